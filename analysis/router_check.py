"""Did the router update change the routes it was meant to change? Before/after per token.

Contract: `token_changes(before, after, preferences, holdout)` joins the score rows of the
same tokens (problem_id, sample_idx, dataset, position) scored with the original model
(`before`) and with the updated one (`after`, same layer, same scoring settings) and returns
one row per token: split ("train" = problems the preference data came from, "held-out" = the
problems `holdout` names), bin (by the original pbar), flagged (the token passes the
preference rule: listed in `preferences` for training problems, or, for held-out problems,
Fragile with a best alternative above u(S) by more than `margin`), route_changed (the standard
route's expert set differs), u(S) before/after, and rho (Spearman of s and u over the routes)
before/after. `mechanism_table(tokens)` reduces it per (split, group) with group = flagged,
confident, ambiguous, fragile: tokens, share of changed routes, mean u(S) before/after, and
router alignment (mean rho, tokens without variance left out) before/after; with `draws`, each
with a 95% percentile bootstrap interval over problems (`mechanism_intervals`) of the share of
changed routes and of the after - before changes of u(S) and of alignment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from analysis.kernel import KERNEL_FIELDS, route_metrics
from analysis.metrics import AnalysisConfig, scan_scores

KEYS = ("dataset", "problem_id", "sample_idx", "position")
GROUPS = ("flagged", "confident", "ambiguous", "fragile")


def _per_token(paths: Sequence[str | Path]) -> pl.DataFrame:
    routes = pl.struct("std_prob", "alt_probs", "std_route_logprob", "alt_route_logprobs")
    return (
        scan_scores(paths)
        .select(
            *KEYS,
            pl.col("std_route").cast(pl.List(pl.Int32)).list.sort().alias("route"),
            pl.col("std_prob").cast(pl.Float64).alias("u_std"),
            routes.map_batches(
                route_metrics, return_dtype=pl.Struct(KERNEL_FIELDS), is_elementwise=True
            ).alias("_k"),
        )
        .unnest("_k")
        .select(*KEYS, "route", "u_std", "pbar", "max_alt", "rho")
        .collect()
    )


def token_changes(
    before: Sequence[str | Path],
    after: Sequence[str | Path],
    preferences: pl.DataFrame,
    holdout: Callable[[str], bool],
    *,
    margin: float,
    cfg: AnalysisConfig | None = None,
) -> pl.DataFrame:
    """One row per token scored both before and after (see the module docstring)."""
    cfg = cfg or AnalysisConfig()
    b, a = _per_token(before), _per_token(after)
    joined = b.join(a.select(*KEYS, "route", "u_std", "rho"), on=KEYS, suffix="_after")
    if joined.height != b.height:
        raise ValueError(f"{b.height} tokens before but {joined.height} matched after the update")
    flagged = preferences.filter(pl.col("kind") == "prefer").select(
        *KEYS, pl.lit(True).alias("_listed")
    )
    ids = joined["problem_id"].unique().to_list()
    held = pl.DataFrame({"problem_id": ids, "held_out": [holdout(p) for p in ids]})
    return (
        joined.join(held, on="problem_id")
        .join(flagged, on=KEYS, how="left")
        .with_columns(
            pl.when(pl.col("pbar") >= pl.lit(cfg.confident, dtype=pl.Float32))
            .then(pl.lit("confident"))
            .when(pl.col("pbar") < pl.lit(cfg.fragile, dtype=pl.Float32))
            .then(pl.lit("fragile"))
            .otherwise(pl.lit("ambiguous"))
            .alias("bin"),
            pl.when(pl.col("held_out"))
            .then(pl.lit("held-out"))
            .otherwise(pl.lit("train"))
            .alias("split"),
        )
        .with_columns(
            pl.when(pl.col("held_out"))
            .then((pl.col("bin") == "fragile") & (pl.col("max_alt") - pl.col("u_std") > margin))
            .otherwise(pl.col("_listed").fill_null(False))
            .alias("flagged"),
            (pl.col("route") != pl.col("route_after")).alias("route_changed"),
        )
        .select(
            *KEYS,
            "split",
            "bin",
            "flagged",
            "route_changed",
            "u_std",
            "u_std_after",
            "rho",
            "rho_after",
        )
        .sort(*KEYS)
    )


def mechanism_table(tokens: pl.DataFrame, *, draws: int = 0, seed: int = 0) -> pl.DataFrame:
    """split, group, tokens, changed (routes), route_changed (their share), u_std_before, u_std_after, alignment_before,
    alignment_after, no_variance_before, no_variance_after."""
    parts = [tokens.filter(pl.col("flagged")).with_columns(pl.lit("flagged").alias("group"))]
    parts.append(tokens.with_columns(pl.col("bin").alias("group")))
    out = (
        pl.concat(parts)
        .group_by("split", "group")
        .agg(
            pl.len().alias("tokens"),
            pl.col("route_changed").sum().alias("changed"),
            pl.col("route_changed").mean().alias("route_changed"),
            pl.col("u_std").mean().alias("u_std_before"),
            pl.col("u_std_after").mean().alias("u_std_after"),
            pl.col("rho").mean().alias("alignment_before"),
            pl.col("rho_after").mean().alias("alignment_after"),
            pl.col("rho").null_count().alias("no_variance_before"),
            pl.col("rho_after").null_count().alias("no_variance_after"),
        )
    )
    order = pl.DataFrame(
        {
            "split": [s for s in ("train", "held-out") for _ in GROUPS],
            "group": [g for _ in ("train", "held-out") for g in GROUPS],
        }
    )
    out = order.join(out, on=["split", "group"], how="inner", maintain_order="left")
    if draws:
        out = out.join(
            mechanism_intervals(pl.concat(parts), draws=draws, seed=seed),
            on=["split", "group"],
            how="left",
            maintain_order="left",
        )
    return out


def mechanism_intervals(
    grouped: pl.DataFrame, *, draws: int, seed: int, level: float = 0.95
) -> pl.DataFrame:
    """split, group, route_changed_lo/hi, u_std_diff (after - before) and its lo/hi,
    alignment_diff (mean over tokens with a rho both before and after) and its lo/hi: the
    problems of each (split, group) resampled with replacement, each statistic the ratio of
    the resampled sums; the generator seeded from (seed, split, group)."""
    from analysis.passk import group_rng

    per_problem = grouped.group_by("split", "group", "problem_id").agg(
        pl.len().alias("n"),
        pl.col("route_changed").sum().alias("changed"),
        (pl.col("u_std_after") - pl.col("u_std")).sum().alias("du"),
        (pl.col("rho_after") - pl.col("rho")).sum().alias("drho"),
        (pl.col("rho_after") - pl.col("rho")).is_not_null().sum().alias("n_rho"),
    )
    rows = []
    q = [(1 - level) / 2, (1 + level) / 2]
    for (split, group), frame in per_problem.sort("problem_id").group_by(
        "split", "group", maintain_order=True
    ):
        sums = frame.select("n", "changed", "du", "drho", "n_rho").to_numpy().astype(np.float64)
        rng = group_rng(seed, "mechanism", split, group)
        boot = sums[rng.integers(0, len(sums), size=(draws, len(sums)))].sum(axis=1)
        total = sums.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats = np.stack(
                [boot[:, 1] / boot[:, 0], boot[:, 2] / boot[:, 0], boot[:, 3] / boot[:, 4]], 1
            )
            point = [total[2] / total[0], total[3] / total[4]]
        lo, hi = (
            np.nanquantile(stats, q, axis=0)
            if np.isfinite(stats).any()
            else (
                np.full(3, np.nan),
                np.full(3, np.nan),
            )
        )
        rows.append((split, group, lo[0], hi[0], point[0], lo[1], hi[1], point[1], lo[2], hi[2]))
    return pl.DataFrame(
        rows,
        schema=[
            "split",
            "group",
            "route_changed_lo",
            "route_changed_hi",
            "u_std_diff",
            "u_std_diff_lo",
            "u_std_diff_hi",
            "alignment_diff",
            "alignment_diff_lo",
            "alignment_diff_hi",
        ],
        orient="row",
    )
