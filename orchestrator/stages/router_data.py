"""The router update's training data: generation and scoring of its training data sets.

Contract: the very units the main stages make (orchestrator/stages/generation.py, scoring.py)
for each `router_update.train_datasets` at the update's layer, so a sweep that already scored
them is reused as is; only their progress names differ.
"""

from __future__ import annotations

from orchestrator.config import ModelConfig, RouterUpdateConfig
from orchestrator.plan import Cell
from orchestrator.stages.generation import GenerationStage
from orchestrator.stages.router import datasets
from orchestrator.stages.scoring import ScoringStage


def training_cells(ru: RouterUpdateConfig, model: ModelConfig, layer: int) -> list[Cell]:
    """The (model, training data set) cells at the update's layer."""
    return [
        Cell(model, d, {ru.layer: layer}) for d in datasets(ru.train_datasets, ru.problems_limit)
    ]


class DataGenerationStage(GenerationStage):
    name = "router_data_generation"


class DataScoringStage(ScoringStage):
    name = "router_data_scoring"
