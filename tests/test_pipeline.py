"""The whole pipeline on a real local Ray: problems -> trajectories -> scores -> report.

One uninterrupted small run (tests/pipeline_runs.py) is the reference; other runs must give
bitwise-identical score shards whatever happens to them or however the work is split.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
import ray
from fault_workers import self_killing_scorer, timed
from pipeline_runs import (
    assert_same_tables,
    copy_run,
    digests,
    run_inprocess,
    sidecars,
    stage_counts,
)

from orchestrator.errors import ActorStartError
from orchestrator.executor import dispatch
from orchestrator.plan import Unit
from orchestrator.progress import StageProgress
from workers.io import discard, is_complete, read_arrow

pytestmark = pytest.mark.usefixtures("local_ray")


def test_default_run_writes_every_stage_and_the_report(reference):
    assert (reference / "config.yaml").is_file() and not (reference / "failures.jsonl").exists()
    [problems] = sidecars(reference, "problems").values()
    assert problems["rows"] == 8
    generated = sidecars(reference, "trajectories/tiny/demo/generated")
    assert sorted(generated) == ["00000.arrow", "00001.arrow"]
    assert {s["backend"] for s in generated.values()} == {"hf"}
    trajectories = pa.concat_tables(
        read_arrow(reference / "trajectories/tiny/demo/generated" / name) for name in generated
    )
    assert trajectories.num_rows == 16  # 8 problems x 2 samples, verified or not
    verified = sum(trajectories.column("verified").to_pylist())
    assert verified > 0
    shards = sidecars(reference, "trajectories/tiny/demo/shards")
    assert sum(s["rows"] for s in shards.values()) == verified
    scores = sidecars(reference, "scores")
    assert {k.split("/")[1] for k in scores} == {"layer=0", "layer=2", "layer=3"}
    assert len(scores) == 3 * len(shards)
    for name, sidecar in scores.items():
        table = read_arrow(reference / "scores" / name)
        assert table.num_rows == sidecar["rows"] > 0
        assert set(table.column("layer").to_pylist()) == {int(name.split("/")[1][6:])}
        assert len(table.column("alt_probs")[0]) == 8  # J = 8
    by_bin = pl.read_parquet(reference / "tables" / "by_bin.parquet")
    assert set(by_bin["layer"].to_list()) == {0, 2, 3}
    assert (reference / "report.md").read_text().strip()
    assert pl.read_parquet(reference / "tables" / "generation.parquet")["backend"].to_list() == ["hf"]
    assert list((reference / "figures").glob("*.png"))


def test_the_saved_config_is_the_resolved_one(reference):
    from omegaconf import OmegaConf

    saved = OmegaConf.to_container(OmegaConf.load(reference / "config.yaml"))
    assert saved["run_id"] == "ref"
    assert saved["dataset"]["size"] == 8  # interpolations resolved
    assert saved["scoring"]["alternatives"] == 8 and "hydra" not in saved


def test_a_rerun_skips_every_complete_unit(reference, tmp_path, capsys):
    run_dir = copy_run(reference, tmp_path, "again")
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.arrow")}
    assert run_inprocess(tmp_path, "again") == 0
    counts = stage_counts(capsys.readouterr().err)
    assert counts["generation"] == dict(total=2, skipped=2, computed=0, failed=0, retried=0)
    assert counts["scoring"]["skipped"] == counts["scoring"]["total"] > 0
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*.arrow")} == before


def test_a_killed_scorer_actor_is_replaced_and_results_are_identical(reference, tmp_path, capsys):
    marker = tmp_path / "scorer-was-killed"
    run_dir = copy_run(reference, tmp_path, "killed")
    for path in (run_dir / "scores/tiny").glob("layer=[23]/demo/*.arrow"):
        discard(path)  # leaves two layers' units to score: each scorer gets a second one
    assert run_inprocess(tmp_path, "killed", workers=self_killing_scorer(marker)) == 0
    assert marker.exists()  # a scorer process really died mid-run
    counts = stage_counts(capsys.readouterr().err)["scoring"]
    assert counts["retried"] == 1 and counts["failed"] == 0
    assert counts["computed"] == counts["total"] - counts["skipped"] >= 4
    assert digests(run_dir) == digests(reference)
    assert_same_tables(run_dir, reference)


def test_dispatch_retries_a_failing_unit_then_records_it_and_goes_on():
    class Flaky:  # defined here so that Ray ships it by value
        def run(self, key):
            if key == "bad":
                raise ValueError("bad input")
            return {"tokens": 10}

    actor = ray.remote(Flaky)
    units = [Unit("t", key, Path(f"/x/{key}"), "h", task=None) for key in ("a", "bad", "c", "d")]
    progress = StageProgress("t", len(units), stream=io.StringIO())
    outcomes = dispatch(
        units,
        spawn=actor.remote,
        call=lambda a, u: a.run.remote(u.key),
        actors=2,
        retries=2,
        progress=progress,
    )
    by_key = {o.unit.key: o for o in outcomes}
    assert sorted(by_key) == ["a", "bad", "c", "d"]
    assert by_key["bad"].attempts == 3 and by_key["bad"].error == "ValueError: bad input"
    assert all(by_key[k].ok and by_key[k].attempts == 1 for k in "acd")
    assert (progress.computed, progress.failed_units, progress.retries, progress.tokens) == (
        3,
        1,
        2,
        30,
    )


def test_dispatch_stops_with_the_cause_when_actors_cannot_start():
    class Broken:
        def __init__(self):
            raise FileNotFoundError("model directory /nowhere does not exist")

        def run(self, key):
            return {}

    actor = ray.remote(Broken)
    units = [Unit("t", "a", Path("/x/a"), "h", task=None)]
    with pytest.raises(ActorStartError, match="model directory /nowhere does not exist"):
        dispatch(
            units,
            spawn=actor.remote,
            call=lambda a, u: a.run.remote(u.key),
            actors=1,
            retries=2,
            progress=StageProgress("t", 1, stream=io.StringIO()),
        )


def test_zero_verified_trajectories_is_one_error_and_nothing_to_score(tmp_path, capsys):
    assert run_inprocess(tmp_path, "none", "model.max_tokens=1") == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "no verified trajectories to score" in lines[0]
    assert "tiny/demo: 0 of 16 trajectories verified" in lines[0]
    assert not (tmp_path / "none" / "scores").exists()
    assert not list((tmp_path / "none" / "trajectories").rglob("shards/*.arrow"))
    # What is kept, as the README says: the problems and every generated sample, complete
    # (a rerun with scoring.verified_only=false reuses them); no scoring plan to report on.
    assert "generated trajectories are kept" in lines[0]
    generated = sorted((tmp_path / "none" / "trajectories").rglob("generated/*.arrow"))
    assert len(generated) == 2 and all(is_complete(p) for p in generated)
    assert is_complete(tmp_path / "none" / "problems" / "demo.arrow")
    assert json.loads((tmp_path / "none" / "plan.json").read_text())["scores"] is None


def test_progress_reaches_wandb_offline(reference, tmp_path):
    copy_run(reference, tmp_path, "wb", "problems", "trajectories", "scores")
    assert run_inprocess(tmp_path, "wb", "wandb=offline") == 0
    logs = [p.read_bytes() for p in (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")]
    assert len(logs) == 1 + 3  # the driver run + one per (model, layer, dataset)
    assert sum(b"scoring/done" in log and b"generation/tokens_per_s" in log for log in logs) == 1


def test_scoring_of_one_data_set_runs_while_another_still_generates(tmp_path):
    """Two data sets on one generator: demo's scorers start as soon as its trajectories are
    sharded, before demo_train's last generation unit is over (which waits, at most 120 s,
    for some scoring to start). plan.json ends up listing every cell's units."""
    log = tmp_path / "units.jsonl"
    workers = timed(log, hold="demo_train")
    args = ("sweep.datasets=[demo,demo_train]", "scoring.layers=[final]")
    assert run_inprocess(tmp_path, "overlap", *args, workers=workers) == 0
    units = [json.loads(line) for line in log.read_text().splitlines()]
    def of(stage, dataset):
        return [u for u in units if u["stage"] == stage and u["dataset"] == dataset]

    held, demo_scoring = of("generation", "demo_train"), of("scoring", "demo")
    assert len(of("generation", "demo")) == len(held) == 2 and demo_scoring
    assert min(u["start"] for u in demo_scoring) < max(u["end"] for u in held)
    assert max(u["end"] - u["start"] for u in held) < 100  # released by scoring, not by the clock
    run_dir = tmp_path / "overlap"
    planned = json.loads((run_dir / "plan.json").read_text())["scores"]
    written = sidecars(run_dir, "scores")
    assert sorted(u["path"].removeprefix("scores/") for u in planned) == sorted(written)
    assert {k.split("/")[2] for k in written} == {"demo", "demo_train"}
    # The report read every planned file (its dataset column is the loader's name, "demo").
    counts = pl.read_parquet(run_dir / "tables" / "counts.parquet")
    assert counts["tokens"].sum() == sum(s["rows"] for s in written.values())
