"""The CoR evaluation: CEI tables -> reroute plans -> TruthfulQA / TriviaQA under each condition.

Contract: `run_cor(cfg, run_dir, summary, run_id=..., sink=..., session=...)` runs after the
main stages (whose cei stage `cor` turned on) and the report, for each model of
`cor_models(cfg)`:
1. tables: analysis.cei's layer and expert tables of the model's CEI files of the calibration
   data set (`cor.calibration`, else the run's first), with the run's interval settings;
2. plans: standard (k everywhere), cor (analysis.cor_plan.cor_plan with `cor.plan`), random
   (the cor plan's k_l and forced counts, random experts: ReroutePlan.with_random), static_k1
   (k + 1 everywhere), those of `cor.conditions`; written to cor/<model>/plans.json;
3. evaluation: the cor_eval stage's units (orchestrator/stages/cor_eval.py) on the model's
   router actor, through the same executor, retries and deadlines as every stage; a unit is
   skipped when complete, so a rerun after a killed driver resumes;
4. analysis (not a unit; cheap, rebuilt every run): cor/<model>/tables/{eval,layers,experts}
   (.parquet, .csv), one W&B run (job_type cor_eval, grouped with the run), the model's section
   of cor.md, which is also appended to report.md and printed.
Returns the path of cor.md, or None when no model got through (the failures are in the
summary). `describe_cor_plan(cfg)` is the dry run's text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from orchestrator.actors import DEFAULT_WORKERS, Workers
from orchestrator.config import ModelConfig, RunConfig, cor_datasets, cor_models, sweep_datasets
from orchestrator.errors import PipelineError
from orchestrator.problems import prepare_datasets
from orchestrator.router_stage import RouterRun
from orchestrator.shards import prune
from orchestrator.stages.cor_eval import CorEvalStage, cor_root, cor_units, plan_record
from orchestrator.summary import RunSummary, Sink
from workers.atomic import atomic_write, read_nofollow

TITLE = "# CoR evaluation"


def run_cor(
    cfg: RunConfig,
    run_dir: Path,
    summary: RunSummary,
    *,
    run_id: str,
    sink: Sink | None = None,
    session: Any = None,
    workers: Workers = DEFAULT_WORKERS,
) -> Path | None:
    problems = prepare_datasets(
        run_dir,
        cor_datasets(cfg),
        checksum=cfg.verify_checksums,
        compression=cfg.cluster.compression,
    )
    run = RouterRun(cfg, run_dir, summary, sink, workers)
    sections = []
    for model in cor_models(cfg):
        section = evaluate_model(run, model, problems, run_id=run_id, session=session)
        if section is not None:
            sections.append(section)
    if not sections:
        return None
    text = "\n".join([TITLE, "", *[line for s in sections for line in s]])
    path = run_dir / "cor.md"
    atomic_write(path, text, root=run_dir)
    append_to_report(summary.report_path or run_dir / "report.md", run_dir, text)
    print(text, flush=True)
    return path


def evaluate_model(
    run: RouterRun,
    model: ModelConfig,
    problems: dict[str, tuple[int, str]],
    *,
    run_id: str,
    session: Any,
) -> list[str] | None:
    """Steps 1-4 for one model: its markdown lines, or None when a step did not complete."""
    from analysis.cei import cei_section

    cfg, run_dir = run.cfg, run.run_dir
    cor = cfg.cor
    calibration = cor.calibration or sweep_datasets(cfg)[0].name
    # 1. The CEI tables of the calibration data set.
    tables = cei_tables(run_dir, model, calibration, cfg.analysis)
    if tables is None:
        run.summary.warnings.append(f"{model.name}: CoR evaluation skipped (no CEI files)")
        return None
    layers, experts, cei_cfg = tables
    # 2. The plans of the conditions.
    plans = condition_plans(model, layers, experts, cor)
    records = {c: plan_record(p) for c, p in plans.items()}
    root = cor_root(run_dir, model)
    atomic_write(root / "plans.json", json.dumps(records, indent=1), root=run_dir)
    # 3. The evaluation units, stale files of another plan pruned first.
    units = cor_units(run_dir, model, cor, plans, problems, cor_datasets(cfg))
    prune(run_dir, sorted({u.path.parent for u in units}), units)
    if not run.stage(CorEvalStage(cfg, run.workers.router), [(model, units)]):
        return None
    # 4. Tables, W&B, markdown.
    from analysis.cor_eval import cor_section

    table = write_results(run_dir, root, units, layers, experts, cor, cfg.analysis.level)
    log_wandb(session, run_id, model, cor, table, layers, experts)
    cei_lines = cei_section(layers, experts, cei_cfg)
    return cor_section(
        model.name, calibration, cei_lines, records, model.top_k, table, cfg.analysis.level
    )


def cei_tables(run_dir: Path, model: ModelConfig, dataset: str, analysis: Any) -> Any:
    """(layer table, expert table, CeiConfig) of the model's complete CEI files of `dataset`,
    or None when there are none."""
    from analysis.cei import cei_tables as tables_of

    return tables_of(
        sorted((run_dir / "cei" / model.name).glob(f"layer=*/{dataset}/*.arrow")), analysis
    )


def condition_plans(model: ModelConfig, layers: Any, experts: Any, cor: Any) -> dict[str, Any]:
    """{condition: ReroutePlan} of `cor.conditions`, in that order; PipelineError when the
    budget rule cannot build a plan from these tables."""
    from analysis.cor_plan import RerouteConfig, cor_plan
    from workers.generation.reroute import ReroutePlan

    shape = (list(model.moe_layers), model.top_k, model.num_experts)
    rule = RerouteConfig(**cor.plan)
    try:
        plan = cor_plan(layers, experts, shape, rule)
    except ValueError as err:
        raise PipelineError(f"{model.name}: no CoR plan from its CEI tables: {err}") from None
    every = {
        "standard": ReroutePlan(dict.fromkeys(shape[0], shape[1])),
        "cor": plan,
        "random": plan.with_random(rule.seed),
        "static_k1": ReroutePlan(dict.fromkeys(shape[0], shape[1] + 1)),
    }
    return {c: every[c] for c in cor.conditions}


def write_results(
    run_dir: Path, root: Path, units: list, layers: Any, experts: Any, cor: Any, level: float
) -> Any:
    """The evaluation table from the units' files (active experts from their sidecars),
    written with the CEI tables under cor/<model>/tables/."""
    import polars as pl

    from analysis.cor_eval import evaluation_table
    from analysis.tables import write_tables
    from workers.io import read_arrow, read_sidecar

    frame = pl.concat([pl.from_arrow(read_arrow(u.path)) for u in units])
    active: dict[str, list[float]] = {}
    for u in units:
        side = read_sidecar(u.path) or {}
        active.setdefault(u.task.condition, []).append(side.get("active_experts_per_token"))
    means = {c: sum(v) / len(v) for c, v in active.items() if None not in v}
    table = evaluation_table(frame, cor.bootstrap_draws, cor.seed, level, means)
    tables = {"eval": table, "layers": layers, "experts": experts}
    write_tables(tables, root / "tables", root=run_dir)
    return table


def log_wandb(session: Any, run_id: str, model: ModelConfig, cor: Any, table, layers, experts):
    """One W&B run of the model's evaluation, grouped with the run."""
    if session is None:
        return
    summary = {
        f"{d}/{m}/{c}": v
        for d, m, c, v in table.select("dataset", "metric", "condition", "mean").rows()
    }
    session.log_step(
        name=f"{run_id}/{model.name}/cor",
        key=(model.name, "cor", "eval"),
        job_type="cor_eval",
        config={"run_id": run_id, "model": model.name, "cor": vars(cor)},
        summary=summary,
        tables={"cor_eval": table, "cei_layers": layers, "cei_experts": experts},
    )


def append_to_report(report: Path, run_dir: Path, text: str) -> None:
    """report.md with the CoR section at its end (report.md is rebuilt every run, so the
    section is appended each time; a stub report when the run has none)."""
    old = read_nofollow(report)  # a planted link is replaced, its target never copied in
    body = old.decode("utf-8", "replace") if old is not None else "# Report\n"
    if TITLE in body:
        body = body[: body.index(TITLE)]
    atomic_write(report, body.rstrip("\n") + "\n\n" + text + "\n", root=run_dir)


# ------------------------------------------------------------------------------- the dry run


def describe_cor_plan(cfg: RunConfig) -> str:
    """The evaluation's units per model, then its GPU-hours (orchestrator/estimate.py)."""
    from orchestrator.estimate import describe_cor_estimate

    cor = cfg.cor
    sets = cor_datasets(cfg)
    sizes = {d.name: min(d.limit or d.size, d.size) for d in sets}
    shards = sum(-(-n // cor.questions_per_unit) for n in sizes.values())
    lines = [
        "",
        f"CoR evaluation ({cor.name}): plans from the CEI tables of"
        f" {cor.calibration or sweep_datasets(cfg)[0].name}; conditions"
        f" {', '.join(cor.conditions)}",
        "  data: "
        + ", ".join(f"{name} ({n:,} questions)" for name, n in sizes.items())
        + f"; {cor.questions_per_unit} questions per unit",
        f"  TruthfulQA: MC1/MC2 by option log-likelihood; TriviaQA: EM of a greedy answer of"
        f" <= {cor.max_new_tokens} tokens; paired bootstrap ({cor.bootstrap_draws} draws) by"
        " question",
        "",
        f"{'model':<16} {'k':>3} {'MoE layers':>10}  units (conditions x shards)",
    ]
    for model in cor_models(cfg):
        lines.append(
            f"{model.name:<16} {model.top_k:>3} {len(model.moe_layers):>10}"
            f"  {len(cor.conditions)} x {shards} = {len(cor.conditions) * shards}"
        )
    lines.append(describe_cor_estimate(cfg, sets))
    return "\n".join(lines)
