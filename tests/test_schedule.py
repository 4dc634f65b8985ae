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
from orchestrator.estimate import main_parts
from orchestrator.policy import MODEL_LOAD_S, PoolState, decide, free_resources, order
from orchestrator.schedule import Cell, ModelWork, simulate, sweep_work


def make(*overrides: str) -> C.RunConfig:
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        return C.to_run_config(compose("config", overrides=list(overrides)), overrides)


def gpus(n: float):
    return lambda: {"GPU": n, "CPU": 100.0}


def test_an_auto_pool_grows_to_the_free_gpus_and_a_capped_one_to_its_cap():
    auto = PoolState((0, 1), queued=10, live=1, need={"GPU": 1}, unit_cost=3600)
    assert decide([auto], gpus(6)).start == [0] * 6
    capped = PoolState((0, 1), queued=10, live=1, cap=3, need={"GPU": 1})
    d = decide([capped], gpus(6))
    assert d.start == [0, 0] and not d.waiting  # the cap, not the cluster, stops it


def test_an_auto_pool_starts_no_more_actors_than_its_queued_work_pays_for():
    # 10 units of 90 s: 900 s of work pays for two more 300 s model loads beside the one live
    short = PoolState((0, 1), queued=10, live=1, need={"GPU": 1}, unit_cost=90)
    assert MODEL_LOAD_S == 300 and decide([short], gpus(6)).start == [0, 0]
    alone = PoolState((0, 1), queued=10, need={"GPU": 1}, unit_cost=1)
    assert decide([alone], gpus(6)).start == [0]  # a pool with work always gets one


def test_the_group_with_most_remaining_work_goes_first_and_holds_back_the_rest():
    small = PoolState((0, 1), queued=4, live=1, need={"GPU": 1}, unit_cost=1000)
    big = PoolState((1, 1), queued=4, live=1, need={"GPU": 1}, unit_cost=10000)
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
    # and the GPUs it takes count against the next start of the same decision
    pool = PoolState((0, 0), queued=3, need={"GPU": 1}, unit_cost=1000)
    assert decide([pool], gpus(1)).start == [0]
    assert decide([pool], gpus(2)).start == [0, 0]


def test_max_gpus_caps_what_the_run_may_hold():
    free = free_resources({"GPU": 16, "CPU": 64}, {"GPU": 12, "CPU": 60}, {"GPU": 4}, max_gpus=6)
    assert free["GPU"] == 2 and free["CPU"] == 60


def one_model(gen: list[float], score: list[float], scorer_cap=None, name="m") -> ModelWork:
    return ModelWork(name, 1, 1, None, scorer_cap, [Cell(name, gen, score)])


def test_a_simulated_sweep_matches_the_schedule_worked_out_by_hand():
    # 2 GPUs, a 300 s load per actor: one generation unit (100 s) on one generator (300-400),
    # then 4 scoring units of 400 s: the generator closes at 400, two scorers load (400-700)
    # and run two rounds each (700-1500).
    sched = simulate([one_model([100.0], [400.0] * 4)], 2)
    assert sched.makespan_s == pytest.approx(1500.0)
    assert sched.busy_s == pytest.approx(1700.0)
    assert sched.utilization == pytest.approx(1700 / 3000)
    assert [p.starts for p in sched.pools] == [1, 2]


def test_auto_caps_fill_a_cluster_that_fixed_caps_leave_idle():
    """The lopsided shape of the paper sweep: one model with most of the scoring."""
    models = [
        one_model([1000.0] * 4, [10000.0] * 192, name="big"),  # three rounds on 64
        one_model([1000.0] * 4, [1000.0] * 100, name="small"),
    ]
    fixed = [
        ModelWork(m.name, 1, 1, 2, 8, m.cells) for m in models
    ]  # the old defaults: 2 generators, 8 scorers per model
    auto = simulate(models, 64)
    old = simulate(fixed, 64)
    assert auto.utilization > 0.9 > 0.2 > old.utilization
    assert auto.makespan_s < old.makespan_s / 4


def test_the_paper_sweep_fills_16_and_64_gpus_at_the_defaults():
    cfg = make("sweep=paper", "cluster=address")
    cells = plan.estimate(cfg)
    parts = main_parts(cfg, cells, plan.scored_positions(cells))
    estimate_hours = sum(p.hours for p in parts)  # the dry run's GPU-hours of the same sweep
    for n in (16, 64):
        sched = simulate(sweep_work(cfg, cells), n)
        assert sched.utilization >= 0.9, (n, sched.utilization)
        assert sched.busy_s / 3600 == pytest.approx(estimate_hours, rel=0.01)


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


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_pool_caps_are_auto_or_a_positive_number(value):
    with pytest.raises(
        C.ConfigError, match=f"cluster.scorers must be auto or a number >= 1, got '{value}'"
    ):
        C.validate(make(f"cluster.scorers={value}"))


def test_a_fixed_cap_still_caps_and_auto_does_not():
    assert C.actor_cap(make("cluster.generators=4").cluster.generators) == 4
    assert C.actor_cap(make("cluster=address").cluster.scorers) is None
    assert C.actor_cap(make().cluster.scorers) == 2  # cluster=local: one machine's processes
