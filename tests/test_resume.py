"""Resuming: the same command again redoes exactly the missing, corrupt, failed or changed units.

Compared with one uninterrupted reference run (tests/pipeline_runs.py) of the same config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from fault_workers import failing_scorer
from pipeline_runs import (
    assert_same_tables,
    cli_command,
    copy_run,
    digests,
    run_cli,
    run_inprocess,
    score_rows,
    settled,
    sidecars,
    stage_counts,
)

from workers.io import discard, done_path, is_complete

pytestmark = pytest.mark.usefixtures("local_ray")


def test_driver_killed_mid_scoring_resumes_only_the_missing_units(reference, tmp_path):
    run_dir = copy_run(reference, tmp_path, "k", "problems", "trajectories")
    total = len(digests(reference))
    driver = subprocess.Popen(
        cli_command(tmp_path, "k"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its Ray processes share the group: cleaned up below
    )
    try:
        deadline = time.monotonic() + 240
        while not list((run_dir / "scores").rglob("*.done.json")):
            assert driver.poll() is None and time.monotonic() < deadline, "no unit finished"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the local Ray it started, if still alive
    # Actors already inside a unit may still finish it (atomically) before they notice.
    complete = settled(lambda: [p for p in (run_dir / "scores").rglob("*.arrow") if is_complete(p)])
    assert 1 <= len(complete) < total, "the driver was not killed mid-run"

    result = run_cli(tmp_path, "k")
    assert result.returncode == 0, result.stderr[-2000:]
    counts = stage_counts(result.stderr)
    assert counts["generation"]["computed"] == 0
    assert counts["scoring"] == dict(
        total=total, skipped=len(complete), computed=total - len(complete), failed=0, retried=0
    )
    assert digests(run_dir) == digests(reference)
    assert_same_tables(run_dir, reference)


def test_truncated_or_corrupted_files_are_detected_and_redone(reference, tmp_path, capsys):
    run_dir = copy_run(reference, tmp_path, "c")
    score = sorted((run_dir / "scores").rglob("*.arrow"))[1]
    score.write_bytes(score.read_bytes()[:100])  # truncated; its sidecar still says complete
    generated = run_dir / "trajectories/tiny/demo/generated/00001.arrow"
    data = bytearray(generated.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    generated.write_bytes(bytes(data))

    # With verify_checksums=false the sidecars are trusted: the damage goes unnoticed...
    assert run_inprocess(tmp_path, "c", "verify_checksums=false") == 2
    assert "rerun with verify_checksums=true" in capsys.readouterr().err
    # ...and the default re-hashes every complete file.
    assert run_inprocess(tmp_path, "c") == 0
    counts = stage_counts(capsys.readouterr().err)
    assert counts["generation"]["computed"] == 1  # regenerated, identically (per-sample seeds)
    assert (
        counts["scoring"]["computed"] == 1
        and counts["scoring"]["skipped"] == len(digests(reference)) - 1
    )
    assert digests(run_dir, "trajectories") == digests(reference, "trajectories")
    assert digests(run_dir) == digests(reference)


def test_a_failing_unit_is_retried_logged_and_resumed(reference, tmp_path, capsys):
    run_dir = copy_run(reference, tmp_path, "f")
    for path in (run_dir / "scores/tiny/layer=2/demo").glob("*.arrow"):
        discard(path)
    assert run_inprocess(tmp_path, "f", workers=failing_scorer("layer=2/demo/00001")) == 1
    err = capsys.readouterr().err
    counts = stage_counts(err)["scoring"]
    assert counts["failed"] == 1 and counts["retried"] == 2  # scoring.retries = 2
    assert counts["computed"] == counts["total"] - counts["skipped"] - 1 >= 1
    [failure] = [json.loads(line) for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert failure["unit"] == "tiny/layer=2/demo/00001" and failure["attempts"] == 3
    assert "injected failure" in failure["error"]
    assert not done_path(run_dir / "scores/tiny/layer=2/demo/00001.arrow").exists()
    resume = err.split("resume with:")[1].split("\n")[1].strip()
    assert resume.startswith("python -m orchestrator") and resume.endswith("run_id=f")

    assert run_inprocess(tmp_path, "f") == 0
    counts = stage_counts(capsys.readouterr().err)["scoring"]
    assert (counts["computed"], counts["failed"]) == (1, 0)
    # failures.jsonl keeps the failure and says that this attempt fixed it.
    lines = [json.loads(line) for line in (run_dir / "failures.jsonl").read_text().splitlines()]
    assert lines[0] == failure and len(lines) == 2
    assert lines[1]["fixed"] is True and lines[1]["unit"] == failure["unit"]
    assert digests(run_dir) == digests(reference)
    assert_same_tables(run_dir, reference)


def test_a_changed_config_redoes_only_the_units_it_changes(reference, tmp_path, capsys):
    run_dir = copy_run(reference, tmp_path, "cfg")
    shards = len(list((reference / "trajectories/tiny/demo/shards").glob("*.arrow")))
    # A new layer: only its units run; the others are kept as they are.
    assert run_inprocess(tmp_path, "cfg", "scoring.layers=[early,middle,final,1]") == 0
    counts = stage_counts(capsys.readouterr().err)
    assert counts["generation"]["computed"] == 0
    assert counts["scoring"]["computed"] == shards and counts["scoring"]["skipped"] == 3 * shards
    kept = {k: v for k, v in digests(run_dir).items() if not k.startswith("tiny/layer=1/")}
    assert kept == digests(reference)
    # Larger shards on one scorer: the split changes, so every score is redone (to the same
    # rows, bitwise) and the old files go away; layer 1 is no longer planned and stays.
    assert (
        run_inprocess(tmp_path, "cfg", "scoring.trajectories_per_shard=8", "cluster.scorers=1") == 0
    )
    counts = stage_counts(capsys.readouterr().err)
    assert counts["generation"]["computed"] == 0
    verified = sum(s["rows"] for s in sidecars(reference, "trajectories/tiny/demo/shards").values())
    expected = -(-verified // 8)
    assert counts["scoring"]["computed"] == counts["scoring"]["total"] == 3 * expected
    for layer in (0, 2, 3):
        assert len(list((run_dir / f"scores/tiny/layer={layer}/demo").glob("*.arrow"))) == expected
    assert len(list((run_dir / "scores/tiny/layer=1/demo").glob("*.arrow"))) == shards
    assert score_rows(run_dir, layers=(0, 2, 3)).equals(score_rows(reference, layers=(0, 2, 3)))


def test_score_files_of_the_int32_list_layout_are_kept_and_read_alike(reference, tmp_path, capsys):
    """A run scored before the compact layout (int32 route lists, plain model and dataset
    strings, no compression) resumes without redoing a unit: completeness compares config
    hashes, not bytes, and the report reads those files into the very tables of the compact
    ones. (Its other files differ only in compression; the shards' hash is of the generated
    files it was split from, so a run's own files always agree.)"""
    from workers.io import read_arrow, write_arrow
    from workers.schemas import SCORES_SCHEMA, as_list_routes

    run_dir = copy_run(reference, tmp_path, "old")
    kept = ("file", "rows", "sha256", "config_hash", "seconds", "host", "finished_at")
    for path in sorted((run_dir / "scores").rglob("*.arrow")):
        sidecar = json.loads(done_path(path).read_text())
        table = as_list_routes(read_arrow(path))
        assert table.schema == SCORES_SCHEMA
        extra = {k: v for k, v in sidecar.items() if k not in kept}
        write_arrow(
            table, path, config_hash=sidecar["config_hash"], extra=extra, compression="none"
        )
    old = digests(run_dir)
    assert old.keys() == digests(reference).keys() and old != digests(reference)

    assert run_inprocess(tmp_path, "old") == 0
    counts = stage_counts(capsys.readouterr().err)
    assert all(c["computed"] == 0 for c in counts.values()), counts
    assert digests(run_dir) == old
    assert_same_tables(run_dir, reference)
