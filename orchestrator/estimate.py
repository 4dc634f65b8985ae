"""What a plan needs before it runs: GPU memory per actor, and GPU-hours per stage.

Contract: pure functions of the typed config and workers/assets/rates.csv (no Ray, no model).
`check_memory(cfg)` raises ConfigError when a scorer or generator of some model cannot fit the
GPU (cluster.gpu_memory_gb; a scorer holds its model on one GPU, or spreads it layer by layer
over its model.gpus GPUs when one does not hold it; a vLLM generator spreads its weights over
model.tensor_parallel_size GPUs);
`describe_estimate(cfg)` is the dry run's text: each actor's memory need and the GPU-hours of
generation and scoring, naming the measured rate each figure uses and how it was interpolated.
Token counts are the plan's upper bounds (every completion reaches model.max_tokens, every
trajectory is verified), so the hours are upper bounds too.
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.config import ConfigError, ModelConfig, RunConfig, score_args, sweep_models
from workers.rates import RATES_PATH, Rate, read_rates

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Prompt tokens on top of max_tokens: the chat templates and the longest prompts of the five
# evaluation sets stay well under this.
PROMPT_ALLOWANCE = 2048
# CUDA context, cuBLAS workspaces and allocator fragmentation, per GPU.
RUNTIME_GB_PER_GPU = 2.0
# vLLM's default gpu_memory_utilization: the share of each GPU an engine takes for itself.
VLLM_GPU_SHARE = 0.9
GB = 1e9


@dataclass(frozen=True)
class Memory:
    """One actor's need, in GB, against what it reserves."""

    weights: float
    kv: float
    micro_batch: float
    runtime: float
    gpus: int  # reserved per scorer (model.gpus): a model one does not hold spreads over them
    length: int  # tokens of the longest trajectory (max_tokens + PROMPT_ALLOWANCE)

    @property
    def total(self) -> float:
        """Over all its GPUs: weights and keys/values once, a micro-batch and the runtime on
        each GPU (a spread model decodes a micro-batch on every device in turn)."""
        return self.weights + self.kv + (self.micro_batch + self.runtime) * self.gpus


def scorer_memory(model: ModelConfig, cfg: RunConfig) -> Memory | None:
    """A scorer's need: its weights in the scoring dtype, the standard pass's keys and values
    of every layer at the longest trajectory, one micro-batch (scoring.memory_budget_mb).
    None when the model YAML does not give params_b and kv_width."""
    if model.params_b is None or model.kv_width is None:
        return None
    size = BYTES[score_args(cfg.scoring, model)["dtype"]]
    length = model.max_tokens + PROMPT_ALLOWANCE
    gpus = model.gpus if cfg.cluster.use_gpus else 1
    return Memory(
        weights=model.params_b * 1e9 * size / GB,
        kv=model.num_layers * model.kv_width * length * size / GB,
        micro_batch=cfg.scoring.memory_budget_mb * 2**20 / GB,
        runtime=RUNTIME_GB_PER_GPU,
        gpus=gpus,
        length=length,
    )


def check_memory(cfg: RunConfig) -> None:
    """ConfigError naming the first model whose scorer or generator cannot fit its GPUs.
    Checked only for GPU runs with cluster.gpu_memory_gb set."""
    per_gpu = cfg.cluster.gpu_memory_gb
    if not cfg.cluster.use_gpus or per_gpu is None:
        return
    for model in sweep_models(cfg):
        need = scorer_memory(model, cfg)
        if need is not None and need.total > per_gpu * need.gpus:
            hint = (
                "scoring.dtype=bfloat16 (or unset: the model's own)"
                if score_args(cfg.scoring, model)["dtype"] == "float32"
                else "more GPUs per scorer (model.gpus), lower model.max_tokens or"
                " scoring.memory_budget_mb, or larger GPUs"
            )
            raise ConfigError(
                f"model {model.name}: a scorer needs {need.total:.1f} GB ({describe_memory(need)})"
                f" and has model.gpus={need.gpus} GPU(s) of cluster.gpu_memory_gb={per_gpu:g};"
                f" use {hint}"
            )
        if cfg.generation.backend == "vllm" and model.params_b is not None:
            weights = model.params_b * 1e9 * BYTES.get(model.dtype, 2) / GB
            room = model.tensor_parallel_size * per_gpu * VLLM_GPU_SHARE
            if weights >= room:
                raise ConfigError(
                    f"model {model.name}: a vLLM generator's weights ({weights:.1f} GB) do not fit"
                    f" {VLLM_GPU_SHARE:.0%} of model.tensor_parallel_size="
                    f"{model.tensor_parallel_size} x {per_gpu:g} GB; raise tensor_parallel_size"
                )


def describe_memory(m: Memory) -> str:
    per_gpu = f" on each of {m.gpus} GPUs" if m.gpus > 1 else ""
    return (
        f"weights {m.weights:.1f} + K/V {m.kv:.1f} at {m.length:,} tokens"
        f" + micro-batch {m.micro_batch:.1f} + runtime {m.runtime:.1f}{per_gpu}"
    )


# ----------------------------------------------------------------------------- GPU-hours


@dataclass(frozen=True)
class Lookup:
    """A rate for one (stage, model, layer, length) and how it was obtained."""

    tokens_per_s: float
    how: str  # e.g. "H200 early, interpolated from 2,048 and 16,384 tokens"
    alternatives: int | None  # J of the measurement


def scoring_rate(
    rates: list[Rate], model: str, position: str, length: int, gpu: str | None
) -> Lookup | None:
    """tokens/s of one scorer of `model` at `position` for trajectories of `length` tokens.

    Prefers rows of `gpu`, then of any GPU; of `position`, then "early" (the slowest position:
    every later layer is decoded per route, so the estimate errs high). The seconds per token
    grow linearly with length (each decode step attends over every earlier key), so between
    two measured lengths the time per token is interpolated linearly, beyond them extrapolated
    from the two nearest; a single measured length is used as is.
    """
    rows = [r for r in rates if r.stage == "scoring" and r.model == model and r.tokens]
    if gpu and any(r.gpu == gpu for r in rows):
        rows = [r for r in rows if r.gpu == gpu]
    elif rows:
        rows = [r for r in rows if r.gpu == rows[0].gpu]
    if not rows:
        return None
    where = f"{rows[0].gpu} {position}"
    if not any(r.layer == position for r in rows):
        position, where = "early", f"{rows[0].gpu} early's rate (no {position} row)"
    by_len = sorted({r.tokens: r.tokens_per_s for r in rows if r.layer == position}.items())
    if not by_len:
        return None
    if len(by_len) == 1:
        n, rate = by_len[0]
        return Lookup(
            rate, f"{where} at {n:,} tokens, the one length measured", rows[0].alternatives
        )
    # the two nearest measured lengths (the lowest two or highest two when outside)
    pairs = list(zip(by_len, by_len[1:], strict=False))
    (n0, r0), (n1, r1) = next(
        (p for p in pairs if p[0][0] <= length <= p[1][0]),
        pairs[0] if length < by_len[0][0] else pairs[-1],
    )
    s0, s1 = 1 / r0, 1 / r1
    seconds = s0 + (s1 - s0) * (length - n0) / (n1 - n0)
    verb = "interpolated" if n0 <= length <= n1 else "extrapolated"
    floor = min(s0, s1)  # never faster than the fastest measurement when extrapolating down
    how = f"{where}, {verb} from {n0:,} and {n1:,} tokens"
    return Lookup(1 / max(seconds, floor), how, rows[0].alternatives)


def generation_rate(rates: list[Rate], model: str, gpu: str | None) -> tuple[Rate, str] | None:
    """A generator replica's tokens/s: the model's own row, else the table's "*" row."""
    rows = [r for r in rates if r.stage == "generation" and r.model in (model, "*")]
    rows.sort(key=lambda r: (r.model != model, r.gpu != gpu))
    return (rows[0], f"{rows[0].gpu}, {rows[0].model} row") if rows else None


def describe_estimate(cfg: RunConfig, cells: list, layers_of: dict[str, dict[str, int]]) -> str:
    """The dry run's memory and GPU-hours section. `cells` are plan.CellEstimate values."""
    rates = read_rates()
    gpu = cfg.cluster.gpu_type
    per_gpu = cfg.cluster.gpu_memory_gb
    lines = ["", "memory per actor (GB)"]
    for model in sweep_models(cfg):
        need = scorer_memory(model, cfg)
        if need is None:
            lines.append(f"  {model.name:<16} scorer: unknown (model.params_b / kv_width not set)")
            continue
        verdict = (
            "GPU memory not checked"
            if not per_gpu
            else (
                f"fits {need.gpus} x {per_gpu:g}"
                if need.total <= per_gpu * need.gpus
                else f"DOES NOT FIT {need.gpus} x {per_gpu:g}"
            )
        )
        lines.append(
            f"  {model.name:<16} scorer {need.total:6.1f} = {describe_memory(need)}; {verdict}"
        )
    if not per_gpu:
        lines.append("  (cluster.gpu_memory_gb not set: set it to check the plan against the GPUs)")

    lines += [
        "",
        f"GPU-hours, upper bounds: tokens / (tokens/s per replica) x GPUs per replica. Rates from"
        f" {RATES_PATH.relative_to(RATES_PATH.parents[2])}, rows of cluster.gpu_type="
        f"{gpu or 'unset'} where the table has them, else of the GPU named; scoring time per"
        " token taken as linear in trajectory length (model.max_tokens here)",
    ]
    gen_total = score_total = 0.0
    notes: list[str] = []
    for model in sweep_models(cfg):
        mine = [c for c in cells if c.cell.model.name == model.name]
        tokens = sum(c.max_completion_tokens for c in mine)
        found = generation_rate(rates, model.name, gpu)
        if found is None:
            lines.append(f"  {model.name:<16} generation: no rate in the table")
        else:
            rate, how = found
            hours = tokens / rate.tokens_per_s / 3600 * model.tensor_parallel_size
            gen_total += hours
            lines.append(
                f"  {model.name:<16} generation    {hours:8,.1f} h  {tokens:>12,} tokens at"
                f" {rate.tokens_per_s:6,.0f}/s x {model.tensor_parallel_size} GPU ({how})"
            )
            if rate.source not in notes:
                notes.append(rate.source)
        for position in layers_of[model.name]:
            lk = scoring_rate(rates, model.name, position, model.max_tokens, gpu)
            if lk is None:
                lines.append(f"  {model.name:<16} scoring {position}: no rate in the table")
                continue
            gpus = model.gpus if cfg.cluster.use_gpus else 1
            rate, how, J = lk.tokens_per_s, lk.how, cfg.scoring.alternatives
            if lk.alternatives and lk.alternatives != J:
                # the work per token is the J + 1 routes decoded through the later layers
                rate *= (lk.alternatives + 1) / (J + 1)
                how += f"; scaled from J={lk.alternatives} to J={J}"
            hours = tokens / rate / 3600 * gpus
            score_total += hours
            lines.append(
                f"  {model.name:<16} scoring {position:<6}{hours:8,.1f} h  {tokens:>12,} tokens at"
                f" {rate:6,.0f}/s x {gpus} GPU ({how})"
            )
    lines.append(
        f"  total: generation {gen_total:,.1f} h + scoring {score_total:,.1f} h"
        f" = {gen_total + score_total:,.1f} GPU-hours"
    )
    lines += [f"  generation rate: {s}" for s in notes]
    return "\n".join(lines)
