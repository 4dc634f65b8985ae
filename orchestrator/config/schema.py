"""The run's schema: one dataclass per Hydra config group, holding every key and its default.

Contract: `RunConfig` is the root (registered in Hydra's ConfigStore as `run_schema` by
orchestrator.config.compose, so an unknown key anywhere is an error); the YAML files under
conf/<group>/ only set values. Two groups take their keys from the worker that uses them, so
each setting is declared, defaulted and explained once: `scoring.*`'s scorer settings are
workers.scoring.score_config.ScoreConfig's fields (all but `device`, each scorer actor's own), and
`router_update.*`'s hyperparameters are workers.router.update_config.UpdateConfig's (the class is
RouterUpdateConfig's base). `analysis.*` is analysis.metrics.AnalysisConfig and `wandb.*`
orchestrator.wandb_run.WandbConfig. Helpers here read the typed config only (no files): which
models, data sets and layers a run covers, what a model loads from, the scorer's arguments.
"""

from __future__ import annotations

import typing
from dataclasses import Field, dataclass, field, fields, make_dataclass
from typing import Any

from omegaconf import MISSING

from analysis.metrics import AnalysisConfig  # the analysis group's schema and defaults
from orchestrator.wandb_run import WandbConfig
from workers.layers import LAYER_NAMES
from workers.router.update_config import UpdateConfig
from workers.scoring.score_config import ScoreConfig

BUNDLED = "bundled"  # ModelConfig.hf_id of the tiny model shipped in workers/assets/


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
    revision: str | None = None  # hub revision (branch, tag or commit); None = the default branch
    family: str = MISSING  # one of FAMILIES: selects the gating rule in workers.adapters
    num_layers: int = MISSING  # decoder layers (config.json: num_hidden_layers)
    moe_layers: list[int] = MISSING  # decoder layers with a routed MoE block
    num_experts: int = MISSING  # routed experts per MoE layer
    top_k: int = MISSING  # experts the router picks per token
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
    use_chat_template: bool = True  # wrap the prompt in the tokenizer's chat template
    temperature: float = 1.0  # sampling temperature (0 = greedy)
    top_p: float = 1.0  # nucleus sampling (1 = off)
    sample_top_k: int = 0  # sampling top-k (0 = off); `top_k` above is the router's k
    min_p: float = 0.0  # 0 = off
    max_tokens: int = 4096  # most new tokens per completion
    generation_backend: str | None = None  # overrides generation.backend for this model
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class DatasetConfig:
    """One evaluation set: how to load it, how to check answers, and what to tell the model."""

    name: str = MISSING  # short name used in paths and tables
    loader: str = MISSING  # name understood by workers.generation.datasets.load_problems
    path: str | None = None  # local file overriding the loader's default location
    size: int = MISSING  # problems in the full set (used to plan before anything is loaded)
    limit: int | None = None  # keep the first `limit` problems (after the loader's order)
    seed: int = 0  # passed to the loader (the demo task draws its problems with it)
    verifier: str = "math"  # one of VERIFIERS
    instruction: str = ""  # appended to the question by workers.generation.prompts.render_prompt
    options: dict[str, Any] = field(default_factory=dict)  # extra loader keyword arguments
    # Rows that cannot be prompted (empty question; prompt too long for a model): false = the
    # run stops before Ray naming the row; true = skipped and counted in the report.
    skip_bad_rows: bool = False


@dataclass
class GenerationConfig:
    """How trajectories are sampled. Per-sample seeds derive from (seed, problem_id, sample_idx)."""

    backend: str = "hf"  # one of BACKENDS
    samples_per_problem: int = 2  # trajectories sampled per problem
    batch_size: int = 16  # prompts per generate() call inside a unit (memory, not results)
    seed: int = 0  # seed of every sample
    problems_per_shard: int = 16  # problems per generation unit
    # Keep the generator's own route of every completion token at every MoE layer in the
    # trajectories (`gen_routes`; HF: router hooks, vLLM: enable_return_routed_experts, GPU
    # builds only); the report then compares them with the scorer's standard routes.
    record_routes: bool = False


def _scorer_setting(f: Field) -> tuple[str, Any, Field]:
    """ScoreConfig's field `f` as a `scoring.<name>` key: same type, default and help, except
    `dtype`, whose default None means each model's own `dtype` (bf16 for the hub models, whose
    float32 weights would not fit one 80 GB GPU; float32 for the tiny model)."""
    if f.name == "dtype":
        help = f"{f.metadata['help']}; null: each model's own model.dtype"
        return "dtype", str | None, field(default=None, metadata={"help": help})
    kind = typing.get_type_hints(ScoreConfig)[f.name]
    return f.name, kind, field(default=f.default, metadata=f.metadata)


# The scorer's own settings (J, P, tau, sampler, seed, dtype, memory_budget_mb, attention,
# compile) are declared, defaulted and checked once, in workers.scoring.score_config.ScoreConfig; the
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
    verified_only: bool = True  # score only trajectories whose answer verified
    trajectories_per_shard: int = 16  # trajectories per scoring unit
    # extra attempts of a failing unit (scoring and generation) before failures.jsonl
    retries: int = 2
    # Counterfactual Expert Impact (docs/method.md): after scoring, the cei stage writes
    # cei/<model>/layer=<L>/<dataset>/<k>.arrow for every scored shard; off by default.
    cei: bool = False
    cei_gating: str = "family"  # gate weights of a route of k-1 experts: family or keep


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
    scorers: str = "auto"  # as generators, for scorer actors
    # GPUs the run's actors may hold together (null: all the cluster has): a share of a
    # cluster others use too.
    max_gpus: int | None = None
    cpus_per_actor: float = 1.0  # CPUs Ray reserves for each generator or scorer
    torch_threads: int = 1  # torch.set_num_threads in each actor, so cores are not oversubscribed
    # An actor not started (scheduled, model loaded) by then fails the run naming what it
    # asked for: a model download + load can be slow on a fresh node.
    actor_start_timeout_s: float = 1800.0
    # A unit running longer is failed (its actor replaced) and retried: one hung engine must
    # not stall a sweep. None: no deadline.
    unit_timeout_s: float | None = None
    gpu_type: str | None = None  # e.g. H100: picks the rows of workers/assets/rates.csv
    gpu_memory_gb: float | None = None  # per GPU; the plan is refused if an actor cannot fit
    # Buffer compression of every Arrow file the run writes (workers.io.COMPRESSIONS): zstd,
    # lz4 or none. Values and completeness are the same whatever it is (a resumed run keeps
    # the files it has), so it is in no hash.
    compression: str = "zstd"


def actor_cap(value: str | int) -> int | None:
    """cluster.generators / cluster.scorers as a pool's cap: None for "auto"."""
    return None if str(value) == "auto" else int(value)


@dataclass
class SweepConfig:
    """A grid of models x layers x datasets; empty lists mean the single `model`/`dataset`."""

    name: str = "none"  # the run id's prefix when the sweep has entries
    # Entry names, conf/model/<name>.yaml; a model file elsewhere only as "file:<path>".
    models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)  # conf/dataset/<name>.yaml, or file:
    layers: list[str] = field(default_factory=list)  # overrides scoring.layers when non-empty
    # Per-entry settings, {model-or-dataset name: {key: value}}, applied after the command
    # line's `model.*` / `dataset.*` overrides (which reach every entry), e.g.
    # +sweep.overrides.gpqa_diamond.path=/data/gpqa.csv (`+`: the entry names are new keys).
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class RouterUpdateConfig(UpdateConfig):
    """The router-only update of the final MoE layer and its evaluation (orchestrator/router_stage.py).

    Off unless `name` is not "none". Preference data comes from the final-layer scores of
    `train_datasets`; pass@K is measured on `eval_datasets` (the two must not share problems).
    The update's hyperparameters (margin, fragile, confident, max_anchor_tokens, beta,
    anchor_weight, steps, lr, holdout_share, seed) are workers.router.update_config.UpdateConfig's
    fields, with their defaults and help; these are the run's own keys.
    """

    name: str = "none"  # "none" = off
    models: list[str] = field(default_factory=list)  # conf/model names; empty = the run's models
    train_datasets: list[str] = field(default_factory=list)  # conf/dataset names: preference data
    eval_datasets: list[str] = field(default_factory=list)  # conf/dataset names: pass@K
    layer: str = "final"  # the MoE layer whose router trains (a spec or an index)
    problems_limit: int | None = None  # keep the first N problems of each dataset (quick runs)
    eval_samples: int = 8  # n samples per problem, original and updated; pass@K for K <= n
    eval_problems_per_shard: int = 16  # problems per evaluation generation unit
    bootstrap_draws: int = 2000  # resamples of problems for the 95% intervals
    # Controls: the same update trained toward other targets (workers.router.update.CONTROLS:
    # random = an alternative drawn uniformly from the token's draws, shuffled = the real
    # winners permuted among the preference tokens), one checkpoint per control and seed,
    # each evaluated like the real update.
    controls: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)  # training seeds of the controls; [] = [seed]
    # Data sets every variant is also evaluated on, to check that nothing else degrades.
    heldout_datasets: list[str] = field(default_factory=list)

    @property
    def enabled(self) -> bool:
        return self.name != "none"


COR_CONDITIONS = ("standard", "cor", "random", "static_k1")


@dataclass
class CorConfig:
    """The CoR evaluation (orchestrator/cor_stage.py, docs/method.md "Evaluating a reroute
    plan"): the run's CEI tables -> a reroute plan -> TruthfulQA MC1/MC2 and TriviaQA EM under
    each condition, with paired bootstrap intervals of each condition minus standard.

    Off unless `name` is not "none"; on, it turns `scoring.cei` on (the plan is built from the
    run's own CEI tables). Conditions: standard (the model as it is), cor (the plan), random
    (the plan's k per layer, forced experts drawn at random with `plan.seed`), static_k1 (k + 1
    experts at every MoE layer).
    """

    name: str = "none"  # "none" = off
    models: list[str] = field(default_factory=list)  # conf/model names; empty = the run's models
    # conf/dataset names whose loader is truthful_qa or trivia_qa
    datasets: list[str] = field(default_factory=list)
    # {dataset name: local file in the hub's layout}, read instead of the option's hub id or path
    paths: dict[str, str] = field(default_factory=dict)
    # which of standard, cor, random, static_k1 to evaluate (standard is always one)
    conditions: list[str] = field(default_factory=lambda: list(COR_CONDITIONS))
    # the run's dataset whose CEI tables the plan is built from; null: the run's first
    calibration: str | None = None
    problems_limit: int | None = None  # keep the first N questions of each dataset
    questions_per_unit: int = 64  # questions per evaluation unit (a unit = condition x shard)
    # The prompt of a question ({question} is its text); an option's tokens follow it, after
    # one space. The TruthfulQA paper's own QA primer is not used: a bare "Q: ... A:" prompt.
    mc_template: str = "Q: {question}\nA:"
    qa_template: str = "Q: {question}\nA:"  # TriviaQA's prompt; greedy answer after it
    max_new_tokens: int = 16  # TriviaQA: most answer tokens generated
    stop: list[str] = field(default_factory=lambda: ["\n"])  # TriviaQA: answer cut at the first
    seed: int = 0  # the bootstrap's resamples (the random condition's: plan.seed)
    bootstrap_draws: int = 2000  # resamples of questions for the 95% paired intervals
    # The plan's settings: analysis.cor_plan.RerouteConfig's fields (shift, layers_moved,
    # forced, min_dormancy, seed; empty: its defaults).
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.name != "none"


@dataclass
class CompareConfig:
    """One command that runs a config once per option of one setting and compares the runs
    (orchestrator/compare.py). `samplers`: a Hydra multirun over scoring.sampler (gumbel,
    uniform_pool, uniform_all), then analysis.samplers over the three runs."""

    name: str = "none"  # "none" = a single run
    # The comparison's bins (analysis.metrics.BINNINGS): std (u(S) alone) holds the same
    # tokens under every sampler; pbar and split bins are drawn from each sampler's routes.
    binning: str = "std"


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
    compare: CompareConfig = field(default_factory=CompareConfig)  # in no hash: runs are runs
    cor: CorConfig = field(default_factory=CorConfig)
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
    datasets: list[DatasetConfig] = field(default_factory=list)  # as models, for datasets


def sweep_models(cfg: RunConfig) -> list[ModelConfig]:
    return list(cfg.models) or [cfg.model]


def sweep_datasets(cfg: RunConfig) -> list[DatasetConfig]:
    return list(cfg.datasets) or [cfg.dataset]


def sweep_layers(cfg: RunConfig) -> list[str]:
    return list(cfg.sweep.layers or cfg.scoring.layers)


def model_path(model: ModelConfig) -> str:
    """What transformers/vLLM load: the local path, the bundled tiny model, or the hub id."""
    if model.path:
        return model.path
    if model.hf_id == BUNDLED:
        from workers.generation.demo_task import bundled_model_path

        return str(bundled_model_path())
    return model.hf_id


def score_args(scoring: ScoringConfig, model: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of ScoreConfig for `model`: every scorer setting (device is set by the
    actor); the dtype is scoring.dtype, or the model's own when that is unset."""
    args = {f.name: getattr(scoring, f.name) for f in fields(ScorerSettings)}
    return {**args, "dtype": scoring.dtype or model.dtype}
