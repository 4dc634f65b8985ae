"""`python -m orchestrator.status`: how a run stands, read from a real demo run's files.

The reference run (tests/pipeline_runs.py) is finished; copies of it are made half-finished
(files deleted, a sidecar edited), given a failure line or a driver's lease, and the command's
counts are checked against the sidecars on disk.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from orchestrator.status import main, status_json
from tests.pipeline_runs import ROOT, copy_run, sidecars

pytestmark = pytest.mark.usefixtures("local_ray")

STAGE_KEYS = {
    "done", "failed", "pending", "running", "estimated", "tokens", "seconds", "gpu_hours",
    "estimate_tokens", "estimate_gpu_hours", "tokens_per_s", "eta_s", "eta_basis",
}  # fmt: skip
CELL_KEYS = {
    "stage", "model", "dataset", "layer", "done", "failed", "pending", "running", "estimated",
    "tokens", "seconds", "gpus", "gpu_hours", "estimate_tokens", "estimate_gpu_hours", "notes",
}  # fmt: skip


def cells(status: dict, stage: str) -> dict:
    return {c["layer"]: c for c in status["cells"] if c["stage"] == stage}


def score_files(run_dir: Path, layer: int) -> list[Path]:
    return sorted((run_dir / f"scores/tiny/layer={layer}/demo").glob("*.arrow"))


def test_a_finished_run_is_all_done_with_the_sidecars_numbers(reference):
    status = status_json(reference)
    assert status["driver"] is None and status["failures"] == []
    for stage in ("generation", "scoring"):
        t = status["stages"][stage]
        assert t["done"] > 0 and t["failed"] == t["pending"] == t["running"] == 0
        assert t["eta_s"] == 0.0 and not t["estimated"]
    scores = sidecars(reference, "scores")
    for layer, cell in cells(status, "scoring").items():
        mine = [s for k, s in scores.items() if k.startswith(f"tiny/layer={layer}/")]
        assert cell["done"] == len(mine) and cell["notes"] == []
        assert cell["tokens"] == sum(s["rows"] for s in mine)
        assert cell["seconds"] == pytest.approx(sum(s["seconds"] for s in mine), abs=1e-3)
        assert cell["gpu_hours"] == 0  # a CPU run reserves no GPU
    generated = sorted((reference / "trajectories/tiny/demo/generated").glob("*.arrow"))
    frame = pl.concat(pl.read_ipc(p) for p in generated)
    tokens = int((frame["input_ids"].list.len() - frame["prompt_len"]).sum())
    [gen] = cells(status, "generation").values()
    assert gen["done"] == len(generated) and gen["tokens"] == tokens
    assert gen["estimate_tokens"] >= tokens  # the estimate is an upper bound
    # each generated file's sidecar records its tokens, so status never reads the token ids
    for path in generated:
        one = pl.read_ipc(path)
        sidecar = json.loads(path.with_name(path.stem + ".done.json").read_text())
        assert sidecar["tokens"] == int((one["input_ids"].list.len() - one["prompt_len"]).sum())
        assert sidecar["verified"] == int(one["verified"].sum())


def test_a_half_finished_run_counts_what_is_missing_and_gives_an_eta(reference, tmp_path):
    run_dir = copy_run(reference, tmp_path, "half")
    gone = score_files(run_dir, 2)[:2]
    for path in gone:  # two units never written
        path.unlink()
        path.with_suffix("").with_suffix(".done.json").unlink()
    edited = score_files(run_dir, 3)[0].with_suffix("").with_suffix(".done.json")
    sidecar = json.loads(edited.read_text())
    edited.write_text(json.dumps({**sidecar, "rows": sidecar["rows"] + 1}))  # corrupt
    stale = score_files(run_dir, 0)[0].with_suffix("").with_suffix(".done.json")
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "config_hash": "other"}))
    status = status_json(run_dir)
    by_layer = cells(status, "scoring")
    assert by_layer[2]["pending"] == 2 and by_layer[2]["done"] == len(score_files(run_dir, 2))
    assert by_layer[3]["pending"] == 1 and "corrupt" in by_layer[3]["notes"][0]
    assert by_layer[0]["pending"] == 1 and "stale" in by_layer[0]["notes"][0]
    scoring = status["stages"]["scoring"]
    assert scoring["pending"] == 4 and scoring["running"] == 0
    assert scoring["eta_s"] > 0 and "per unit" in scoring["eta_basis"]
    assert main([str(run_dir)]) == 0


def test_a_failure_line_is_counted_with_its_first_error_line(reference, tmp_path, capsys):
    run_dir = copy_run(reference, tmp_path, "fail")
    path = score_files(run_dir, 2)[1]
    path.unlink()
    key = f"tiny/layer=2/demo/{path.stem}"
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "stage": "scoring",
        "unit": key,
        "path": str(path),
        "config_hash": "x",
        "attempts": 3,
        "error": "RuntimeError: injected failure\nTraceback (most recent call last):\n  ...",
    }
    fixed = {**entry, "unit": "tiny/layer=3/demo/00000"}  # complete now: not a failure
    lines = [entry, fixed, {"unit": "tiny/layer=0/demo/00000", "fixed": True}, "not json"]
    (run_dir / "failures.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    status = status_json(run_dir)
    assert cells(status, "scoring")[2]["failed"] == 1
    assert status["stages"]["scoring"]["failed"] == 1
    [failure] = status["failures"]
    assert failure["unit"] == key and failure["attempts"] == 3
    assert failure["error"] == "RuntimeError: injected failure"
    assert main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"scoring {key} (3 attempts" in out and "failures: 1 open" in out


def test_a_live_lease_makes_the_missing_units_running(reference, tmp_path):
    run_dir = copy_run(reference, tmp_path, "live")
    for side in (run_dir / "scores").rglob("*.done.json"):  # all finished long before
        old = {**json.loads(side.read_text()), "finished_at": "2020-01-01T00:00:00+0000"}
        side.write_text(json.dumps(old))
    for path in score_files(run_dir, 0)[:3]:
        path.unlink()
    now = time.time()
    lease = {"host": socket.gethostname(), "pid": os.getpid(), "token": "t", "heartbeat": now}
    lease["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now - 60))
    (run_dir / ".driver.lock").write_text(json.dumps(lease))
    failed = score_files(run_dir, 3)[0]  # failed in an earlier session: this driver retries it
    failed.unlink()
    entry = {"time": "2020-01-01T00:00:00+0000", "stage": "scoring", "error": "OSError: x"}
    entry["unit"] = f"tiny/layer=3/demo/{failed.stem}"
    (run_dir / "failures.jsonl").write_text(json.dumps(entry) + "\n")
    status = status_json(run_dir)
    assert status["driver"]["live"] and status["driver"]["pid"] == os.getpid()
    assert status["stages"]["scoring"]["running"] == 4
    assert status["stages"]["scoring"]["failed"] == 0 and len(status["failures"]) == 1
    assert status["stages"]["scoring"]["pending"] == 0
    assert "per unit" in status["stages"]["scoring"]["eta_basis"]  # none landed since it began
    for path in score_files(run_dir, 2)[:2]:  # two units this driver wrote
        side = path.with_suffix("").with_suffix(".done.json")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now - 10))
        side.write_text(json.dumps({**json.loads(side.read_text()), "finished_at": stamp}))
    scoring = status_json(run_dir)["stages"]["scoring"]
    assert scoring["eta_basis"] == "the live driver's pace on this stage" and scoring["eta_s"] > 0
    lease["pid"] = 2**22 + 1  # no such process on this host: the driver is gone
    (run_dir / ".driver.lock").write_text(json.dumps(lease))
    status = status_json(run_dir)
    assert not status["driver"]["live"] and status["stages"]["scoring"]["pending"] == 3
    assert status["stages"]["scoring"]["failed"] == 1


def test_json_has_the_documented_shape(reference, capsys):
    assert main([str(reference), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["version"] == 1
    assert set(status) == {"version", "run", "run_dir", "time", "driver", "stages", "cells",
                           "failures", "notes"}  # fmt: skip
    assert set(status["stages"]) == {"generation", "scoring"}
    for totals in status["stages"].values():
        assert set(totals) == STAGE_KEYS
    assert all(set(c) == CELL_KEYS for c in status["cells"])


@pytest.mark.parametrize(
    "what", ["missing", "empty", "file", "linked config", "bad yaml", "bad name", "not a config"]
)
def test_a_folder_that_is_not_a_run_is_one_error_line(tmp_path, reference, capsys, what):
    target = tmp_path / "x"
    if what == "empty":
        target.mkdir()
    elif what == "file":
        target.write_text("")
    elif what == "linked config":
        target.mkdir()
        (target / "config.yaml").symlink_to(reference / "config.yaml")
    elif what == "bad yaml":
        target.mkdir()
        (target / "config.yaml").write_text("model: [\x1b[31m")
    elif what == "bad name":  # a name that would lead out of the run folder
        target.mkdir()
        text = (reference / "config.yaml").read_text().replace("name: demo", "name: ../..")
        (target / "config.yaml").write_text(text)
    elif what == "not a config":
        target.mkdir()
        (target / "config.yaml").write_text("generation: {samples_per_problem: many}")
    assert main([str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert "\x1b" not in captured.err


def test_control_characters_never_reach_the_terminal(reference, tmp_path):
    run_dir = copy_run(reference, tmp_path, "esc")
    path = score_files(run_dir, 2)[0]
    path.unlink()
    evil = "problem \x1b[2J\x1b]0;owned\x07 id\rspoof"
    entry = {"time": "now\x1b[31m", "stage": "scoring\x1b[31m", "attempts": 1, "error": evil}
    entry["unit"] = f"tiny/layer=2/demo/{path.stem}"
    (run_dir / "failures.jsonl").write_text(json.dumps(entry) + "\n")
    lease = {"host": "elsewhere\x1b[31m\rspoof", "pid": 1, "started": "x\x1b[0m", "heartbeat": 0}
    (run_dir / ".driver.lock").write_text(json.dumps(lease))
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.status", str(run_dir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\r" not in result.stdout and "\x07" not in result.stdout
    assert "problem \\x1b[2J\\x1b]0;owned\\x07 id\n" in result.stdout  # its first line
    assert "elsewhere\\x1b[31m\\rspoof" in result.stdout


def test_a_cell_the_plan_leaves_unscored_and_a_linked_plan(reference, tmp_path):
    run_dir = copy_run(reference, tmp_path, "plan")
    plan = json.loads((run_dir / "plan.json").read_text())
    scored = {e["path"].split("/")[2] for e in plan["scores"]}
    plan["scores"] = [e for e in plan["scores"] if not e["path"].startswith("scores/tiny/")]
    plan["unscored"] = ["tiny/demo: 0 of 16 trajectories verified"]
    (run_dir / "plan.json").write_text(json.dumps(plan))
    status = status_json(run_dir)
    for cell in cells(status, "scoring").values():
        assert (cell["done"], cell["pending"], cell["estimated"]) == (0, 0, False)
        assert cell["notes"] == ["not scored: 0 of 16 trajectories verified"]
    (run_dir / "plan.json").unlink()
    (run_dir / "plan.json").symlink_to(reference / "plan.json")
    status = status_json(run_dir)
    assert "plan.json is a link" in status["notes"][0]
    assert len(cells(status, "scoring")) == len(scored)
    assert all(c["estimated"] and c["done"] == 0 for c in cells(status, "scoring").values())


def test_watch_refreshes_until_interrupted(reference):
    watch = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.status", str(reference), "--watch", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        seen = 0
        while seen < 2:  # two refreshes
            line = watch.stdout.readline()
            assert line, watch.stderr.read()
            seen += line.startswith("run ")
        watch.send_signal(signal.SIGINT)
        assert watch.wait(timeout=60) == 0
    finally:
        watch.kill()
        watch.wait()
