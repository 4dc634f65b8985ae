"""Router rescoring: the training shards scored again with the updated model.

Contract: scoring units (orchestrator/stages/scoring.py) of the updated model at the update's
layer with the run's scoring settings, over the training shards, written to
router_update/<model>/rescore/<dataset>/<k>.arrow (a control's checkpoint likewise, under
router_update/<model>/controls/<variant>/rescore/). Each scores again the alternative routes the
original model's scores of that shard drew (not fresh draws from the updated router), so the
mechanism check compares the same alternatives before and after; the standard route is the
updated router's own.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from orchestrator.config import ModelConfig, RouterUpdateConfig, ScoringConfig
from orchestrator.plan import Cell, Unit
from orchestrator.stages.router import UPDATED, Variant, datasets, relocate, variant_root
from orchestrator.stages.scoring import ScoringStage, scoring_units
from orchestrator.tasks import ScoringTask
from workers.io import config_hash, read_sidecar


def rescore_units(
    run_dir: Path,
    ru: RouterUpdateConfig,
    scoring: ScoringConfig,
    model: ModelConfig,
    updated: ModelConfig,
    layer: int,
    shards: dict[str, list[tuple[Path, str]]],
    before: dict[str, list[Unit[ScoringTask]]],
    variant: Variant = UPDATED,
) -> dict[Cell, list[Unit[ScoringTask]]]:
    """{cell of the updated model: its units}; `shards` are each training data set's
    (path, sha256) input shards, `before` their complete scoring units under the original
    model, whose alternative routes each unit scores again (its hash covers them by content)."""
    root = variant_root(run_dir, model, variant)
    key = f"{model.name}/rescore" + ("" if variant == UPDATED else f"/{variant.name}")
    out = {}
    for d in datasets(ru.train_datasets, ru.problems_limit):
        cell = Cell(updated, d, {ru.layer: layer})
        units = scoring_units(run_dir, cell, scoring, shards[d.name])
        out[cell] = []
        for u, b in zip(units, before[d.name], strict=True):
            if u.task.in_path != b.task.in_path:
                raise ValueError(f"{u.task.in_path} is rescored against {b.task.in_path}")
            drawn = read_sidecar(b.path)["sha256"]
            out[cell].append(
                dataclasses.replace(
                    relocate(
                        u,
                        root / "rescore" / d.name / u.path.name,
                        f"{key}/{d.name}/{u.path.stem}",
                    ),
                    config_hash=config_hash({"unit": u.config_hash, "draws": drawn}),
                    task=dataclasses.replace(u.task, draws=b.path),
                )
            )
    return out


class RescoreStage(ScoringStage):
    name = "router_rescore"
    plan = staticmethod(rescore_units)
