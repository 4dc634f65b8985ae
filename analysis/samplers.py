"""Sampler comparison: the same tokens scored with other route samplers, side by side.

Contract: `compare_samplers(run_dirs, cfg) -> pl.DataFrame` takes runs that differ in their
route sampler (`scoring.sampler` of each run's config.yaml: gumbel, uniform_pool, uniform_all)
and scored the same tokens, and returns one row per (model, layer, dataset, bin, sampler):
tokens, gain_pp, win_rate, mean_rank and chance_rank, each mean with its `_lo/_hi` bootstrap
interval, and `run` (the run's folder name). Each run's numbers are those of its own report
(analysis.tables.summarise over the score files of its current plan, analysis.inputs) in the
binning `cfg.binning`; the default here is `std` (u(S) alone, from the standard pass), whose
bins hold the same tokens under every sampler, while pbar and split bins are drawn from each
sampler's own routes, so a bin holds other tokens under each (`binning` column). Runs
whose scored tokens differ (other trajectories, layers, positions or u(S)), two runs of one
sampler, or a run without a sampler in its config are refused.

CLI: `python -m analysis.samplers RUN_DIR RUN_DIR [...] --out DIR [--binning std]` writes samplers.parquet,
samplers.csv and samplers.md under DIR (`write_comparison`, which the driver's
`compare=samplers` calls too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

from analysis.inputs import select_score_files
from analysis.metrics import (
    BINNINGS,
    BINS,
    GROUP_KEYS,
    AnalysisConfig,
    collect_stats,
    resolve_margin,
    scan_scores,
)
from analysis.tables import summarise, write_tables
from workers.atomic import atomic_write
from workers.runfiles import read_run_config
from workers.scoring.routes import SAMPLERS

MEANS = ("gain_pp", "win_rate", "mean_rank")
TOKEN_KEYS = ("problem_id", "sample_idx", "position", "std_prob")


def run_sampler(run_dir: Path) -> str:
    """The route sampler a run scored with, from its config.yaml."""
    config = read_run_config(run_dir) or {}
    sampler = (config.get("scoring") or {}).get("sampler")
    if sampler not in SAMPLERS:
        raise ValueError(f"{run_dir.name}: config.yaml names no known scoring.sampler")
    return sampler


def _token_digest(files: list[Path]) -> pl.DataFrame:
    """Per (model, layer, dataset): how many tokens and an order-free digest of which."""
    keys = pl.struct(*TOKEN_KEYS).hash().cast(pl.UInt64)
    return (
        scan_scores(files)
        .group_by(*GROUP_KEYS)
        .agg(pl.len().alias("n"), (keys % (1 << 61)).sum().alias("digest"))
        .sort(*GROUP_KEYS)
        .collect()
    )


def compare_samplers(run_dirs: list[Path], cfg: AnalysisConfig | None = None) -> pl.DataFrame:
    """The per-bin table of the module docstring; ValueError for runs that cannot be compared."""
    cfg = cfg or AnalysisConfig(binning="std")
    if len(run_dirs) < 2:
        raise ValueError("give at least two run folders to compare")
    frames, digest, seen = [], None, {}
    for run_dir in map(Path, run_dirs):
        if not run_dir.is_dir():
            raise ValueError(f"run directory {run_dir} does not exist")
        sampler = run_sampler(run_dir)
        if sampler in seen:
            raise ValueError(f"{run_dir.name} and {seen[sampler]} both scored with {sampler}")
        seen[sampler] = run_dir.name
        files = select_score_files(run_dir).files
        if not files:
            raise ValueError(f"{run_dir.name}: no complete score files of its current plan")
        tokens = _token_digest(files)
        if digest is not None and not tokens.equals(digest):
            raise ValueError(f"{run_dir.name} did not score the same tokens as the runs before it")
        digest = tokens
        binnings = summarise(collect_stats(files, resolve_margin(cfg, files)), cfg)["binnings"]
        by_bin = binnings.filter(pl.col("binning") == cfg.binning)
        cols = [f"{m}{s}" for m in MEANS for s in ("", "_lo", "_hi")]
        frames.append(
            by_bin.filter(pl.col("dataset") != "all").select(
                *GROUP_KEYS,
                "binning",
                "bin",
                pl.lit(sampler).alias("sampler"),
                "tokens",
                *(c for c in cols if c in by_bin.columns),
                "chance_rank",
                pl.lit(run_dir.name).alias("run"),
            )
        )
    order = {name: i for i, name in enumerate((*BINS, "all"))}
    rank = {name: i for i, name in enumerate(SAMPLERS)}
    return (
        pl.concat(frames, how="diagonal")
        .with_columns(
            pl.col("bin").replace_strict(order, return_dtype=pl.Int32).alias("_b"),
            pl.col("sampler").replace_strict(rank, return_dtype=pl.Int32).alias("_s"),
        )
        .sort(*GROUP_KEYS, "_b", "_s")
        .drop("_b", "_s")
    )


def _ci(row: dict, mean: str, spec: str) -> str:
    value, lo, hi = row.get(mean), row.get(f"{mean}_lo"), row.get(f"{mean}_hi")
    if value is None:
        return "–"
    text = format(value, spec)
    return text if lo is None or hi is None else f"{text} [{lo:{spec}}, {hi:{spec}}]"


def render_markdown(table: pl.DataFrame) -> list[str]:
    """A section: per (model, layer, dataset), one row per bin and sampler."""
    lines = [
        "## Route samplers compared",
        "",
        "The same tokens scored with each route sampler (gumbel: the router's Gumbel top-k "
        "over its pool; uniform_pool: k experts uniformly from the pool; uniform_all: k "
        "experts uniformly from all experts). Gain in percentage points, win rate and mean "
        "rank of S among its J + 1 routes, with bootstrap intervals.",
    ]
    binning = table["binning"][0] if table.height else "std"
    lines[-1] += f" Bins: `{binning}`" + (
        " (u(S) alone: the same tokens under every sampler)."
        if binning == "std"
        else " (drawn from each sampler's own routes: a bin holds other tokens under each)."
    )
    for (model, layer, dataset), group in table.group_by(*GROUP_KEYS, maintain_order=True):
        # model and dataset names come from files: shown as code, backticks stripped
        name = f"`{str(model).replace('`', '')}`, layer {layer}, `{str(dataset).replace('`', '')}`"
        lines += ["", f"### {name}", ""]
        lines += ["| bin | sampler | tokens | gain (pp) | win rate | mean rank (chance) |"]
        lines += ["|---|---|---:|---:|---:|---:|"]
        for row in group.iter_rows(named=True):
            rank = f"{_ci(row, 'mean_rank', '.2f')} ({row['chance_rank']:.1f})"
            cells = [row["bin"], row["sampler"], str(row["tokens"])]
            cells += [_ci(row, "gain_pp", ".3f"), _ci(row, "win_rate", ".3f"), rank]
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.samplers",
        description="Compare runs that scored the same tokens with different route samplers.",
    )
    parser.add_argument("run_dirs", type=Path, nargs="+", help="runs/<run_id>, one per sampler")
    parser.add_argument("--out", type=Path, required=True, help="folder for the table")
    d = AnalysisConfig()
    parser.add_argument("--binning", choices=list(BINNINGS), default="std", help="the bins")
    parser.add_argument("--bootstrap", type=int, default=d.bootstrap, help="replicates")
    parser.add_argument("--seed", type=int, default=d.seed, help="bootstrap seed")
    args = parser.parse_args(argv)
    try:
        cfg = AnalysisConfig(binning=args.binning, bootstrap=args.bootstrap, seed=args.seed)
        table = compare_samplers(args.run_dirs, cfg)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(write_comparison(table, args.out))
    return 0


def write_comparison(table: pl.DataFrame, out: Path) -> Path:
    """samplers.{parquet,csv,md} of `table` under `out` (made if absent); the markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    write_tables({"samplers": table}, out)
    atomic_write(out / "samplers.md", "\n".join(render_markdown(table)))
    return out / "samplers.md"


if __name__ == "__main__":
    sys.exit(main())
