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
router alignment (mean rho, tokens without variance left out) before/after.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

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


def mechanism_table(tokens: pl.DataFrame) -> pl.DataFrame:
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
    return order.join(out, on=["split", "group"], how="inner", maintain_order="left")
