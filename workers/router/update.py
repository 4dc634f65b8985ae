"""Router-only update of one MoE layer from the counterfactual scores (preference pairs -> router).

Contract, three steps, each over files:
1. `select_tokens(scores, cfg)`: from one layer's SCORES_SCHEMA rows, the preference tokens
   (Fragile, pbar < cfg.fragile, whose best alternative R* beats the standard route S by more
   than cfg.margin in u: winner R*, loser S) and a deterministic sample of at most
   cfg.max_anchor_tokens Confident tokens (pbar >= cfg.confident; winner = loser = S) whose
   routes the update must keep. Problems whose hash falls in cfg.holdout_share are left out
   entirely (`is_holdout`): their tokens are the held-out set of the mechanism check.
   `add_router_inputs(model, table, trajectories, layer)` adds the router input x at each
   selected token, from one standard forward pass per trajectory -> PREFERENCES_SCHEMA.
2. `train_router(weight, bias, prefs, rule, cfg)`: trains only the router's weight (and bias,
   GPT-OSS) on those rows. With z = x W^T + b and s(R) = sum_{e in R} log_softmax(z)_e (the
   scorer's route score), the loss is the DPO loss on (R*, S) relative to the original router,
       -log sigmoid(beta * [(s(R*) - s0(R*)) - (s(S) - s0(S))]),
   averaged over preference tokens, plus anchor_weight x the mean KL(p0 || p) between the
   original and the new expert distributions softmax(z) on the anchor tokens. Full-batch Adam
   for cfg.steps steps in float32 on the CPU: deterministic (the anchor sample is the only
   randomness, seeded). The family's own selection rule decides which R* can be chosen at
   all (DeepSeek-V2 group-limited: R* must span at most topk_group groups; other pairs are
   dropped and counted) and what "the router now picks R*" means in the training summary.
3. `write_checkpoint(src, dst, tensors, readme)`: a copy of the model directory in which only
   the named tensors are replaced (cast to their stored dtype), written to a temporary
   directory and renamed into place.
Nothing here knows about Ray, configs or run directories.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from workers.adapters import MoeAdapter
from workers.atomic import atomic_file, atomic_write, ensure_folder
from workers.router.update_config import UpdateConfig  # declared without torch, for the driver

# One row per selected token. kind: "prefer" (fragile, winner R* beats loser S by > margin) or
# "anchor" (confident; winner = loser = S). x: the router input at the token (float32).
PREFERENCES_SCHEMA = pa.schema(
    [
        ("problem_id", pa.string()),
        ("sample_idx", pa.int32()),
        ("dataset", pa.string()),
        ("position", pa.int32()),
        ("kind", pa.string()),
        ("winner", pa.list_(pa.int32())),
        ("loser", pa.list_(pa.int32())),
        ("u_winner", pa.float32()),
        ("u_loser", pa.float32()),
        ("pbar", pa.float32()),
        ("x", pa.list_(pa.float32())),
    ]
)
# One row per training step.
TRAIN_LOG_SCHEMA = pa.schema(
    [
        ("step", pa.int32()),
        ("loss", pa.float64()),
        ("pref_loss", pa.float64()),
        ("anchor_loss", pa.float64()),
        ("pref_accuracy", pa.float64()),  # share of pairs with s(R*) > s(S) under the new router
    ]
)


# ------------------------------------------------------------------------------ 1. the tokens


def is_holdout(problem_id: str, share: float, seed: int) -> bool:
    """True for a fixed `share` of problems (by sha256 of seed and id): never trained on."""
    digest = hashlib.sha256(f"router-holdout:{seed}:{problem_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def _token_key(seed: int, problem_id: str, sample_idx: int, position: int) -> int:
    blob = f"router-anchor:{seed}:{problem_id}:{sample_idx}:{position}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def _matrix(column: pa.ChunkedArray | pa.Array, *shape: int) -> np.ndarray:
    """A fixed-width list column as an (rows, *shape) numpy array."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = arr.flatten()
    while pa.types.is_list(values.type) or pa.types.is_fixed_size_list(values.type):
        values = values.flatten()
    return values.to_numpy(zero_copy_only=False).reshape(len(arr), *shape)


def token_pbar(std_prob: np.ndarray, alt_probs: np.ndarray) -> np.ndarray:
    """pbar as the analysis bins it: the mean over S and the alternatives in float64, then
    rounded to float32 (compare with float32 thresholds)."""
    u = np.concatenate([std_prob[:, None].astype(np.float64), alt_probs.astype(np.float64)], 1)
    return u.mean(axis=1).astype(np.float32)


def select_tokens(scores: pa.Table, cfg: UpdateConfig) -> pa.Table:
    """PREFERENCES_SCHEMA rows without x (x empty), preference tokens then anchors, each in
    input order; problems held out by `is_holdout` are skipped."""
    n = scores.num_rows
    if n == 0:
        return _preferences_table([])
    k = len(scores.column("std_route")[0])
    j = len(scores.column("alt_probs")[0])
    std_u = scores.column("std_prob").to_numpy().astype(np.float32)
    alt_u = _matrix(scores.column("alt_probs"), j).astype(np.float32)
    std_r = _matrix(scores.column("std_route"), k)
    alt_r = _matrix(scores.column("alt_routes"), j, k)
    pbar = token_pbar(std_u, alt_u)
    best = alt_u.argmax(axis=1)
    best_u = alt_u[np.arange(n), best]
    ids = scores.column("problem_id").to_pylist()
    samples = scores.column("sample_idx").to_pylist()
    positions = scores.column("position").to_pylist()
    datasets = scores.column("dataset").to_pylist()
    held = {p: is_holdout(p, cfg.holdout_share, cfg.seed) for p in set(ids)}
    keep = np.array([not held[p] for p in ids], dtype=bool)
    prefer = keep & (pbar < np.float32(cfg.fragile)) & (best_u - std_u > cfg.margin)
    anchor = np.flatnonzero(keep & (pbar >= np.float32(cfg.confident)))
    if anchor.size > cfg.max_anchor_tokens:
        keys = [_token_key(cfg.seed, ids[i], samples[i], positions[i]) for i in anchor]
        anchor = np.sort(anchor[np.argsort(keys, kind="stable")[: cfg.max_anchor_tokens]])
    rows = []
    for i in np.flatnonzero(prefer):
        rows.append((i, "prefer", alt_r[i, best[i]], std_r[i], best_u[i], std_u[i]))
    for i in anchor:
        rows.append((i, "anchor", std_r[i], std_r[i], std_u[i], std_u[i]))
    return _preferences_table(
        [
            {
                "problem_id": ids[i],
                "sample_idx": samples[i],
                "dataset": datasets[i],
                "position": positions[i],
                "kind": kind,
                "winner": [int(e) for e in win],
                "loser": [int(e) for e in lose],
                "u_winner": float(uw),
                "u_loser": float(ul),
                "pbar": float(pbar[i]),
                "x": [],
            }
            for i, kind, win, lose, uw, ul in rows
        ]
    )


CONTROLS = ("random", "shuffled")  # control targets of the update (`control_targets`)


def control_targets(prefs: pa.Table, scores: pa.Table, control: str, seed: int) -> pa.Table:
    """`prefs` with the preference tokens' winners replaced by a control's (anchors and
    every other column kept, so the token count and the anchor loss are the real update's):
    "random", an alternative drawn uniformly from that token's J draws in `scores` (seeded
    per token, so a winner does not depend on which other tokens were selected); "shuffled",
    the real winners permuted among the preference tokens by a seeded permutation."""
    if control not in CONTROLS:
        raise ValueError(f"unknown control {control!r}; valid: {', '.join(CONTROLS)}")
    rows = prefs.to_pylist()
    prefer = [i for i, r in enumerate(rows) if r["kind"] == "prefer"]
    if control == "shuffled":
        order = np.random.default_rng(seed).permutation(len(prefer))
        picked = [(rows[prefer[j]]["winner"], rows[prefer[j]]["u_winner"]) for j in order]
    else:
        keys = ["dataset", "problem_id", "sample_idx", "position"]
        alts = {
            tuple(r[k] for k in keys): (r["alt_routes"], r["alt_probs"])
            for r in scores.select([*keys, "alt_routes", "alt_probs"]).to_pylist()
        }
        picked = []
        for i in prefer:
            key = tuple(rows[i][k] for k in keys)
            if key not in alts:
                raise ValueError(f"preference token {key} is not in the scores")
            routes, probs = alts[key]
            blob = f"router-random:{seed}:{key[1]}:{key[2]}:{key[3]}".encode()
            j = int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") % len(routes)
            picked.append((routes[j], probs[j]))
    for i, (winner, u) in zip(prefer, picked, strict=True):
        rows[i] = {**rows[i], "winner": list(winner), "u_winner": float(u)}
    return pa.Table.from_pylist(rows, schema=PREFERENCES_SCHEMA)


def _preferences_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PREFERENCES_SCHEMA)


def add_router_inputs(
    model: nn.Module, adapter: MoeAdapter, tokens: pa.Table, trajectories: pa.Table, layer: int
) -> pa.Table:
    """`tokens` with x filled in: the input of layer `layer`'s router at each token, from one
    standard forward pass per trajectory that has selected tokens (a forward pre-hook on the
    router; the pass runs the model as it is, no route is changed)."""
    if tokens.num_rows == 0:
        return tokens
    device = next(model.parameters()).device
    ids_by_key = {
        (r["problem_id"], r["sample_idx"]): r["input_ids"]
        for r in trajectories.select(["problem_id", "sample_idx", "input_ids"]).to_pylist()
    }
    keys = list(
        zip(
            tokens.column("problem_id").to_pylist(),
            tokens.column("sample_idx").to_pylist(),
            strict=True,
        )
    )
    positions = tokens.column("position").to_pylist()
    wanted: dict[tuple[str, int], list[int]] = {}
    for row, key in enumerate(keys):
        wanted.setdefault(key, []).append(row)
    missing = [k for k in wanted if k not in ids_by_key]
    if missing:
        raise ValueError(f"scores name trajectories that are not in the input: {missing[:3]}")
    seen: dict[str, torch.Tensor] = {}

    def keep_input(module, args):
        seen["x"] = args[0].reshape(-1, args[0].shape[-1])

    out: list[Any] = [None] * tokens.num_rows
    hook = adapter.router(layer).register_forward_pre_hook(keep_input)
    try:
        with torch.inference_mode():
            for key, rows in wanted.items():
                ids = ids_by_key[key]
                model(input_ids=torch.tensor(ids[:-1], device=device)[None], use_cache=False)
                x = seen.pop("x").float().cpu().numpy()
                for row in rows:
                    out[row] = x[positions[row]]
    finally:
        hook.remove()
    x_col = pa.array([v.tolist() for v in out], type=pa.list_(pa.float32()))
    return tokens.set_column(tokens.schema.get_field_index("x"), "x", x_col)


# ------------------------------------------------------------------------------ 2. the update


def router_parameters(model: nn.Module, adapter: MoeAdapter, layer: int) -> dict[str, nn.Parameter]:
    """The router parameters of `layer` by their full names (checkpoint keys), e.g.
    model.layers.3.mlp.gate.weight; GPT-OSS adds ...mlp.router.bias."""
    router = adapter.router(layer)
    prefix = next(name for name, module in model.named_modules() if module is router)
    return {f"{prefix}.{name}": p for name, p in router.named_parameters()}


def selectable(adapter: MoeAdapter, routes: torch.Tensor) -> torch.Tensor:
    """Whether the family's selection rule can pick each route (N, k) at all: DeepSeek-V2's
    group-limited rule only picks experts from its topk_group best groups."""
    router = adapter.router(adapter.moe_layers[0])
    if adapter.family != "deepseek_v2" or router.topk_method != "group_limited_greedy":
        return torch.ones(routes.shape[0], dtype=torch.bool)
    groups = routes // (adapter.n_experts // router.num_group)
    hit = torch.zeros(routes.shape[0], router.num_group, dtype=torch.bool)
    hit.scatter_(1, groups, True)
    return hit.sum(dim=1) <= router.topk_group


def route_score(z: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
    """s(R) = sum over e in R of log_softmax(z)_e: z (N, E), routes (N, k) -> (N,)."""
    return torch.log_softmax(z, dim=-1).gather(-1, routes).sum(dim=-1)


def same_set(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise: do routes a and b (N, k) hold the same experts?"""
    return (a.sort(dim=-1).values == b.sort(dim=-1).values).all(dim=-1)


def _tensors(prefs: pa.Table, hidden: int) -> dict[str, torch.Tensor]:
    k = len(prefs.column("winner")[0]) if prefs.num_rows else 1
    return {
        "x": torch.from_numpy(_matrix(prefs.column("x"), hidden).astype(np.float32)),
        "winner": torch.from_numpy(_matrix(prefs.column("winner"), k).astype(np.int64)),
        "loser": torch.from_numpy(_matrix(prefs.column("loser"), k).astype(np.int64)),
        "prefer": torch.tensor([kind == "prefer" for kind in prefs.column("kind").to_pylist()]),
    }


def train_router(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    prefs: pa.Table,
    adapter: MoeAdapter,
    cfg: UpdateConfig,
) -> tuple[torch.Tensor, torch.Tensor | None, pa.Table, dict[str, Any]]:
    """(new weight, new bias, TRAIN_LOG_SCHEMA table, summary) of the router update.

    Only rows whose winner the family can select are trained on (`dropped_unselectable`
    counts the rest). The summary holds the pair counts and, under the old and new router
    with the family's own top-k rule, the share of preference tokens routed to R* and of
    anchor tokens whose route changed.
    """
    if prefs.num_rows == 0:
        raise ValueError("no preference or anchor tokens to train on (scores too few?)")
    torch.manual_seed(cfg.seed)
    w0 = weight.detach().float().cpu()
    b0 = bias.detach().float().cpu() if bias is not None else None
    t = _tensors(prefs, w0.shape[1])
    ok = selectable(adapter, t["winner"]) | ~t["prefer"]
    x, win, lose, prefer = t["x"][ok], t["winner"][ok], t["loser"][ok], t["prefer"][ok]
    anchor = ~prefer

    def logits(w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        z = x @ w.T
        return z + b if b is not None else z

    with torch.no_grad():
        z0 = logits(w0, b0)
        ref = route_score(z0[prefer], win[prefer]) - route_score(z0[prefer], lose[prefer])
        logp0 = torch.log_softmax(z0[anchor], dim=-1)
    w = w0.clone().requires_grad_(True)
    b = b0.clone().requires_grad_(True) if b0 is not None else None
    params = [w] + ([b] if b is not None else [])
    opt = torch.optim.Adam(params, lr=cfg.lr)
    zero = torch.zeros((), dtype=torch.float32)
    log = []
    for step in range(cfg.steps + 1):
        z = logits(w, b)
        margin = route_score(z[prefer], win[prefer]) - route_score(z[prefer], lose[prefer])
        pref_loss = (
            -torch.nn.functional.logsigmoid(cfg.beta * (margin - ref)).mean()
            if prefer.any()
            else zero
        )
        logp = torch.log_softmax(z[anchor], dim=-1)
        anchor_loss = (logp0.exp() * (logp0 - logp)).sum(dim=-1).mean() if anchor.any() else zero
        loss = pref_loss + cfg.anchor_weight * anchor_loss
        accuracy = (margin > 0).double().mean().item() if prefer.any() else float("nan")
        log.append((step, loss.item(), pref_loss.item(), anchor_loss.item(), accuracy))
        if step == cfg.steps:  # the last row logs the final parameters' loss
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    w1, b1 = w.detach(), (b.detach() if b is not None else None)
    with torch.no_grad():
        old, new = adapter.standard_route(z0), adapter.standard_route(logits(w1, b1))
    summary = {
        "prefer_tokens": int(prefer.sum()),
        "anchor_tokens": int(anchor.sum()),
        "dropped_unselectable": int((~ok).sum()),
        "prefer_routed_to_winner_before": _share(same_set(old, win)[prefer]),
        "prefer_routed_to_winner_after": _share(same_set(new, win)[prefer]),
        "prefer_route_changed": _share(~same_set(old, new)[prefer]),
        "anchor_route_changed": _share(~same_set(old, new)[anchor]),
        "final_loss": log[-1][1],
        "router_parameters": int(sum(p.numel() for p in params)),
    }
    table = pa.Table.from_pylist(
        [dict(zip(TRAIN_LOG_SCHEMA.names, row, strict=True)) for row in log],
        schema=TRAIN_LOG_SCHEMA,
    )
    return w1.to(weight.dtype), (b1.to(bias.dtype) if bias is not None else None), table, summary


def _share(mask: torch.Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else float("nan")


# ------------------------------------------------------------------------------ 3. the checkpoint


def write_checkpoint(
    src: str | Path,
    dst: str | Path,
    tensors: dict[str, torch.Tensor],
    readme: str,
    *,
    root: str | Path | None = None,
) -> Path:
    """Copy the model directory `src` to `dst`, replacing exactly the named safetensors tensors
    (same shape required; cast to the stored dtype), plus a README.md. Atomic: built in a
    private temporary sibling folder (created exclusively, each file through workers.atomic),
    then renamed to `dst`; whatever was at `dst` (an older checkpoint, or a link, which is not
    followed) is moved aside first and removed after; `root` is the run folder, as for
    workers.atomic. Returns `dst`."""
    from safetensors import safe_open
    from safetensors.torch import save

    src, dst = Path(src), Path(dst)
    ensure_folder(dst.parent, root=root)
    inside = root if root is not None else dst.parent  # what each file's folders are checked under
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
    try:
        found: set[str] = set()
        for path in sorted(src.iterdir()):
            if path.is_dir() or path.name == "README.md":
                continue  # subfolders (original/, metal/) are not what transformers loads
            target = tmp / path.name
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    keys, metadata = list(f.keys()), f.metadata()
                    hits = [k for k in keys if k in tensors]
                    if hits:
                        stored = {k: f.get_tensor(k) for k in keys}
                if hits:
                    for key in hits:
                        old = stored[key]
                        new = tensors[key].detach().cpu()
                        if tuple(new.shape) != tuple(old.shape):
                            raise ValueError(
                                f"{key}: new shape {tuple(new.shape)} != stored {tuple(old.shape)}"
                            )
                        stored[key] = new.to(old.dtype).contiguous()
                    # To bytes, not to a path a library would reopen by name; this holds
                    # the file twice in host memory (a hub shard is at most a few GB).
                    atomic_write(target, save(stored, metadata=metadata), root=inside)
                    found.update(hits)
                    continue
            # Reads follow symlinks (Hugging Face cache snapshots); the copy is a regular file.
            with open(path, "rb") as f, atomic_file(target, root=inside) as out:
                shutil.copyfileobj(f, out, 1 << 24)
        missing = sorted(set(tensors) - found)
        if missing:
            raise ValueError(f"tensors not found in {src}/*.safetensors: {missing}")
        atomic_write(tmp / "README.md", readme, root=inside)
        tmp.chmod(stat.S_IMODE(dst.parent.stat().st_mode))  # mkdtemp's 0o700 -> as its folder
        old = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.old")
        with contextlib.suppress(FileNotFoundError):
            os.rename(dst, old)  # a link is moved itself, never followed
        os.replace(tmp, dst)
        if old.is_symlink() or old.is_file():
            old.unlink()
        elif old.is_dir():
            shutil.rmtree(old)
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)
    return dst


def describe_update(
    *, source: str, layer: int, names: list[str], summary: dict[str, Any], cfg: UpdateConfig
) -> str:
    """The README.md of an updated checkpoint: what changed, from what, how."""
    lines = [
        "# Router-updated checkpoint",
        "",
        f"A copy of `{source}` in which only the router of decoder layer {layer} (the final",
        "MoE layer) was trained; every other tensor is bitwise identical to the original.",
        "",
        "Changed tensors:",
        "",
        *[f"- `{n}`" for n in names],
        "",
        f"Trainable parameters: {summary['router_parameters']:,}.",
        "",
        "Objective: a DPO loss on route scores s(R) = sum of the router's log-softmax over the",
        "route's experts, preferring the best sampled alternative route R* over the standard",
        "route S on fragile tokens where R* raised the probability of the verified next token",
        "by more than the margin, relative to the original router; plus a KL term to the",
        "original router's expert distribution on confident tokens.",
        *(
            [
                "",
                f"This is a control ({summary['control']}): the same tokens, anchors, loss and",
                "settings, but each preference token's winner is not its best alternative",
                "(random: one of its draws chosen uniformly; shuffled: another token's best).",
            ]
            if "control" in summary
            else []
        ),
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in vars(cfg).items()],
        "",
        "| training summary | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in summary.items()],
        "",
    ]
    return "\n".join(lines)
