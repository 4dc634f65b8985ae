"""The router update: training data -> preferences -> update -> pass@K -> rescoring.

Contract: `run_router_update(cfg, run_dir, summary, run_id=..., sink=..., session=...)` runs,
for each model of `router_models(cfg)` and after the main stages, these steps as resumable
work units, each step a stage of orchestrator/stages/ run through the same executor, pools and
start and unit deadlines as the main stages (a unit is skipped when its stage says it is
complete, as elsewhere):
1. training data: generation, shards and scoring at the update's layer of each
   `router_update.train_datasets`, the very units the main pipeline would make (so a sweep
   that already scored them is reused as is);
2. preferences: `router_update/<model>/preferences.arrow` (workers.router.update: the
   selected tokens and the router input x at each, one standard pass per trajectory);
3. training: `router_update/<model>/train_log.arrow` plus the checkpoint directory
   `router_update/<model>/checkpoint/` (complete only while its files match the fingerprint
   in the log's sidecar);
4. evaluation: `eval_samples` samples per problem of `eval_datasets` from the original and
   the updated model, same backend and sampling, `router_update/<model>/eval/<variant>/...`;
5. rescoring: the training shards scored with the updated model at the same layer and with
   the same scoring settings, the alternatives those of the original model's scores (drawn
   once), `router_update/<model>/rescore/<dataset>/<k>.arrow`;
6. analysis (not a unit; cheap, rebuilt every run): pass@K tables and figure, the mechanism
   table, `router_update.md`, one W&B run per step (job_type router_*, grouped with the run).
`describe_router_plan(cfg)` is the dry run's text. Returns the path of router_update.md, or
None when some unit failed before the analysis could run (the failures are in the summary).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import plan
from orchestrator.actors import DEFAULT_WORKERS, Workers
from orchestrator.config import ModelConfig, RunConfig, resolve_layer, router_models
from orchestrator.errors import PipelineError
from orchestrator.problems import prepare_datasets
from orchestrator.shards import write_shards
from orchestrator.stage import Stage, by_model, run_stage
from orchestrator.stages.generation import generation_units
from orchestrator.stages.router import datasets, trained_variants, updated_model
from orchestrator.stages.router_data import DataGenerationStage, DataScoringStage, training_cells
from orchestrator.stages.router_eval import EvalStage, eval_units
from orchestrator.stages.router_preferences import PreferenceStage, preference_unit
from orchestrator.stages.router_rescore import RescoreStage, rescore_units
from orchestrator.stages.router_train import TrainStage, train_unit
from orchestrator.stages.scoring import scoring_units
from orchestrator.summary import RunSummary, Sink, record_failures

# {dataset: ([(shard path, sha256)], [scoring units])}: a model's training data at its layer
TrainingData = dict[str, tuple[list[tuple[Path, str]], list[plan.Unit]]]


def run_router_update(
    cfg: RunConfig,
    run_dir: Path,
    summary: RunSummary,
    *,
    run_id: str,
    sink: Sink | None = None,
    session: Any = None,
    workers: Workers = DEFAULT_WORKERS,
) -> Path | None:
    ru = cfg.router_update
    problems = prepare_datasets(
        run_dir,
        datasets([*ru.train_datasets, *ru.eval_datasets, *ru.heldout_datasets], ru.problems_limit),
        checksum=cfg.verify_checksums,
    )
    run = RouterRun(cfg, run_dir, summary, sink, workers)
    sections = []
    for model in router_models(cfg):
        section = update_model(run, model, problems, run_id=run_id, session=session)
        if section is not None:
            sections.append(section)
    if not sections:
        return None
    from orchestrator.router_report import write_markdown

    return write_markdown(run_dir, sections, ru)


def update_model(
    run: RouterRun,
    model: ModelConfig,
    problems: dict[str, tuple[int, str]],
    *,
    run_id: str,
    session: Any,
) -> Any:
    """Steps 1-6 for one model: its report section, or None when a step did not complete."""
    cfg, run_dir, summary, workers = run.cfg, run.run_dir, run.summary, run.workers
    ru = cfg.router_update
    layer = resolve_layer(model, ru.layer)
    failures_before = len(summary.failures)
    # 1. Training data at the update's layer: the main stages' own units.
    data = run.training_data(model, layer, problems)
    if data is None:
        return None
    score_paths = [u.path for _, units in data.values() for u in units]
    shard_paths = [p for shards, _ in data.values() for p, _ in shards]
    # 2. Preferences.
    pref = preference_unit(run_dir, model, layer, ru, score_paths, shard_paths)
    if not run.stage(PreferenceStage(cfg, workers.router), [(model, [pref])]):
        return None
    # 3. Training: the real update's checkpoint, then each control's at each seed.
    variants = trained_variants(ru)
    trains = {
        v.name: train_unit(run_dir, model, layer, ru, pref.path, v, tuple(score_paths))
        for v in variants
    }
    if not run.stage(TrainStage(cfg, workers.router), [(model, list(trains.values()))]):
        return None
    models = {"original": model} | {v.name: updated_model(run_dir, model, v) for v in variants}
    # 4. Evaluation: every variant, same backend and sampling.
    evals = eval_units(cfg, run_dir, model, models, problems)
    run.stage(EvalStage(cfg, workers.generator), by_model(evals))
    # 5. Rescoring of the training shards with each trained model, the original draws.
    shards = {name: shards for name, (shards, _) in data.items()}
    before = {name: units for name, (_, units) in data.items()}
    rescores = {
        v.name: rescore_units(
            run_dir, ru, cfg.scoring, model, models[v.name], layer, shards, before, v
        )
        for v in variants
    }
    run.stage(
        RescoreStage(cfg, workers.scorer),
        by_model({c: us for r in rescores.values() for c, us in r.items()}),
    )
    if len(summary.failures) > failures_before:
        return None
    # 6. Analysis of this model.
    from orchestrator.router_report import analyse_model

    return analyse_model(
        run_dir,
        model,
        layer,
        ru,
        pref_path=pref.path,
        train_paths={name: u.path for name, u in trains.items()},
        eval_paths={
            v: [u.path for c, us in evals.items() if c.model.name == m.name for u in us]
            for v, m in models.items()
        },
        before=score_paths,
        after={v: [u.path for us in r.values() for u in us] for v, r in rescores.items()},
        run_id=run_id,
        session=session,
    )


@dataclass
class RouterRun:
    """What every step of the update shares: the run, its summary and its workers."""

    cfg: RunConfig
    run_dir: Path
    summary: RunSummary
    sink: Sink | None
    workers: Workers

    def stage(self, stage: Stage, units: list[tuple[ModelConfig, list[plan.Unit]]]) -> bool:
        """Run `stage`'s incomplete `units` on the executor; record its failures and metrics
        once it is done; whether every unit is complete now."""
        outcomes, metrics = run_stage(stage, units, sink=self.sink)
        record_failures(self.summary, outcomes)
        self.summary.stages[stage.name] = metrics
        return all(stage.complete(u, checksum=False) for _, us in units for u in us)

    def training_data(
        self, model: ModelConfig, layer: int, problems: dict[str, tuple[int, str]]
    ) -> TrainingData | None:
        """The training data sets generated, sharded and scored at `layer`, running whatever
        is incomplete; None if some of it failed."""
        cfg, run_dir = self.cfg, self.run_dir
        ru = cfg.router_update
        cells = training_cells(ru, model, layer)
        gen = {
            c: generation_units(
                run_dir,
                c.model,
                c.dataset,
                cfg.generation,
                num_problems=problems[c.dataset.name][0],
                problems_sha256=problems[c.dataset.name][1],
            )
            for c in cells
        }
        if not self.stage(DataGenerationStage(cfg, self.workers.generator), by_model(gen)):
            self.summary.warnings.append(
                f"{model.name}: router update skipped (training data incomplete)"
            )
            return None
        shards = {c: write_shards(run_dir, c, cfg, gen[c])[0] for c in cells}
        if not any(shards.values()):
            raise PipelineError(
                f"{model.name}: no verified trajectories in {ru.train_datasets} to train the"
                " router on"
            )
        units = {c: scoring_units(run_dir, c, cfg.scoring, shards[c]) for c in cells}
        if not self.stage(DataScoringStage(cfg, self.workers.scorer), by_model(units)):
            self.summary.warnings.append(
                f"{model.name}: router update skipped (training scores incomplete)"
            )
            return None
        return {c.dataset.name: (shards[c], units[c]) for c in cells}


# ------------------------------------------------------------------------------- the dry run


def describe_router_plan(cfg: RunConfig) -> str:
    """The router update's plan: models and their layer, data, units, samples, then its
    GPU-hours and the run's (orchestrator/estimate.py)."""
    ru = cfg.router_update
    train = datasets(ru.train_datasets, ru.problems_limit)
    evals = datasets([*ru.eval_datasets, *ru.heldout_datasets], ru.problems_limit)
    n_eval = sum(min(d.limit or d.size, d.size) for d in evals)
    n_var = 1 + len(trained_variants(ru))
    lines = [
        "",
        f"router update ({ru.name}): train the router of the {ru.layer} MoE layer only",
        f"  train on: {', '.join(d.name for d in train)} (final-layer scores; preference tokens"
        f" pbar < {ru.fragile} with gain > {ru.margin}, anchors pbar >= {ru.confident};"
        f" {ru.holdout_share:.0%} of problems held out)",
        f"  loss: DPO beta={ru.beta} + {ru.anchor_weight} x KL on anchors; Adam lr={ru.lr}"
        f" steps={ru.steps} seed={ru.seed}",
        f"  controls: {', '.join(ru.controls) or 'none'} at seeds {ru.seeds or [ru.seed]}",
        f"  evaluate on: {', '.join(d.name for d in evals)} ({n_eval} problems) x"
        f" {ru.eval_samples} samples x {n_var} variants (original, updated"
        f"{', controls' if n_var > 2 else ''}) = {n_var * n_eval * ru.eval_samples:,}"
        f" completions; pass@K for K = 1, 2, 4, ..., {ru.eval_samples}",
        "",
        f"{'model':<16} {'layer':>5}  router tensors  units: gen+score(train data), preferences,"
        " train, eval gen, rescore",
    ]
    for model in router_models(cfg):
        layer = resolve_layer(model, ru.layer)
        tensor = "gate.weight" if model.family != "gpt_oss" else "router.weight + router.bias"
        gen = sum(
            -(-min(d.limit or d.size, d.size) // cfg.generation.problems_per_shard) for d in train
        )
        ev = n_var * sum(
            -(-min(d.limit or d.size, d.size) // ru.eval_problems_per_shard) for d in evals
        )
        lines.append(
            f"{model.name:<16} {layer:>5}  mlp.{tensor} ({model.num_experts} experts)"
            f"  {gen} + <=scoring, 1, 1, {ev}, <=scoring"
        )
    from orchestrator.estimate import describe_router_estimate

    cells = plan.estimate(cfg)
    lines.append(describe_router_estimate(cfg, train, evals, cells, plan.scored_positions(cells)))
    return "\n".join(lines)
