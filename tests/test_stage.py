"""A stage is one module (tests/toy_stage.py) run through the executor by orchestrator.stage;
every stage of the project runs its actors under the run's start and unit deadlines."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pytest
from toy_stage import SquareStage, SquareWorker

from orchestrator import config as C
from orchestrator.actors import DEFAULT_WORKERS
from orchestrator.progress import StageProgress
from orchestrator.stage import run_stage, stage_pool
from workers.io import read_verified


def test_a_toy_stage_runs_on_the_executor_and_a_second_run_skips_its_units(local_ray, tmp_path):
    cfg = C.RunConfig()
    models = [C.ModelConfig(name="a"), C.ModelConfig(name="b")]
    units = [(m, SquareStage.plan(tmp_path, m, numbers=7, per_unit=3)) for m in models]
    stage = SquareStage(cfg, SquareWorker)
    outcomes, metrics = run_stage(stage, units)
    assert sorted(o.unit.key for o in outcomes if o.ok) == [
        f"{m}/{k:05d}" for m in "ab" for k in range(3)
    ]
    assert (metrics["squares/computed"], metrics["squares/skipped"]) == (6, 0)
    table, sidecar = read_verified(tmp_path / "squares" / "b" / "00002.arrow")
    assert table.to_pydict() == {"n": [6], "square": [36]}
    assert sidecar["label"] == "b"  # written by b's own actor
    written = {u.path: u.path.stat().st_mtime_ns for _, us in units for u in us}

    # Resume: every unit complete, none run again; a removed file is redone alone.
    (tmp_path / "squares" / "a" / "00001.arrow").unlink()
    outcomes, metrics = run_stage(stage, units)
    assert [o.unit.key for o in outcomes] == ["a/00001"]
    assert (metrics["squares/computed"], metrics["squares/skipped"]) == (1, 5)
    again = {p: p.stat().st_mtime_ns for p in written}
    changed = [p.relative_to(tmp_path).as_posix() for p in written if again[p] != written[p]]
    assert changed == ["squares/a/00001.arrow"]
    assert read_verified(tmp_path / "squares" / "a" / "00001.arrow")[0].num_rows == 3
    outcomes, metrics = run_stage(stage, units)
    assert outcomes == [] and metrics["squares/skipped"] == 6


def every_stage() -> list[type]:
    from orchestrator.stages.generation import GenerationStage
    from orchestrator.stages.router_data import DataGenerationStage, DataScoringStage
    from orchestrator.stages.router_eval import EvalStage
    from orchestrator.stages.router_preferences import PreferenceStage
    from orchestrator.stages.router_rescore import RescoreStage
    from orchestrator.stages.router_train import TrainStage
    from orchestrator.stages.scoring import ScoringStage

    return [
        GenerationStage,
        ScoringStage,
        DataGenerationStage,
        DataScoringStage,
        PreferenceStage,
        TrainStage,
        EvalStage,
        RescoreStage,
    ]


@pytest.mark.parametrize("stage", every_stage(), ids=lambda s: s.name)
def test_every_stage_declares_its_task_and_worker_and_runs_under_the_deadlines(stage):
    cluster = dataclasses.replace(
        C.RunConfig().cluster, actor_start_timeout_s=12.0, unit_timeout_s=34.0
    )
    cfg = dataclasses.replace(C.RunConfig(), cluster=cluster)
    worker = {"generate": "generator", "score": "scorer"}.get(stage.method, "router")
    worker_cls = getattr(DEFAULT_WORKERS, worker)
    assert callable(getattr(worker_cls, stage.method))
    assert stage.task.__module__ == "orchestrator.tasks"
    model = C.ModelConfig(name="m", path=str(Path(__file__).parent))
    pool = stage_pool(stage(cfg, worker_cls), model, StageProgress(stage.name, 0))
    assert (pool.start_timeout_s, pool.unit_timeout_s) == (12.0, 34.0)
    assert pool.retries == cfg.scoring.retries
    assert pool.need is not None and "CPU" in pool.need


def test_a_squares_table_is_what_the_worker_writes(tmp_path):
    # The worker is a plain class: usable without Ray.
    [unit] = SquareStage.plan(tmp_path, C.ModelConfig(name="m"), numbers=2, per_unit=5)
    result = SquareWorker("m").square(unit.task, str(unit.path), unit.config_hash, root=tmp_path)
    assert result["rows"] == 2
    table, _ = read_verified(unit.path, unit.config_hash)
    assert table.equals(pa.table({"n": [0, 1], "square": [0, 1]}))


def test_stop_drops_the_queued_units_and_seals_every_pool(tmp_path):
    # How a landing hook that meets an error ends the run without raising inside the loop.
    from orchestrator.executor import Executor, Pool

    executor = Executor()
    pools = [
        executor.add(Pool(lambda: None, lambda a, u: None, 1, 0, StageProgress("s", 0)))
        for _ in range(2)
    ]
    units = SquareStage.plan(tmp_path, C.ModelConfig(name="m"), numbers=4, per_unit=1)
    pools[0].add(units)
    executor.stop()
    assert all(p.sealed and not p.queue for p in pools)
    with pytest.raises(RuntimeError, match="sealed"):
        pools[1].add(units)
