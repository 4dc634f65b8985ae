"""What a stage is, and how one runs: the stage modules (orchestrator/stages/) fill it in.

Contract: a stage is one module under orchestrator/stages/ with one `Stage` subclass that
declares
- `name`: its progress and W&B name; `task`: the frozen task type its units carry
  (orchestrator/tasks.py);
- `plan(...)`: its units and their config hashes, from its config slice and its inputs by
  content (its own arguments: what the hash covers differs per stage);
- `spawner(model)`: which worker runs a task (a `Spawner`: the actor class made remote with
  its resources) and `method`, the worker method that takes the task;
- `complete(unit)`: when a unit's output counts as done (by default its file verifies against
  its sidecar, workers.io.is_complete), so a rerun skips it;
- `landed`: what happens when one of its units lands (a callback the run hands the stage;
  None: nothing but the bookkeeping every stage gets).
`stage_pool` makes the executor's `Pool` of one stage and model, with the run's retries and
start and unit deadlines; `run_stage` runs a stage whose units are all known up front and
returns its outcomes, failures recorded after the executor is done. The executor
(orchestrator/executor.py) knows none of this: it runs pools of actors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

from orchestrator.config import ModelConfig, RunConfig
from orchestrator.executor import Executor, Outcome, Pool
from orchestrator.plan import Unit
from orchestrator.progress import StageProgress
from workers.io import is_complete


class Spawner(Protocol):
    """Starts the actors of one stage and model: calling it returns a new actor handle."""

    def __call__(self) -> Any: ...
    def need(self) -> dict[str, float]: ...  # what one actor takes from the cluster
    def describe(self) -> str: ...  # "the scorer actor of model tiny, needing {...},"


@dataclass
class Stage:
    """One kind of work unit (see the module docstring); subclasses set the class variables
    and `spawner`, and give a `plan` method with the inputs their hashes cover."""

    name: ClassVar[str]
    task: ClassVar[type]
    method: ClassVar[str]

    cfg: RunConfig
    worker: type  # the worker class its actors run (tests pass failing subclasses)
    landed: Callable[[Outcome], None] | None = None

    def spawner(self, model: ModelConfig) -> Spawner:
        raise NotImplementedError

    def actors(self) -> int | None:
        """Most live actors per model; None: as many as the cluster has room for."""
        return None

    def complete(self, unit: Unit, checksum: bool) -> bool:
        return is_complete(unit.path, unit.config_hash, checksum=checksum)

    def call(self, actor: Any, unit: Unit) -> Any:
        """The one call that runs `unit` on `actor`: its method, its task, where to write."""
        method = getattr(actor, self.method)
        return method.remote(unit.task, str(unit.path), unit.config_hash, root=unit.root)


def stage_pool(stage: Stage, model: ModelConfig, progress: StageProgress, **options: Any) -> Pool:
    """The pool of `stage`'s actors for `model` under the run's retries and deadlines; a
    spawner that holds placement groups frees them (`release`, `close`)."""
    spawn, cluster = stage.spawner(model), stage.cfg.cluster
    return Pool(
        spawn,
        stage.call,
        stage.actors(),
        stage.cfg.scoring.retries,
        progress,
        need=spawn.need(),
        start_timeout_s=cluster.actor_start_timeout_s,
        unit_timeout_s=cluster.unit_timeout_s,
        release=getattr(spawn, "release", None),
        on_close=getattr(spawn, "close", None),
        describe=spawn.describe,
        on_outcome=stage.landed,
        **options,
    )


def incomplete(stage: Stage, units: list[Unit], checksum: bool) -> list[Unit]:
    return [u for u in units if not stage.complete(u, checksum)]


def run_stage(
    stage: Stage,
    units: list[tuple[ModelConfig, list[Unit]]],
    sink: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[Outcome], dict[str, Any]]:
    """`stage`'s incomplete units, all known up front, on one executor with a pool per model
    (served in the order given); (every outcome, the stage's final progress metrics)."""
    checksum = stage.cfg.verify_checksums
    pairs = list(units)
    todo = [(model, incomplete(stage, us, checksum)) for model, us in pairs]
    total = sum(len(us) for _, us in pairs)
    left = sum(len(us) for _, us in todo)
    progress = StageProgress(stage.name, total, skipped=total - left, sink=sink)
    executor = Executor(max_gpus=stage.cfg.cluster.max_gpus)
    pools = []
    for i, (model, us) in enumerate(todo):
        if us:
            pool = executor.add(stage_pool(stage, model, progress, priority=(i,)))
            pool.add(us)
            pool.seal()
            pools.append(pool)
    executor.run()
    return [o for p in pools for o in p.outcomes], progress.close()


def by_model(units: dict[Any, list[Unit]]) -> list[tuple[ModelConfig, list[Unit]]]:
    """Units of (model, dataset) cells grouped per model, in the cells' order."""
    out: dict[str, tuple[ModelConfig, list[Unit]]] = {}
    for cell, us in units.items():
        out.setdefault(cell.model.name, (cell.model, []))[1].extend(us)
    return list(out.values())


def absolute_path(model: ModelConfig) -> ModelConfig:
    """`model` with a relative `path` made absolute here, on the driver: actors run elsewhere."""
    from dataclasses import replace

    if model.path and not Path(model.path).is_absolute():
        return replace(model, path=str(Path(model.path).resolve()))
    return model
