"""Scoring: the counterfactual scores of one trajectory shard at one MoE layer per unit.

Contract: `ScoringStage.plan` gives one unit per (layer, input shard) of a cell, written to
scores/<model>/layer=<L>/<dataset>/<k>.arrow; its hash covers the model's identity, the layer,
every scorer setting that decides the scores (not those of speed only, which may change on
resume) and the input shard by content. A `ScorerWorker` (orchestrator/actors.py) runs a
`ScoringTask` with `score`, started by a `ScorerSpawner` that loads the model once per actor.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ray

from orchestrator import actors
from orchestrator.config import ModelConfig, RunConfig, ScoringConfig, actor_cap, score_args
from orchestrator.plan import Cell, Unit, model_identity, scores_dir, without_unhashed
from orchestrator.stage import Stage, absolute_path
from orchestrator.tasks import ScoringTask
from workers.io import config_hash
from workers.scoring.score_config import SPEED_SETTINGS


def scoring_units(
    run_dir: Path, cell: Cell, scoring: ScoringConfig, shards: list[tuple[Path, str]]
) -> list[Unit[ScoringTask]]:
    """One unit per (layer, input shard); `shards` are (path, sha256) of the input files."""
    model, dataset = cell.model, cell.dataset
    # Every scorer setting that decides the scores; those of speed only may change on resume.
    values = {k: v for k, v in score_args(scoring, model).items() if k not in SPEED_SETTINGS}
    values = without_unhashed(values)  # the position budget only where it is set
    identity = model_identity(model)
    units = []
    for layer in sorted(set(cell.layers.values())):
        out = scores_dir(run_dir, model, layer, dataset)
        for path, sha in shards:
            units.append(
                Unit(
                    stage="scoring",
                    key=f"{model.name}/layer={layer}/{dataset.name}/{path.stem}",
                    path=out / path.name,
                    root=run_dir,
                    config_hash=config_hash(
                        {
                            "model": identity,
                            "layer": layer,
                            "score": values,
                            "input": sha,
                        }
                    ),
                    task=ScoringTask(in_path=path, layer=layer),
                )
            )
    return units


def expected_scoring_units(cell: Cell, units: list[Unit], cfg: RunConfig) -> int:
    """The scoring units a cell brings when every trajectory its generation `units` write
    is kept."""
    problems = sum(u.task.rows[1] - u.task.rows[0] for u in units)
    trajectories = problems * cfg.generation.samples_per_problem
    shards = math.ceil(trajectories / cfg.scoring.trajectories_per_shard)
    return len(set(cell.layers.values())) * shards


class ScorerSpawner:
    """Starts scorer actors for one model; each loads the model once and takes many units."""

    def __init__(self, model: ModelConfig, cfg: RunConfig, worker: type = actors.ScorerWorker):
        self.model, self.cluster = absolute_path(model), cfg.cluster
        self.actor_cls = ray.remote(worker)
        device = "cuda" if self.cluster.use_gpus else "cpu"
        self.score_options = {**score_args(cfg.scoring, model), "device": device}
        self.gpus = model.gpus if self.cluster.use_gpus else 0

    def __call__(self) -> Any:
        options = {"num_cpus": self.cluster.cpus_per_actor, "num_gpus": self.gpus}
        return self.actor_cls.options(max_restarts=0, **options).remote(
            self.model,
            self.score_options,
            torch_threads=self.cluster.torch_threads,
            provenance=actors.driver_provenance(),
            compression=self.cluster.compression,
        )

    def need(self) -> dict[str, float]:
        return {"CPU": self.cluster.cpus_per_actor, "GPU": self.gpus}

    def describe(self) -> str:
        return f"the scorer actor of model {self.model.name}, needing {self.need()},"


class ScoringStage(Stage):
    name = "scoring"
    task = ScoringTask
    method = "score"

    def actors(self) -> int | None:
        return actor_cap(self.cfg.cluster.scorers)

    def spawner(self, model: ModelConfig) -> ScorerSpawner:
        return ScorerSpawner(model, self.cfg, self.worker)

    plan = staticmethod(scoring_units)
