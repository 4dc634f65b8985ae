"""Router rescoring: the training shards scored again with the updated model.

Contract: scoring units (orchestrator/stages/scoring.py) of the updated model at the update's
layer with the run's scoring settings, over the training shards, written to
router_update/<model>/rescore/<dataset>/<k>.arrow.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import ModelConfig, RouterUpdateConfig, ScoringConfig
from orchestrator.plan import Cell, Unit
from orchestrator.stages.router import datasets, relocate, router_root
from orchestrator.stages.scoring import ScoringStage, scoring_units
from orchestrator.tasks import ScoringTask


def rescore_units(
    run_dir: Path,
    ru: RouterUpdateConfig,
    scoring: ScoringConfig,
    model: ModelConfig,
    updated: ModelConfig,
    layer: int,
    shards: dict[str, list[tuple[Path, str]]],
) -> dict[Cell, list[Unit[ScoringTask]]]:
    """{cell of the updated model: its units}; `shards` are each training data set's
    (path, sha256) input shards."""
    root = router_root(run_dir, model)
    out = {}
    for d in datasets(ru.train_datasets, ru.problems_limit):
        cell = Cell(updated, d, {ru.layer: layer})
        out[cell] = [
            relocate(
                u,
                root / "rescore" / d.name / u.path.name,
                f"{model.name}/rescore/{d.name}/{u.path.stem}",
            )
            for u in scoring_units(run_dir, cell, scoring, shards[d.name])
        ]
    return out


class RescoreStage(ScoringStage):
    name = "router_rescore"
    plan = staticmethod(rescore_units)
