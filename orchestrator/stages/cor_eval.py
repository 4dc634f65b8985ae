"""CoR evaluation: the evaluation sets' questions scored under each routing condition.

Contract: `cor_units` gives one unit per (condition, dataset, shard of `cor.questions_per_unit`
questions) of one model, written to cor/<model>/eval/<condition>/<dataset>/<k>.arrow
(workers.generation.cor_eval.EVAL_SCHEMA; the sidecar records the routed experts per token the
unit ran). Its hash covers the model's identity, the condition's plan (k_l, forced experts,
random seed), the prompts and answer settings, and the questions by content (the problems
file's sha256 and the rows). The model's router actor (orchestrator/stages/router.py
RouterSpawner) runs a `CorEvalTask` with `cor_eval`, one unit at a time.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.config import CorConfig, DatasetConfig, ModelConfig
from orchestrator.plan import Unit, model_identity, problems_path
from orchestrator.stages.router import RouterStage
from orchestrator.tasks import CorEvalTask
from workers.generation.cor_eval import EvalSettings
from workers.generation.reroute import ReroutePlan
from workers.io import config_hash


def cor_root(run_dir: Path, model: ModelConfig) -> Path:
    return run_dir / "cor" / model.name


def eval_settings(cor: CorConfig) -> EvalSettings:
    return EvalSettings(cor.mc_template, cor.qa_template, cor.max_new_tokens, tuple(cor.stop))


def plan_record(plan: ReroutePlan) -> dict:
    """The plan as plain data (its hash key and its row in the report)."""
    return {
        "k": {str(layer): n for layer, n in plan.k.items()},
        "forced": {str(layer): list(ids) for layer, ids in plan.forced.items()},
        "random_seed": plan.random_seed,
    }


def cor_units(
    run_dir: Path,
    model: ModelConfig,
    cor: CorConfig,
    plans: dict[str, ReroutePlan],
    problems: dict[str, tuple[int, str]],
    sets: list[DatasetConfig],
) -> list[Unit[CorEvalTask]]:
    """Every unit of `model`: conditions in `plans`' order, then `sets` (orchestrator.config
    cor_datasets), then shards."""
    settings = eval_settings(cor)
    identity = model_identity(model)
    units = []
    for condition, plan in plans.items():
        for d in sets:
            rows, sha = problems[d.name]
            out = cor_root(run_dir, model) / "eval" / condition / d.name
            for k, start in enumerate(range(0, rows, cor.questions_per_unit)):
                stop = min(rows, start + cor.questions_per_unit)
                key = {
                    "model": identity,
                    "plan": plan_record(plan),
                    "settings": vars(settings),
                    "problems": sha,
                    "rows": [start, stop],
                }
                units.append(
                    Unit(
                        stage="cor_eval",
                        key=f"{model.name}/{condition}/{d.name}/{k:05d}",
                        path=out / f"{k:05d}.arrow",
                        root=run_dir,
                        config_hash=config_hash(key),
                        task=CorEvalTask(
                            problems_path=problems_path(run_dir, d),
                            rows=(start, stop),
                            kind=d.loader,
                            condition=condition,
                            plan=plan,
                            settings=settings,
                        ),
                    )
                )
    return units


class CorEvalStage(RouterStage):
    name = "cor_eval"
    task = CorEvalTask
    method = "cor_eval"
    plan = staticmethod(cor_units)
