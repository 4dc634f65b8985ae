"""The dispatch rule (orchestrator/policy.py) on hand-built pool states, and the schedule
simulation (orchestrator/schedule.py) that runs it on a virtual clock: small sweeps whose
schedule can be worked out by hand, and the paper sweep's dry run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from orchestrator import config as C
from orchestrator import plan
from orchestrator.policy import PoolState, decide, free_resources, order
from orchestrator.schedule import Cell, ModelWork, simulate, sweep_work


def make(*overrides: str) -> C.RunConfig:
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        return C.to_run_config(compose("config", overrides=list(overrides)), overrides)


def gpus(n: float):
    return lambda: {"GPU": n, "CPU": 100.0}


def test_an_auto_pool_grows_to_the_free_gpus_and_a_capped_one_to_its_cap():
    auto = PoolState((0, 1), queued=10, live=1, need={"GPU": 1})
    assert decide([auto], gpus(6)).start == [0] * 6
    capped = PoolState((0, 1), queued=10, live=1, cap=3, need={"GPU": 1})
    d = decide([capped], gpus(6))
    assert d.start == [0, 0] and not d.waiting  # the cap, not the cluster, stops it


def test_the_group_with_most_remaining_work_goes_first_and_holds_back_the_rest():
    small = PoolState((0, 1), queued=4, live=1, need={"GPU": 1}, unit_cost=10)
    big = PoolState((1, 1), queued=4, live=1, need={"GPU": 1}, unit_cost=100)
    wide = PoolState((1, 0), queued=1, need={"GPU": 4}, unit_cost=1)  # big's generators
    assert order([small, big, wide]) == [2, 1, 0]  # group 1 first, generators before scorers
    d = decide([small, big, wide], gpus(3))
    # the 4-GPU generator cannot start: nothing after it may overtake it
    assert d.start == [] and d.waiting
    d = decide([small, big], gpus(6))
    assert d.start == [1, 1, 1, 1, 0, 0] and d.waiting


def test_expected_units_count_as_work_before_they_are_queued():
    coming = PoolState((0, 1), queued=1, need={"GPU": 1}, expected=100)
    now = PoolState((1, 1), queued=5, need={"GPU": 1})
    assert order([now, coming]) == [1, 0]


def test_idle_actors_close_when_sealed_or_when_another_pool_waits():
    idle = PoolState((0, 1), queued=0, idle=2, live=2, need={"GPU": 1})
    assert decide([idle], gpus(0)).close == []
    assert decide([idle], gpus(0), waiting=True).close == [0]
    sealed = PoolState((0, 1), queued=0, idle=2, live=2, need={"GPU": 1}, sealed=True)
    assert decide([sealed], gpus(0)).close == [0]


def test_with_no_actor_alive_the_first_pool_starts_one_regardless():
    huge = PoolState((0, 0), queued=3, need={"GPU": 8})
    assert decide([huge], gpus(2)).start == [0]


def test_max_gpus_caps_what_the_run_may_hold():
    free = free_resources({"GPU": 16, "CPU": 64}, {"GPU": 12, "CPU": 60}, {"GPU": 4}, max_gpus=6)
    assert free["GPU"] == 2 and free["CPU"] == 60


def one_model(gen: list[float], score: list[float], scorer_cap=None, name="m") -> ModelWork:
    return ModelWork(name, 1, 1, None, scorer_cap, [Cell(name, gen, score)])


def test_a_simulated_sweep_matches_the_schedule_worked_out_by_hand():
    # 2 GPUs, load 5 s: one generation unit (10 s) on one generator (t 5-15), then 4 scoring
    # units of 20 s: the generator closes at 15, two scorers load (15-20) and run two rounds.
    sched = simulate([one_model([10.0], [20.0] * 4)], 2, load_s=5.0)
    assert sched.makespan_s == pytest.approx(60.0)
    assert sched.busy_s == pytest.approx(90.0)
    assert sched.utilization == pytest.approx(90 / 120)
    assert [p.starts for p in sched.pools] == [1, 2]


def test_auto_caps_fill_a_cluster_that_fixed_caps_leave_idle():
    """The lopsided shape of the paper sweep: one model with most of the scoring."""
    models = [
        one_model([10.0] * 4, [100.0] * 192, name="big"),  # three rounds on 64
        one_model([10.0] * 4, [10.0] * 100, name="small"),
    ]
    fixed = [
        ModelWork(m.name, 1, 1, 2, 8, m.cells) for m in models
    ]  # the old defaults: 2 generators, 8 scorers per model
    auto = simulate(models, 64, load_s=5.0)
    old = simulate(fixed, 64, load_s=5.0)
    assert auto.utilization > 0.9 > 0.2 > old.utilization
    assert auto.makespan_s < old.makespan_s / 4


def test_the_paper_sweep_fills_16_and_64_gpus_at_the_defaults():
    cfg = make("sweep=paper", "cluster=address")
    cells = plan.estimate(cfg)
    for n in (16, 64):
        sched = simulate(sweep_work(cfg, cells), n)
        assert sched.utilization >= 0.9, (n, sched.utilization)
        assert sched.busy_s / 3600 == pytest.approx(3160, rel=0.01)  # the estimate's GPU-hours


def test_the_dry_run_prints_the_schedule_and_writes_its_timeline(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "sweep=paper", "dry_run=true", "cluster=address",
         "cluster.num_gpus=64", f"runs_dir={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "schedule on 64 GPUs" in result.stdout
    assert "GPU utilization 9" in result.stdout  # >= 90%
    assert "qwen3-30b-a3b scoring" in result.stdout
    [figure] = tmp_path.rglob("schedule-64gpus.png")
    assert str(figure) in result.stdout and figure.stat().st_size > 10_000
