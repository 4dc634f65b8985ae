"""The CoR evaluation's table: each condition's scores and its paired difference to standard.

Contract: rows of workers.generation.cor_eval.EVAL_SCHEMA (several conditions, one model) in,
`evaluation_table(frame, draws, seed, level)` out: per (dataset, metric, condition) the
questions n, the mean score, the mean routed experts per token (`active`, from the units'
sidecars, when given) and, for every condition but standard, `diff` = its mean minus
standard's over the questions both have, with a percentile bootstrap interval `diff_lo`,
`diff_hi` that resamples questions (paired: one draw of question indices serves both
conditions), `draws` resamples from a generator seeded with (seed, crc32 of "dataset/metric/
condition"). Metrics: mc1 and mc2 of TruthfulQA-layout sets, em of TriviaQA-layout sets.
`cor_section(...)` is the report's markdown.
"""

from __future__ import annotations

import zlib

import numpy as np
import polars as pl

from analysis.intervals import resample_weights

METRICS = ("mc1", "mc2", "em")
TABLE_SCHEMA = {
    "dataset": pl.String,
    "metric": pl.String,
    "condition": pl.String,
    "n": pl.Int64,
    "mean": pl.Float64,
    "active": pl.Float64,
    "diff": pl.Float64,
    "diff_lo": pl.Float64,
    "diff_hi": pl.Float64,
}


def paired_interval(
    x: np.ndarray, y: np.ndarray, draws: int, seed: list[int], level: float
) -> tuple[float, float, float]:
    """(mean(x - y), lo, hi): the percentile bootstrap of the mean paired difference,
    resampling the pairs."""
    d = x - y
    rng = np.random.default_rng(seed)
    w = resample_weights(rng, len(d), draws).astype(np.float64)
    reps = (w @ d) / len(d)
    alpha = (1 - level) / 2
    return float(d.mean()), float(np.quantile(reps, alpha)), float(np.quantile(reps, 1 - alpha))


def evaluation_table(
    frame: pl.DataFrame,
    draws: int,
    seed: int,
    level: float = 0.95,
    active: dict[str, float] | None = None,
) -> pl.DataFrame:
    """The table of the module docstring; conditions in their order of first appearance."""
    conditions = list(dict.fromkeys(frame["condition"].to_list()))
    rows = []
    for dataset in sorted(set(frame["dataset"].to_list())):
        sub = frame.filter(pl.col("dataset") == dataset)
        for metric in METRICS:
            if sub[metric].null_count() == sub.height:
                continue
            wide = sub.pivot(on="condition", index="problem_id", values=metric).sort("problem_id")
            for condition in conditions:
                if condition not in wide.columns:
                    continue
                x = wide[condition].drop_nulls().to_numpy()
                row = {"dataset": dataset, "metric": metric, "condition": condition}
                row |= {"n": len(x), "mean": float(x.mean()) if len(x) else None}
                row["active"] = (active or {}).get(condition)
                row |= {"diff": None, "diff_lo": None, "diff_hi": None}
                if condition != "standard" and "standard" in wide.columns:
                    both = wide.select(condition, "standard").drop_nulls()
                    if both.height:
                        name = f"{dataset}/{metric}/{condition}".encode()
                        diff, lo, hi = paired_interval(
                            both[condition].to_numpy(),
                            both["standard"].to_numpy(),
                            draws,
                            [seed, zlib.crc32(name)],
                            level,
                        )
                        row |= {"diff": diff, "diff_lo": lo, "diff_hi": hi}
                rows.append(row)
    return pl.DataFrame(rows, schema=TABLE_SCHEMA)


def _num(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def plan_lines(plans: dict[str, dict], top_k: int) -> list[str]:
    """One line per condition: the layers whose k_l differs from k and the forced experts."""
    lines = ["| condition | k_l != k | forced experts | random seed |", "|---|---|---|---:|"]
    for condition, plan in plans.items():
        moved = (
            ", ".join(f"L{layer}: {n}" for layer, n in plan["k"].items() if n != top_k) or "none"
        )
        forced = ", ".join(f"L{layer}: {ids}" for layer, ids in plan["forced"].items()) or "none"
        seed = plan["random_seed"] if plan["random_seed"] is not None else ""
        lines.append(f"| {condition} | {moved} | {forced} | {seed} |")
    return lines


def cor_section(
    model: str,
    calibration: str,
    cei_lines: list[str],
    plans: dict[str, dict],
    top_k: int,
    table: pl.DataFrame,
    level: float,
) -> list[str]:
    """Markdown lines of one model: the CEI tables the plan came from, the plans, the
    evaluation table."""
    lines = [
        f"## CoR evaluation: {model}",
        "",
        f"The plan is built from the CEI tables of {calibration} (below; k = {top_k}).",
        "",
        *[line.replace("## Counterfactual Expert Impact", "### CEI tables") for line in cei_lines],
        "",
        "### Plans",
        "",
        *plan_lines(plans, top_k),
        "",
        "### Evaluation",
        "",
        "MC1, MC2: TruthfulQA by option log-likelihood; EM: TriviaQA, greedy answer, SQuAD"
        f" normalisation. Diff: condition - standard, paired over questions, {level:.0%}"
        " bootstrap interval. Active: routed experts per token over all MoE layers.",
        "",
        "| dataset | metric | condition | n | mean | active | diff vs standard |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in table.iter_rows(named=True):
        diff = (
            ""
            if r["diff"] is None
            else f"{r['diff']:+.3f} [{r['diff_lo']:+.3f}, {r['diff_hi']:+.3f}]"
        )
        lines.append(
            f"| {r['dataset']} | {r['metric']} | {r['condition']} | {r['n']} |"
            f" {_num(r['mean'])} | {_num(r['active'], '.2f')} | {diff} |"
        )
    return [*lines, ""]
