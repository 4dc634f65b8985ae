"""Typed configuration: the schema, its composition from Hydra and sweep entries, its checks.

Contract: `main` builds one `RunConfig` from the composed DictConfig (`to_run_config`) and
`validate` checks it against itself and the files on disk before Ray, raising `ConfigError`
(a ValueError) with one line that says what is wrong and what is valid. Each stage then gets
its own slice (`ModelConfig`, `ScoringConfig`, ...), never the root. One concern a module:
- schema.py: the dataclasses, one per Hydra config group, with every key and its default;
- compose.py: Hydra registration, conf/<group>/ options, sweep entries and their overrides;
- validate.py: the checks (a model's config.json read through workers.families);
- describe.py: every key with its type, default and help (`python -m orchestrator.config`).
Every name the driver and the tests use is importable from here.
"""

from orchestrator.config.compose import (
    CONF_DIR,
    FILE_PREFIX,
    apply_entry,
    build_entry,
    config_tree,
    cor_datasets,
    cor_models,
    entry_overrides,
    load_option,
    override_key_error,
    register_configs,
    reject_unknown_keys,
    router_models,
    to_run_config,
)
from orchestrator.config.schema import (
    BUNDLED,
    ClusterConfig,
    CorConfig,
    DatasetConfig,
    EngineConfig,
    GenerationConfig,
    ModelConfig,
    RouterUpdateConfig,
    RunConfig,
    ScorerSettings,
    ScoringConfig,
    SweepConfig,
    actor_cap,
    model_path,
    score_args,
    sweep_datasets,
    sweep_layers,
    sweep_models,
)
from orchestrator.config.validate import (
    RAY_JOB_ENV,
    check_local_model,
    check_model_shape,
    check_names,
    check_runs_dir,
    is_finite,
    moe_shape,
    resolve_layer,
    validate,
    validate_cluster,
    validate_dataset,
    validate_engine,
    validate_model,
    validate_router_update,
    validate_sampling,
    validate_scoring,
)
from orchestrator.errors import ConfigError
from orchestrator.wandb_run import WandbConfig, scrub_secrets

__all__ = [
    "BUNDLED",
    "CONF_DIR",
    "FILE_PREFIX",
    "RAY_JOB_ENV",
    "ClusterConfig",
    "ConfigError",
    "DatasetConfig",
    "EngineConfig",
    "GenerationConfig",
    "ModelConfig",
    "CorConfig",
    "RouterUpdateConfig",
    "RunConfig",
    "ScorerSettings",
    "ScoringConfig",
    "SweepConfig",
    "WandbConfig",
    "actor_cap",
    "apply_entry",
    "build_entry",
    "check_local_model",
    "check_model_shape",
    "check_names",
    "check_runs_dir",
    "config_tree",
    "entry_overrides",
    "is_finite",
    "load_option",
    "model_path",
    "moe_shape",
    "override_key_error",
    "register_configs",
    "reject_unknown_keys",
    "resolve_layer",
    "cor_datasets",
    "cor_models",
    "router_models",
    "score_args",
    "scrub_secrets",
    "sweep_datasets",
    "sweep_layers",
    "sweep_models",
    "to_run_config",
    "validate",
    "validate_cluster",
    "validate_dataset",
    "validate_engine",
    "validate_model",
    "validate_router_update",
    "validate_sampling",
    "validate_scoring",
]
