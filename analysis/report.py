"""Tables, figures and report.md of a run, from its complete score shards alone.

    python -m analysis.report runs/<run_id> [--confident 0.9] [--fragile 0.5]

Contract: `build_report(run_dir, config=None)` scans `runs/<id>/scores/**.arrow` (only files
with a `.done.json` sidecar; see analysis.metrics), writes `tables/<name>.{parquet,csv}`,
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

from analysis.figures import plot_all
from analysis.metrics import BINS, SCORES_GLOB, AnalysisConfig, collect_stats, find_shards
from analysis.tables import summarise, write_tables


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
    # 1. The complete shards (a data file without its sidecar is never opened).
    shards = find_shards(run_dir)
    if not shards:
        raise FileNotFoundError(
            f"no complete score shards under {run_dir / 'scores'} "
            f"(expected {SCORES_GLOB} files, each with a .done.json sidecar)"
        )
    incomplete = len(list(run_dir.glob(SCORES_GLOB))) - len(shards)
    # 2. One streaming pass -> per-bin sums -> tables.
    started = time.perf_counter()
    tables = summarise(collect_stats(shards, cfg), cfg)
    seconds = time.perf_counter() - started
    write_tables(tables, run_dir / "tables")
    # 3. Figures and the markdown report that embeds them.
    figures = plot_all(tables, run_dir / "figures")
    text = render_markdown(
        tables,
        figures,
        run_dir=run_dir,
        cfg=cfg,
        shards=len(shards),
        incomplete=incomplete,
        seconds=seconds,
        run_config=load_run_config(run_dir),
    )
    path = run_dir / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return Report(tables=tables, figures=figures, path=path)


def load_run_config(run_dir: Path) -> dict[str, Any] | None:
    """runs/<id>/config.yaml as a dict, or None when absent or unreadable."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def summarise_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The few settings a reader needs (orchestrator/config.py's RunConfig layout). Only these
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


def _markdown_table(frame: pl.DataFrame) -> list[str]:
    columns = [
        ("model", "model", "s"),
        ("layer", "layer", "d"),
        ("dataset", "dataset", "s"),
        ("bin", "bin", "s"),
        ("tokens", "tokens", ","),
        ("share", "share", ".1%"),
        ("mean_u_std", "mean u(S)", ".3f"),
        ("mean_max_alt", "mean max u(R)", ".3f"),
        ("gain_pp", "gain (pp)", ".1f"),
        ("win_rate", "win rate", ".1%"),
        ("mean_rank", "mean rank of S", ".2f"),
        ("alignment", "alignment ρ", ".3f"),
        ("no_variance", "no variance", ","),
    ]
    lines = [
        "| " + " | ".join(title for _, title, _ in columns) + " |",
        "|" + "|".join("---" if spec == "s" else "---:" for *_, spec in columns) + "|",
    ]
    for row in frame.iter_rows(named=True):
        lines.append("| " + " | ".join(_fmt(row[c], spec) for c, _, spec in columns) + " |")
    return lines


def render_markdown(
    tables: dict[str, pl.DataFrame],
    figures: dict[str, Path],
    *,
    run_dir: Path,
    cfg: AnalysisConfig,
    shards: int,
    incomplete: int,
    seconds: float,
    run_config: dict[str, Any] | None,
) -> str:
    by_bin = tables["by_bin"]
    per_job = by_bin.filter(pl.col("dataset") != "all")
    total = int(per_job.filter(pl.col("bin") == "all")["tokens"].sum())
    lines = [f"# Counterfactual routing report: {run_dir.name}", ""]
    lines += [
        f"{total:,} scored tokens from {shards} complete score shards"
        + (f" ({incomplete} without a sidecar, ignored)" if incomplete else "")
        + f"; aggregated in {seconds:.1f} s. Regenerate with `python -m analysis.report {run_dir}`.",
        "",
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
    lines += [
        f"- bins: Confident pbar ≥ {cfg.confident}, Fragile pbar < {cfg.fragile}, Ambiguous between",
        "",
        "## Key numbers (all datasets pooled)",
        "",
    ]
    for row in by_bin.filter(
        (pl.col("dataset") == "all") & (pl.col("bin").is_in(list(BINS)))
    ).iter_rows(named=True):
        lines.append(
            f"- {row['model']} layer {row['layer']}, {row['bin']}: {row['tokens']:,} tokens "
            f"({_fmt(row['share'], '.1%')}); best alternative beats S by "
            f"{_fmt(row['gain_pp'], '.1f')} pp on average, wins on {_fmt(row['win_rate'], '.1%')}; "
            f"router alignment ρ = {_fmt(row['alignment'], '.3f')}"
        )
    lines += ["", "## Figures", ""]
    captions = {
        "headline": "Mean u(S) and mean max_j u(R_j) per bin (token counts above the bars).",
        "gain_hist": "Distribution of the per-token gain max_j u(R_j) − u(S), per bin.",
        "alignment": "Router alignment: mean Spearman ρ between s(R) and u(R) over the J+1 routes.",
        "win_rate": "Share of tokens where some alternative strictly beats the standard route.",
    }
    for name, path in figures.items():
        rel = os.path.relpath(path, run_dir)
        lines += [f"![{name}]({rel})", "", captions.get(name, ""), ""]
    lines += ["## Per model, layer, dataset and bin", ""]
    lines += _markdown_table(by_bin)
    lines += [
        "",
        "## Definitions",
        "",
        "- u(R) = p(next token | prefix, route R at the scored position and layer); S = the "
        "router's own route; R_1..R_J = the sampled alternatives; pbar = mean of u over S and "
        "the J alternatives (float64 mean of the float32 data, compared in float32).",
        "- gain (pp) = 100 × mean over tokens of max_j u(R_j) − u(S). Win rate = share of "
        "tokens where max_j u(R_j) > u(S) strictly (a tie is not a win).",
        "- Mean rank of S: rank of u(S) among the J+1 routes, 1 = highest utility, tied routes "
        "share the average of their ranks (1 + #better + #tied/2); (J+2)/2 is chance level.",
        "- Alignment: per token, the Spearman correlation (average ranks for ties) between the "
        "router score s(R) = Σ_{e∈R} log softmax(z)_e and u(R) over the J+1 routes; averaged "
        "over tokens. Tokens where s or u is constant over the routes have no correlation: "
        "they are left out and counted in 'no variance'.",
        "- Rows with dataset = all pool the datasets of a (model, layer); bin = all pools bins.",
        "",
        "Tables: `tables/by_bin`, `tables/overall`, `tables/counts`, `tables/gain_hist` (.parquet and .csv).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.report",
        description="Regenerate tables, figures and report.md of a run from its score shards.",
    )
    parser.add_argument("run_dir", type=Path, help="runs/<run_id>")
    defaults = AnalysisConfig()
    parser.add_argument(
        "--confident", type=float, default=defaults.confident, help="pbar >= this: Confident"
    )
    parser.add_argument(
        "--fragile", type=float, default=defaults.fragile, help="pbar < this: Fragile"
    )
    args = parser.parse_args(argv)
    try:
        cfg = AnalysisConfig(confident=args.confident, fragile=args.fragile)
        report = build_report(args.run_dir, config=cfg)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
