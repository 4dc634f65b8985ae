"""Counterfactual Expert Impact by virtual ablation, exact (docs/method.md, "Counterfactual
Expert Impact").

Contract: `cei_table(scorer, trajectories, layer, gating=...)` returns one CEI_SCHEMA row per
completion token (positions prompt_len-1 .. len-2, target ids[t+1]; every one: the scorer's
position budget does not apply here), rows in input order, positions ascending. With u(R) = p(target | prefix, route R at (t, L)) and S the standard route:
- `cei_out[i]` = log u(S) - log u(S without S[i]) for each expert of S (in S's order): the
  route of k-1 experts. Its gate weights (`gating`): "family" applies the family's own rule to
  the k-1 set (renormalised exactly where the family renormalises: Qwen3-MoE with
  norm_topk_prob, GPT-OSS's softmax over the chosen); "keep" leaves the other experts the
  weights they have in S (the removed expert's term is taken out of the sum, nothing else).
- `cei_in[j]` = log u(S with its weakest expert replaced by in_experts[j]) - log u(S) for
  every pool expert not in S (the pool: the P experts with the highest router logits,
  workers.scoring.routes; `in_experts` in descending logit order). The weakest expert of S is
  its expert with the lowest router logit; the new set takes the family's gate weights.
- `std_prob` = u(S); `std_entropy` = the entropy (nats) of the standard pass's next-token
  distribution at t, the model's uncertainty before the target is seen.
Every route list is deterministic (no sampling). The intervention is the scorer's: only
position t at layer L changes, later layers route normally (workers.scoring.scorer: one
standard pass, layer L's MoE output recomputed per route, later layers as batched decode
steps). A route of k-1 experts travels as S with a zero weight on the removed expert: the
model adds that expert's output times 0, which changes nothing, bitwise.
Cost: k + (P - |S in pool|) decoded routes per token, about P + 1 (as J + 1 for the scorer).

CLI: `python -m workers.scoring.cei MODEL TRAJECTORIES.arrow OUT.arrow --layer final`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from workers.schemas import CEI_SCHEMA
from workers.scoring import kv

GATINGS = ("family", "keep")
# positions per LM-head call for the entropy: 256 x a 152k vocabulary in float32 is 155 MB
ENTROPY_ROWS = 256


def ablation_weights(adapter, z: torch.Tensor, std: torch.Tensor, gating: str) -> torch.Tensor:
    """Gate weights (N, k, k) of the k routes "S without S[i]", each written over S's k slots
    with a zero in slot i: z (N, E) router logits, std (N, k) the standard route."""
    if gating not in GATINGS:
        raise ValueError(f"unknown gating {gating!r}; valid: {', '.join(GATINGS)}")
    n, k = std.shape
    out = torch.zeros(n, k, k, dtype=torch.float32, device=z.device)
    full = adapter.route_weights(z, std)
    for i in range(k):
        rest = [j for j in range(k) if j != i]
        w = full[:, rest] if gating == "keep" else adapter.route_weights(z, std[:, rest])
        out[:, i, rest] = w.float()
    return out


def swap_routes(z: torch.Tensor, std: torch.Tensor, pool: int):
    """The pool's experts (N, P) in descending logit order, which of them are not in S (N, P)
    bool, and the routes (N, P, k) "S with its weakest expert replaced by pool[j]"."""
    cand = torch.topk(z, pool, dim=-1).indices
    fresh = ~(cand[:, :, None] == std[:, None, :]).any(-1)
    weakest = z.gather(-1, std).argmin(dim=-1)  # (N,) slot of S with the lowest logit
    swapped = std[:, None, :].repeat(1, pool, 1)
    slot = weakest[:, None, None].expand(-1, pool, 1)
    swapped.scatter_(-1, slot, cand[:, :, None])
    return cand, fresh, swapped


def standard_entropy(model, final: torch.Tensor, rows: int = ENTROPY_ROWS) -> torch.Tensor:
    """Entropy (nats, float32) of the next-token distribution from final hidden states (T, H),
    `rows` positions at a time: a full vocabulary of logits per position is large."""
    out = []
    for a in range(0, final.shape[0], rows):
        logp = torch.log_softmax(model.lm_head(final[a : a + rows]).float(), dim=-1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out)


def cei_sequence(scorer, ids: list[int], prompt_len: int, layer: int, gating: str) -> dict:
    """CEI of one trajectory's completion tokens. Run inside kv.attention_switched."""
    ad = scorer.adapter
    first = prompt_len - 1
    later = [i for i in range(layer + 1, len(ad.layers))]
    base = getattr(scorer.model, "model", scorer.model)
    # 1. the standard pass (keys/values after L, layer L's inputs) and the final hidden states
    seen, store = scorer.standard_state(ids, prompt_len, layer, keep={"final": base.norm})
    z, x, resid = seen["z"], seen["x"], seen["resid"]
    device = x.device
    positions = torch.arange(first, len(ids) - 1, device=device)
    targets = torch.tensor(ids[prompt_len:], device=device)
    std = (seen["std"] if "std" in seen else ad.standard_route(z)).long().to(device)
    entropy = standard_entropy(scorer.model, seen["final"])
    # 2. the deterministic routes: S, the k ablations, the pool's swaps (new experts only)
    n, k = std.shape
    w_out = ablation_weights(ad, z, std, gating)
    cand, fresh, swapped = swap_routes(z, std, scorer.pool)
    tok = torch.arange(n, device=device)
    fresh_tok = tok[:, None].expand_as(fresh)[fresh]
    token = torch.cat([tok, tok.repeat_interleave(k), fresh_tok])
    route = torch.cat([std, std.repeat_interleave(k, dim=0), swapped[fresh]])
    weights = torch.cat(
        [
            ad.route_weights(z, std).float(),
            w_out.flatten(0, 1),
            ad.route_weights(z[fresh_tok], swapped[fresh]).float(),
        ]
    )
    order = torch.argsort(token, stable=True)  # decode steps take pairs sorted by position
    # 3. decode every (t, route) through the layers after L
    out = scorer._decode_routes(
        layer,
        later,
        store,
        z,
        x,
        resid,
        positions,
        targets,
        token[order],
        route[order],
        weights[order],
    )
    lp = torch.empty_like(out)
    lp[order] = out
    lp = lp.double().cpu()
    std_lp = lp[:n]
    cei_out = std_lp[:, None] - lp[n : n + n * k].view(n, k)
    cei_in = lp[n + n * k :] - std_lp[fresh_tok.cpu()]
    counts = fresh.sum(-1).cpu()
    return {
        "position": positions.cpu().numpy().astype(np.int32),
        "target_id": targets.cpu().numpy().astype(np.int32),
        "std_route": std.cpu().numpy().astype(np.int32),
        "std_prob": std_lp.exp().numpy().astype(np.float32),
        "std_entropy": entropy.cpu().numpy().astype(np.float32),
        "cei_out": cei_out.numpy().astype(np.float32),
        "in_experts": cand[fresh].cpu().numpy().astype(np.int32),
        "cei_in": cei_in.numpy().astype(np.float32),
        "in_offsets": np.concatenate([[0], np.cumsum(counts.numpy())]).astype(np.int32),
    }


def cei_table(
    scorer, trajectories: pa.Table, layer: int | str, *, gating: str = "family"
) -> pa.Table:
    """CEI_SCHEMA rows for every completion token of every trajectory, in input order."""
    layer = scorer.resolve_layer(layer)
    if gating not in GATINGS:
        raise ValueError(f"unknown gating {gating!r}; valid: {', '.join(GATINGS)}")
    rows = scorer.validate(trajectories)
    tables = []
    with kv.attention_switched(scorer.model), torch.inference_mode():
        for row in rows:
            c = cei_sequence(scorer, row["input_ids"], row["prompt_len"], layer, gating)
            tables.append(_to_table(row, layer, c, scorer.model_name))
    return pa.concat_tables(tables)


def _to_table(row: dict[str, Any], layer: int, c: dict[str, np.ndarray], name: str) -> pa.Table:
    n = len(c["position"])
    k = c["std_route"].shape[1]
    fixed = pa.array(np.arange(n + 1, dtype=np.int32) * k)
    offsets = pa.array(c["in_offsets"])
    cols = {
        "problem_id": pa.array([row["problem_id"]] * n, pa.string()),
        "sample_idx": pa.array(np.full(n, row["sample_idx"], np.int32)),
        "position": pa.array(c["position"]),
        "target_id": pa.array(c["target_id"]),
        "std_route": pa.ListArray.from_arrays(fixed, pa.array(c["std_route"].reshape(-1))),
        "std_prob": pa.array(c["std_prob"]),
        "std_entropy": pa.array(c["std_entropy"]),
        "cei_out": pa.ListArray.from_arrays(fixed, pa.array(c["cei_out"].reshape(-1))),
        "in_experts": pa.ListArray.from_arrays(offsets, pa.array(c["in_experts"])),
        "cei_in": pa.ListArray.from_arrays(offsets, pa.array(c["cei_in"])),
        "model": pa.array([row.get("model") or name] * n, pa.string()),
        "layer": pa.array(np.full(n, layer, np.int32)),
        "dataset": pa.array([row.get("dataset") or "unknown"] * n, pa.string()),
    }
    return pa.Table.from_arrays([cols[f.name] for f in CEI_SCHEMA], schema=CEI_SCHEMA)


def cei_file(
    scorer,
    in_path: str | Path,
    layer: int | str,
    out_path: str | Path,
    *,
    gating: str,
    config_hash: str,
    extra: dict[str, Any] | None = None,
    root: str | Path | None = None,
    compression: str | None = None,
) -> dict[str, Any]:
    """CEI of a trajectories Arrow file into `out_path` (+ sidecar); return the sidecar.
    Nothing is written unless it succeeds; `extra` is added to the sidecar, `root` is the run
    folder and `compression` the IPC compression (workers.io.write_arrow; None: its default)."""
    from dataclasses import asdict

    from workers.io import write_arrow
    from workers.trajectories import read_trajectories

    started = time.time()
    in_path = Path(in_path)
    if not in_path.is_file():
        raise FileNotFoundError(f"trajectories file {in_path} does not exist")
    table = read_trajectories(in_path)
    layer = scorer.resolve_layer(layer)
    rows = cei_table(scorer, table, layer, gating=gating)
    extra = {
        "layer": layer,
        "model": scorer.model_name,
        "input": str(in_path),
        "tokens": rows.num_rows,
        "gating": gating,
        "pool": scorer.pool,
        "score_config": asdict(scorer.config),
        **(extra or {}),
    }
    return write_arrow(
        rows,
        out_path,
        config_hash=config_hash,
        started=started,
        extra=extra,
        root=root,
        **({} if compression is None else {"compression": compression}),
    )


def main(argv: list[str] | None = None) -> int:
    from workers.scoring.scorer import ScoreConfig, Scorer

    parser = argparse.ArgumentParser(
        prog="python -m workers.scoring.cei", description=__doc__.split("\n")[0]
    )
    parser.add_argument("model", help="model folder (a transformers checkpoint)")
    parser.add_argument("trajectories", help="trajectories Arrow file (TRAJECTORIES_SCHEMA)")
    parser.add_argument("out", help="output Arrow file (CEI_SCHEMA)")
    parser.add_argument("--layer", default="final", help="MoE layer: index, early, middle or final")
    parser.add_argument("--gating", default="family", choices=GATINGS)
    parser.add_argument("--pool", type=int, default=32)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        config = ScoreConfig(pool=args.pool, dtype=args.dtype, device=args.device)
        if not Path(args.model).is_dir():
            raise ValueError(f"model folder {args.model} does not exist")
        if not Path(args.trajectories).is_file():
            raise ValueError(f"trajectories file {args.trajectories} does not exist")
        scorer = Scorer(args.model, config)
        layer = args.layer if not args.layer.lstrip("-").isdigit() else int(args.layer)
        side = cei_file(
            scorer, args.trajectories, layer, args.out, gating=args.gating, config_hash="cli"
        )
    except (ValueError, pa.ArrowInvalid) as err:
        print(f"error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    print(f"{side['tokens']} tokens -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
