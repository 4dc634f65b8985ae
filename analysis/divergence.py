"""Beyond the realized token, and verified against unverified trajectories (docs/method.md).

Contract: `divergence_table(paths, cfg)` -> one row per (model, layer, dataset, verified, bin)
of the next-token distribution columns of the score files (KL(p_S || p_R) per draw, the argmax
change), or None when no file has them (files written before they existed); the files that lack
them are left out and `divergence_files(paths)` says which have them. `verified_table(paths,
cfg)` -> the headline table (analysis.tables, cfg.binning) once over the verified and once over
the unverified trajectories' rows, with a `verified` column, or None unless both kinds were
scored (`scoring.verified_only=false`).

Bins are the headline's (cfg.binning), `bin = all` every token; `verified` is "verified",
"unverified", "unknown" (rows without the flag) or "all". Per token, with d_j = u(R_j) - u(S):
the best draw j* = the first j with the largest u(R_j), its KL and whether its argmax changed;
the sum of KL and of argmax changes over the J draws; the winning draws (u(R_j) > u(S) + m),
how many changed the argmax and their KL; and the sums of d, KL, d x KL, d^2, KL^2 over the
draws for the pooled Pearson correlation of d_j and KL_j over every draw of a bin. Sums are
fixed point (metrics.weighted_sum), weighted like every other table under a position budget.
Intervals: percentile bootstrap over cfg.cluster clusters, as analysis.intervals does.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from analysis.intervals import group_seed, resample_weights
from analysis.metrics import (
    BIN_COLUMNS,
    BINS,
    FIXED_POINT,
    GROUP_KEYS,
    AnalysisConfig,
    _schema,
    aggregate,
    scan_scores,
    token_metrics,
    weighted_sum,
    with_weights,
)

COLUMNS = ("std_argmax", "alt_kl", "alt_argmax_changed")
KEYS = (*GROUP_KEYS, "verified", "bin")
VERIFIED = {True: "verified", False: "unverified", None: "unknown"}
# mean: (numerator sum, denominator sum)
MEANS = {
    "mean_kl_best": ("kl_best", "best_tokens"),
    "mean_kl_draws": ("kl_draws", "draws"),
    "share_changed": ("changed_draws", "draws"),
    "share_best_changed": ("changed_best", "best_tokens"),
    "share_wins_best_changed": ("changed_best_win", "wins"),
    "share_win_draws_changed": ("win_changed", "win_draws"),
    "mean_kl_win_draws": ("win_kl", "win_draws"),
}
SUMS = (
    "best_tokens", "kl_best", "changed_best", "wins", "changed_best_win", "draws", "kl_draws",
    "changed_draws", "win_draws", "win_changed", "win_kl", "d", "k", "dk", "dd", "kk",
)  # fmt: skip
# KL^2 summed over 32 draws reaches ~10^4 per token for very different distributions; in
# units of KK_SCALE its fixed-point sum (2**-32 steps) stays inside Int64 for millions of
# tokens per cluster, at a resolution (2**-20) far below what a correlation needs.
KK_SCALE = 2**12
INTERVALS = ("mean_kl_best", "share_changed", "share_win_draws_changed", "corr_gain_kl")


def divergence_files(paths: Sequence[str | Path]) -> list[Path]:
    """The score files that have the next-token distribution columns."""
    return [Path(p) for p in paths if set(COLUMNS) <= set(_schema(p).names)]


def _token_sums(lf: pl.LazyFrame, cfg: AnalysisConfig) -> pl.LazyFrame:
    """Per token: bin, verified and the summands of SUMS (before weighting)."""
    keep = ("weight", "verified", "alt_probs", "alt_kl", "alt_argmax_changed")
    tok = token_metrics(with_weights(lf), cfg, keep=keep)
    alt = pl.col("alt_probs").cast(pl.List(pl.Float64))
    d = alt - pl.col("u_std")
    kl = pl.col("alt_kl").cast(pl.List(pl.Float64))
    changed = pl.col("alt_argmax_changed").list.eval(pl.element().cast(pl.Float64))
    won = (d - cfg.margin).list.eval((pl.element() > 0).cast(pl.Float64))
    best = pl.col("alt_probs").list.arg_max()
    has = pl.col("alt_kl").list.len() > 0
    changed_best = pl.col("alt_argmax_changed").list.get(best, null_on_oob=True)
    return tok.select(
        *GROUP_KEYS,
        "problem_id",
        "sample_idx",
        "weight",
        pl.when(pl.col("verified").is_null())
        .then(pl.lit("unknown"))
        .when(pl.col("verified"))
        .then(pl.lit("verified"))
        .otherwise(pl.lit("unverified"))
        .alias("verified"),
        pl.col(BIN_COLUMNS[cfg.binning]).alias("bin"),
        has.cast(pl.Float64).alias("best_tokens"),
        pl.when(has).then(pl.col("alt_kl").list.get(best, null_on_oob=True)).alias("kl_best"),
        changed_best.cast(pl.Float64).alias("changed_best"),
        pl.col("win").cast(pl.Float64).alias("wins"),
        (changed_best & pl.col("win")).cast(pl.Float64).alias("changed_best_win"),
        pl.col("alt_kl").list.len().cast(pl.Float64).alias("draws"),
        kl.list.sum().alias("kl_draws"),
        changed.list.sum().alias("changed_draws"),
        won.list.sum().alias("win_draws"),
        (won * changed).list.sum().alias("win_changed"),
        (won * kl).list.sum().alias("win_kl"),
        d.list.sum().alias("d"),
        kl.list.sum().alias("k"),
        (d * kl).list.sum().alias("dk"),
        (d * d).list.sum().alias("dd"),
        ((kl * kl).list.sum() / KK_SCALE).alias("kk"),
    ).filter(pl.col("bin").is_not_null())


def _cluster_sums(paths: Sequence[Path], cfg: AnalysisConfig) -> pl.DataFrame:
    """Fixed-point sums per (model, layer, dataset, verified, bin, cluster): integer sums, so
    the table does not depend on the order the shards are read in."""
    tok = _token_sums(scan_scores(paths), cfg)
    sums = tok.group_by(*KEYS, *cfg.cluster_keys).agg(weighted_sum(c).alias(c) for c in SUMS)
    return sums.collect(engine="streaming")


def _means(sums: np.ndarray) -> np.ndarray:
    """(..., SUMS) -> (..., MEANS + corr_gain_kl); NaN where a denominator is 0."""
    col = {s: i for i, s in enumerate(SUMS)}
    out = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for num, den in MEANS.values():
            d = sums[..., col[den]]
            out.append(np.where(d > 0, sums[..., col[num]] / np.where(d > 0, d, 1), np.nan))
        n = sums[..., col["draws"]]
        cov = n * sums[..., col["dk"]] - sums[..., col["d"]] * sums[..., col["k"]]
        var_d = n * sums[..., col["dd"]] - sums[..., col["d"]] ** 2
        var_k = n * sums[..., col["kk"]] - sums[..., col["k"]] ** 2
        ok = (var_d > 0) & (var_k > 0)
        out.append(np.where(ok, cov / np.sqrt(np.where(ok, var_d * var_k, 1)), np.nan))
    return np.stack(out, axis=-1)


def _row(key: dict, x: np.ndarray, cfg: AnalysisConfig) -> dict:
    """One table row: key, draws, the means of the summed clusters, their intervals."""
    names = [*MEANS, "corr_gain_kl"]
    means = _means(x.sum(axis=0))
    row = {**key, "tokens_weighted": float(x[:, SUMS.index("best_tokens")].sum())}
    row |= {n: None if np.isnan(v) else float(v) for n, v in zip(names, means, strict=True)}
    lo = hi = np.full(len(names), np.nan)
    if cfg.bootstrap and x.shape[0]:
        seed = group_seed(cfg, key["model"], key["layer"], f"{key['dataset']}/{key['verified']}")
        rng = np.random.default_rng([*seed, BINS.index(key["bin"]) if key["bin"] in BINS else 3])
        reps = _means(resample_weights(rng, x.shape[0], cfg.bootstrap).astype(np.float64) @ x)
        tail = (1.0 - cfg.level) / 2.0
        with warnings.catch_warnings(action="ignore", category=RuntimeWarning):
            lo, hi = np.nanquantile(reps, tail, axis=0), np.nanquantile(reps, 1 - tail, axis=0)
    for n in INTERVALS:
        i = names.index(n)
        row[f"{n}_lo"] = None if np.isnan(lo[i]) else float(lo[i])
        row[f"{n}_hi"] = None if np.isnan(hi[i]) else float(hi[i])
    return row


def divergence_table(paths: Sequence[str | Path], cfg: AnalysisConfig) -> pl.DataFrame | None:
    """The per-bin distribution table (module docstring) over the files that have the columns."""
    usable = divergence_files(paths)
    if not usable:
        return None
    sums = _cluster_sums(usable, cfg)
    sums = pl.concat([sums, sums.with_columns(pl.lit("all").alias("verified"))])
    sums = pl.concat([sums, sums.with_columns(pl.lit("all").alias("bin"))])
    rows = []
    for key in sums.select(KEYS).unique().sort(KEYS).iter_rows(named=True):
        part = sums.filter(pl.all_horizontal(pl.col(k) == v for k, v in key.items()))
        x = part.group_by(cfg.cluster_keys).agg(pl.col(c).sum() for c in SUMS)
        x = x.sort(cfg.cluster_keys).select(SUMS).to_numpy().astype(np.float64) / FIXED_POINT
        x[:, SUMS.index("kk")] *= KK_SCALE
        rows.append(_row(key, x, cfg))
    order = {b: i for i, b in enumerate((*BINS, "all"))}
    frame = pl.DataFrame(rows).with_columns(
        pl.col("bin").replace_strict(order, return_dtype=pl.Int32).alias("_o")
    )
    return frame.sort(*GROUP_KEYS, "verified", "_o").drop("_o")


def verified_table(paths: Sequence[str | Path], cfg: AnalysisConfig) -> pl.DataFrame | None:
    """The headline table over verified and over unverified rows, side by side (a `verified`
    column), when the score files hold both; else None."""
    from analysis.tables import summarise

    with_flag = [Path(p) for p in paths if "verified" in _schema(p).names]
    if not with_flag:
        return None
    lf = scan_scores(with_flag)
    kinds = lf.select(pl.col("verified").unique()).collect()["verified"].to_list()
    if not ({True, False} <= set(kinds)):
        return None
    parts = []
    for flag in (True, False):
        stats = aggregate(lf.filter(pl.col("verified") == flag), cfg).collect(engine="streaming")
        headline = summarise(stats, cfg)["headline"]
        parts.append(headline.select(pl.lit(VERIFIED[flag]).alias("verified"), pl.all()))
    return pl.concat(parts, how="diagonal")
