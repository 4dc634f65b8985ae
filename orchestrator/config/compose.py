"""Composition: the typed RunConfig from Hydra's composed tree, sweep entries and overrides.

Contract: `register_configs()` registers the schema (orchestrator.config.schema) with Hydra;
`to_run_config(dcfg, overrides)` types Hydra's DictConfig, rejecting keys the schema lacks,
and fills `models` / `datasets` with the run's entries: the sweep's (conf/<group>/<name>.yaml,
or `file:<path>`), or the single `model` / `dataset`, each with the command line's `model.*` /
`dataset.*` overrides and then `sweep.overrides.<entry>.*` applied. `load_option(group, name)`
reads one option as written; `config_tree(cfg)` is the typed config as a plain tree. A bad
value is ConfigError (orchestrator.errors) with one line naming it.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from orchestrator.config.schema import (
    DatasetConfig,
    ModelConfig,
    RunConfig,
    sweep_models,
)
from orchestrator.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


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
    if cfg.cor.enabled:  # its reroute plan is built from the run's own CEI tables
        cfg.scoring.cei = True
    return cfg


def config_tree(cfg: RunConfig) -> dict[str, Any]:
    """The typed config as a plain tree (config.yaml, W&B, the run id), the resolved sweep
    entries included."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def reject_unknown_keys(node: Any, schema: type, prefix: str = "") -> None:
    """Raise ConfigError for a key the schema does not have. Hydra's `+key=value` adds keys
    even to a structured config (it opens the struct flag) and `to_object` then drops them
    silently: `+scoring.alternative=8` would leave J at its default."""
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


def cor_models(cfg: RunConfig) -> list[ModelConfig]:
    """The models the CoR evaluation covers: cor.models, else the run's (only models the run
    scored have CEI tables to plan from)."""
    names = cfg.cor.models
    return [m for m in sweep_models(cfg) if m.name in names] if names else sweep_models(cfg)


def cor_datasets(cfg: RunConfig) -> list[DatasetConfig]:
    """The CoR evaluation's data sets as conf/dataset/ defines them, read from the local file
    cor.paths names for one if any, cut to cor.problems_limit questions if set."""
    out = [load_option("dataset", n) for n in cfg.cor.datasets]
    out = [dataclasses.replace(d, path=cfg.cor.paths.get(d.name, d.path)) for d in out]
    limit = cfg.cor.problems_limit
    if limit is not None:
        out = [dataclasses.replace(d, limit=min(d.limit or limit, limit)) for d in out]
    return out


def router_models(cfg: RunConfig) -> list[ModelConfig]:
    """The models whose router the update trains: router_update.models, else the run's."""
    names = cfg.router_update.models
    return [load_option("model", n) for n in names] if names else sweep_models(cfg)
