"""Router evaluation: samples of the evaluation data sets from the original and updated model.

Contract: generation units (orchestrator/stages/generation.py) with `router_update.eval_samples`
samples per problem and `eval_problems_per_shard` problems per unit, same backend and sampling
otherwise, of every `eval_datasets` and `heldout_datasets` for each variant (original, updated,
each control at each seed), written to router_update/<model>/eval/<variant>/<dataset>/<k>.arrow.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from orchestrator.config import ModelConfig, RunConfig
from orchestrator.plan import Cell, Unit
from orchestrator.stages.generation import GenerationStage, generation_units
from orchestrator.stages.router import datasets, relocate, router_root
from orchestrator.tasks import GenerationTask


def eval_units(
    cfg: RunConfig,
    run_dir: Path,
    model: ModelConfig,
    variants: dict[str, ModelConfig],
    problems: dict[str, tuple[int, str]],
) -> dict[Cell, list[Unit[GenerationTask]]]:
    """Generation units of every evaluation and held-out dataset for each of `variants`
    ({name: model}: "original", "updated", the controls), under router_update/."""
    ru = cfg.router_update
    gen_cfg = dataclasses.replace(
        cfg.generation,
        samples_per_problem=ru.eval_samples,
        problems_per_shard=ru.eval_problems_per_shard,
    )
    root = router_root(run_dir, model) / "eval"
    out = {}
    for variant, m in variants.items():
        for d in datasets([*ru.eval_datasets, *ru.heldout_datasets], ru.problems_limit):
            units = generation_units(
                run_dir,
                m,
                d,
                gen_cfg,
                num_problems=problems[d.name][0],
                problems_sha256=problems[d.name][1],
            )
            out[Cell(m, d, {})] = [
                relocate(
                    u,
                    root / variant / d.name / u.path.name,
                    f"{model.name}/eval/{variant}/{d.name}/{u.path.stem}",
                )
                for u in units
            ]
    return out


class EvalStage(GenerationStage):
    name = "router_eval"
    plan = staticmethod(eval_units)
