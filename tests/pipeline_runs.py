"""Small real runs of the pipeline, shared by test_pipeline.py and test_resume.py.

`SMALL` shrinks the default demo run (8 problems x 2 samples, J = 8, shards of 4) so a whole
run takes seconds; `reference_run` makes one uninterrupted run per test session and every
other run is compared with it. Runs go through `orchestrator.__main__.run` in-process (on the
Ray the test module started) or through `python -m orchestrator` in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
from hydra import compose, initialize_config_dir

from orchestrator import config as C
from orchestrator.__main__ import run
from orchestrator.actors import DEFAULT_WORKERS, Workers

ROOT = Path(__file__).resolve().parent.parent
SMALL = [
    "dataset.options.n=8",
    "generation.samples_per_problem=2",
    "generation.problems_per_shard=4",
    "scoring.alternatives=8",
    "scoring.trajectories_per_shard=4",
    "wandb=disabled",
]
DONE = re.compile(
    r"\[(\w+)\] done: (\d+) units = (\d+) skipped \(complete\) \+ (\d+) computed"
    r" \+ (\d+) failed; (\d+) retried"
)

C.register_configs()


def run_inprocess(
    runs_dir: Path, run_id: str, *overrides: str, workers: Workers = DEFAULT_WORKERS
) -> int:
    """`python -m orchestrator SMALL... runs_dir=... run_id=... overrides...`, in this process,
    with the actor classes `workers` (tests/fault_workers.py has misbehaving ones)."""
    args = [*SMALL, f"runs_dir={runs_dir}", f"run_id={run_id}", *overrides]
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        dcfg = compose("config", overrides=args)
    return run(dcfg, overrides=args, workers=workers)


def cli_command(runs_dir: Path, run_id: str, *overrides: str) -> list[str]:
    args = [*SMALL, f"runs_dir={runs_dir}", f"run_id={run_id}", *overrides]
    return [sys.executable, "-m", "orchestrator", *args]


def run_cli(runs_dir: Path, run_id: str, *overrides: str, env: dict | None = None):
    return subprocess.run(
        cli_command(runs_dir, run_id, *overrides),
        cwd=runs_dir.parent,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def stage_counts(stderr: str) -> dict[str, dict[str, int]]:
    """{stage: {total, skipped, computed, failed, retried}} from the driver's summary lines."""
    return {
        m[1]: dict(
            zip(
                ("total", "skipped", "computed", "failed", "retried"),
                map(int, m.groups()[1:]),
                strict=True,
            )
        )
        for m in DONE.finditer(stderr)
    }


def settled(count, quiet_s: float = 3.0, timeout_s: float = 60.0):
    """`count()` once it has stopped changing for `quiet_s` seconds."""
    last, since, start = count(), time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() - start < timeout_s:
        time.sleep(0.2)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
    return last


def reference_run(base: Path) -> Path:
    """One uninterrupted run, made once per session under `base` (the session's basetemp)."""
    run_dir = base / "reference" / "runs" / "ref"
    marker = base / "reference" / "ok"
    if not marker.exists():
        code = run_inprocess(run_dir.parent, "ref")
        assert code == 0, f"the reference run failed with exit code {code}"
        marker.touch()
    return run_dir


def copy_run(src: Path, runs_dir: Path, run_id: str, *parts: str) -> Path:
    """A copy of (parts of) a run dir under a new run id, e.g. to resume from its state."""
    dst = runs_dir / run_id
    for part in parts or ("",):
        if (src / part).is_dir():
            shutil.copytree(src / part, dst / part, dirs_exist_ok=True)
    return dst


def sidecars(run_dir: Path, stage_dir: str) -> dict[str, dict]:
    """{path relative to the stage dir: sidecar} of every complete file of a stage."""
    root = run_dir / stage_dir
    return {
        str(p.relative_to(root)).removesuffix(".done.json") + ".arrow": json.loads(p.read_text())
        for p in sorted(root.rglob("*.done.json"))
    }


def digests(run_dir: Path, stage_dir: str = "scores") -> dict[str, str]:
    return {k: v["sha256"] for k, v in sidecars(run_dir, stage_dir).items()}


def score_rows(run_dir: Path, layers: tuple[int, ...] | None = None) -> pl.DataFrame:
    """Every score row of a run in a canonical order, whatever files they are in."""
    files = sorted((run_dir / "scores").rglob("*.arrow"))
    # model and dataset are dictionary-encoded in the files: compared as strings
    frame = pl.concat(pl.read_ipc(p) for p in files).with_columns(
        pl.col(pl.Categorical).cast(pl.String)
    )
    if layers is not None:
        frame = frame.filter(pl.col("layer").is_in(layers))
    return frame.sort(["layer", "problem_id", "sample_idx", "position"])


def tables(run_dir: Path) -> dict[str, pl.DataFrame]:
    return {p.stem: pl.read_parquet(p) for p in sorted((run_dir / "tables").glob("*.parquet"))}


def assert_same_tables(a: Path, b: Path) -> None:
    """The report tables of two runs are identical (analysis sums in fixed point, so equal
    score shards give bitwise-equal tables whatever order they are read in)."""
    ta, tb = tables(a), tables(b)
    assert ta and sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].equals(tb[name]), name
