"""Counterfactual Expert Impact: the virtual ablations of one scored shard at one MoE layer per
unit (docs/method.md, "Counterfactual Expert Impact"), after scoring, when `scoring.cei` is set.

Contract: `cei_units` gives one unit per (layer, input shard) of a cell, written to
cei/<model>/layer=<L>/<dataset>/<k>.arrow (workers.schemas.CEI_SCHEMA); its hash covers the
model's identity, the layer, every scorer setting that decides the scores, the gating of k-1
routes and the input shard by content. The scorer actors (orchestrator/actors.py ScorerWorker,
started by stages.scoring.ScorerSpawner) run a `CeiTask` with `cei`. `run_cei` runs the stage
over the cells that were scored, pruning stale files first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.config import ModelConfig, RunConfig, ScoringConfig, actor_cap, score_args
from orchestrator.plan import Cell, Unit, cei_dir, model_identity, without_unhashed
from orchestrator.shards import prune
from orchestrator.stage import Stage, run_stage
from orchestrator.stages.scoring import ScorerSpawner
from orchestrator.tasks import CeiTask
from workers.io import config_hash
from workers.scoring.score_config import SPEED_SETTINGS


def cei_units(
    run_dir: Path, cell: Cell, scoring: ScoringConfig, shards: list[tuple[Path, str]]
) -> list[Unit[CeiTask]]:
    """One unit per (layer, input shard); `shards` are (path, sha256) of the input files."""
    model, dataset = cell.model, cell.dataset
    values = {k: v for k, v in score_args(scoring, model).items() if k not in SPEED_SETTINGS}
    values = without_unhashed(values)
    identity = model_identity(model)
    units = []
    for layer in sorted(set(cell.layers.values())):
        out = cei_dir(run_dir, model, layer, dataset)
        for path, sha in shards:
            key = {"model": identity, "layer": layer, "score": values, "input": sha}
            units.append(
                Unit(
                    stage="cei",
                    key=f"{model.name}/layer={layer}/{dataset.name}/{path.stem}",
                    path=out / path.name,
                    root=run_dir,
                    config_hash=config_hash({**key, "gating": scoring.cei_gating}),
                    task=CeiTask(in_path=path, layer=layer, gating=scoring.cei_gating),
                )
            )
    return units


class CeiStage(Stage):
    name = "cei"
    task = CeiTask
    method = "cei"

    def actors(self) -> int | None:
        return actor_cap(self.cfg.cluster.scorers)

    def spawner(self, model: ModelConfig) -> ScorerSpawner:
        return ScorerSpawner(model, self.cfg, self.worker)

    plan = staticmethod(cei_units)


def run_cei(
    cfg: RunConfig,
    run_dir: Path,
    shards: dict[Cell, list[tuple[Path, str]]],
    worker: type,
    sink: Any = None,
) -> tuple[list[Any], dict[str, Any]]:
    """The cei stage over every scored cell's shards, one pool per model in the plan's order;
    (its outcomes, its progress metrics)."""
    by_model: dict[str, tuple[ModelConfig, list[Unit]]] = {}
    for cell, cell_shards in shards.items():
        units = cei_units(run_dir, cell, cfg.scoring, cell_shards)
        dirs = [cei_dir(run_dir, cell.model, L, cell.dataset) for L in set(cell.layers.values())]
        prune(run_dir, dirs, units)
        by_model.setdefault(cell.model.name, (cell.model, []))[1].extend(units)
    return run_stage(CeiStage(cfg, worker), list(by_model.values()), sink)
