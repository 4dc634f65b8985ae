"""Counterfactual route scoring, exact and fast (docs/method.md, "The intervention and the utility").

Contract: `Scorer(model_path, ScoreConfig(...))` loads the model once; `score_table(trajectories,
layer)` returns one row per completion token (positions prompt_len-1 .. len-2, target
ids[t+1]; workers.schemas.scores_schema of the model: routes as fixed-size lists of small
ids), rows in input order, positions ascending. For each token: the standard route S (the
router's own choice, in the router's order), J alternatives (workers.scoring.routes, in the
order picked), u(R) = p(target | prefix, route R at (t, L)) for each, and s(R). Under a position
budget (ScoreConfig.positions other than "all") only the positions `select_positions` keeps get
a row, plus a `completion_tokens` column (workers.schemas.COMPLETION_TOKENS).

How, per sequence (one at a time, so results never depend on what else is in the shard):
1. one standard forward pass (workers.scoring.kv.standard_pass) keeps the keys/values of every layer
   after L and, by forward hooks, the residual entering layer L's MoE block, the block's
   normalised input x and the router logits z (and the router's chosen experts);
2. routes are drawn (workers.scoring.routes) and deduplicated as sets per token: a set that occurs
   twice (e.g. an alternative equal to S) is computed once, so equal sets get equal u, bitwise;
3. per micro-batch of (t, R) pairs, sorted by t: layer L's MoE output for R (each (token,
   expert) pair run once by the model's own experts module, then recombined with R's gate
   weights, workers.adapters), added to the residual; then the layers after L run as
   single-token decode steps (the model's own layer modules; attention over the stored keys of
   positions < t plus the query's own); final norm, LM head, log-softmax, log p(target), the
   argmax token and KL(p_S || p_R) (each token's S is decoded first and its log-softmax kept,
   docs/method.md "Beyond the realized token").
Micro-batches are sized so their activations fit `memory_budget_mb`. Cost: about (J+1)
single-token passes through the layers after L per token, instead of T x (J+1) full passes.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from workers.adapters import MoeAdapter, adapter_for
from workers.models import devices_of
from workers.schemas import COMPLETION_TOKENS, MOE_GEOMETRY, scores_schema
from workers.scoring import kv, routes
from workers.scoring.attention import BLOCK_SIZE
from workers.scoring.score_config import (  # declared there: the driver reads it without torch
    ALL_POSITIONS,
    ScoreConfig,
    parse_positions,
)

REQUIRED_COLUMNS = ("problem_id", "sample_idx", "input_ids", "prompt_len")
# On a CPU a decode step's activations fall out of cache beyond ~1k pairs: on the tiny benchmark
# 4096 pairs per step ran 2x slower than 1024. GPUs take whatever the memory budget allows.
CPU_MAX_PAIRS = 1024
# Kept free on each GPU of a spread model besides one micro-batch: the CUDA context and its
# layers' share of the standard pass's keys/values (Qwen3-30B-A3B: 3.4 GB at 34k tokens in all).
SPREAD_RESERVE_BYTES = 4 * 2**30
# Compiled decode steps kept per process: one per scorer, layer L and key bucket (up to 8).
COMPILE_LIMIT = 64


def load_model(model_path: str | Path, config: ScoreConfig) -> nn.Module:
    """workers.models.load_causal_lm in config.dtype on config.device; a "cuda" device spreads
    a model that one visible GPU cannot hold over the others, keeping each one's share of the
    keys/values and one micro-batch free."""
    from workers.models import load_causal_lm

    return load_causal_lm(
        model_path,
        dtype=config.torch_dtype,
        device=config.device,
        reserve_bytes=config.memory_budget_mb * 2**20 + SPREAD_RESERVE_BYTES,
    )


def flex_refusal(model: nn.Module, config: ScoreConfig) -> str | None:
    """Why `config` may not score `model` (None: it may). On CUDA the compiled FlexAttention
    kernel disagreed with eager attention on GPT-OSS-20B's shape (sliding windows and sinks):
    one (t, R) pair in 2,700 off by 0.11 in float32 log-probability on an H200 (torch 2.11).
    What runs around the kernel is exact on a CPU, also as a block-sparse kernel reads it
    (tests/test_attention.py: only the listed key blocks, mask_mod on partial ones only, padded
    ragged query blocks, windows at block edges, rows that see no key, sinks): the block lists,
    the LSE merge of the query's own key and the sink. That run compiled the kernel with dynamic
    shapes (after the first new length) over ragged query and key blocks; decoding now gives it
    static, block-aligned shapes (key buckets, micro-batches of whole blocks), which no GPU has
    run yet. Until `test_cuda_flex_attend_gpt_oss_shape` passes on one, flex on CUDA is for
    models without windows or sinks."""
    if config.attention != "flex" or not config.device.startswith("cuda"):
        return None
    for module in model.modules():
        window = getattr(module, "sliding_window", None)
        sinks = getattr(module, "sinks", None)
        if (isinstance(window, int) and window > 0) or isinstance(sinks, torch.Tensor):
            return (
                "ScoreConfig: attention=flex on CUDA is not exact yet for models with sliding"
                " windows or attention sinks (GPT-OSS); use attention=eager"
            )
    return None


def position_uniform(seed: int, problem_id: str, sample_idx: int, position: int) -> float:
    """u(t) in [0, 1): a uniform draw that depends on exactly (seed, problem_id, sample_idx,
    position), from the sha256 of those values (hashed apart from routes.token_seed's)."""
    key = json.dumps(["positions", int(seed), str(problem_id), int(sample_idx), int(position)])
    digest = hashlib.sha256(key.encode()).digest()
    return (int.from_bytes(digest[:8], "little") >> 11) / 2**53


def select_positions(
    budget: str, seed: int, problem_id: str, sample_idx: int, first: int, n_tokens: int
) -> np.ndarray:
    """Indices (ascending, into the completion's n_tokens positions first, first + 1, ...) of
    the positions a `positions` budget scores: every one for "all"; for a fraction f those
    with u(t) < f; for a count n the n with the smallest u(t) (all when there are fewer).
    Whether t is kept depends only on (seed, problem_id, sample_idx, t) and the budget (and,
    for a count, the trajectory's own length): never on the shard, the batch or the layer,
    so every layer scores the same positions and a budgeted row is the full run's row."""
    limit = parse_positions(budget)
    if limit is None:
        return np.arange(n_tokens)
    u = np.array(
        [position_uniform(seed, problem_id, sample_idx, first + i) for i in range(n_tokens)]
    )
    if isinstance(limit, float):
        return np.flatnonzero(u < limit)
    return np.sort(np.argsort(u, kind="stable")[:limit])


class Scorer:
    """A model loaded once, scoring trajectory tables at any of its MoE layers.

    `model` (tests, benchmarks) skips loading; it is moved to config.device/dtype unless it
    spans several devices (a spread model, as load_model makes: kept where it is).
    `micro_batch` fixes the number of (t, R) pairs per decode step (else from the budget);
    `key_floor` is the smallest key bucket of static-shape decoding (kv.key_bucket).
    """

    def __init__(
        self,
        model_path: str | Path,
        config: ScoreConfig,
        *,
        model: nn.Module | None = None,
        micro_batch: int | None = None,
        key_floor: int | None = None,
    ):
        self.model_path = Path(model_path)
        self.config = config
        if model is None:
            model = load_model(model_path, config)
        self.devices = devices_of(model)
        if len(self.devices) > 1:  # spread by load_model (accelerate's hooks move the inputs)
            if config.compile:
                raise ValueError(
                    "ScoreConfig: compile needs the model on one device; this one spans"
                    f" {', '.join(map(str, self.devices))}"
                )
            self.model = model.eval()
        else:
            if model.dtype != config.torch_dtype:  # else keep GPT-OSS's float32 norms as loaded
                model = model.to(dtype=config.torch_dtype)
            self.model = model.to(device=config.device).eval()
            self.devices = devices_of(self.model)
        self.adapter: MoeAdapter = adapter_for(self.model)
        self.moe_layers = list(self.adapter.moe_layers)
        self.pool = routes.pool_size(
            config.pool, self.adapter.n_experts, self.adapter.top_k, config.sampler
        )
        self.micro_batch = micro_batch
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        self.model_name = self.model_path.name or str(model_path)
        # Counters since construction: scored tokens, (t, R) pairs, distinct pairs decoded.
        self.stats = {"tokens": 0, "pairs": 0, "distinct_pairs": 0}
        self._compiled: Callable | None = None
        self.key_floor = key_floor or kv.KEY_BUCKET_FLOOR.get(self.devices[0].type, 1024)
        self._cuda = self.devices[0].type == "cuda"
        refusal = flex_refusal(self.model, config)
        if refusal:
            raise ValueError(refusal)

    def resolve_layer(self, spec: int | str) -> int:
        """An MoE layer index from an index or "early" | "middle" | "final"."""
        return self.adapter.resolve_layer(spec)

    def score_table(
        self,
        trajectories: pa.Table,
        layer: int | str,
        *,
        progress: Callable[[int], Any] | None = None,
        draws: pa.Table | None = None,
    ) -> pa.Table:
        """Score rows (scores_schema) for every completion token of every trajectory, in input
        order. `draws` (scores of the same tokens, e.g. under the original router) gives each
        token's alternative routes instead of drawing them: the same alternatives scored again."""
        layer = self.resolve_layer(layer)
        rows = self.validate(trajectories)
        given = given_draws(draws) if draws is not None else None
        tables = []
        with kv.attention_switched(self.model), torch.inference_mode():
            for row in rows:
                scores = self.score_sequence(
                    row["input_ids"],
                    row["prompt_len"],
                    layer,
                    row["problem_id"],
                    row["sample_idx"],
                    given=given,
                )
                tables.append(self._to_table(row, layer, scores))
                if progress is not None:
                    progress(len(scores["position"]))
        return pa.concat_tables(tables)

    def validate(self, table: pa.Table) -> list[dict[str, Any]]:
        """The rows to score, or one ValueError saying what is wrong with the input."""
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(
                f"trajectories lack column(s) {', '.join(missing)}; required: {', '.join(REQUIRED_COLUMNS)}"
            )
        if table.num_rows == 0:
            raise ValueError("trajectories table is empty: nothing to score")
        extra = [c for c in ("model", "dataset", "verified") if c in table.column_names]
        rows = table.select([*REQUIRED_COLUMNS, *extra]).to_pylist()
        for i, row in enumerate(rows):
            ids, p = row["input_ids"], row["prompt_len"]
            name = f"row {i} ({row['problem_id']}, sample {row['sample_idx']})"
            if ids is None or p is None or row["problem_id"] is None or row["sample_idx"] is None:
                raise ValueError(
                    f"{name}: problem_id, sample_idx, input_ids and prompt_len must not be null"
                )
            if not 1 <= p < len(ids):
                raise ValueError(
                    f"{name}: prompt_len {p} must be in [1, len(input_ids) - 1] = [1, {len(ids) - 1}]"
                )
            bad = [x for x in ids if not 0 <= x < self.vocab_size]
            if bad:
                raise ValueError(
                    f"{name}: token id {bad[0]} is outside the model's vocabulary [0, {self.vocab_size})"
                )
        return rows

    # -- one sequence ------------------------------------------------------------------------------

    def score_sequence(
        self,
        ids: list[int],
        prompt_len: int,
        layer: int,
        problem_id: str,
        sample_idx: int,
        given: dict[tuple[str, int, int], list] | None = None,
    ) -> dict[str, np.ndarray]:
        """Scores of one trajectory's completion tokens. Run inside kv.attention_switched."""
        cfg, ad = self.config, self.adapter
        first, n_tokens = prompt_len - 1, len(ids) - prompt_len
        later = [i for i in range(layer + 1, len(ad.layers))]
        # 1. the standard pass, with layer L's block input, residual and router output kept
        seen, store = self.standard_state(ids, prompt_len, layer)
        z, x, resid = seen["z"], seen["x"], seen["resid"]
        # layer L's device: where its routes are decoded (later layers move them on if the
        # model is spread over several devices)
        device = x.device
        positions = torch.arange(first, len(ids) - 1, device=device)
        targets = torch.tensor(ids[prompt_len:], device=device)
        std = seen["std"] if "std" in seen else ad.standard_route(z)

        # 2. the scored positions (the position budget; every one by default), then routes:
        # S then J alternatives per token; each distinct set computed once. `token` indexes
        # the whole completion, so the decode below sees what a full run would.
        keep = select_positions(cfg.positions, cfg.seed, problem_id, sample_idx, first, n_tokens)
        n_kept = len(keep)
        seeds = [
            routes.token_seed(cfg.seed, problem_id, sample_idx, first + int(i), layer) for i in keep
        ]
        keep_t = torch.from_numpy(keep)
        z_cpu = z.cpu()[keep_t]
        std = std.cpu()[keep_t]
        alts = routes.sample_routes(
            z_cpu,
            seeds,
            k=ad.top_k,
            alternatives=cfg.alternatives,
            pool=self.pool,
            temperature=cfg.temperature,
            sampler=cfg.sampler,
        )
        if given is not None:
            alts = given_routes(given, problem_id, sample_idx, positions.cpu()[keep_t], alts)
        all_routes = torch.cat([std.long()[:, None], alts], dim=1)  # (N, J+1, k)
        router_lp = routes.router_logprob(z_cpu, all_routes)
        token = keep_t[:, None, None].expand(-1, all_routes.shape[1], 1)
        sets = torch.cat([token, all_routes.sort(dim=-1).values], dim=-1).flatten(0, 1)
        uniq, inverse = np.unique(sets.numpy(), axis=0, return_inverse=True)  # sorted by token
        inverse = torch.from_numpy(inverse.reshape(-1))
        uniq = torch.from_numpy(uniq).to(device)
        self.stats["tokens"] += n_kept
        self.stats["pairs"] += sets.shape[0]
        self.stats["distinct_pairs"] += uniq.shape[0]

        # 3. decode every distinct (t, R) through the layers after L: each token's S first, so
        # that its next-token distribution is at hand for the KL of the token's other routes
        inverse = inverse.view(n_kept, all_routes.shape[1])
        decoded = self._decode_pairs(
            layer, later, store, z, x, resid, positions, targets, uniq, inverse[:, 0]
        )
        logp, argmax, kl, *geometry = (v.cpu()[inverse] for v in decoded)
        probs = logp.exp()
        geo = zip(MOE_GEOMETRY, geometry, strict=False)  # none without config.moe_geometry
        extra = {f.name: v[:, 1:].numpy() for f, v in geo}
        return extra | {
            "position": positions.cpu()[keep_t].numpy().astype(np.int32),
            "target_id": targets.cpu()[keep_t].numpy().astype(np.int32),
            "std_route": all_routes[:, 0].numpy().astype(np.int32),
            "alt_routes": all_routes[:, 1:].numpy().astype(np.int32),
            "std_prob": probs[:, 0].numpy().astype(np.float32),
            "alt_probs": probs[:, 1:].numpy().astype(np.float32),
            "std_route_logprob": router_lp[:, 0].numpy().astype(np.float32),
            "alt_route_logprobs": router_lp[:, 1:].numpy().astype(np.float32),
            "std_argmax": argmax[:, 0].numpy().astype(np.int32),
            "alt_kl": kl[:, 1:].numpy().astype(np.float32),
            "alt_argmax_changed": (argmax[:, 1:] != argmax[:, :1]).numpy(),
        }

    def standard_state(
        self, ids: list[int], prompt_len: int, layer: int, keep: dict[str, nn.Module] | None = None
    ) -> tuple[dict[str, torch.Tensor], kv.KVStore]:
        """The standard pass over one sequence: the keys/values of the layers after `layer`, and
        for the completion's positions (prompt_len - 1 ..) the residual entering layer L's MoE
        block ("resid"), its normalised input ("x"), the router logits ("z", float32) and, where
        the router reports them, its chosen experts ("std"); `keep` names further modules whose
        outputs at those positions are kept under their names. Run inside kv.attention_switched."""
        ad, first = self.adapter, prompt_len - 1
        later = [i for i in range(layer + 1, len(ad.layers))]
        seen: dict[str, torch.Tensor] = {}

        def keep_norm(module, args, output):
            seen["resid"], seen["x"] = args[0].flatten(0, -2)[first:], output.flatten(0, -2)[first:]

        def keep_router(module, args, output):
            z, chosen = ad.parse_router_output(output)
            seen["z"] = z.flatten(0, -2)[first:].float()
            if chosen is not None:
                seen["std"] = chosen.flatten(0, -2)[first:]

        def keeper(name):
            def hook(module, args, output):
                seen[name] = output.flatten(0, -2)[first:]

            return hook

        hooks = [
            ad.moe_norm(layer).register_forward_hook(keep_norm),
            ad.router(layer).register_forward_hook(keep_router),
            *(m.register_forward_hook(keeper(n)) for n, m in (keep or {}).items()),
        ]
        try:
            input_ids = torch.tensor(ids[:-1], device=self.devices[0])[None]
            store = kv.standard_pass(
                self.model,
                input_ids,
                later,
                self._budget_bytes(),
                self.config.attention,
                capacity=self._key_length(len(ids) - 1),
            )
        finally:
            for h in hooks:
                h.remove()
        return seen, store

    def _decode_routes(
        self, layer, later, store, z, x, resid, positions, targets, token, route_sets, weights=None
    ):
        """log p(target) for each (token, route set): token (M,), route_sets (M, k) -> (M,).
        Pairs sorted by position. `weights` (M, k): gate weights to use instead of the family's
        rule on the set (a zero weight drops that expert's term exactly)."""
        out = torch.empty(token.shape[0], dtype=torch.float32, device=token.device)
        pairs = torch.cat([token[:, None], route_sets], dim=1)
        for part, lp in self._decode_batches(
            layer, later, store, z, x, resid, positions, pairs, weights
        ):
            out[part] = lp.gather(1, targets[token[part]][:, None])[:, 0]
        return out

    def _decode_pairs(self, layer, later, store, z, x, resid, positions, targets, uniq, std_rows):
        """For each distinct (token, route set) row of `uniq` (M, 1 + k), sorted by token, with
        std_rows the row of each token's S (ascending): log p(target), the argmax token and
        KL(p_S || p_R) over the vocabulary (0 for S itself), each (M,); with
        `config.moe_geometry` also the cosine and norm ratio of each row's layer-L MoE output
        against its token's S row (1 for S itself), each (M,). Tokens go in groups
        whose S distributions (group x vocab, float32) fit a quarter of the memory budget: a
        group's S rows are decoded first and their log-softmax kept, then its other rows."""
        m, device = uniq.shape[0], uniq.device
        logp = torch.empty(m, dtype=torch.float32, device=device)
        argmax = torch.empty(m, dtype=torch.long, device=device)
        kl = torch.zeros(m, dtype=torch.float32, device=device)
        geometry = self.config.moe_geometry
        cos, ratio = torch.ones(m, device=device), torch.ones(m, device=device)
        ref_moe: torch.Tensor | None = None
        tokens = uniq[:, 0].cpu().numpy()
        std_rows = std_rows.numpy()
        is_std = np.zeros(m, dtype=bool)
        is_std[std_rows] = True
        group = max(1, self._budget_bytes() // 4 // (4 * self.vocab_size))
        for g in range(0, len(std_rows), group):
            rows_s = std_rows[g : g + group]
            ref = torch.empty(len(rows_s), self.vocab_size, dtype=torch.float32, device=device)
            chosen = torch.from_numpy(rows_s).to(device)
            if geometry:
                ref_moe = torch.empty(len(rows_s), x.shape[-1], dtype=torch.float32, device=device)
            for part, lp in self._decode_batches(
                layer, later, store, z, x, resid, positions, uniq[chosen], moe=ref_moe
            ):
                ref[part] = lp
                logp[chosen[part]] = lp.gather(1, targets[uniq[chosen[part], 0]][:, None])[:, 0]
                argmax[chosen[part]] = lp.argmax(dim=-1)
            lo = np.searchsorted(tokens, tokens[rows_s[0]], side="left")
            hi = np.searchsorted(tokens, tokens[rows_s[-1]], side="right")
            rows_o = lo + np.flatnonzero(~is_std[lo:hi])
            local = torch.from_numpy(np.searchsorted(tokens[rows_s], tokens[rows_o])).to(device)
            other = torch.from_numpy(rows_o).to(device)
            moe_o = None
            if geometry:
                moe_o = torch.empty(len(rows_o), x.shape[-1], dtype=torch.float32, device=device)
            for part, lp in self._decode_batches(
                layer, later, store, z, x, resid, positions, uniq[other], moe=moe_o
            ):
                logp[other[part]] = lp.gather(1, targets[uniq[other[part], 0]][:, None])[:, 0]
                argmax[other[part]] = lp.argmax(dim=-1)
                p_s = ref[local[part]]
                # float rounding can leave a tiny negative sum for near-equal distributions
                kl[other[part]] = (p_s.exp() * (p_s - lp)).sum(dim=-1).clamp(min=0)
            if geometry and len(rows_o):
                out_s = ref_moe[local]
                cos[other] = torch.nn.functional.cosine_similarity(moe_o, out_s, dim=-1, eps=0)
                ratio[other] = moe_o.norm(dim=-1) / out_s.norm(dim=-1)
        return (logp, argmax, kl, cos, ratio) if geometry else (logp, argmax, kl)

    def _decode_batches(
        self, layer, later, store, z, x, resid, positions, pairs, weights=None, moe=None
    ):
        """Yield (slice of rows, log-softmax over the vocabulary (rows, V), float32) per
        micro-batch for the (token, route set) rows `pairs` (M, 1 + k), sorted by token;
        `weights` (M, k): gate weights instead of the family's rule on each set; `moe` (M, H):
        filled with each row's layer-L MoE block output (float32) where given."""
        ad, cfg = self.adapter, self.config
        n = pairs.shape[0]
        if n == 0:  # a position budget that keeps none of this trajectory's tokens
            return
        token, route_sets = pairs[:, 0], pairs[:, 1:]
        shared = ad.shared_output(layer, x)
        if weights is None:
            weights = ad.route_weights(z[token], route_sets)
        step = self._compiled_step(tuple(later)) if cfg.compile else self._step
        for a, stop, n_keys, batch in self._plan(positions[token]):
            rows: slice | torch.Tensor = slice(a, stop)
            if n_keys and stop - a < batch:  # pad with copies of the last pair: one shape
                rows = torch.arange(a, a + batch, device=token.device).clamp(max=stop - 1)
            tok = token[rows]
            out = ad.moe_output(layer, x, tok, route_sets[rows], weights[rows], shared)
            if moe is not None:
                moe[a:stop] = out[: stop - a].float()
            hidden = resid[tok] + out
            pos = positions[tok]
            # stored keys up to the last one any query sees (one device sync), or the bucket's
            seen = n_keys or max(1, int(pos.max()))  # >= 1: no kernel sees an empty sequence
            keys = tuple(store.keys[i][:, :seen] for i in later)
            values = tuple(store.values[i][:, :seen] for i in later)
            masks = {} if cfg.attention == "flex" else None  # flex block masks of this step
            logp = step(hidden, pos, tuple(later), keys, values, masks)
            yield slice(a, stop), logp[: stop - a].to(token.device)

    def _plan(self, pair_positions: torch.Tensor) -> list[tuple[int, int, int | None, int]]:
        """Micro-batches (start, stop, key length, size) over pairs sorted by position. Static
        shapes: a micro-batch holds pairs of one key bucket (the keys it needs, padded: query
        t needs t keys) and is padded to that bucket's size, so steps of one bucket have one
        shape whatever the sequence; else key length None and the size from the budget."""
        n = pair_positions.shape[0]
        last = int(pair_positions[-1]) + 1
        if not self._key_length(last):
            batch = self.micro_batch or self._micro_batch(last)
            return [(a, min(a + batch, n), None, batch) for a in range(0, n, batch)]
        pos = pair_positions.tolist()  # one device sync per sequence
        plan, a = [], 0
        while a < n:
            n_keys = self._key_length(max(1, pos[a]))
            batch = self.micro_batch or self._micro_batch(n_keys)
            stop = min(a + batch, bisect.bisect_right(pos, n_keys, lo=a))
            plan.append((a, stop, n_keys, batch))
            a = stop
        return plan

    def _step(self, hidden, positions, later, keys, values, masks):
        """One decode step: the log-softmax over the vocabulary (B, V), float32, of B
        single-token queries after the layers `later`;
        hidden (B, H) entering the first of them; keys/values: those layers' stored keys."""
        model = self.model
        base = getattr(model, "model", model)
        rope = kv.rotary(model, hidden, positions)
        fused = masks is not None
        for i, k, v in zip(later, keys, values, strict=True):
            layer = self.adapter.layers[i]
            hidden = kv.decode_layer(layer, hidden, positions, rope, k, v, fused=fused, masks=masks)
        return torch.log_softmax(model.lm_head(base.norm(hidden)).float(), dim=-1)

    def _compiled_step(self, later: tuple[int, ...]):
        """`_step` through torch.compile with static shapes: the micro-batch is padded to one
        size and the keys to the sequence's bucket (`_key_length`), so a step compiles once per
        layer L and key bucket; eager attention is traced into the graph (kv.attention_in_graph),
        flex runs between graphs. Without CUDA graphs: each later layer's graph is the same code
        run again, and CUDA graph trees then overwrite the outputs that later layers still read
        (the rotary embeddings; seen on an H200, torch 2.11)."""
        if self._compiled is None:
            # compiled code is cached per code object: every scorer, layer L and bucket of the
            # process shares _step's (dynamo's default limit, 8, is 3 layers of 3 buckets)
            limit = torch._dynamo.config.recompile_limit
            torch._dynamo.config.recompile_limit = max(limit, COMPILE_LIMIT)
            self._compiled = torch.compile(self._step, dynamic=False)
        return self._compiled

    def _key_length(self, n_tokens: int) -> int | None:
        """Stored keys per sequence of n_tokens: its bucket where shapes must be static
        (compiled steps, the compiled flex kernel); None: exactly what each step needs."""
        if not (self.config.compile or (self.config.attention == "flex" and self._cuda)):
            return None
        limit = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        return kv.key_bucket(n_tokens, limit, self.key_floor)

    def _budget_bytes(self) -> int:
        return self.config.memory_budget_mb * 2**20

    def _micro_batch(self, n_keys: int) -> int:
        """(t, R) pairs per decode step so that one step's activations fit the budget."""
        c = self.model.config
        hidden, vocab = c.hidden_size, self.vocab_size
        heads = c.num_attention_heads
        inter = max(
            int(getattr(c, name, 0) or 0) for name in ("intermediate_size", "moe_intermediate_size")
        )
        # the eager path's attention logits, exp, weights (float32) + a low-precision copy;
        # the fused path keeps no per-key state
        logits = 4 * heads * n_keys if self.config.attention == "eager" else 0
        per_pair = 4 * (
            logits
            + 6 * vocab  # logits, float copy, logsumexp; S's row, its exp and the KL terms
            + 32 * hidden  # residual stream, norms, attention and block outputs
            + 6
            * self.adapter.top_k
            * (inter + hidden)  # routed experts: layer L's pairs, later layers
        )
        batch = max(1, self._budget_bytes() // per_pair)
        if self._key_length(n_keys) and batch >= BLOCK_SIZE:  # whole query blocks, no ragged one
            batch -= batch % BLOCK_SIZE
        return min(batch, CPU_MAX_PAIRS) if self.config.device == "cpu" else batch

    def _to_table(self, row: dict[str, Any], layer: int, s: dict[str, np.ndarray]) -> pa.Table:
        n = len(s["position"])
        model = row.get("model") or self.model_name
        dataset = row.get("dataset") or "unknown"
        k, j = s["std_route"].shape[1], s["alt_routes"].shape[1]
        schema = scores_schema(self.adapter.n_experts, k, j)
        ids = schema.field("std_route").type.value_type.to_pandas_dtype()
        cols = {
            "problem_id": pa.array([row["problem_id"]] * n, pa.string()),
            "sample_idx": pa.array(np.full(n, row["sample_idx"], np.int32)),
            "position": pa.array(s["position"]),
            "target_id": pa.array(s["target_id"]),
            "std_route": _fixed(s["std_route"].astype(ids)),
            "std_prob": pa.array(s["std_prob"]),
            "alt_routes": _fixed(s["alt_routes"].astype(ids)),
            "alt_probs": _lists(s["alt_probs"]),
            "std_route_logprob": pa.array(s["std_route_logprob"]),
            "alt_route_logprobs": _lists(s["alt_route_logprobs"]),
            "model": _constant(model, n),
            "layer": pa.array(np.full(n, layer, np.int32)),
            "dataset": _constant(dataset, n),
            "std_argmax": pa.array(s["std_argmax"]),
            "alt_kl": _lists(s["alt_kl"]),
            "alt_argmax_changed": _lists(s["alt_argmax_changed"]),
            "verified": pa.array([row.get("verified")] * n, pa.bool_()),
        }
        table = pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)
        if self.config.positions != ALL_POSITIONS:
            total = len(row["input_ids"]) - row["prompt_len"]
            table = table.append_column(COMPLETION_TOKENS, pa.array(np.full(n, total, np.int32)))
        if self.config.moe_geometry:
            for f in MOE_GEOMETRY:
                table = table.append_column(f, _lists(s[f.name].astype(np.float32)))
        return table


def given_draws(draws: pa.Table) -> dict[tuple[str, int, int], list]:
    """{(problem_id, sample_idx, position): alt_routes} of a scores table."""
    cols = draws.select(["problem_id", "sample_idx", "position", "alt_routes"]).to_pydict()
    keys = zip(cols["problem_id"], cols["sample_idx"], cols["position"], strict=True)
    return dict(zip(keys, cols["alt_routes"], strict=True))


def given_routes(given: dict, problem_id: str, sample_idx: int, positions, drawn) -> torch.Tensor:
    """The given alternatives of these positions, shaped like the `drawn` ones (N, J, k)."""
    out = []
    for p in positions.tolist():
        routes = given.get((problem_id, sample_idx, p))
        if routes is None:
            raise ValueError(f"no given draws for ({problem_id!r}, {sample_idx}, position {p})")
        out.append(routes)
    given_t = torch.tensor(out, dtype=drawn.dtype).reshape(len(out), *drawn.shape[1:])
    if given_t.shape != drawn.shape:
        raise ValueError(
            f"given draws have shape {tuple(given_t.shape)}, expected {tuple(drawn.shape)}"
        )
    return given_t


def score_file(
    scorer: Scorer,
    in_path: str | Path,
    layer: int | str,
    out_path: str | Path,
    *,
    config_hash: str,
    require_complete: bool = False,
    progress: Callable[[int], Any] | None = None,
    extra: dict[str, Any] | None = None,
    root: str | Path | None = None,
    compression: str | None = None,
    draws: str | Path | None = None,
) -> dict[str, Any]:
    """Score a trajectories Arrow file into `out_path` (+ sidecar); return the sidecar.
    `compression`: workers.io.write_arrow's (None: its default). `draws`: a complete scores
    file whose alternatives are scored again (Scorer.score_table).

    The input is read with workers.trajectories.read_trajectories (a shard's references
    resolved; its sidecar is required only with `require_complete`); nothing is written unless scoring succeeds. `extra` is added to
    the sidecar; `root` is the run folder (workers.io.write_arrow).
    """
    from workers.io import read_arrow, write_arrow
    from workers.trajectories import read_trajectories

    started = time.time()
    in_path = Path(in_path)
    if not in_path.is_file():
        raise FileNotFoundError(f"trajectories file {in_path} does not exist")
    try:
        table = read_trajectories(in_path, require_complete=require_complete)
    except pa.ArrowInvalid as err:
        raise ValueError(f"{in_path} is not a readable Arrow IPC file: {err}") from err
    layer = scorer.resolve_layer(layer)
    given = read_arrow(draws, require_complete=True) if draws is not None else None
    scores = scorer.score_table(table, layer, progress=progress, draws=given)
    extra = {
        "layer": layer,
        "model": scorer.model_name,
        "input": str(in_path),
        "tokens": scores.num_rows,
        "score_config": asdict(scorer.config),
        **(extra or {}),
    }
    packing = {} if compression is None else {"compression": compression}
    return write_arrow(
        scores,
        out_path,
        config_hash=config_hash,
        started=started,
        extra=extra,
        root=root,
        **packing,
    )


def _lists(values: np.ndarray) -> pa.Array:
    """A numpy array (N, ..., m) as nested Arrow lists, one level per trailing axis."""
    flat = pa.array(values.reshape(-1))
    for size in reversed(values.shape[1:]):
        count = len(flat) // size
        flat = pa.ListArray.from_arrays(pa.array(np.arange(count + 1, dtype=np.int32) * size), flat)
    return flat


def _fixed(values: np.ndarray) -> pa.Array:
    """A numpy array (N, ..., m) as nested fixed-size Arrow lists (no offsets), zero-copy."""
    flat = pa.array(values.reshape(-1))
    for size in reversed(values.shape[1:]):
        flat = pa.FixedSizeListArray.from_arrays(flat, size)
    return flat


def _constant(value: str, n: int) -> pa.DictionaryArray:
    """`value` n times, dictionary-encoded: one string and n small indices."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([value]))
