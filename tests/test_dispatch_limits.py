"""Bounded waits and shared resources on a real local Ray: actors that cannot start, units
that hang, the placement group of an actor that dies, and pools that hand GPUs to each other.
Ray is started here with two (declared, not real) GPUs so that GPU actors and placement
groups of GPU bundles can be made on a CPU machine.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
from pipeline_runs import run_cli

from orchestrator.config import RunConfig
from orchestrator.errors import ActorStartError
from orchestrator.executor import Executor, Pool, dispatch
from orchestrator.plan import Unit
from orchestrator.progress import StageProgress
from orchestrator.stages.generation import GeneratorSpawner


@pytest.fixture(scope="module")
def gpu_ray():
    # The workers cannot import this test module: ship its classes by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False)
    yield
    ray.shutdown()


class Worker:
    """Runs a unit per its name: 'hang-once' hangs on its first try (a marker file records
    it), 'hang' always, 'die-once' kills its process once, anything else returns at once."""

    def __init__(self, *args, **kwargs):
        pass

    def pid(self) -> int:
        return os.getpid()

    def run(self, name: str, marker: str) -> dict:
        first = not Path(marker).exists()
        Path(marker).touch()
        if name == "hang" or (name == "hang-once" and first):
            time.sleep(3600)
        if name == "die-once" and first:
            os._exit(1)
        return {"tokens": 1}


def units(tmp_path, *names):
    """Units whose task is the path of their marker file."""
    return [Unit("generation", n, tmp_path / f"{n}.arrow", "h", str(tmp_path / n)) for n in names]


def test_a_hung_unit_is_timed_out_retried_then_logged(gpu_ray, tmp_path):
    spawn = ray.remote(num_cpus=1)(Worker).remote
    started = time.monotonic()
    outcomes = dispatch(
        units(tmp_path, "ok", "hang-once", "hang"),
        spawn=spawn,
        call=lambda a, u: a.run.remote(u.key, u.task),
        actors=1,
        retries=1,
        progress=StageProgress("generation", 3),
        start_timeout_s=60,
        unit_timeout_s=3,
    )
    by_key = {o.unit.key: o for o in outcomes}
    assert by_key["ok"].ok and by_key["hang-once"].ok and by_key["hang-once"].attempts == 2
    assert not by_key["hang"].ok and by_key["hang"].attempts == 2
    assert "timed out after 3 s" in by_key["hang"].error
    assert time.monotonic() - started < 40


def test_an_unschedulable_actor_fails_the_stage_naming_the_resource(gpu_ray, tmp_path):
    spawn = ray.remote(num_cpus=1, resources={"TPU": 1})(Worker).remote
    with pytest.raises(ActorStartError, match=r"needing \{'TPU': 1\}.*within 2 s"):
        dispatch(
            units(tmp_path, "ok"),
            spawn=spawn,
            call=lambda a, u: a.run.remote(u.key, u.task),
            actors=1,
            retries=0,
            progress=StageProgress("generation", 1),
            start_timeout_s=2,
            describe=lambda: "the test actor, needing {'TPU': 1},",
        )


def test_the_placement_group_of_a_dead_actor_is_freed_at_once(gpu_ray, tmp_path):
    """Two GPUs, a tensor-parallel (2) generator that dies in its first unit: its replacement
    can only be placed if the dead actor's group was removed when it went."""
    cfg = RunConfig()
    cfg.generation.backend = "vllm"
    cfg.cluster.use_gpus, cfg.cluster.actor_start_timeout_s = True, 20
    model = SimpleNamespace(
        name="m", path=None, dtype="float32", tensor_parallel_size=2, generation_backend=None,
        engine=cfg.model.engine,
    )  # fmt: skip
    spawner = GeneratorSpawner(model, cfg, Worker)
    assert spawner.options["distributed_executor_backend"] == "ray"
    outcomes = dispatch(
        units(tmp_path, "die-once"),
        spawn=spawner,
        call=lambda a, u: a.run.remote(u.key, u.task),
        actors=1,
        retries=1,
        progress=StageProgress("generation", 1),
        start_timeout_s=20,
        release=spawner.release,
        describe=spawner.describe,
    )
    assert outcomes[0].ok and outcomes[0].attempts == 2
    spawner.close()
    states = [g["state"] for g in ray.util.placement_group_table().values()]
    assert len(states) == 2 and set(states) == {"REMOVED"}


def test_driver_exits_2_with_one_error_line_when_no_node_has_a_gpu(tmp_path):
    result = run_cli(tmp_path, "nogpu", "cluster.use_gpus=true", "cluster.actor_start_timeout_s=5")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'GPU': 1" in errors[0] and "within 5 s" in errors[0]
    assert not list((tmp_path / "nogpu").rglob("trajectories/**/*.done.json"))


class Timed:
    """Runs a unit: waits until `wait_for` exists (at most 60 s), creates `touch`, returns
    its start and end times."""

    def run(self, wait_for: str | None, touch: str | None) -> dict:
        start = time.time()
        while wait_for and not Path(wait_for).exists() and time.time() - start < 60:
            time.sleep(0.02)
        if touch:
            Path(touch).touch()
        return {"start": start, "end": time.time()}


def test_a_later_pool_takes_a_gpu_as_soon_as_an_earlier_one_frees_it(gpu_ray, tmp_path):
    """Two GPUs. Pool A (served first) has a slow and a fast unit on two one-GPU actors; pool
    B needs a GPU too. B must wait while A holds both GPUs, and start as soon as A's fast
    actor, left with nothing to do, is closed: while A's slow unit (which waits for B's) runs."""
    actor = ray.remote(num_cpus=0, num_gpus=1)(Timed)
    results: dict[str, dict] = {}

    def pool(priority: tuple[int], units: dict[str, dict]) -> Pool:
        p = Pool(
            actor.remote,
            lambda a, u: a.run.remote(u.task.get("wait_for"), u.task.get("touch")),
            actors=2,
            retries=0,
            progress=StageProgress("t", len(units)),
            priority=priority,
            need={"GPU": 1},
            on_outcome=lambda o: results.update({o.unit.key: o.result}),
        )
        p.add(Unit("t", key, tmp_path / key, "h", task) for key, task in units.items())
        p.seal()
        return p

    b_ran = str(tmp_path / "b-ran")
    executor = Executor()
    a = executor.add(pool((0,), {"slow": {"wait_for": b_ran}, "fast": {}}))
    b = executor.add(pool((1,), {"b": {"touch": b_ran}}))
    executor.run()
    assert sorted(results) == ["b", "fast", "slow"]
    assert results["fast"]["end"] <= results["b"]["start"]  # B waited for a free GPU...
    assert results["b"]["start"] < results["slow"]["end"]  # ...and ran beside A's slow unit
    assert results["slow"]["end"] - results["slow"]["start"] < 50  # not by the 60 s fallback
    assert a.closed and b.closed and not a.live and not b.live


class Sleeper:
    def run(self, seconds: float) -> dict:
        start = time.time()
        time.sleep(seconds)
        return {"start": start, "end": time.time()}


@pytest.mark.parametrize("max_gpus", [None, 1])
def test_an_uncapped_pool_grows_to_the_free_gpus_under_max_gpus(gpu_ray, tmp_path, max_gpus):
    """Two GPUs, two queued units each worth a model load: without a budget the pool starts
    two actors at once; `max_gpus=1` holds the run to one, which runs the units in turn."""
    results: list[dict] = []
    spawned: list[object] = []
    actor = ray.remote(num_cpus=0, num_gpus=1)(Sleeper)
    pool = Pool(
        lambda: spawned.append(actor.remote()) or spawned[-1],
        lambda a, u: a.run.remote(u.task),
        actors=None,
        retries=0,
        progress=StageProgress("t", 2),
        need={"GPU": 1},
        unit_cost=1000.0,  # estimated seconds: each unit pays for its own actor's load
        on_outcome=lambda o: results.append(o.result),
    )
    pool.add(Unit("t", k, tmp_path / k, "h", 0.5) for k in ("a", "b"))
    pool.seal()
    executor = Executor(max_gpus=max_gpus)
    executor.add(pool)
    executor.run()
    assert len(spawned) == (2 if max_gpus is None else 1) and len(results) == 2
    if max_gpus == 1:
        first, second = sorted(results, key=lambda r: r["start"])
        assert first["end"] <= second["start"]


def test_a_worker_killed_for_memory_is_described_by_its_first_line():
    from ray.exceptions import OutOfMemoryError

    from orchestrator.executor import describe_error

    err = OutOfMemoryError("2 worker(s) were killed due to the node running low on memory.\n"
                           "Top 10 memory users: ...\nSet max_restarts to retry")  # fmt: skip
    assert describe_error(err) == (
        "OutOfMemoryError: 2 worker(s) were killed due to the node running low on memory."
    )


class DiesInFirstWave:
    """Its process exits while it starts (no exception: as when its node is lost) for the
    first `n` actors made; later ones start."""

    def __init__(self, folder: str, n: int):
        mine = Path(folder) / f"{os.getpid()}-{time.monotonic_ns()}"
        mine.touch()
        if len(list(Path(folder).iterdir())) <= n:
            os._exit(1)

    def run(self, name: str, marker: str) -> dict:
        return {"tokens": 1}


def test_actors_lost_together_while_starting_count_as_one_loss(gpu_ray, tmp_path):
    """Three actors asked for at once all die while starting (one lost node): with retries=0
    that is one loss, so their replacements start and every unit completes."""
    made = tmp_path / "made"
    made.mkdir()
    spawn = lambda: ray.remote(num_cpus=0.5)(DiesInFirstWave).remote(str(made), 3)  # noqa: E731
    outcomes = dispatch(
        units(tmp_path, "a", "b", "c", "d"),
        spawn=spawn,
        call=lambda a, u: a.run.remote(u.key, u.task),
        actors=3,
        retries=0,
        progress=StageProgress("generation", 4),
        start_timeout_s=60,
    )
    assert all(o.ok for o in outcomes) and len(outcomes) == 4
    assert len(list(made.iterdir())) > 3  # the first three died, replacements ran the units
