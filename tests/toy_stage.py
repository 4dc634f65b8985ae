"""A stage added in one module: the squares of a range of numbers, one small Arrow file per unit.

What a new stage brings: its task type, how its units and hashes are planned, its worker (a
plain class) with the actor that runs it, and its `Stage` declaration; the config it reads is
the run's (`cluster` for its actors, `scoring.retries`, `verify_checksums`). Ray's workers cannot
import the tests folder: this module is shipped to them by value.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from orchestrator.config import ModelConfig
from orchestrator.plan import Unit
from orchestrator.stage import Stage
from workers.io import config_hash, write_arrow

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclass(frozen=True)
class SquareTask:
    """Square the numbers start .. stop - 1."""

    start: int
    stop: int


class SquareWorker:
    """Writes one table of (n, n squared) per task."""

    def __init__(self, label: str):
        self.label = label

    def square(
        self, task: SquareTask, out_path: str, unit_hash: str, root: Path | None = None
    ) -> dict[str, Any]:
        numbers = list(range(task.start, task.stop))
        table = pa.table({"n": numbers, "square": [n * n for n in numbers]})
        write_arrow(table, out_path, config_hash=unit_hash, extra={"label": self.label}, root=root)
        return {"rows": table.num_rows, "tokens": table.num_rows}


class SquareSpawner:
    def __init__(self, model: ModelConfig, cluster: Any, worker: type):
        self.model, self.cluster, self.actor_cls = model, cluster, ray.remote(worker)

    def __call__(self) -> Any:
        options = {"num_cpus": self.cluster.cpus_per_actor, "max_restarts": 0}
        return self.actor_cls.options(**options).remote(self.model.name)

    def need(self) -> dict[str, float]:
        return {"CPU": self.cluster.cpus_per_actor}

    def describe(self) -> str:
        return f"the square actor of {self.model.name}, needing {self.need()},"


def square_units(run_dir: Path, model: ModelConfig, numbers: int, per_unit: int) -> list[Unit]:
    """One unit per `per_unit` numbers of range(numbers), squares/<model>/<k>.arrow."""
    units = []
    for k, start in enumerate(range(0, numbers, per_unit)):
        rows = (start, min(start + per_unit, numbers))
        units.append(
            Unit(
                stage="squares",
                key=f"{model.name}/{k:05d}",
                path=run_dir / "squares" / model.name / f"{k:05d}.arrow",
                root=run_dir,
                config_hash=config_hash({"rows": list(rows)}),
                task=SquareTask(*rows),
            )
        )
    return units


class SquareStage(Stage):
    name = "squares"
    task = SquareTask
    method = "square"
    plan = staticmethod(square_units)

    def spawner(self, model: ModelConfig) -> SquareSpawner:
        return SquareSpawner(model, self.cfg.cluster, self.worker)
