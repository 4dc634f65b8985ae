"""What a plan needs before it runs: GPU memory per actor, GPU-hours per stage, disk.

Contract: pure functions of the typed config and workers/assets/rates.csv (no Ray, no model).
`check_memory(cfg)` raises ConfigError when a scorer or generator of some model cannot fit the
GPU (cluster.gpu_memory_gb; a scorer holds its model on one GPU, or spreads it layer by layer
over its model.gpus GPUs when one does not hold it; a vLLM generator spreads its weights over
model.tensor_parallel_size GPUs);
`describe_estimate(cfg, cells, layers_of)` is the dry run's text: each actor's memory need,
the GPU-hours of generation and scoring and the disk the run's files take (describe_footprint); `describe_router_estimate(cfg, train, evals)` those of
the router update's steps and the run's total. Each line names its rate, the GPU type that rate
was measured on and how it was carried to the plan's length (LENGTH_RULE). Token counts are
upper bounds (every completion reaches model.max_tokens, every trajectory is verified); the
hours are estimates at those counts, not bounds: the rates are measured or extrapolated. A
figure without a rate is "unknown" and the totals count it as such, never as 0.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import pyarrow as pa

from orchestrator.config import (
    ConfigError,
    DatasetConfig,
    ModelConfig,
    RunConfig,
    load_option,
    resolve_layer,
    router_models,
    score_args,
    sweep_models,
)
from workers.io import check_path_name
from workers.rates import RATES_PATH, Rate, read_rates
from workers.schemas import COMPLETION_TOKENS, MOE_GEOMETRY, expert_id_type, scores_schema
from workers.scoring.score_config import parse_positions

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

LENGTH_RULE = (
    "scoring seconds per token are linear in trajectory length n (model.max_tokens here): between"
    " or beyond two measured lengths, the line through the two nearest; from a single measured"
    " length n0, s(n) = s(n0) + k x model.attn_width x ((J+1) x layers after the scored one +"
    " all layers) x (n - n0), the attention over every earlier key that the J+1 decoded routes"
    " and the standard pass add per token of length, with k fitted on the models measured at"
    " several lengths on that GPU; below the shortest measured length, that length's rate."
    " Generation: the table's rate, not scaled by length"
)


@dataclass(frozen=True)
class Lookup:
    """A rate for one (stage, model, layer, length) and how it was obtained."""

    tokens_per_s: float
    how: str  # e.g. "H200 early, interpolated from 2,048 and 16,384 tokens"
    alternatives: int | None  # J of the measurement
    gpu: str = ""  # the GPU type the rate was measured on
    kind: str = "measured"  # measured | interpolated | extrapolated
    path: str = "eager"  # the attention path measured (workers.rates: path)


@functools.cache
def model_shape(name: str) -> ModelConfig | None:
    """conf/model/<name>.yaml, the model a row of the rates table names; None if there is none
    (or the name is no file name: the table's text never becomes a path outside conf/)."""
    try:
        return load_option("model", check_path_name(name, "model"))
    except (ConfigError, ValueError):  # no such option, or one that does not compose
        return None


def attention_work(model: ModelConfig, position: str, alternatives: int | None) -> float | None:
    """Attention multiply-adds per scored token and per token of trajectory length: each of the
    J+1 routes decodes the layers after the scored one, the standard pass runs every layer once,
    and each of those attends over every earlier key (the scorer's eager attention masks a
    sliding window rather than skipping its keys). None without model.attn_width or J."""
    if model.attn_width is None or alternatives is None:
        return None
    try:
        layer = resolve_layer(model, position)
    except ConfigError:
        return None
    return model.attn_width * (
        (alternatives + 1) * (model.num_layers - 1 - layer) + model.num_layers
    )


def length_cost(rates: list[Rate], gpu: str) -> tuple[float, list[str]] | None:
    """k, seconds per attention multiply-add (attention_work) on `gpu`: the mean, over each
    (model, position) measured at two or more lengths there, of its slope of seconds per token
    in length divided by its attention work; and the names of those models. None if no row
    of `gpu` is measured at two lengths (of a model with model.attn_width)."""
    groups: dict[tuple[str, str, int | None], dict[int, float]] = {}
    for r in rates:
        if r.stage == "scoring" and r.gpu == gpu and r.tokens:
            groups.setdefault((r.model, r.layer, r.alternatives), {})[r.tokens] = 1 / r.tokens_per_s
    ks, names = [], []
    for (model, layer, alternatives), seconds in groups.items():
        shape = model_shape(model)
        work = shape and attention_work(shape, layer, alternatives)
        if len(seconds) < 2 or not work:
            continue
        (n0, s0), (n1, s1) = min(seconds.items()), max(seconds.items())
        ks.append((s1 - s0) / (n1 - n0) / work)
        names.append(model)
    return (sum(ks) / len(ks), list(dict.fromkeys(names))) if ks else None


def scoring_rate(
    rates: list[Rate], model: str, position: str, length: int, gpu: str | None
) -> Lookup | None:
    """tokens/s of one scorer of `model` at `position` for trajectories of `length` tokens, with
    the fastest exact attention path: each path whose rows count as exact
    (Rate.counts_as_exact: checked exact, or the eager reference) is looked up on its own rows
    (`path_rate`, its length cost fitted on that path's rows too), and the highest rate wins,
    rates of `gpu` before those of another GPU. `how` names the path. None when no path has one.
    """
    exact = [r for r in rates if r.stage == "scoring" and r.counts_as_exact]
    paths = list(dict.fromkeys(r.path for r in exact if r.model == model and r.tokens))
    found = []
    for path in paths:
        lk = path_rate([r for r in exact if r.path == path], model, position, length, gpu)
        if lk is not None:
            found.append(replace(lk, path=path))
    if not found:
        return None
    best = max(found, key=lambda lk: (lk.gpu == gpu, lk.tokens_per_s))
    of = f", the fastest exact of {', '.join(lk.path for lk in found)}" if len(found) > 1 else ""
    return replace(best, how=f"{best.how}; {best.path} attention{of}")


def path_rate(
    rates: list[Rate], model: str, position: str, length: int, gpu: str | None
) -> Lookup | None:
    """tokens/s of one scorer of `model` at `position` for trajectories of `length` tokens,
    from `rates` (the rows of one attention path).

    Prefers rows of `gpu`, then of any GPU; of `position`, then "early" (the slowest position:
    every later layer is decoded per route, so the estimate errs high). Seconds per token are
    linear in length (LENGTH_RULE): interpolated or extrapolated through the two nearest
    measured lengths; from a single measured length, extrapolated with the attention cost of
    the model's shape (conf/model/<model>.yaml), `length_cost`'s k. None when the table has no
    row of the model, or only one length and no shape or k to extrapolate it with.
    """
    rows = [r for r in rates if r.stage == "scoring" and r.model == model and r.tokens]
    if gpu and any(r.gpu == gpu for r in rows):
        rows = [r for r in rows if r.gpu == gpu]
    elif rows:
        rows = [r for r in rows if r.gpu == rows[0].gpu]
    if not rows:
        return None
    on = rows[0].gpu
    where = f"{on} {position}"
    if not any(r.layer == position for r in rows):
        position, where = "early", f"{on} early's rate (no {position} row, errs high)"
    mine = [r for r in rows if r.layer == position]
    by_len = sorted({r.tokens: r.tokens_per_s for r in mine}.items())
    alternatives = mine[0].alternatives
    n_low, r_low = by_len[0]
    if length <= n_low:
        below = "" if length == n_low else ", the shortest measured (not scaled down)"
        return Lookup(r_low, f"{where} at {n_low:,} tokens{below}", alternatives, on)
    if len(by_len) >= 2:
        # the two nearest measured lengths (the highest two beyond them)
        pairs = list(zip(by_len, by_len[1:], strict=False))
        (n0, r0), (n1, r1) = next((p for p in pairs if p[0][0] <= length <= p[1][0]), pairs[-1])
        s0, s1 = 1 / r0, 1 / r1
        seconds = max(s0 + (s1 - s0) * (length - n0) / (n1 - n0), min(s0, s1))
        kind = "interpolated" if length <= n1 else "extrapolated"
        how = f"{where}, {kind} from {n0:,} and {n1:,} tokens"
        return Lookup(1 / seconds, how, alternatives, on, kind)
    shape = model_shape(model)
    work = shape and attention_work(shape, position, alternatives)
    cost = length_cost(rates, on)
    if not work or cost is None:
        return None
    k, names = cost
    seconds = 1 / r_low + k * work * (length - n_low)
    how = (
        f"{where}, extrapolated from {n_low:,} tokens by attention cost"
        f" (k={k:.3g} s on {on}, fitted on {', '.join(names)})"
    )
    return Lookup(1 / seconds, how, alternatives, on, "extrapolated")


def generation_rate(rates: list[Rate], model: str, gpu: str | None) -> tuple[Rate, str] | None:
    """A generator replica's tokens/s: the model's own row, else the table's "*" row."""
    rows = [r for r in rates if r.stage == "generation" and r.model in (model, "*")]
    rows.sort(key=lambda r: (r.model != model, r.gpu != gpu))
    if not rows:
        return None
    whose = "any model's (*) row" if rows[0].model == "*" else "its own row"
    return rows[0], f"{rows[0].gpu}, {whose}"


@dataclass(frozen=True)
class Part:
    """One line of the GPU-hours: `hours` None is unknown (no rate), unless the part is small."""

    group: str  # the total's term it adds to, e.g. generation | scoring
    model: str
    stage: str
    tokens: int
    hours: float | None
    rate: float | None = None  # tokens/s per replica
    gpus: int = 1
    gpu: str = ""  # the GPU type the rate was measured on
    how: str = ""
    source: str = ""
    small: bool = False

    @property
    def tenths(self) -> int:
        """The hours as printed, in tenths: totals add these, so they add up as printed."""
        return 0 if self.hours is None else round(self.hours * 10)


def generation_part(
    rates: list[Rate], model: ModelConfig, tokens: int, gpu: str | None, group: str, stage: str
) -> Part:
    found = generation_rate(rates, model.name, gpu)
    if found is None:
        return Part(group, model.name, stage, tokens, None, how="no generation rate in the table")
    rate, how = found
    tp = model.tensor_parallel_size
    hours = tokens / rate.tokens_per_s / 3600 * tp
    src = f"generation rate: {rate.source}"
    return Part(group, model.name, stage, tokens, hours, rate.tokens_per_s, tp, rate.gpu, how, src)


def scoring_part(
    rates: list[Rate],
    cfg: RunConfig,
    model: ModelConfig,
    position: str,
    tokens: int,
    group: str,
    stage: str,
    *,
    standard_pass: bool = False,
) -> Part:
    """Scoring `tokens` at `position`; with `standard_pass`, one plain forward pass over them,
    taken as 1/(J+1) of the first layer's scoring time (which decodes J+1 routes through
    nearly every layer: bench_score measured eager scoring there at 0.92-0.94 x (J+1) standard
    passes)."""
    gpu = cfg.cluster.gpu_type
    lk = scoring_rate(
        rates, model.name, "early" if standard_pass else position, model.max_tokens, gpu
    )
    if lk is None or (standard_pass and lk.alternatives is None):
        rows = [r for r in rates if r.stage == "scoring" and r.model == model.name and r.tokens]
        why = (
            "no scoring rate of this model in the table"
            if not rows
            else "one length measured, and no model.attn_width or no model measured at several"
            " lengths on its GPU to extrapolate it with"
        )
        return Part(group, model.name, stage, tokens, None, how=why)
    gpus = model.gpus if cfg.cluster.use_gpus else 1
    rate, how, J = lk.tokens_per_s, lk.how, cfg.scoring.alternatives
    if standard_pass:
        rate *= lk.alternatives + 1
        how = f"1/(J+1) of first-layer scoring: {how}"
    elif lk.alternatives and lk.alternatives != J:
        # the work per token is the J + 1 routes decoded through the later layers
        rate *= (lk.alternatives + 1) / (J + 1)
        how += f"; scaled from J={lk.alternatives} to J={J}"
    hours = tokens / rate / 3600 * gpus
    return Part(group, model.name, stage, tokens, hours, rate, gpus, lk.gpu, how)


def positions_share(cfg: RunConfig, model: ModelConfig) -> float:
    """The share of a trajectory's completion tokens that scoring.positions scores, at the
    estimate's length (model.max_tokens): the fraction, or count / max_tokens."""
    limit = parse_positions(cfg.scoring.positions)
    if limit is None:
        return 1.0
    return limit if isinstance(limit, float) else min(1.0, limit / model.max_tokens)


def budgeted_part(
    rates: list[Rate], cfg: RunConfig, model: ModelConfig, position: str, tokens: int
) -> Part:
    """Scoring `tokens` at `position` under the position budget: a share f of the positions
    at the full cost per scored token, plus the standard pass, which still runs over every
    token (scoring_part's standard_pass; left out, and said so, where it has no rate)."""
    stage = f"scoring {position}"
    full = scoring_part(rates, cfg, model, position, tokens, "scoring", stage)
    share = positions_share(cfg, model)
    if share == 1.0 or full.hours is None:
        return full
    rest = scoring_part(rates, cfg, model, position, tokens, "scoring", stage, standard_pass=True)
    hours = share * full.hours + (0.0 if rest.hours is None else (1 - share) * rest.hours)
    how = f"{full.how}; {share:.3g} of positions" + (
        ", the standard pass over the rest" if rest.hours is not None else ", no standard pass"
    )
    scored = round(tokens * share)
    rate = scored / hours / 3600 * full.gpus if hours > 0 else full.rate  # per scored token
    return replace(full, tokens=scored, hours=hours, rate=rate, how=how)


def render_parts(parts: list[Part]) -> list[str]:
    lines = []
    for p in parts:
        head = f"  {p.model:<16} {p.stage:<22}"
        if p.small:
            lines.append(f"{head} {'small':>9}    {p.how}")
        elif p.hours is None:
            lines.append(f"{head} {'unknown':>9}    {p.tokens:>13,} tokens: {p.how}")
        elif p.rate is None:  # made by other units
            lines.append(f"{head} {p.tenths / 10:9,.1f} h  {p.tokens:>13,} tokens: {p.how}")
        else:
            lines.append(
                f"{head} {p.tenths / 10:9,.1f} h  {p.tokens:>13,} tokens at {p.rate:6,.0f}/s"
                f" x {p.gpus} {p.gpu} GPU ({p.how})"
            )
    return lines


def unknown(parts: list[Part]) -> list[Part]:
    return [p for p in parts if p.hours is None and not p.small]


def describe_total(terms: dict[str, int], missing: list[Part]) -> str:
    """ "a X h + b Y h = Z GPU-hours", every figure a sum of printed tenths; plus the unknown
    parts, named, which no figure includes."""
    text = " + ".join(f"{name} {t / 10:,.1f} h" for name, t in terms.items())
    text += f" = {sum(terms.values()) / 10:,.1f} GPU-hours"
    if missing:
        names = ", ".join(f"{p.model} {p.stage}" for p in missing)
        text += f" + {len(missing)} unknown part(s): {names}"
    return text


def group_tenths(parts: list[Part]) -> dict[str, int]:
    """{group: printed tenths}, in order; a group of small parts only is left out."""
    out: dict[str, int] = {}
    for p in parts:
        if not p.small:
            out[p.group] = out.get(p.group, 0) + p.tenths
    return out


def describe_gpus(parts: list[Part], gpu: str | None) -> str:
    """Which GPU type the rates of each term were measured on, flagging another than the
    cluster's: hours of one GPU type's rates do not carry over to another."""
    on: dict[str, list[str]] = {}
    for p in parts:
        if p.gpu and p.gpu not in on.setdefault(p.group, []):
            on[p.group].append(p.gpu)
    text = "; ".join(f"{g} on {', '.join(gs)}" for g, gs in on.items() if gs)
    others = sorted({p.gpu for p in parts if p.gpu and p.gpu != gpu})
    if not gpu:
        text += " (cluster.gpu_type unset)"
    elif others:
        text += (
            f" (the table has no cluster.gpu_type={gpu} row for the figures on {', '.join(others)})"
        )
    return f"  rates measured: {text}"


def main_parts(cfg: RunConfig, cells: list, layers_of: dict[str, dict[str, int]]) -> list[Part]:
    """Generation and scoring of the main stages. `cells` are plan.CellEstimate values."""
    rates = read_rates()
    parts = []
    for model in sweep_models(cfg):
        tokens = sum(c.max_completion_tokens for c in cells if c.cell.model.name == model.name)
        gpu = cfg.cluster.gpu_type
        parts.append(generation_part(rates, model, tokens, gpu, "generation", "generation"))
        for position in layers_of[model.name]:
            parts.append(budgeted_part(rates, cfg, model, position, tokens))
    return parts


def describe_estimate(cfg: RunConfig, cells: list, layers_of: dict[str, dict[str, int]]) -> str:
    """The dry run's memory and GPU-hours section. `cells` are plan.CellEstimate values."""
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

    parts = main_parts(cfg, cells, layers_of)
    lines += [
        "",
        "GPU-hours, estimates: tokens / (tokens/s per replica) x GPUs per replica, on the GPU type"
        " each line names. Tokens are upper bounds (every completion reaches model.max_tokens,"
        " every trajectory verified); the rates are measured or extrapolated, so the hours are"
        " estimates at those token counts, not bounds.",
        f"Rates from {RATES_PATH.relative_to(RATES_PATH.parents[2])}, rows of cluster.gpu_type="
        f"{gpu or 'unset'} where the table has them, else of the GPU named; a layer position"
        f" without rows takes early's, the slowest (errs high); of each model, the fastest"
        f" attention path measured exact (each line names it). Length: {LENGTH_RULE}.",
        *render_parts(parts),
        f"  total: {describe_total(group_tenths(parts), unknown(parts))}",
        describe_gpus(parts, gpu),
    ]
    lines += [f"  {s}" for s in dict.fromkeys(p.source for p in parts if p.source)]
    return "\n".join(lines + describe_footprint(cfg, cells, layers_of))


# ----------------------------------------------------------------------------- disk
#
# Bytes on disk before compression (zstd takes more off: README, "Scaling"), so the footprint
# errs high, at the token counts' upper bounds. A trajectory token: input_ids (int32), its
# sample_logprobs (float32) and ~4 bytes of completion text; a prompt token only its id. A score
# row: the width of every column the scorer writes (workers.schemas.scores_schema, plus the
# position budget's and the MoE geometry's columns when the run writes them), read off the
# schema itself so the estimate follows the layout: fixed-width values, 4-byte offsets of
# variable lists and strings, J values per list of alternatives, PROBLEM_ID_BYTES of id text.
# A shard holds a reference per trajectory (workers.schemas.SHARD_REFS_SCHEMA): two dictionary
# indices and a row index, not the tokens.
COMPLETION_TOKEN_BYTES = 12
PROMPT_TOKEN_BYTES = 4
PROBLEM_ID_BYTES = 16
SHARD_REF_BYTES = 16


def _value_bytes(kind: pa.DataType, alternatives: int) -> float:
    """Bytes one value of `kind` takes in a score row (a variable list holds J values)."""
    if pa.types.is_dictionary(kind):
        return kind.index_type.bit_width / 8
    if pa.types.is_fixed_size_list(kind):
        return kind.list_size * _value_bytes(kind.value_type, alternatives)
    if pa.types.is_list(kind):
        return 4 + alternatives * _value_bytes(kind.value_type, alternatives)
    if pa.types.is_string(kind):
        return 4 + PROBLEM_ID_BYTES
    return kind.bit_width / 8


def score_row_bytes(
    model: ModelConfig, alternatives: int, *, budget: bool = False, geometry: bool = False
) -> int:
    """Bytes of one score row of `model` with J = `alternatives`, uncompressed; `budget` and
    `geometry`: the run scores under a position budget / with scoring.moe_geometry."""
    schema = scores_schema(model.num_experts, model.top_k, alternatives)
    fields = [
        *schema,
        *([COMPLETION_TOKENS] if budget else []),
        *(MOE_GEOMETRY if geometry else ()),
    ]
    return math.ceil(sum(_value_bytes(f.type, alternatives) for f in fields))


def describe_footprint(
    cfg: RunConfig, cells: list, layers_of: dict[str, dict[str, int]]
) -> list[str]:
    """The dry run's disk section: trajectories, shards (a reference per trajectory, every
    one verified) and scores (every scored token at every distinct layer), per model."""
    J = cfg.scoring.alternatives
    lines = [
        "",
        "disk, upper bounds (uncompressed, at the token counts above; 1 GB = 10^9 bytes):",
    ]
    total = 0
    for model in sweep_models(cfg):
        mine = [c for c in cells if c.cell.model.name == model.name]
        tokens = sum(c.max_completion_tokens for c in mine)
        prompts = sum(c.completions for c in mine) * PROMPT_ALLOWANCE
        trajectories = tokens * COMPLETION_TOKEN_BYTES + prompts * PROMPT_TOKEN_BYTES
        # generation.record_routes: k ids per MoE layer per token, in the generated files only
        ids = expert_id_type(model.num_experts).bit_width // 8
        routes = tokens * len(model.moe_layers) * model.top_k * ids
        routes *= cfg.generation.record_routes
        shards = sum(c.completions for c in mine) * SHARD_REF_BYTES
        row = score_row_bytes(
            model,
            J,
            budget=parse_positions(cfg.scoring.positions) is not None,
            geometry=cfg.scoring.moe_geometry,
        )
        scored = round(tokens * positions_share(cfg, model)) * len(layers_of[model.name])
        total += trajectories + routes + shards + scored * row
        lines.append(
            f"  {model.name:<16} trajectories {(trajectories + routes) / GB:10,.1f} GB, shards"
            f" <= {shards / 1e6:10,.1f} MB, scores {scored * row / GB:10,.1f} GB"
            f" ({scored:,} rows x {row} bytes)"
        )
    lines.append(f"  total <= {total / GB:,.1f} GB")
    return lines


def dataset_problems(d: DatasetConfig) -> int:
    return min(d.limit or d.size, d.size)


def router_parts(
    cfg: RunConfig, cells: list, train: list[DatasetConfig], evals: list[DatasetConfig]
) -> list[Part]:
    """The router update's steps per model: its training data (generation and scoring at the
    update's layer, 0 h where the main stages make the same units), preferences (one standard
    pass per training trajectory), training (small), the evaluation completions (2 variants x
    problems x eval_samples, each at max_tokens; controls add variants) and the rescoring of the
    training data."""
    ru = cfg.router_update
    rates = read_rates()
    gpu = cfg.cluster.gpu_type
    n_eval = sum(dataset_problems(d) for d in evals)
    parts = []
    for model in router_models(cfg):
        layer = resolve_layer(model, ru.layer)
        all_tokens = 0
        for d in train:
            n = dataset_problems(d)
            tokens = n * cfg.generation.samples_per_problem * model.max_tokens
            all_tokens += tokens
            same = [
                c
                for c in cells
                if (c.cell.model.name, c.cell.dataset.name, c.problems) == (model.name, d.name, n)
            ]
            if same:
                how = f"the main stages' own {d.name} units, counted above"
                parts.append(Part("data", model.name, f"{d.name} generation", tokens, 0.0, how=how))
            else:
                parts.append(
                    generation_part(rates, model, tokens, gpu, "data", f"{d.name} generation")
                )
            stage = f"{d.name} scoring {ru.layer}"
            if same and layer in same[0].cell.layers.values():
                how = f"the main stages' own {d.name} units at layer {layer}, counted above"
                parts.append(Part("data", model.name, stage, tokens, 0.0, how=how))
            else:
                parts.append(scoring_part(rates, cfg, model, ru.layer, tokens, "data", stage))
        parts.append(
            scoring_part(
                rates,
                cfg,
                model,
                ru.layer,
                all_tokens,
                "preferences",
                "preferences",
                standard_pass=True,
            )
        )
        how = f"full-batch Adam on layer {layer}'s router, {ru.steps} steps: not counted"
        parts.append(Part("training", model.name, "training", 0, None, how=how, small=True))
        variants = 2 + len(ru.controls) * len(ru.seeds or [ru.seed])  # original, updated, controls
        tokens = variants * n_eval * ru.eval_samples * model.max_tokens
        parts.append(generation_part(rates, model, tokens, gpu, "evaluation", "eval generation"))
        parts.append(
            scoring_part(
                rates, cfg, model, ru.layer, all_tokens, "rescoring", f"rescoring {ru.layer}"
            )
        )
    return parts


def describe_router_estimate(
    cfg: RunConfig,
    train: list[DatasetConfig],
    evals: list[DatasetConfig],
    cells: list,
    layers_of: dict[str, dict[str, int]],
) -> str:
    """The router update's GPU-hours, then the run's: the main stages' and the update's.
    `cells` and `layers_of` are the main plan's (plan.estimate, plan.scored_positions)."""
    parts = router_parts(cfg, cells, train, evals)
    main = main_parts(cfg, cells, layers_of)
    lines = [
        "",
        "router update GPU-hours, estimates by the rules above (tokens: upper bounds, every"
        " completion at model.max_tokens, every training trajectory verified)",
        *render_parts(parts),
        f"  total: {describe_total(group_tenths(parts), unknown(parts))}"
        + (" (training: small, not counted)" if any(p.small for p in parts) else ""),
        describe_gpus(parts, cfg.cluster.gpu_type),
    ]
    lines += [f"  {s}" for s in dict.fromkeys(p.source for p in parts if p.source)]
    terms = {
        "main stages": sum(p.tenths for p in main),
        "router update": sum(p.tenths for p in parts),
    }
    lines.append(f"run total: {describe_total(terms, unknown(main) + unknown(parts))}")
    return "\n".join(lines)


# The CoR evaluation's tokens per question (upper bounds of the hub sets): TruthfulQA runs one
# forward over prompt + option for each of its mc1 and mc2 options (at most 13 + 20 options
# in the validation split, 7 + 5 on average; prompts and options well under 64 tokens each);
# TriviaQA a prompt under 64 tokens, then cor.max_new_tokens greedy steps.
COR_OPTIONS_PER_QUESTION = 12
COR_TOKENS_PER_OPTION = 128
COR_PROMPT_TOKENS = 64


def cor_parts(cfg: RunConfig, evals: list[DatasetConfig]) -> list[Part]:
    """The CoR evaluation per model and data set: every condition's forward tokens, priced as
    standard passes (scoring_part's standard_pass; the rates are of long trajectories, so the
    short prompts here err high). TriviaQA's greedy steps run at batch 1, whose latency the
    rates table does not hold: they are priced as forward tokens only."""
    from orchestrator.config import cor_models

    cor = cfg.cor
    rates = read_rates()
    parts = []
    for model in cor_models(cfg):
        for d in evals:
            n = dataset_problems(d) * len(cor.conditions)
            if d.loader == "truthful_qa":
                tokens = n * COR_OPTIONS_PER_QUESTION * COR_TOKENS_PER_OPTION
            else:
                tokens = n * (COR_PROMPT_TOKENS + cor.max_new_tokens)
            stage = f"{d.name} x {len(cor.conditions)}"
            parts.append(
                scoring_part(rates, cfg, model, "early", tokens, "cor", stage, standard_pass=True)
            )
    return parts


def describe_cor_estimate(cfg: RunConfig, evals: list[DatasetConfig]) -> str:
    """The CoR evaluation's GPU-hours (the plans and tables: small, not counted)."""
    parts = cor_parts(cfg, evals)
    return "\n".join(
        [
            "",
            "CoR evaluation GPU-hours (tokens: upper bounds; TruthfulQA"
            f" {COR_OPTIONS_PER_QUESTION} options x {COR_TOKENS_PER_OPTION} tokens a question,"
            f" TriviaQA {COR_PROMPT_TOKENS} + max_new_tokens; batch-1 decoding latency not"
            " counted)",
            *render_parts(parts),
            f"  total: {describe_total(group_tenths(parts), unknown(parts))}",
            describe_gpus(parts, cfg.cluster.gpu_type),
        ]
    )
