"""Aggregate tables from the per-bin sums of `analysis.metrics.aggregate`.

Contract: `summarise(stats, cfg)` -> {"by_bin", "overall", "counts", "gain_hist"}; `write_tables`
writes each as `<name>.parquet` and `<name>.csv`. Every mean is a ratio of exact sums, so the
rollups are exact too:
- by_bin: one row per (model, layer, dataset, bin) with bin in confident / ambiguous / fragile
  and "all" (every token of the group), plus dataset = "all" rows pooling the datasets of each
  (model, layer) that has more than one. Columns: tokens, share (of the group's tokens),
  mean_u_std, mean_max_alt, gain_pp = 100 x mean(max_j u(R_j) - u(S)), win_rate (share of
  tokens where an alternative beats S by more than cfg.win_margin), win_rate_strict (by any
  amount), mean_rank (of u(S) among the J+1 routes, 1 = best, ties averaged), alignment (mean
  Spearman rho of s and u over the tokens where both vary), alignment_tokens, no_variance
  (tokens left out of alignment), routes (J+1; min if it varies), chance_rank ((J+2)/2, the
  mean rank of a route no better than the alternatives), and `<mean>_lo`, `<mean>_hi`: the
  cluster bootstrap interval of each mean (analysis/intervals.py; null without replicates).
- overall: the bin = "all" rows of by_bin.
- counts: tokens per bin side by side, per (model, layer, dataset), with no_variance.
- gain_hist: tokens per gain bucket [lo_pp, hi_pp) in percentage points per (model, layer,
  dataset, bin), for figures; buckets without tokens have no row.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from analysis.intervals import bootstrap_intervals
from analysis.metrics import (
    BIN_COLUMNS,
    BINNINGS,
    BINS,
    CLUSTERS,
    FIXED_POINT,
    GROUP_KEYS,
    TRAJECTORY,
    AnalysisConfig,
)
from workers.atomic import atomic_file

BIN_ORDER = (*BINS, "all")
SUMS = (
    "tokens",
    "sum_weight",
    "sum_u_std",
    "sum_max_alt",
    "gain_tokens",
    "sum_weight_gain",
    "sum_gain",
    "wins",
    "wins_strict",
    "sum_win",
    "sum_win_strict",
    "sum_rank",
    "sum_rho",
    "rho_tokens",
    "sum_weight_rho",
    "split_tokens",
    "sum_weight_split",
    "sum_max_split",
    "sum_gain_split",
    "wins_split",
    "sum_win_split",
    "sum_rho_distinct",
    "rho_distinct_tokens",
    "sum_weight_rho_distinct",
    "sum_std_draws",
    "sum_draws",
    "sum_distinct",
)
# Means also reported as the mean over trajectories of each trajectory's own mean (every
# trajectory with a token in the bin weighs the same), a check that a few long trajectories do
# not carry the token mean.
PER_TRAJECTORY = (
    "mean_u_std", "gain_pp", "gain_split_pp", "win_rate", "alignment", "alignment_distinct"
)  # fmt: skip


def _sum_by(stats: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    return stats.group_by(keys).agg(
        *(pl.col(c).sum() for c in SUMS),
        pl.col("min_routes").min(),
        pl.col("max_routes").max(),
    )


def _means(sums: pl.DataFrame) -> pl.DataFrame:
    """Means from sums, each a ratio of weighted sums (analysis.metrics.with_weights; all
    weights are 1 unless positions were budgeted, and then each ratio is bitwise the
    unweighted one: both sums are exact multiples of FIXED_POINT); a mean over zero tokens is
    null, never NaN."""

    def ratio(num: str, den: str, scale: float = 1.0) -> pl.Expr:
        return pl.when(pl.col(den) > 0).then(scale * pl.col(num) / pl.col(den)).otherwise(None)

    return sums.select(
        *GROUP_KEYS,
        "bin",
        pl.col("tokens").cast(pl.Int64),
        ratio("sum_u_std", "sum_weight").alias("mean_u_std"),
        ratio("sum_max_alt", "sum_weight_gain").alias("mean_max_alt"),
        ratio("sum_gain", "sum_weight_gain", 100.0).alias("gain_pp"),
        ratio("sum_win", "sum_weight_gain").alias("win_rate"),
        ratio("sum_win_strict", "sum_weight_gain").alias("win_rate_strict"),
        ratio("sum_rank", "sum_weight").alias("mean_rank"),
        ratio("sum_rho", "sum_weight_rho").alias("alignment"),
        pl.col("rho_tokens").cast(pl.Int64).alias("alignment_tokens"),
        (pl.col("tokens") - pl.col("rho_tokens")).cast(pl.Int64).alias("no_variance"),
        pl.col("min_routes").cast(pl.Int64).alias("routes"),
        pl.col("sum_weight"),  # for the share; dropped by _by_bin
        (pl.col("min_routes") != pl.col("max_routes")).alias("routes_vary"),
        ((pl.col("min_routes") + 1) / 2).alias("chance_rank"),
        ratio("sum_max_split", "sum_weight_split").alias("mean_max_split"),
        ratio("sum_gain_split", "sum_weight_split", 100.0).alias("gain_split_pp"),
        ratio("sum_win_split", "sum_weight_split").alias("win_rate_split"),
        ratio("sum_rho_distinct", "sum_weight_rho_distinct").alias("alignment_distinct"),
        pl.col("rho_distinct_tokens").cast(pl.Int64).alias("alignment_distinct_tokens"),
        ratio("sum_std_draws", "sum_draws").alias("share_std_draws"),
        ratio("sum_distinct", "sum_weight").alias("mean_distinct_routes"),
    )


def _sort(frame: pl.DataFrame) -> pl.DataFrame:
    """model, layer, dataset ("all" last), bin in BIN_ORDER."""
    return (
        frame.with_columns(
            (pl.col("dataset") == "all").alias("_all"),
            pl.col("bin").replace_strict(BIN_ORDER, range(len(BIN_ORDER))).alias("_bin"),
        )
        .sort("model", "layer", "_all", "dataset", "_bin")
        .drop("_all", "_bin")
    )


def _rollups(stats: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Sums per (model, layer, dataset, bin, *keys), with bin = "all" and, where a (model,
    layer) has several datasets, dataset = "all" rows."""
    per_bin = _sum_by(stats, [*GROUP_KEYS, "bin", *keys])
    every = _sum_by(stats, [*GROUP_KEYS, *keys]).with_columns(pl.lit("all").alias("bin"))
    sums = pl.concat([per_bin, every.select(per_bin.columns)])
    several = sums.group_by("model", "layer").agg(pl.col("dataset").n_unique() > 1)
    several = several.filter(pl.col("dataset")).select("model", "layer")
    pooled = sums.join(several, on=["model", "layer"])
    if keys:  # a unit below the dataset stays distinct when datasets are pooled
        pooled = pooled.with_columns(pl.col("dataset").alias("_dataset"))
        keys = [*keys, "_dataset"]
    pooled = _sum_by(pooled, ["model", "layer", "bin", *keys])
    pooled = pooled.with_columns(pl.lit("all").alias("dataset"))
    return pl.concat([sums, pooled.select(sums.columns)])


def _per_trajectory(stats: pl.DataFrame) -> pl.DataFrame:
    """`<mean>_per_trajectory`: the mean over trajectories of each one's own mean (those with
    a token counted in that mean), per (model, layer, dataset, bin)."""
    from analysis.intervals import MEANS

    sums = _rollups(stats, list(TRAJECTORY))
    out = []
    for name in PER_TRAJECTORY:
        num, den, scale = MEANS[name]
        # both fixed point (weighted sums) or both counts: the ratio needs no unit
        unit = 1.0 if num.startswith("sum_") == den.startswith("sum_") else 1 / FIXED_POINT
        own = pl.when(pl.col(den) > 0).then(scale * unit * pl.col(num) / pl.col(den))
        # summed in fixed point like every other sum, so the order of the rows does not matter
        total = (own * FIXED_POINT).round().cast(pl.Int64).sum()
        mean = pl.when(own.count() > 0).then(total / own.count() / FIXED_POINT)
        out.append(mean.alias(f"{name}_per_trajectory"))
    return sums.group_by(*GROUP_KEYS, "bin").agg(out)


def _intervals(stats: pl.DataFrame, cfg: AnalysisConfig, by_bin: pl.DataFrame) -> pl.DataFrame:
    """by_bin with `<mean>_lo/_hi` (cfg.cluster) and `<mean>_lo_<unit>/_hi_<unit>` for each
    resampling unit, computed once per unit."""
    keys = [*GROUP_KEYS, "bin"]
    units = {}
    for unit in CLUSTERS:
        units[unit] = bootstrap_intervals(stats, cfg, by_bin, cluster=unit)
    by_bin = by_bin.join(units[cfg.cluster], on=keys, how="left", nulls_equal=True)
    for unit, frame in units.items():
        frame = frame.rename({c: f"{c}_{unit}" for c in frame.columns if c not in keys})
        by_bin = by_bin.join(frame, on=keys, how="left", nulls_equal=True)
    return by_bin


def _by_bin(stats: pl.DataFrame, cfg: AnalysisConfig) -> pl.DataFrame:
    """One row per (model, layer, dataset, bin) of the bins in stats' `bin` column."""
    keys = list(GROUP_KEYS)
    by_bin = _intervals(stats, cfg, _means(_rollups(stats, [])))
    by_bin = by_bin.join(_per_trajectory(stats), on=[*keys, "bin"], how="left")
    totals = by_bin.filter(pl.col("bin") == "all").select(
        *keys, pl.col("sum_weight").alias("_total")
    )
    return _sort(
        by_bin.join(totals, on=keys, how="left")
        .with_columns((pl.col("sum_weight") / pl.col("_total")).alias("share"))
        .drop("_total", "sum_weight")
        .select(*keys, "bin", "tokens", "share", pl.exclude(*keys, "bin", "tokens", "share"))
    )


def rebin(stats: pl.DataFrame, binning: str) -> pl.DataFrame:
    """The sums with `bin` taken from another binning (metrics.BINNINGS); tokens that binning
    cannot place (split draws need J >= 2) are left out."""
    column = BIN_COLUMNS[binning]
    return stats.filter(pl.col(column).is_not_null()).with_columns(pl.col(column).alias("bin"))


def summarise(stats: pl.DataFrame, cfg: AnalysisConfig) -> dict[str, pl.DataFrame]:
    """The report's tables from `aggregate(..., cfg)`'s sums (small: a row per group and bin)."""
    keys = list(GROUP_KEYS)
    by_bin = _by_bin(stats, cfg)
    binnings = {b: by_bin if b == "pbar" else _by_bin(rebin(stats, b), cfg) for b in BINNINGS}
    counts = (
        by_bin.filter(pl.col("dataset") != "all")
        .pivot(on="bin", index=keys, values="tokens")
        .join(
            by_bin.filter((pl.col("bin") == "all") & (pl.col("dataset") != "all")).select(
                *keys, "no_variance", "routes"
            ),
            on=keys,
        )
    )
    for name in BINS:  # a bin with no tokens has no column after the pivot
        if name not in counts.columns:
            counts = counts.with_columns(pl.lit(0, dtype=pl.Int64).alias(name))
    counts = counts.select(
        *keys,
        pl.col("all").alias("tokens"),
        *(pl.col(b).fill_null(0) for b in BINS),
        "no_variance",
        "routes",
    ).sort(*keys)
    width = 2.0 / cfg.gain_buckets
    gain_hist = _sort(
        stats.group_by(*keys, "bin", "gain_bucket")
        .agg(pl.col("tokens").sum().cast(pl.Int64))
        .drop_nulls("gain_bucket")
        .with_columns(  # percentage points, the unit of gain_pp and of the figure's axis
            (100.0 * (pl.col("gain_bucket") * width - 1.0)).alias("lo_pp"),
            (100.0 * ((pl.col("gain_bucket") + 1) * width - 1.0)).alias("hi_pp"),
        )
    ).sort(*keys, "bin", "gain_bucket")
    return {
        "by_bin": by_bin,
        "overall": by_bin.filter(pl.col("bin") == "all").drop("bin", "share"),
        "counts": counts,
        "gain_hist": gain_hist,
        "binnings": pl.concat(
            [f.select(pl.lit(b).alias("binning"), pl.all()) for b, f in binnings.items()]
        ),
        "headline": binnings[cfg.binning],
    }


def pooled_rows(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows over all datasets of a (model, layer): its dataset = "all" rows where it has several
    datasets, its only dataset's rows otherwise; `dataset` is kept as it was."""
    alone = frame.group_by("model", "layer").agg(
        (pl.col("dataset").filter(pl.col("dataset") != "all").n_unique() == 1).alias("_alone")
    )
    return (
        frame.join(alone, on=["model", "layer"])
        .filter(pl.col("_alone") | (pl.col("dataset") == "all"))
        .drop("_alone")
    )


def write_tables(
    tables: dict[str, pl.DataFrame], out_dir: str | Path, *, root: str | Path | None = None
) -> dict[str, Path]:
    """Write every table as Parquet and CSV through workers.atomic (`root`: the run folder);
    returns {name: parquet path}."""
    out_dir = Path(out_dir)
    paths = {}
    for name, frame in tables.items():
        with atomic_file(out_dir / f"{name}.parquet", root=root) as f:
            frame.write_parquet(f)
        with atomic_file(out_dir / f"{name}.csv", root=root) as f:
            frame.write_csv(f)
        paths[name] = out_dir / f"{name}.parquet"
    return paths
