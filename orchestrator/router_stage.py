"""The router update stage: training data -> preferences -> update -> pass@K -> rescoring.

Contract: `run_router_update(cfg, run_dir, summary, run_id=..., sink=..., session=...)` runs,
for each model of `router_models(cfg)` and after the main stages, these steps as resumable
work units (a unit is skipped when its file's sidecar matches its config hash, as elsewhere):
1. training data: generation, shards and scoring at the update's layer of each
   `router_update.train_datasets`, the very units the main pipeline would make (so a sweep
   that already scored them is reused as is);
2. preferences: `router_update/<model>/preferences.arrow` (workers.router_update: the
   selected tokens and the router input x at each, one standard pass per trajectory);
3. training: `router_update/<model>/train_log.arrow` plus the checkpoint directory
   `router_update/<model>/checkpoint/` (complete only while its files match the fingerprint
   in the log's sidecar);
4. evaluation: `eval_samples` samples per problem of `eval_datasets` from the original and
   the updated model, same backend and sampling, `router_update/<model>/eval/<variant>/...`;
5. rescoring: the training shards scored with the updated model at the same layer and with
   the same scoring settings, `router_update/<model>/rescore/<dataset>/<k>.arrow`;
6. analysis (not a unit; cheap, rebuilt every run): pass@K tables and figure, the mechanism
   table, `router_update.md`, one W&B run per step (job_type router_*, grouped with the run).
`describe_router_plan(cfg)` is the dry run's text. Returns the path of router_update.md, or
None when some unit failed before the analysis could run (the failures are in the summary).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import plan
from orchestrator.config import (
    DatasetConfig,
    ModelConfig,
    RouterUpdateConfig,
    RunConfig,
    load_option,
    resolve_layer,
    router_models,
)
from orchestrator.pipeline import (
    PipelineError,
    RunSummary,
    Sink,
    generator_pool,
    prepare_datasets,
    record_failures,
    run_units,
    scorer_pool,
    write_shards,
)
from orchestrator.tasks import GenerationTask, PreferenceTask, TrainTask
from workers.io import config_hash, is_complete, read_arrow, read_sidecar, write_arrow

if TYPE_CHECKING:
    from workers.router_update import UpdateConfig

VARIANTS = ("original", "updated")
SELECT_KEYS = ("margin", "fragile", "confident", "max_anchor_tokens", "holdout_share", "seed")
TRAIN_KEYS = ("beta", "anchor_weight", "steps", "lr", "seed")


def update_config(ru: RouterUpdateConfig) -> UpdateConfig:
    """The update's hyperparameters as the worker takes them."""
    from workers.router_update import UpdateConfig  # loads torch: the router stage only

    return UpdateConfig(**{k: getattr(ru, k) for k in (*SELECT_KEYS, *TRAIN_KEYS)})


def router_root(run_dir: Path, model: ModelConfig) -> Path:
    return run_dir / "router_update" / model.name


def updated_model(run_dir: Path, model: ModelConfig) -> ModelConfig:
    """The updated checkpoint as a model of its own (name <model>-router, loaded from disk)."""
    ckpt = router_root(run_dir, model) / "checkpoint"
    return dataclasses.replace(model, name=f"{model.name}-router", path=str(ckpt))


def datasets(names: list[str], limit: int | None = None) -> list[DatasetConfig]:
    """The named datasets as conf/dataset/ defines them, cut to `limit` problems if given."""
    out = [load_option("dataset", n) for n in names]
    if limit is not None:
        out = [dataclasses.replace(d, limit=min(d.limit or limit, limit)) for d in out]
    return out


# ------------------------------------------------------------------------------- the worker


class RouterWorker:
    """Loads one model once; builds preference data and trains its router (Ray actor body)."""

    def __init__(self, model: ModelConfig, device: str, *, torch_threads: int):
        from orchestrator.actors import local_model_dir, setup_process

        setup_process(torch_threads)
        from workers.adapters import adapter_for
        from workers.scorer import ScoreConfig, load_model

        self.path = local_model_dir(model)
        self.model = load_model(self.path, ScoreConfig(dtype=model.dtype, device=device))
        self.adapter = adapter_for(self.model)

    def preferences(
        self, task: PreferenceTask, out_path: str, unit_hash: str, root: Path | None = None
    ) -> dict[str, Any]:
        import pyarrow as pa

        from workers.router_update import add_router_inputs, select_tokens

        started = time.time()
        scores = pa.concat_tables([read_arrow(p) for p in task.scores])
        trajectories = pa.concat_tables([read_arrow(p) for p in task.shards])
        tokens = select_tokens(scores, task.update)
        table = add_router_inputs(self.model, self.adapter, tokens, trajectories, task.layer)
        kinds = table.column("kind").to_pylist()
        counts = {"prefer": kinds.count("prefer"), "anchor": kinds.count("anchor")}
        write_arrow(
            table, out_path, config_hash=unit_hash, started=started, extra=counts, root=root
        )
        return {"rows": table.num_rows, "tokens": scores.num_rows, **counts}

    def train(
        self, task: TrainTask, out_path: str, unit_hash: str, root: Path | None = None
    ) -> dict[str, Any]:
        from workers.router_update import (
            describe_update,
            router_parameters,
            train_router,
            write_checkpoint,
        )

        started = time.time()
        cfg, layer = task.update, task.layer
        params = router_parameters(self.model, self.adapter, layer)
        weight_name = next(n for n in params if n.endswith(".weight"))
        bias_name = next((n for n in params if n.endswith(".bias")), None)
        prefs = read_arrow(task.preferences)
        weight, bias, log, summary = train_router(
            params[weight_name], params[bias_name] if bias_name else None, prefs, self.adapter, cfg
        )
        tensors = {weight_name: weight, **({bias_name: bias} if bias_name else {})}
        readme = describe_update(
            source=task.source, layer=layer, names=list(tensors), summary=summary, cfg=cfg
        )
        write_checkpoint(self.path, task.checkpoint, tensors, readme, root=root)
        fingerprint = plan.local_fingerprint(str(task.checkpoint.resolve()))
        extra = {"summary": summary, "checkpoint_fingerprint": fingerprint}
        write_arrow(log, out_path, config_hash=unit_hash, started=started, extra=extra, root=root)
        return {"rows": log.num_rows, "tokens": summary["prefer_tokens"], **summary}


def train_complete(unit: plan.Unit[TrainTask], checksum: bool) -> bool:
    """The log is complete and the checkpoint's files still match the recorded fingerprint."""
    if not is_complete(unit.path, unit.config_hash, checksum=checksum):
        return False
    ckpt = unit.task.checkpoint
    if not (ckpt / "config.json").is_file():
        return False
    recorded = (read_sidecar(unit.path) or {}).get("checkpoint_fingerprint")
    return recorded == plan.local_fingerprint(str(ckpt.resolve()))


# ------------------------------------------------------------------------------- the steps


def run_router_update(
    cfg: RunConfig,
    run_dir: Path,
    summary: RunSummary,
    *,
    run_id: str,
    sink: Sink | None = None,
    session: Any = None,
) -> Path | None:
    ru = cfg.router_update
    problems = prepare_datasets(
        run_dir,
        datasets([*ru.train_datasets, *ru.eval_datasets], ru.problems_limit),
        checksum=cfg.verify_checksums,
    )
    sections = []
    for model in router_models(cfg):
        layer = resolve_layer(model, ru.layer)
        root = router_root(run_dir, model)
        failures_before = len(summary.failures)
        # 1. Training data at the update's layer: the main pipeline's own units.
        shards = training_scores(cfg, run_dir, model, layer, problems, summary, sink)
        if shards is None:
            continue
        score_paths = [u.path for units in shards.values() for u in units[1]]
        shard_paths = [p for units in shards.values() for p, _ in units[0]]
        # 2. Preferences.
        pref = plan.Unit(
            stage="router_preferences",
            key=f"{model.name}/preferences",
            path=root / "preferences.arrow",
            root=run_dir,
            config_hash=config_hash(
                {
                    "model": plan.model_identity(model),
                    "layer": layer,
                    "select": {k: getattr(ru, k) for k in SELECT_KEYS},
                    "scores": [read_sidecar(p)["sha256"] for p in score_paths],
                }
            ),
            task=PreferenceTask(
                scores=tuple(score_paths),
                shards=tuple(shard_paths),
                layer=layer,
                update=update_config(ru),
            ),
        )
        run_router_units(cfg, "router_preferences", model, [pref], "preferences", summary, sink)
        if not is_complete(pref.path, pref.config_hash, checksum=False):
            continue
        # 3. Training: the checkpoint.
        train = plan.Unit(
            stage="router_train",
            key=f"{model.name}/train",
            path=root / "train_log.arrow",
            root=run_dir,
            config_hash=config_hash(
                {
                    "model": plan.model_identity(model),
                    "layer": layer,
                    "train": {k: getattr(ru, k) for k in TRAIN_KEYS},
                    "preferences": read_sidecar(pref.path)["sha256"],
                }
            ),
            task=TrainTask(
                preferences=pref.path,
                checkpoint=root / "checkpoint",
                layer=layer,
                update=update_config(ru),
                source=model.hf_id if model.hf_id != "bundled" else "workers/assets/tiny-moe",
            ),
        )
        run_router_units(
            cfg, "router_train", model, [train], "train", summary, sink, complete=train_complete
        )
        if not train_complete(train, checksum=False):
            continue
        updated = updated_model(run_dir, model)
        # 4. Evaluation: original and updated, same backend and sampling.
        evals = eval_units(cfg, run_dir, model, updated, problems)
        summary.stages["router_eval"] = run_units(
            "router_eval", evals, cfg, generator_pool, summary, sink
        )
        # 5. Rescoring of the training shards with the updated model.
        rescore = {
            plan.Cell(updated, d, {ru.layer: layer}): [
                relocate(
                    u,
                    root / "rescore" / d.name / u.path.name,
                    f"{model.name}/rescore/{d.name}/{u.path.stem}",
                )
                for u in plan.scoring_units(
                    run_dir,
                    plan.Cell(updated, d, {ru.layer: layer}),
                    cfg.scoring,
                    shards[d.name][0],
                )
            ]
            for d in datasets(ru.train_datasets, ru.problems_limit)
        }
        summary.stages["router_rescore"] = run_units(
            "router_rescore", rescore, cfg, scorer_pool, summary, sink
        )
        if len(summary.failures) > failures_before:
            continue
        # 6. Analysis of this model.
        from orchestrator.router_report import analyse_model

        sections.append(
            analyse_model(
                run_dir,
                model,
                layer,
                ru,
                pref_path=pref.path,
                train_path=train.path,
                eval_paths={
                    v: [u.path for c, us in evals.items() if c.model.name == m.name for u in us]
                    for v, m in (("original", model), ("updated", updated))
                },
                before=score_paths,
                after=[u.path for us in rescore.values() for u in us],
                run_id=run_id,
                session=session,
            )
        )
    if not sections:
        return None
    from orchestrator.router_report import write_markdown

    return write_markdown(run_dir, sections, ru)


def training_scores(cfg, run_dir, model, layer, problems, summary, sink):
    """{dataset: ([(shard path, sha256)], [scoring units])} at `layer` for the training
    datasets, running whatever is incomplete; None if some of it failed."""
    ru = cfg.router_update
    cells = [
        plan.Cell(model, d, {ru.layer: layer})
        for d in datasets(ru.train_datasets, ru.problems_limit)
    ]
    gen = {
        c: plan.generation_units(
            run_dir,
            c.model,
            c.dataset,
            cfg.generation,
            num_problems=problems[c.dataset.name][0],
            problems_sha256=problems[c.dataset.name][1],
        )
        for c in cells
    }
    summary.stages["router_data_generation"] = run_units(
        "router_data_generation", gen, cfg, generator_pool, summary, sink
    )
    if any(
        not is_complete(u.path, u.config_hash, checksum=False) for us in gen.values() for u in us
    ):
        summary.warnings.append(f"{model.name}: router update skipped (training data incomplete)")
        return None
    shards = {c: write_shards(run_dir, c, cfg, gen[c])[0] for c in cells}
    if not any(shards.values()):
        raise PipelineError(
            f"{model.name}: no verified trajectories in {ru.train_datasets} to train the router on"
        )
    units = {c: plan.scoring_units(run_dir, c, cfg.scoring, shards[c]) for c in cells}
    summary.stages["router_data_scoring"] = run_units(
        "router_data_scoring", units, cfg, scorer_pool, summary, sink
    )
    if any(
        not is_complete(u.path, u.config_hash, checksum=False) for us in units.values() for u in us
    ):
        summary.warnings.append(f"{model.name}: router update skipped (training scores incomplete)")
        return None
    return {c.dataset.name: (shards[c], units[c]) for c in cells}


def eval_units(
    cfg, run_dir, model, updated, problems
) -> dict[plan.Cell, list[plan.Unit[GenerationTask]]]:
    """Generation units of every evaluation dataset for both variants, under router_update/."""
    ru = cfg.router_update
    gen_cfg = dataclasses.replace(
        cfg.generation,
        samples_per_problem=ru.eval_samples,
        problems_per_shard=ru.eval_problems_per_shard,
    )
    root = router_root(run_dir, model) / "eval"
    out = {}
    for variant, m in zip(VARIANTS, (model, updated), strict=True):
        for d in datasets(ru.eval_datasets, ru.problems_limit):
            units = plan.generation_units(
                run_dir,
                m,
                d,
                gen_cfg,
                num_problems=problems[d.name][0],
                problems_sha256=problems[d.name][1],
            )
            out[plan.Cell(m, d, {})] = [
                relocate(
                    u,
                    root / variant / d.name / u.path.name,
                    f"{model.name}/eval/{variant}/{d.name}/{u.path.stem}",
                )
                for u in units
            ]
    return out


def relocate(unit: plan.Unit[plan.TaskT], path: Path, key: str) -> plan.Unit[plan.TaskT]:
    return dataclasses.replace(unit, path=path, key=key)


def run_router_units(
    cfg: RunConfig,
    stage: str,
    model: ModelConfig,
    units: list[plan.Unit],
    method: str,
    summary: RunSummary,
    sink: Sink | None,
    *,
    complete=None,
) -> None:
    """Run `units` on one RouterWorker actor (skipping complete ones); record failures."""
    import ray

    from orchestrator.executor import dispatch
    from orchestrator.progress import StageProgress

    done = complete or (lambda u, checksum: is_complete(u.path, u.config_hash, checksum=checksum))
    todo = [u for u in units if not done(u, cfg.verify_checksums)]
    progress = StageProgress(stage, len(units), skipped=len(units) - len(todo), sink=sink)
    if todo:
        actor_cls = ray.remote(RouterWorker)
        device = "cuda" if cfg.cluster.use_gpus else "cpu"
        options = {
            "num_cpus": cfg.cluster.cpus_per_actor,
            "num_gpus": model.gpus if cfg.cluster.use_gpus else 0,
            "max_restarts": 0,
        }
        outcomes = dispatch(
            todo,
            spawn=lambda: actor_cls.options(**options).remote(
                model, device, torch_threads=cfg.cluster.torch_threads
            ),
            call=lambda actor, u: getattr(actor, method).remote(
                u.task, str(u.path), u.config_hash, root=u.root
            ),
            actors=1,
            retries=cfg.scoring.retries,
            progress=progress,
        )
        record_failures(summary, outcomes)
    summary.stages[stage] = progress.close()


# ------------------------------------------------------------------------------- the dry run


def describe_router_plan(cfg: RunConfig) -> str:
    """The router update's plan: models and their layer, data, units, samples, then its
    GPU-hours and the run's (orchestrator/estimate.py)."""
    ru = cfg.router_update
    train = datasets(ru.train_datasets, ru.problems_limit)
    evals = datasets(ru.eval_datasets, ru.problems_limit)
    n_eval = sum(min(d.limit or d.size, d.size) for d in evals)
    lines = [
        "",
        f"router update ({ru.name}): train the router of the {ru.layer} MoE layer only",
        f"  train on: {', '.join(d.name for d in train)} (final-layer scores; preference tokens"
        f" pbar < {ru.fragile} with gain > {ru.margin}, anchors pbar >= {ru.confident};"
        f" {ru.holdout_share:.0%} of problems held out)",
        f"  loss: DPO beta={ru.beta} + {ru.anchor_weight} x KL on anchors; Adam lr={ru.lr}"
        f" steps={ru.steps} seed={ru.seed}",
        f"  evaluate on: {', '.join(d.name for d in evals)} ({n_eval} problems) x"
        f" {ru.eval_samples} samples x 2 variants (original, updated) = {2 * n_eval * ru.eval_samples:,}"
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
        ev = 2 * sum(
            -(-min(d.limit or d.size, d.size) // ru.eval_problems_per_shard) for d in evals
        )
        lines.append(
            f"{model.name:<16} {layer:>5}  mlp.{tensor} ({model.num_experts} experts)"
            f"  {gen} + <=scoring, 1, 1, {ev}, <=scoring"
        )
    from orchestrator.estimate import describe_router_estimate

    cells = plan.estimate(cfg)
    lines.append(
        describe_router_estimate(cfg, train, evals, cells, plan.scored_positions(cells))
    )
    return "\n".join(lines)
