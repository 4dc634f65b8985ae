"""Percentile bootstrap intervals of the per-bin means, resampling clusters, not tokens.

Contract: `bootstrap_intervals(stats, cfg, rows)` takes `analysis.metrics.aggregate`'s sums
and the (model, layer, dataset, bin) rows of the by_bin table (dataset "all" = pooled, bin
"all" = every bin) and returns one row per such group with `<mean>_lo` and `<mean>_hi` for
every mean in MEANS, at coverage `cfg.level` from `cfg.bootstrap` replicates.

Why clusters: tokens of one trajectory share a prefix, a problem and a sampled answer, so they
are far from independent; resampling tokens would give intervals that are much too narrow.
The unit is a trajectory (problem_id, sample_idx) or a problem (`cluster`, cfg.cluster by
default; the tables compute both). A replicate
draws the group's n clusters n times with replacement (multinomial counts) and recomputes each mean as a
ratio of resampled sums, so a bin's mean uses every resampled trajectory's tokens in that bin
(trajectories without any count as zeros), exactly as the point estimate does.

Cost: the tokens are never touched again. Per group, a cluster x statistic matrix of sums
(small: one row per trajectory) is multiplied by blocks of replicate weights, each block
capped at BLOCK_CELLS weights, so memory stays bounded whatever the numbers of tokens and
replicates. Deterministic: the clusters are sorted and each group's generator is seeded from
(cfg.seed, the group's name), so a group's interval does not depend on which other groups
the run holds or in what order the shards were read.
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import polars as pl

from analysis.metrics import BINS, CLUSTERS, FIXED_POINT, GROUP_KEYS, AnalysisConfig

# statistic columns (sums of the aggregate, fixed point where sum_*), in matrix order
# (weighted: analysis.metrics.with_weights; with weights 1 these are the token and win counts
# and the plain sums, so a full run's intervals are as they were)
STATS = (
    "sum_weight",
    "sum_weight_gain",
    "sum_weight_rho",
    "sum_u_std",
    "sum_max_alt",
    "sum_gain",
    "sum_win",
    "sum_win_strict",
    "sum_rank",
    "sum_rho",
    "sum_weight_split",
    "sum_max_split",
    "sum_gain_split",
    "sum_win_split",
    "sum_weight_rho_distinct",
    "sum_rho_distinct",
    "sum_draws",
    "sum_std_draws",
)
# mean -> (numerator, denominator, scale): the same ratios as tables._means
MEANS = {
    "mean_u_std": ("sum_u_std", "sum_weight", 1.0),
    "mean_max_alt": ("sum_max_alt", "sum_weight_gain", 1.0),
    "gain_pp": ("sum_gain", "sum_weight_gain", 100.0),
    "win_rate": ("sum_win", "sum_weight_gain", 1.0),
    "win_rate_strict": ("sum_win_strict", "sum_weight_gain", 1.0),
    "mean_rank": ("sum_rank", "sum_weight", 1.0),
    "alignment": ("sum_rho", "sum_weight_rho", 1.0),
    "mean_max_split": ("sum_max_split", "sum_weight_split", 1.0),
    "gain_split_pp": ("sum_gain_split", "sum_weight_split", 100.0),
    "win_rate_split": ("sum_win_split", "sum_weight_split", 1.0),
    "alignment_distinct": ("sum_rho_distinct", "sum_weight_rho_distinct", 1.0),
    "share_std_draws": ("sum_std_draws", "sum_draws", 1.0),
}
BLOCK_CELLS = 2**20  # replicate weights per block (8 MiB each as int64 and float64)
BIN_INDEX = {b: i for i, b in enumerate(BINS)}


def interval_columns() -> list[str]:
    return [f"{m}_{side}" for m in MEANS for side in ("lo", "hi")]


def group_seed(
    cfg: AnalysisConfig, model: str, layer: int, dataset: str, cluster: str | None = None
) -> list[int]:
    """The seed of one group's generator: (cfg.seed, a stable hash of the group's name and the
    resampling unit, cfg.cluster unless given)."""
    name = f"{model}\x00{layer}\x00{dataset}\x00{cluster or cfg.cluster}".encode()
    return [cfg.seed, zlib.crc32(name)]


def _cluster_sums(stats: pl.DataFrame, cluster: str) -> pl.DataFrame:
    """Sums per (model, layer, dataset, bin, cluster), fixed point turned into float64."""
    keys = [*GROUP_KEYS, "bin", *CLUSTERS[cluster]]
    return (
        stats.group_by(keys)
        .agg(pl.col(c).sum() for c in STATS)
        .with_columns(
            pl.col(c).cast(pl.Float64) / FIXED_POINT if c.startswith("sum_") else pl.col(c)
            for c in STATS
        )
    )


def resample_weights(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """(size, n) int64: how often each of n clusters is drawn in each of `size` resamples of n
    draws with replacement (multinomial counts; drawing indices and counting them is ~5x
    faster than numpy's multinomial at thousands of clusters)."""
    idx = rng.integers(0, n, size=(size, n))
    flat = (np.arange(size, dtype=np.int64)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=size * n).reshape(size, n)


def _replicate_means(x: np.ndarray, cfg: AnalysisConfig, seed: list[int]) -> np.ndarray:
    """x: (bins, clusters, stats) sums -> (replicates, bins + 1, means); the last bin is all."""
    x = np.concatenate([x, x.sum(axis=0, keepdims=True)])  # bin "all"
    n_bins, n, _ = x.shape
    rng = np.random.default_rng(seed)
    block = max(1, BLOCK_CELLS // max(n, 1))
    col = {s: i for i, s in enumerate(STATS)}
    out = np.empty((cfg.bootstrap, n_bins, len(MEANS)))
    flat = x.transpose(1, 0, 2).reshape(n, -1)  # clusters x (bins * stats)
    for start in range(0, cfg.bootstrap, block):
        size = min(block, cfg.bootstrap - start)
        weights = resample_weights(rng, n, size).astype(np.float64)
        sums = (weights @ flat).reshape(size, n_bins, len(STATS))
        with np.errstate(invalid="ignore", divide="ignore"):
            for k, (num, den, scale) in enumerate(MEANS.values()):
                d = sums[..., col[den]]
                out[start : start + size, :, k] = np.where(
                    d > 0, scale * sums[..., col[num]] / np.where(d > 0, d, 1), np.nan
                )
    return out


def bootstrap_intervals(
    stats: pl.DataFrame, cfg: AnalysisConfig, groups: pl.DataFrame, cluster: str | None = None
) -> pl.DataFrame:
    """`<mean>_lo`, `<mean>_hi` per (model, layer, dataset, bin) row of `groups`, resampling
    `cluster` units (cfg.cluster unless given)."""
    cluster = cluster or cfg.cluster
    keys = [*GROUP_KEYS, "bin"]
    schema = {
        "model": pl.String,
        "layer": stats.schema["layer"],
        "dataset": pl.String,
        "bin": pl.String,
        **{c: pl.Float64 for c in interval_columns()},
    }
    if cfg.bootstrap == 0 or stats.is_empty():
        return groups.select(keys).with_columns(
            pl.lit(None, dtype=pl.Float64).alias(c) for c in interval_columns()
        )
    sums = _cluster_sums(stats, cluster)
    unit = ["dataset", *CLUSTERS[cluster]]  # a cluster never spans datasets
    tail = (1.0 - cfg.level) / 2.0
    rows = []
    wanted = groups.select("model", "layer", "dataset").unique()
    for model, layer, dataset in sorted(wanted.rows(), key=lambda r: (r[0], r[1], r[2])):
        part = sums.filter((pl.col("model") == model) & (pl.col("layer") == layer))
        if dataset != "all":
            part = part.filter(pl.col("dataset") == dataset)
        clusters = part.select(unit).unique().sort(unit).with_row_index("_c")
        part = part.join(clusters, on=unit, how="left", nulls_equal=True)
        x = np.zeros((len(BINS), clusters.height, len(STATS)))
        b = part["bin"].replace_strict(BIN_INDEX, return_dtype=pl.Int64).to_numpy()
        np.add.at(x, (b, part["_c"].to_numpy()), part.select(STATS).to_numpy().astype(np.float64))
        reps = _replicate_means(x, cfg, group_seed(cfg, model, layer, dataset, cluster))
        # An all-NaN slice (a bin no replicate has tokens in) warns; its interval is null.
        with warnings.catch_warnings(action="ignore", category=RuntimeWarning):
            lo = np.nanquantile(reps, tail, axis=0)
            hi = np.nanquantile(reps, 1.0 - tail, axis=0)
        for i, bin_name in enumerate((*BINS, "all")):
            values = {}
            for k, mean in enumerate(MEANS):
                ok = np.isfinite(lo[i, k])
                values[f"{mean}_lo"] = float(lo[i, k]) if ok else None
                values[f"{mean}_hi"] = float(hi[i, k]) if ok else None
            rows.append(
                {"model": model, "layer": layer, "dataset": dataset, "bin": bin_name, **values}
            )
    frame = pl.DataFrame(rows, schema=schema)
    return groups.select(keys).join(frame, on=keys, how="left", nulls_equal=True)
