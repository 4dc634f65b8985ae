"""How an alternative's gain depends on the direction and the size of its layer-L MoE output.

Contract: `geometry_tables(files, buckets) -> {"geometry": ..., "geometry_corr": ...}` from
score files written with `scoring.moe_geometry` (columns alt_moe_cos, alt_moe_norm_ratio,
workers.schemas.MOE_GEOMETRY). Every alternative draw R of every token is one row, draws that
repeat S (cosine and norm ratio exactly 1) left out; du = u(R) - u(S).
- `geometry`: per (model, layer, dataset, axis, bucket), axis `cos` (cos(out(R), out(S))) or
  `norm_ratio` (||out(R)|| / ||out(S)||), bucket the draw's quantile bucket of that axis within
  its (model, layer, dataset) (0 = lowest): draws, the axis's mean, lo and hi, mean du in
  percentage points (`du_pp`) and the share of draws with du > 0 (`improves`).
- `geometry_corr`: per (model, layer, dataset): draws, the Spearman correlation of du with
  the cosine and with the norm ratio, and that of the two axes with each other.
Draws are counted alike (rows of a run under a position budget are not weighted).

CLI: `python -m analysis.geometry RUN_DIR --out DIR [--buckets 5]` reads the score files of the
run's current plan (analysis.inputs) and writes both tables as Parquet and CSV under DIR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

from analysis.inputs import select_score_files
from analysis.metrics import GROUP_KEYS, scan_scores
from analysis.tables import write_tables
from workers.schemas import MOE_GEOMETRY

AXES = {"cos": "alt_moe_cos", "norm_ratio": "alt_moe_norm_ratio"}


def _draws(files: list[Path]) -> pl.DataFrame:
    columns = [f.name for f in MOE_GEOMETRY]
    lf = scan_scores(files)
    if not set(columns) <= set(lf.collect_schema().names()):
        raise ValueError("the score files have no MoE output columns (scoring.moe_geometry)")
    return (
        lf.select(*GROUP_KEYS, "std_prob", "alt_probs", *columns)
        .explode("alt_probs", *columns)
        .filter(~((pl.col("alt_moe_cos") == 1.0) & (pl.col("alt_moe_norm_ratio") == 1.0)))
        .select(
            *GROUP_KEYS,
            (100.0 * (pl.col("alt_probs") - pl.col("std_prob")).cast(pl.Float64)).alias("du_pp"),
            *(pl.col(c).cast(pl.Float64).alias(axis) for axis, c in AXES.items()),
        )
        .collect()
    )


def geometry_tables(files: list[Path], buckets: int = 5) -> dict[str, pl.DataFrame]:
    """The two tables of the module docstring; ValueError without the columns or draws."""
    draws = _draws(files)
    if draws.height == 0:
        raise ValueError("no alternative draw other than S itself")
    keys = list(GROUP_KEYS)
    frames = []
    for axis in AXES:
        rank = pl.col(axis).rank("ordinal").over(keys) - 1
        bucket = (rank * buckets // pl.len().over(keys)).cast(pl.Int32)
        frames.append(
            draws.with_columns(bucket.alias("bucket"))
            .group_by(*keys, "bucket")
            .agg(
                pl.len().alias("draws"),
                pl.col(axis).mean().alias("mean"),
                pl.col(axis).min().alias("lo"),
                pl.col(axis).max().alias("hi"),
                pl.col("du_pp").mean(),
                (pl.col("du_pp") > 0).mean().alias("improves"),
            )
            .select(*keys, pl.lit(axis).alias("axis"), pl.exclude(keys))
        )
    corr = draws.group_by(*keys).agg(
        pl.len().alias("draws"),
        pl.corr("du_pp", "cos", method="spearman").alias("rho_du_cos"),
        pl.corr("du_pp", "norm_ratio", method="spearman").alias("rho_du_norm_ratio"),
        pl.corr("cos", "norm_ratio", method="spearman").alias("rho_cos_norm_ratio"),
    )
    return {
        "geometry": pl.concat(frames).sort(*keys, "axis", "bucket"),
        "geometry_corr": corr.sort(*keys),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.geometry",
        description="Gain of alternative routes against the direction and size of their MoE output.",
    )
    parser.add_argument("run_dir", type=Path, help="runs/<run_id>, scored with moe_geometry")
    parser.add_argument("--out", type=Path, required=True, help="folder for the tables")
    parser.add_argument("--buckets", type=int, default=5, help="quantile buckets per axis")
    args = parser.parse_args(argv)
    try:
        if args.buckets < 1:
            raise ValueError(f"--buckets must be >= 1, got {args.buckets}")
        if not args.run_dir.is_dir():
            raise ValueError(f"run directory {args.run_dir} does not exist")
        files = select_score_files(args.run_dir).files
        if not files:
            raise ValueError(f"{args.run_dir.name}: no complete score files of its current plan")
        tables = geometry_tables(files, args.buckets)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    paths = write_tables(tables, args.out)
    print(paths["geometry"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
