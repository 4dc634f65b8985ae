"""A run's record of what made it, and the check a resumed run makes against it.

Contract: `run_record(cfg)` is the `provenance` block of runs/<id>/config.yaml: the project's
git commit, the scoring code's version, the driver's library versions and each model's
requested revision (the revision a node actually loaded is in every sidecar, with that
node's versions). `check_resume(run_dir, record, allow_scorer_change)` compares it with the
record of the run's previous session (its config.yaml, read by workers.runfiles):
differences are returned as one warning line; a
different scoring code version raises ConfigError unless `allow_scorer_change`, because the
complete score shards would otherwise mix two versions of the scorer in one table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.config import ConfigError, RunConfig, sweep_models
from workers.provenance import git_commit, library_versions, scoring_code_version
from workers.runfiles import CONFIG_FILE, read_run_config


def run_record(cfg: RunConfig) -> dict[str, Any]:
    return {
        "git_commit": git_commit(),
        "scoring_code": scoring_code_version(),
        "versions": library_versions(),
        "models": {m.name: {"hf_id": m.hf_id, "revision": m.revision} for m in sweep_models(cfg)},
    }


def check_resume(run_dir: Path, record: dict[str, Any], allow_scorer_change: bool) -> str | None:
    """None for a new run or the same code; else a warning line (or ConfigError, see above)."""
    try:
        saved = read_run_config(run_dir)
    except ValueError as err:
        raise ConfigError(
            f"{err}; it is the existing run's record: restore it, or move it away to resume"
            " without it"
        ) from None
    if saved is None:
        return None
    path = run_dir / CONFIG_FILE
    old = saved.get("provenance") or {}
    if not isinstance(old, dict):
        raise ConfigError(f"{path}: its provenance is not a mapping; restore it or move it away")
    if not old:
        return f"resuming {run_dir.name}: its config.yaml records no code or library versions"
    if old.get("scoring_code") != record["scoring_code"] and not allow_scorer_change:
        raise ConfigError(
            f"run {run_dir.name} was scored by scoring code {old.get('scoring_code')}, this is"
            f" {record['scoring_code']}: its complete shards would mix two scorers; use a new"
            " run_id, or allow_scorer_change=true to keep them"
        )
    changed = [
        f"{key} {old.get(key)} -> {record[key]}"
        for key in ("git_commit", "scoring_code")
        if old.get(key) != record[key]
    ]
    versions = old.get("versions") or {}
    changed += [
        f"{lib} {versions.get(lib)} -> {now}"
        for lib, now in record["versions"].items()
        if versions.get(lib) != now
    ]
    if not changed:
        return None
    return (
        f"resuming {run_dir.name} with other code or libraries than it started with: "
        + ", ".join(changed)
    )
