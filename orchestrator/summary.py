"""What a run did, and its record of failed units: the summary and failures.jsonl.

Contract: `RunSummary` collects each stage's final progress metrics, the failed units and the
warnings of a run; `record_failures` appends failed outcomes to failures.jsonl (one JSON object
per line) and the summary; `record_fixed` marks there the failures a later run completed, so
the file tells what is still missing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.atomic import atomic_append, read_nofollow
from workers.io import is_complete

Sink = Callable[[dict[str, Any]], None]
JobSink = Callable[[str, int, str, dict[str, Any]], None]


@dataclass
class RunSummary:
    run_id: str
    run_dir: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    report_path: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failures


def record_failures(summary: RunSummary, outcomes: list[Any]) -> None:
    """Append failed units to failures.jsonl (one JSON object per line) and the summary."""
    failed = [o for o in outcomes if not o.ok]
    if not failed:
        return
    lines = []
    for o in failed:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stage": o.unit.stage,
            "unit": o.unit.key,
            "path": str(o.unit.path),
            "config_hash": o.unit.config_hash,
            "attempts": o.attempts,
            "error": o.error,
        }
        lines.append(json.dumps(entry) + "\n")
        summary.failures.append(entry)
    path = summary.run_dir / "failures.jsonl"
    atomic_append(path, "".join(lines), root=summary.run_dir)


def record_fixed(run_dir: Path) -> list[dict[str, Any]]:
    """Append `{"fixed": true, ...}` to failures.jsonl for each unit failed there that is
    complete now (a later attempt redid it), so the file tells what is still missing; return
    the records. A failure is open until a fixed record with its unit follows it."""
    path = run_dir / "failures.jsonl"
    still_open = open_failures(run_dir)
    fixed = [
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stage": e.get("stage"),
            "unit": unit,
            "path": e.get("path"),
            "fixed": True,
        }
        for unit, e in still_open.items()
        if isinstance(e.get("path"), str)
        and is_complete(e["path"], e.get("config_hash"), checksum=False)
    ]
    if fixed:
        atomic_append(path, "".join(json.dumps(r) + "\n" for r in fixed), root=run_dir)
    return fixed


def open_failures(run_dir: Path) -> dict[str, dict[str, Any]]:
    """{unit key: its last failure record} of failures.jsonl, for the failures no later
    `fixed` record closes (whether the unit is complete now is not checked here). Lines that
    are not JSON objects with a unit are skipped."""
    content = read_nofollow(run_dir / "failures.jsonl")  # never through a link, nor a FIFO
    if content is None:
        return {}
    still_open: dict[str, dict[str, Any]] = {}
    for line in content.decode("utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
            unit = str(entry["unit"])
        except (ValueError, KeyError, TypeError):
            continue
        if entry.get("fixed") is True:
            still_open.pop(unit, None)
        else:
            still_open[unit] = entry
    return still_open
