"""Tables, figures and report.md of a run, from its complete score shards alone.

    python -m analysis.report runs/<run_id> [--confident 0.9] [--fragile 0.5] [--win-margin 1e-4]
        [--binning split|pbar|std] [--cluster problem|trajectory] [--bootstrap 1000]
        [--level 0.95] [--seed 0]

(every flag is a field of analysis.metrics.AnalysisConfig, which holds the defaults; the driver
passes its `analysis` config group.)

Contract: `build_report(run_dir, config=None)` reads the score files of the run's current
plan that verify against their sidecars (analysis.inputs; missing, stale or corrupt units,
and generated trajectory files that do not verify, are named on stderr and in report.md, one
line per kind), writes `tables/<name>.{parquet,csv}`,
`figures/<name>.png` and `report.md`, and returns a `Report`. No Ray, no model, no GPU. It
raises FileNotFoundError when the run dir or its complete shards are missing; the CLI turns
that (and bad thresholds) into one line on stderr and exit code 2. Rerunning replaces the
outputs, so it can be rerun on a partially finished run and again when it completes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from analysis.cei import cei_report
from analysis.divergence import divergence_files, divergence_table, verified_table
from analysis.figures import layer_label, plot_all
from analysis.gen_routes import route_agreement
from analysis.inputs import SCORES_GLOB, ScoreInputs, select_generated_files, select_score_files
from analysis.metrics import (
    BINNINGS,
    BINS,
    CLUSTERS,
    FIXED_POINT,
    AnalysisConfig,
    collect_stats,
    resolve_margin,
    scoring_dtypes,
)
from analysis.runinfo import generation_summary, layer_labels
from analysis.tables import pooled_rows, summarise, write_tables
from workers.atomic import atomic_write
from workers.runfiles import read_run_config


@dataclass
class Report:
    tables: dict[str, pl.DataFrame]
    figures: dict[str, Path]
    path: Path


def build_report(run_dir: str | Path, *, config: AnalysisConfig | None = None) -> Report:
    """Regenerate tables/, figures/ and report.md of `run_dir` from its complete score shards."""
    cfg = config or AnalysisConfig()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    # 1. The score files of the run's current plan, intact (analysis.inputs); the rest is
    # named on stderr and in report.md, never silently left out.
    inputs = select_score_files(run_dir)
    generated, inputs.corrupt_trajectories = select_generated_files(run_dir)
    shards = inputs.files
    if not shards:
        raise FileNotFoundError(
            f"no complete score shards of the current plan under {run_dir / 'scores'} "
            f"(expected {SCORES_GLOB} files, each with a .done.json sidecar)"
        )
    for line in inputs.problems():
        print(f"warning: report of {run_dir.name}: {line}", file=sys.stderr)
    # 2. One streaming pass -> per-bin sums -> tables, with the margin they used: the one
    # given, else the default of the dtype the scores were computed in.
    explicit, cfg = cfg.win_margin is not None, resolve_margin(cfg, shards)
    dtypes = ", ".join(scoring_dtypes(shards))
    started = time.perf_counter()
    stats = collect_stats(shards, cfg)
    tables = summarise(stats, cfg)
    # next-token distributions (score files written before those columns are left out) and
    # the verified/unverified split (only when both kinds were scored)
    for name, table in (
        ("divergence", divergence_table(shards, cfg)),
        ("by_verified", verified_table(shards, cfg)),
    ):
        if table is not None:
            tables[name] = table
    old_scores = len(shards) - len(divergence_files(shards))
    for name in ("by_bin", "overall"):
        tables[name] = tables[name].with_columns(
            win_margin=pl.lit(cfg.win_margin), scoring_dtype=pl.lit(dtypes)
        )
    seconds = time.perf_counter() - started
    tables["generation"] = generation_summary(run_dir, generated)
    agreement = route_agreement(shards, generated)  # where trajectories carry gen_routes
    if agreement is not None:
        tables["route_agreement"] = agreement
        for r in agreement.iter_rows(named=True):
            print(
                f"route agreement of {run_dir.name}: {r['model']} layer {r['layer']}: S = G on"
                f" {r['same_set']:,} of {r['tokens']:,} scored tokens ({r['share']:.4f}),"
                f" mean |S ∩ G| / k {r['mean_overlap']:.4f}",
                file=sys.stderr,
            )
    write_tables(tables, run_dir / "tables", root=run_dir)
    # 3. Figures and the markdown report that embeds them.
    run_config = load_run_config(run_dir)
    labels = layer_labels(run_config)
    figures = plot_all(tables, run_dir / "figures", labels, root=run_dir)
    text = render_markdown(
        tables,
        figures,
        run_dir=run_dir,
        cfg=cfg,
        shards=len(shards),
        inputs=inputs,
        seconds=seconds,
        run_config=run_config,
        labels=labels,
        positions=describe_positions(run_config, stats),
        margin_source="set" if explicit else f"default for {dtypes} scores",
        old_scores=old_scores,
    )
    text += "\n".join(cei_report(run_dir, cfg))  # when the run has a cei stage's files
    path = run_dir / "report.md"
    atomic_write(path, text, root=run_dir)
    return Report(tables=tables, figures=figures, path=path)


def load_run_config(run_dir: Path) -> dict[str, Any] | None:
    """runs/<id>/config.yaml as a dict (workers.runfiles), or None when absent or unreadable."""
    try:
        return read_run_config(run_dir)
    except ValueError:
        return None


def describe_positions(run_config: dict[str, Any] | None, stats: pl.DataFrame) -> str | None:
    """The position budget's line (None for a run that scored every position): the setting
    (scoring.positions) and the share of its trajectories' completion tokens scored."""
    setting = ((run_config or {}).get("scoring") or {}).get("positions")
    scored = int(stats["tokens"].sum())
    total = float(stats["sum_weight"].sum()) / FIXED_POINT  # weights add up to the tokens
    if setting in (None, "all") and scored == round(total):
        return None
    share = scored / total if total else 0.0
    return (
        f"positions scored per trajectory: {setting or 'a sample'} ({scored:,} of the"
        f" {round(total):,} completion tokens of the scored trajectories at the scored layers,"
        f" {share:.1%}); each row is weighted by its trajectory's completion tokens / scored"
        " positions, so every mean and interval estimates the full run's"
    )


def summarise_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The few settings a reader needs (orchestrator/config/schema.py's RunConfig layout). Only these
    named fields are printed, so nothing secret-looking from the config can reach the report."""

    def get(*keys: str) -> Any:
        node: Any = cfg
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    sweep = get("sweep") or {}
    return {
        "run_id": get("run_id"),
        "models": sweep.get("models") or [get("model", "name")],
        "layers": sweep.get("layers") or get("scoring", "layers"),
        "datasets": sweep.get("datasets") or [get("dataset", "name")],
        "J (alternatives)": get("scoring", "alternatives"),
        "P (pool)": get("scoring", "pool"),
        "tau (temperature)": get("scoring", "temperature"),
        "sampler": get("scoring", "sampler"),
        "scoring seed": get("scoring", "seed"),
        "generation seed": get("generation", "seed"),
        "verified only": get("scoring", "verified_only"),
    }


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    return format(value, spec)


def _ci(row: dict[str, Any], mean: str, spec: str) -> str:
    """'0.412 [0.380, 0.441]': the mean and its bootstrap interval, when there is one."""
    text = _fmt(row[mean], spec)
    lo, hi = row.get(f"{mean}_lo"), row.get(f"{mean}_hi")
    if row[mean] is None or lo is None or hi is None:
        return text
    return f"{text} [{_fmt(lo, spec)}, {_fmt(hi, spec)}]"


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A markdown table; align has one letter per column, l(eft) or r(ight)."""
    rules = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rules) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _markdown_table(frame: pl.DataFrame, labels: dict) -> list[str]:
    header = [
        "model", "layer", "dataset", "bin", "tokens", "share", "mean u(S)", "mean max u(R)",
        "gain (pp)", "win rate", "strict win rate", "mean rank of S", "alignment ρ",
        "no variance",
    ]  # fmt: skip
    rows = []
    for row in frame.iter_rows(named=True):
        rows.append(
            [
                row["model"],
                layer_label(labels, row["model"], row["layer"]),
                row["dataset"],
                row["bin"],
                _fmt(row["tokens"], ","),
                _fmt(row["share"], ".1%"),
                _ci(row, "mean_u_std", ".3f"),
                _ci(row, "mean_max_alt", ".3f"),
                _ci(row, "gain_pp", ".1f"),
                _ci(row, "win_rate", ".1%"),
                _ci(row, "win_rate_strict", ".1%"),
                _ci(row, "mean_rank", ".2f"),
                _ci(row, "alignment", ".3f"),
                _fmt(row["no_variance"], ","),
            ]
        )
    return _table(header, rows, align="llll" + "r" * 10)


def _generation_table(generation: pl.DataFrame) -> list[str]:
    if generation.is_empty():
        return ["(no complete generated trajectories in this run directory)"]
    header = ["model", "dataset", "backend", "samples", "verified", "mean length", "max length"]
    header += ["finish reasons", "skipped rows"]
    rows = [
        [
            r["model"],
            r["dataset"],
            r["backend"],
            _fmt(r["samples"], ","),
            f"{r['verified']:,} ({_fmt(r['verified_share'], '.1%')})",
            _fmt(r["mean_tokens"], ",.1f"),
            _fmt(r["max_tokens"], ","),
            r["finish_reasons"],
            _fmt(r["skipped_rows"], ","),
        ]
        for r in generation.iter_rows(named=True)
    ]
    return _table(header, rows, align="lllrrrrlr")


def _route_agreement(table: pl.DataFrame | None, labels: dict) -> list[str]:
    if table is None:
        return []
    lines = [
        "## Generator routes",
        "",
        "Scored tokens whose standard route S (the scorer's forward pass) is, as a set, the"
        " route G the generator's own router took at that position (`gen_routes`,"
        " generation.record_routes), and the mean overlap |S ∩ G| / k"
        " (`tables/route_agreement`):",
        "",
    ]
    rows = [
        [
            r["model"],
            layer_label(labels, r["model"], r["layer"]),
            f"{r['tokens']:,}",
            f"{r['same_set']:,}",
            _fmt(r["share"], ".4f"),
            _fmt(r["mean_overlap"], ".4f"),
        ]
        for r in table.iter_rows(named=True)
    ]
    header = ["model", "layer", "tokens", "S = G", "share", "mean overlap"]
    lines += _table(header, rows or [["–"] * len(header)], "llrrrr") + [""]
    return lines


def _how_to_read(cfg: AnalysisConfig, chance: str) -> list[str]:
    unit = {"trajectory": "trajectories", "problem": "problems"}[cfg.cluster]
    margin_pp = 100 * cfg.margin
    return [
        "## How to read this",
        "",
        "- Each scored token is a position of a verified completion. At the scored layer, "
        "S is the route (set of k experts) the router picks; R_1..R_J are alternatives of the "
        "same size drawn from the router's top experts. u(R) is the probability the model "
        "gives to the token it actually wrote next when only this position, at this layer, "
        "takes route R; everything before is unchanged and later layers route as usual.",
        "- pbar = mean of u over S and the J alternatives. A token is Confident when "
        f"pbar ≥ {cfg.confident}, Fragile when pbar < {cfg.fragile}, Ambiguous in between "
        "(pbar is the float64 mean of the float32 data, compared in float32).",
        "- mean u(S), mean max u(R): averages over the bin's tokens of u(S) and of the best "
        "alternative's u. gain (pp) = 100 × mean of max_j u(R_j) − u(S): how much probability "
        "the best sampled route adds, in percentage points. max ≥ u(S) often only because an "
        "alternative repeats S or differs from it by rounding, so gain is never negative in "
        "the mean and small gains mean little.",
        f"- win rate: share of tokens where the best alternative beats u(S) by more than "
        f"{cfg.margin:g} ({margin_pp:g} pp), the margin below which a difference is float "
        "rounding rather than a better route. strict win rate: beats u(S) by any amount (a tie "
        "is not a win); the gap between the two is the share of tokens won by rounding only.",
        "- mean rank of S: rank of u(S) among the J+1 routes, 1 = the highest utility, tied "
        "routes share the average of their ranks (1 + #better + #tied/2). A route no better "
        f"than a random one of the J+1 would average (J+2)/2 = {chance}.",
        "- alignment ρ: per token, the Spearman correlation (average ranks for ties) between "
        "the router's score s(R) = Σ_{e∈R} log softmax(z)_e and u(R) over the J+1 routes, "
        "averaged over tokens. 1: the router orders routes by their utility; 0: no relation. "
        "Tokens where s or u is constant over the routes have no correlation; they are left out "
        "and counted in 'no variance'.",
        f"- [lo, hi]: {100 * cfg.level:g}% percentile bootstrap interval of the mean, from "
        f"{cfg.bootstrap:,} resamples of whole {unit} (seed {cfg.seed}): tokens of one "
        "trajectory are correlated, and the verified samples of one problem share its prompt, "
        f"so {unit}, not tokens, are the independent units. A "
        "bin with few trajectories gets a wide interval; '–' means no interval (no tokens, or "
        "intervals turned off).",
        "- Bins independent of the gain: pbar contains u(S) and the draws whose maximum is the "
        "gain, so the same noise picks the bin and moves the gain (a low u(S) puts a token in "
        "Fragile and raises its gain; a high best draw raises both pbar and the gain). The split "
        "bins use the mean u of the first J/2 draws alone (not S); the gain is then the best "
        "of the other draws minus u(S) (a maximum over fewer draws, hence smaller: compare it "
        "with the pbar bins' gain over the same draws). u(S)-alone bins are the other bracket.",
        "- Repeated draws: a draw often repeats S or another draw (same set of experts, same "
        "u); such ties weigh the Spearman correlation towards the repeated routes. 'over "
        "distinct routes' keeps each set of experts once; 'draws equal to S' is the share of "
        "the J draws that are S again.",
        f"- Key numbers give the interval resampling {unit} and, beside it, the other unit; "
        "'per-trajectory mean' averages each trajectory's own mean, every trajectory weighing "
        "the same, as a check that a few long trajectories do not carry the token mean.",
        "- Rows with dataset = all pool the datasets of a (model, layer) (only when there are "
        "several); bin = all pools the bins.",
        "",
    ]


BINNING_NAMES = {
    "pbar": "pbar over S and all J draws (the paper's)",
    "split": "split draws: pbar of the first J/2 draws bins, the other draws give the gain",
    "std": "u(S) alone",
}


def _unit_ci(row: dict[str, Any], mean: str, unit: str, spec: str) -> str:
    lo, hi = row.get(f"{mean}_lo_{unit}"), row.get(f"{mean}_hi_{unit}")
    return "–" if lo is None or hi is None else f"[{_fmt(lo, spec)}, {_fmt(hi, spec)}]"


def _key_numbers(frame: pl.DataFrame, cfg: AnalysisConfig, labels: dict) -> list[str]:
    """One line per (model, layer, bin) over all datasets, in the headline's binning."""
    split = cfg.binning == "split"
    gain, win = ("gain_split_pp", "win_rate_split") if split else ("gain_pp", "win_rate")
    other = "trajectory" if cfg.cluster == "problem" else "problem"
    others = {"trajectory": "trajectories", "problem": "problems"}[other]
    lines = [f"## Key numbers (all datasets of a model and layer; bins: {cfg.binning})", ""]
    for row in pooled_rows(frame).filter(pl.col("bin").is_in(list(BINS))).iter_rows(named=True):
        lines.append(
            f"- {row['model']} {layer_label(labels, row['model'], row['layer'])}, {row['bin']}: "
            f"{row['tokens']:,} tokens ({_fmt(row['share'], '.1%')}); best "
            f"{'gain draw' if split else 'alternative'} beats S by {_ci(row, gain, '.1f')} pp "
            f"on average (resampling {others}: {_unit_ci(row, gain, other, '.1f')}; "
            f"per-trajectory mean {_fmt(row[f'{gain}_per_trajectory'], '.1f')}); wins on "
            f"{_ci(row, win, '.1%')} ("
            + (f"all J draws: {_fmt(row['win_rate'], '.1%')}, " if split else "")
            + f"strictly: {_fmt(row['win_rate_strict'], '.1%')}); "
            f"mean rank of S {_ci(row, 'mean_rank', '.2f')} (chance {_fmt(row['chance_rank'], 'g')}); "
            f"router alignment ρ = {_ci(row, 'alignment', '.3f')}, over distinct routes "
            f"{_ci(row, 'alignment_distinct', '.3f')}; draws equal to S: "
            f"{_fmt(row['share_std_draws'], '.1%')}"
        )
    return [*lines, ""]


def _robustness(binnings: pl.DataFrame | None, cfg: AnalysisConfig, labels: dict) -> list[str]:
    """The gain under each binning side by side, and alignment with and without repeats."""
    if binnings is None or binnings.is_empty():
        return []
    keys = ["model", "layer", "dataset", "bin"]
    parts = {b: pooled_rows(binnings.filter(pl.col("binning") == b)) for b in BINNINGS}
    order = {b: i for i, b in enumerate(BINS)}
    every = pl.concat([f.select(keys) for f in parts.values()]).unique()
    every = every.filter(pl.col("bin").is_in(list(BINS))).rows(named=True)
    every.sort(key=lambda r: (r["model"], r["layer"], r["dataset"], order[r["bin"]]))
    found = {
        b: {tuple(r[k] for k in keys): r for r in f.iter_rows(named=True)} for b, f in parts.items()
    }
    header = [
        "model", "layer", "bin", "pbar bins: tokens", "gain, J draws", "gain, gain draws",
        "split bins: tokens", "gain, gain draws", "u(S) bins: tokens", "gain, J draws",
        "ρ, all draws", "ρ, distinct routes", "draws = S", "distinct routes",
    ]  # fmt: skip
    rows = []
    empty = {"tokens": 0, "gain_pp": None, "gain_split_pp": None, "alignment": None}
    empty |= {"alignment_distinct": None, "share_std_draws": None, "mean_distinct_routes": None}
    for key_row in every:
        key = tuple(key_row[k] for k in keys)
        row = found["pbar"].get(key) or {**key_row, **empty}
        sp, st = found["split"].get(key), found["std"].get(key)
        rows.append(
            [
                row["model"],
                layer_label(labels, row["model"], row["layer"]),
                row["bin"],
                _fmt(row["tokens"], ","),
                _ci(row, "gain_pp", ".1f"),
                _ci(row, "gain_split_pp", ".1f"),
                _fmt(sp["tokens"], ",") if sp else "0",
                _ci(sp, "gain_split_pp", ".1f") if sp else "–",
                _fmt(st["tokens"], ",") if st else "0",
                _ci(st, "gain_pp", ".1f") if st else "–",
                _ci(row, "alignment", ".3f"),
                _ci(row, "alignment_distinct", ".3f"),
                _fmt(row["share_std_draws"], ".1%"),
                _fmt(row["mean_distinct_routes"], ".1f"),
            ]
        )
    return [
        "## Robustness: bins independent of the gain, repeated draws",
        "",
        "Gain (pp) with its interval under three binnings of the same tokens: the pbar bins "
        "(S and all J draws: the draws that give the gain also pick the bin), the split bins "
        "(the first J/2 draws pick the bin, the other draws give the gain) and u(S) alone. "
        "'gain draws' is the maximum over the second half of the draws only, so compare the "
        "split bins with the pbar bins' 'gain, gain draws' column. Alignment ρ (pbar bins) over "
        "all J+1 routes and over the distinct routes only; 'draws = S' is the share of the J "
        "draws that repeat S, 'distinct routes' the mean number of distinct routes of J+1.",
        "",
        *_table(header, rows, align="lll" + "r" * 11),
        "",
    ]


def _divergence(
    table: pl.DataFrame | None, cfg: AnalysisConfig, labels: dict, old: int, shards: int
) -> list[str]:
    """Beyond the realized token: KL and argmax changes per bin (all trajectories pooled)."""
    lines = ["## Beyond the realized token: next-token distributions", ""]
    if old:
        lines += [
            f"{old} of {shards} score files were written before the next-token distribution "
            "columns (KL, argmax change) existed"
            + ("; this section covers the others." if table is not None else ": no table."),
            "",
        ]
    if table is None:
        return lines
    lines += [
        f"Per bin ({cfg.binning} bins, every trajectory): KL(p_S ‖ p_R) in nats of the best "
        "draw and of all J draws; the share of draws whose argmax next token differs from S's; "
        "among tokens an alternative wins, the share whose best draw changed the argmax; among "
        "winning draws (u(R) > u(S) + margin), the share that changed it and their mean KL; ρ = "
        "Pearson correlation of u(R) − u(S) with KL over every draw of the bin. A better u(R) "
        "that comes with a small KL and an unchanged argmax is a sharper version of S's "
        "distribution; a large KL with a changed argmax is a different distribution.",
        "",
    ]
    header = [
        "model", "layer", "dataset", "bin", "KL best", "KL draws", "argmax changed",
        "wins: best changed", "winning draws changed", "KL winning draws", "ρ(gain, KL)",
    ]  # fmt: skip
    rows = []
    for r in table.filter(pl.col("verified") == "all").iter_rows(named=True):
        rows.append(
            [
                r["model"],
                layer_label(labels, r["model"], r["layer"]),
                r["dataset"],
                r["bin"],
                _ci(r, "mean_kl_best", ".3f"),
                _fmt(r["mean_kl_draws"], ".3f"),
                _ci(r, "share_changed", ".1%"),
                _fmt(r["share_wins_best_changed"], ".1%"),
                _ci(r, "share_win_draws_changed", ".1%"),
                _fmt(r["mean_kl_win_draws"], ".3f"),
                _ci(r, "corr_gain_kl", ".2f"),
            ]
        )
    return [*lines, *_table(header, rows, align="llll" + "r" * 7), ""]


def _verified(table: pl.DataFrame | None, cfg: AnalysisConfig, labels: dict) -> list[str]:
    """The headline per bin over verified and over unverified trajectories of the same model."""
    if table is None:
        return []
    split = cfg.binning == "split"
    gain = "gain_split_pp" if split else "gain_pp"
    header = ["model", "layer", "bin", "trajectories", "tokens", "u(S)", "gain (pp)", "ρ"]
    rows = []
    for r in pooled_rows(table).iter_rows(named=True):
        rows.append(
            [
                r["model"],
                layer_label(labels, r["model"], r["layer"]),
                r["bin"],
                r["verified"],
                _fmt(r["tokens"], ","),
                _ci(r, "mean_u_std", ".3f"),
                _ci(r, gain, ".1f"),
                _ci(r, "alignment", ".3f"),
            ]
        )
    return [
        "## Verified against unverified trajectories",
        "",
        f"The headline ({cfg.binning} bins) once over the verified and once over the unverified "
        "trajectories of the same model (scoring.verified_only = false): the difference is the "
        "selection effect of scoring only verified trajectories.",
        "",
        *_table(header, rows, align="llll" + "r" * 4),
        "",
    ]


def render_markdown(
    tables: dict[str, pl.DataFrame],
    figures: dict[str, Path],
    *,
    run_dir: Path,
    cfg: AnalysisConfig,
    shards: int,
    inputs: ScoreInputs,
    seconds: float,
    run_config: dict[str, Any] | None,
    labels: dict[tuple[str, int], str] | None = None,
    positions: str | None = None,
    margin_source: str = "set",
    old_scores: int = 0,
) -> str:
    labels = labels or {}
    by_bin = tables["by_bin"]
    per_job = by_bin.filter(pl.col("dataset") != "all")
    total = int(per_job.filter(pl.col("bin") == "all")["tokens"].sum())
    chances = sorted({f"{c:g}" for c in by_bin["chance_rank"].drop_nulls().to_list()})
    chance = " or ".join(chances) or "–"
    lines = [f"# Counterfactual routing report: {run_dir.name}", ""]
    lines += [
        f"{total:,} scored tokens from {shards} complete score shards"
        + (f" of {inputs.planned} planned" if inputs.planned is not None else "")
        + f"; aggregated in {seconds:.1f} s. Regenerate with `python -m analysis.report {run_dir}`.",
        "",
    ]
    notes = inputs.problems(limit=50)
    if notes:
        lines += ["## Inputs", ""]
        if inputs.partial:
            lines += ["**Incomplete: these results cover only part of the run.**", ""]
        lines += [f"- {line}" for line in notes] + [""]
    lines += [
        "## Configuration",
        "",
    ]
    if run_config is not None:
        for key, value in summarise_config(run_config).items():
            if value is not None and value != [None]:
                shown = ", ".join(map(str, value)) if isinstance(value, list) else value
                lines.append(f"- {key}: {shown}")
    else:
        lines.append("- (no config.yaml in the run directory)")
    if positions:
        lines.append(f"- {positions}")
    mapping = ", ".join(f"{m}: {name}" for (m, _), name in sorted(labels.items()))
    lines += [
        f"- layer mapping: {mapping}" if mapping else "- layer mapping: (not in the run config)",
        f"- bins: Confident pbar ≥ {cfg.confident}, Fragile pbar < {cfg.fragile}, Ambiguous between",
        f"- headline bins: {BINNING_NAMES[cfg.binning]}",
        f"- win margin: {cfg.margin:g} ({margin_source}); chance rank of S: {chance}",
        f"- intervals: {100 * cfg.level:g}% percentile bootstrap resampling {cfg.cluster} "
        "clusters, "
        f"{cfg.bootstrap:,} replicates, seed {cfg.seed} (tables: both units)",
        "",
        "## Generation and verification",
        "",
        *_generation_table(tables.get("generation", pl.DataFrame())),
        "",
        "Lengths are completion tokens; "
        + (
            "verified and unverified trajectories are scored."
            if "by_verified" in tables
            else "only verified trajectories are scored."
        ),
        "",
    ]
    lines += _route_agreement(tables.get("route_agreement"), labels)  # generation.record_routes
    lines += _key_numbers(tables.get("headline", by_bin), cfg, labels)
    lines += _robustness(tables.get("binnings"), cfg, labels)
    lines += _divergence(tables.get("divergence"), cfg, labels, old_scores, shards)
    lines += _verified(tables.get("by_verified"), cfg, labels)
    lines += ["## Figures", ""]
    captions = {
        "headline": "Mean u(S) and mean max_j u(R_j) per bin (token counts above the bars), "
        "with 95% bootstrap intervals; pbar bins, as in by_bin.",
        "gain_hist": "Distribution of the per-token gain max_j u(R_j) − u(S), per bin.",
        "alignment": "Router alignment: mean Spearman ρ between s(R) and u(R) over the J+1 routes.",
        "win_rate": "Share of tokens where some alternative beats the standard route by more "
        "than the win margin, per scored layer.",
    }
    for name, path in figures.items():
        rel = os.path.relpath(path, run_dir)
        lines += [f"![{name}]({rel})", "", captions.get(name, ""), ""]
    lines += ["## Per model, layer, dataset and bin", ""]
    lines += _markdown_table(by_bin, labels)
    lines += [""]
    lines += _how_to_read(cfg, chance)
    lines += [
        "Tables: `tables/by_bin`, `tables/overall`, `tables/counts`, `tables/gain_hist`, "
        "`tables/generation`, `tables/binnings` (every binning), `tables/headline` (the "
        "headline's binning), `tables/divergence` (next-token distributions) and "
        "`tables/by_verified` where the run has them (.parquet and .csv). The exact "
        "definitions: docs/method.md.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.report",
        description="Regenerate tables, figures and report.md of a run from its score shards.",
    )
    parser.add_argument("run_dir", type=Path, help="runs/<run_id>")
    d = AnalysisConfig()
    add = parser.add_argument
    add("--confident", type=float, default=d.confident, help="pbar >= this: Confident")
    add("--fragile", type=float, default=d.fragile, help="pbar < this: Fragile")
    add(
        "--win-margin",
        type=float,
        default=d.win_margin,
        help="a win beats u(S) by more"
        " (default: analysis.metrics.WIN_MARGINS of the scores' dtype)",
    )
    add("--binning", choices=list(BINNINGS), default=d.binning, help="the headline's bins")
    add("--cluster", choices=list(CLUSTERS), default=d.cluster, help="bootstrap resampling unit")
    add("--bootstrap", type=int, default=d.bootstrap, help="replicates (0: no intervals)")
    add("--level", type=float, default=d.level, help="interval coverage")
    add("--seed", type=int, default=d.seed, help="bootstrap seed")
    add("--gain-buckets", type=int, default=d.gain_buckets, help="gain histogram buckets")
    args = parser.parse_args(argv)
    try:
        cfg = AnalysisConfig(
            confident=args.confident,
            fragile=args.fragile,
            gain_buckets=args.gain_buckets,
            win_margin=args.win_margin,
            binning=args.binning,
            cluster=args.cluster,
            bootstrap=args.bootstrap,
            level=args.level,
            seed=args.seed,
        )
        report = build_report(args.run_dir, config=cfg)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
