"""The run folder's own files, read and written in one place by the driver and the analysis.

Contract: runs/<id>/plan.json lists the score files the run's current config writes
(`plan_text` is what the driver writes, `read_plan` what the report and the driver read:
None when absent, ValueError naming the file when it is not a plan); runs/<id>/config.yaml is
the run's resolved config (`read_run_config`: None when absent, ValueError naming the file
when it is not a YAML mapping), and `run_models(run_config)` its models by name, each entry as
resolved when the run was made (its shape, path and hub id), never today's conf/ files. Every
data file's sidecar is read by workers.io (`read_sidecar`, `read_verified`, `verify`).
Both are read without following links: a link (or a FIFO, a folder) at either name counts as
absent, so a planted link never makes a reader take another file for the run's (the driver
then writes the file anew, which replaces the link itself). Plain file reads: no Ray, no config
schema, no model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workers.atomic import read_nofollow

PLAN_FILE = "plan.json"
CONFIG_FILE = "config.yaml"
PLAN_UNIT_KEYS = ("unit", "path", "config_hash")  # one planned score file


def plan_text(scores: list[dict[str, str]] | None, unscored: list[str]) -> str:
    """plan.json's text: `scores` None while scoring is not planned yet, else one entry per
    score file with PLAN_UNIT_KEYS; `unscored`: the cells the run leaves unscored."""
    return json.dumps({"scores": scores, "unscored": unscored}, indent=1)


def read_plan(run_dir: str | Path) -> dict[str, Any] | None:
    """plan.json as a dict, or None when absent; ValueError when unreadable."""
    path = Path(run_dir) / PLAN_FILE
    data = read_nofollow(path)
    if data is None:
        return None
    try:
        plan = json.loads(data)
    except ValueError as err:
        raise ValueError(f"{path} is not readable JSON ({err}); rerun the driver") from None
    if not isinstance(plan, dict) or "scores" not in plan:
        raise ValueError(f"{path} is not a plan (no 'scores' key); rerun the driver")
    units, unscored = plan["scores"], plan.setdefault("unscored", [])
    if not (
        (units is None or isinstance(units, list))
        and all(
            isinstance(u, dict) and all(isinstance(u.get(k), str) for k in PLAN_UNIT_KEYS)
            for u in units or []
        )
        and isinstance(unscored, list)
        and all(isinstance(w, str) for w in unscored)
    ):
        raise ValueError(f"{path} is not a plan (malformed entries); rerun the driver")
    return plan


def read_run_config(run_dir: str | Path) -> dict[str, Any] | None:
    """config.yaml as a dict, or None when absent; ValueError (one line naming the file) when
    it is not readable YAML or not a mapping."""
    import yaml

    path = Path(run_dir) / CONFIG_FILE
    raw = read_nofollow(path)
    if raw is None:
        return None
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        message = " ".join(str(err).split())[:200] or type(err).__name__
        raise ValueError(f"{path} is not readable YAML ({message})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a YAML mapping")
    return data


def run_models(run_config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{model name: its entry} as config.yaml records them: `models` (every model of the run,
    sweep entries resolved with their overrides), then the composed `model` (the run's model
    without a sweep; a sweep's config.yaml holds it too, so the report has always labelled it).
    Entries that are not mappings with a name are left out."""
    entries = run_config.get("models")
    entries = [*(entries if isinstance(entries, list) else []), run_config.get("model")]
    models: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            models.setdefault(entry["name"], entry)
    return models
