"""Per-token metrics and per-bin sufficient statistics over score shards (docs/method.md).

Contract: `find_shards(run_dir)` lists the complete score shards of a run (those of its current
plan that verify against their `<name>.done.json` sidecar, analysis.inputs; no other file is
opened);
`scan_scores(paths)` is one lazy scan over them; `token_metrics(lf, cfg)` adds the per-token
columns; `aggregate(lf, cfg)` reduces everything to one small frame of sums per
(model, layer, dataset, bin, cluster, gain bucket), from which `tables.py` derives every mean
exactly and `intervals.py` resamples clusters (trajectories or problems) for the intervals.

Per token, with u(S) = `std_prob`, u(R_j) = `alt_probs[j]`, s(R) = route log-probabilities:
- pbar = mean of u over S and the J alternatives, computed in float64 from the stored float32
  values and rounded to float32 before it is compared with the thresholds (also rounded to
  float32): the data only has float32 precision, so a token whose routes average exactly 0.9
  in that precision is Confident, as the definition says, not a float64 rounding accident.
- bin: Confident if pbar >= confident, Fragile if pbar < fragile, Ambiguous otherwise.
- max_alt = max_j u(R_j); gain = max_alt - u(S) (tables report its mean x 100, in points).
- win = max_alt > u(S) + win_margin: an alternative must beat S by more than the margin, so
  that float rounding in the scorer is not counted as a better route; win_strict = max_alt >
  u(S) (any difference, a tie is not a win), kept to show how much of it is rounding.
- rank of u(S) among the J+1 routes: 1 = highest utility, ties share the average of the ranks
  they span, i.e. rank = 1 + #{j: u(R_j) > u(S)} + #{j: u(R_j) = u(S)} / 2. It lies in
  [1, J+1]; (J+2)/2 is what a route of no special quality would get on average.
- rho = Spearman correlation of s(R) and u(R) over the J+1 routes (S first, then the J
  alternatives, every draw kept even when routes repeat): the Pearson correlation of their
  average ranks. Null when s or u is constant over the routes (zero rank variance); such
  tokens are left out of the alignment mean and counted as `no_variance`.
- Split draws (bins independent of the gain): with h = J // 2, pbar_split = mean of u over the
  first h draws alone (S left out: u(S) is in the gain), bin_split from it; max_split = max of
  u over the other J - h draws, gain_split = max_split - u(S), win_split at the margin. Null
  when J < 2. bin_std bins by u(S) alone (float32), with the gain over all J draws.
- Repeated routes: a route is its set of experts. std_draws = how many of the J draws equal S;
  distinct_routes = number of distinct sets among the J+1; rho_distinct = the Spearman
  correlation over the distinct sets only (S first, each later set at its first draw).

Two implementations of the per-token columns, checked against each other in the tests: the
Polars list-expression reference (`concat_list`, `list.eval(rank)`, list arithmetic) and the
default compiled kernel (analysis/kernel.py, ~20x faster). Neither explodes the lists, so the
streaming engine holds a bounded number of row batches whatever the number of shards.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl

from analysis.inputs import select_score_files
from workers.atomic import read_nofollow
from workers.io import done_path
from workers.schemas import COMPLETION_TOKENS, ROUTE_COLUMNS

BINS = ("confident", "ambiguous", "fragile")  # display order: high pbar to low
GROUP_KEYS = ("model", "layer", "dataset")
# Float columns are summed in fixed point (steps of 2**-32, far below float32's resolution of
# the stored probabilities): integer addition is associative, so the sums, and every table
# derived from them, are bitwise identical whatever order the streaming engine adds batches
# in. 10 million tokens of values in [-33, 33] stay well inside Int64.
FIXED_POINT = 2**32


CLUSTERS = {"trajectory": ("problem_id", "sample_idx"), "problem": ("problem_id",)}
# The win margin per scoring dtype (the score files' sidecars, score_config.dtype), used when
# win_margin is not set. float32: 1e-4 (0.01 pp) is far above float32 rounding of a probability
# (< 6e-8) and ~10x the fast scorer's float32 deviation from brute force (~1e-5), and far below
# any difference a reader would call a better route. bfloat16: 3e-2 (3 pp), above the 99th
# percentile (2.7e-2) of a token's |gain in bf16 - gain in float32| over the six tiny variants
# at their early and final layers (`python -m tools.dtype_margin --trajectories 12`; the tiny
# models are made route-sensitive, so this errs high; their largest deviation is 0.24).
WIN_MARGINS = {"float32": 1e-4, "bfloat16": 3e-2}
TRAJECTORY = CLUSTERS["trajectory"]  # the aggregate's finest unit; problems are sums of these
# How a token gets its bin: pbar over S and all J draws (the paper's), the first J // 2 draws
# alone (independent of the draws that give the gain), or u(S) alone.
BINNINGS = ("pbar", "split", "std")
BIN_COLUMNS = {"pbar": "bin", "split": "bin_split", "std": "bin_std"}


@dataclass
class AnalysisConfig:
    """How scores become tables: bins, win margin, histogram resolution, bootstrap intervals.

    The one place these defaults live: `python -m analysis.report` flags and the driver's
    `analysis` config group (orchestrator/config/schema.py) both take them from here. Not frozen: it is
    also the Hydra schema of conf/analysis/.
    """

    confident: float = 0.9  # pbar >= confident -> Confident
    fragile: float = 0.5  # pbar < fragile -> Fragile; in between -> Ambiguous
    gain_buckets: int = 100  # histogram of per-token gain over [-1, 1]; width 2 / buckets
    # A win needs max_j u(R_j) > u(S) + win_margin. None: WIN_MARGINS of the scoring dtype
    # (resolve_margin; float32's where no score file says).
    win_margin: float | None = None
    # The headline's bins: split draws, so the noise of the draws that give the gain cannot
    # also move a token between bins; by_bin keeps the paper's pbar bins.
    binning: str = "split"
    # bootstrap unit of `<mean>_lo/_hi`: problem (the verified samples of one problem share a
    # prompt); both units are also kept as `<mean>_lo_<unit>`.
    cluster: str = "problem"
    bootstrap: int = 1000  # replicates for the percentile intervals; 0 = no intervals
    level: float = 0.95  # coverage of the intervals
    seed: int = 0  # the intervals are a function of (data, seed)

    def __post_init__(self) -> None:
        if not 0.0 < self.fragile < self.confident <= 1.0:
            raise ValueError(
                f"bin thresholds must satisfy 0 < fragile < confident <= 1, got "
                f"fragile={self.fragile}, confident={self.confident}"
            )
        if self.gain_buckets < 1:
            raise ValueError(f"gain_buckets must be >= 1, got {self.gain_buckets}")
        if self.win_margin is not None and not 0.0 <= self.win_margin < 1.0:
            raise ValueError(f"win_margin must be in [0, 1), got {self.win_margin}")
        if self.binning not in BINNINGS:
            raise ValueError(f"binning must be one of {', '.join(BINNINGS)}, got {self.binning!r}")
        if self.cluster not in CLUSTERS:
            raise ValueError(f"cluster must be one of {', '.join(CLUSTERS)}, got {self.cluster!r}")
        if self.bootstrap < 0:
            raise ValueError(f"bootstrap must be >= 0 replicates, got {self.bootstrap}")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {self.level}")

    @property
    def cluster_keys(self) -> tuple[str, ...]:
        """Score columns that identify one resampling unit within a (model, layer, dataset)."""
        return CLUSTERS[self.cluster]

    @property
    def margin(self) -> float:
        """win_margin, or float32's default when it is unset (resolve_margin sets it)."""
        return WIN_MARGINS["float32"] if self.win_margin is None else self.win_margin


def scoring_dtypes(paths: Sequence[str | Path]) -> list[str]:
    """The scoring dtypes that the sidecars of `paths` name (score_config.dtype), sorted;
    float32 (the scorer's default) for a sidecar that names none."""
    found = set()
    for path in paths:
        try:  # a link or a non-file reads as None: no sidecar
            sidecar = json.loads(read_nofollow(done_path(path)) or b"{}")
            dtype = (sidecar.get("score_config") or {}).get("dtype") or "float32"
        except (ValueError, AttributeError):
            dtype = "float32"
        found.add(dtype if dtype in WIN_MARGINS else "float32")
    return sorted(found)


def resolve_margin(cfg: AnalysisConfig, paths: Sequence[str | Path]) -> AnalysisConfig:
    """`cfg` with win_margin set: as given, else the largest WIN_MARGINS of the dtypes the
    score files were computed in (a run mixing dtypes takes the noisiest one's)."""
    if cfg.win_margin is not None:
        return cfg
    margin = max(WIN_MARGINS[d] for d in scoring_dtypes(paths) or ["float32"])
    return replace(cfg, win_margin=margin)


def find_shards(run_dir: str | Path) -> list[Path]:
    """Complete score shards of a run, sorted: those of its current plan (all, without a
    plan.json) whose sidecar verifies, checksum included (analysis.inputs.select_score_files).

    A file without one (in progress, crashed, foreign, tampered) is never opened
    (docs/design.md)."""
    return select_score_files(run_dir).files


def scan_scores(paths: Sequence[str | Path]) -> pl.LazyFrame:
    """One lazy scan over score shards; model, layer and dataset are columns of the files.
    Shards scored under a position budget add `completion_tokens` (workers.schemas); where
    only some do, the others get it as null (all positions scored). Shards whose route
    columns differ in type (the compact layout of models with other expert counts or k, or
    files of the int32 list layout) are read with their routes as int32 lists."""
    if not paths:
        raise FileNotFoundError("no score shards to scan")
    groups: dict[object, list[str]] = {}
    for p in paths:
        groups.setdefault(_schema(p), []).append(str(p))
    # The directories say layer=<L> too; hive parsing would duplicate the file's own column.
    scans = [pl.scan_ipc(g, hive_partitioning=False, glob=False) for g in groups.values()]
    # model and dataset are dictionary-encoded in the files (Categorical): strings downstream
    scans = [s.with_columns(pl.col(pl.Categorical).cast(pl.String)) for s in scans]
    if len(scans) == 1:
        return scans[0]
    routes = {tuple(str(schema.field(c).type) for c in ROUTE_COLUMNS) for schema in groups}
    if len(routes) > 1:
        wide = {"std_route": pl.List(pl.Int32), "alt_routes": pl.List(pl.List(pl.Int32))}
        scans = [scan.with_columns(pl.col(c).cast(t) for c, t in wide.items()) for scan in scans]
    return pl.concat(scans, how="diagonal")


def _schema(path: str | Path):
    """The schema of an Arrow IPC file, from its footer."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).schema


def with_weights(lf: pl.LazyFrame) -> pl.LazyFrame:
    """A `weight` column: 1 for a row of a fully scored trajectory; under a position budget,
    the trajectory's completion tokens / its scored rows (at that model, layer, dataset).
    The scored positions are a uniform sample within each trajectory, so each trajectory's
    weighted sums are unbiased for its full sums, whatever share of it was scored."""
    if COMPLETION_TOKENS.name not in lf.collect_schema().names():
        return lf.with_columns(pl.lit(1.0, dtype=pl.Float64).alias("weight"))
    keys = [*GROUP_KEYS, "problem_id", "sample_idx"]
    # a second scan of five columns, reduced to one row per trajectory
    scored = lf.group_by(keys).agg(pl.len().alias("_scored"))
    total = pl.col(COMPLETION_TOKENS.name).cast(pl.Float64)
    return (
        lf.join(scored, on=keys, how="left", nulls_equal=True)
        .with_columns(
            pl.when(total.is_null()).then(1.0).otherwise(total / pl.col("_scored")).alias("weight")
        )
        .drop("_scored")
    )


def _reference_columns(lf: pl.LazyFrame, keys: tuple[str, ...]) -> pl.LazyFrame:
    """The per-token route columns as Polars list expressions: the readable reference, exact
    but slow (`list.eval(rank)` costs ~7 s per million J=32 rows per ranked column)."""
    u = pl.concat_list(pl.col("std_prob"), pl.col("alt_probs"))
    s = pl.concat_list(pl.col("std_route_logprob"), pl.col("alt_route_logprobs"))
    out = lf.select(
        *GROUP_KEYS,
        *keys,
        pl.col("std_prob").cast(pl.Float64).alias("u_std"),
        pl.col("alt_probs").list.max().cast(pl.Float64).alias("max_alt"),
        u.list.mean().cast(pl.Float32).alias("pbar"),
        # Average ranks, ascending (1 = lowest); the Spearman rho of s and u is the Pearson
        # correlation of these. The ranks' mean is (n + 1) / 2 whatever the ties.
        u.list.eval(pl.element().rank("average")).alias("_ru"),
        s.list.eval(pl.element().rank("average")).alias("_rs"),
        u.list.len().alias("n_routes"),
        _draw_reference().alias("_d"),
    )
    mid = (pl.col("n_routes") + 1) / 2
    du = pl.col("_ru") - mid
    ds = pl.col("_rs") - mid
    var_u = (du * du).list.sum()
    var_s = (ds * ds).list.sum()
    cov = (du * ds).list.sum()
    return (
        out.with_columns(
            # Descending average rank of S = n + 1 - its ascending average rank.
            (pl.col("n_routes") + 1 - pl.col("_ru").list.first())
            .cast(pl.Float64)
            .alias("rank_std"),
            pl.when((var_u > 0) & (var_s > 0))
            .then(cov / (var_u * var_s).sqrt())
            .otherwise(None)
            .alias("rho"),
        )
        .drop("_ru", "_rs")
        .unnest("_d")
    )


def _spearman(u: list[float], s: list[float]) -> float | None:
    """Pearson correlation of Polars' average ranks; None without rank variance."""
    ru = pl.Series(u, dtype=pl.Float32).rank("average").to_numpy() - (len(u) + 1) / 2
    rs = pl.Series(s, dtype=pl.Float32).rank("average").to_numpy() - (len(s) + 1) / 2
    var = float((ru * ru).sum() * (rs * rs).sum())
    return float((ru * rs).sum()) / var**0.5 if var > 0 else None


def _draw_row(row: dict) -> dict:
    """The split-draw and repeated-route columns of one token, plainly (the reference)."""
    alt = [float(v) for v in row["alt_probs"]]
    h = len(alt) // 2
    sets = [tuple(sorted(r)) for r in [row["std_route"], *row["alt_routes"]]]
    u = [row["std_prob"], *alt]
    s = [row["std_route_logprob"], *row["alt_route_logprobs"]]
    first = [q for q, key in enumerate(sets) if key not in sets[:q]]
    return {
        "pbar_split": float(np.float32(np.mean(alt[:h], dtype=np.float64))) if h else None,
        "max_split": max(alt[h:]) if h else None,
        "rho_distinct": _spearman([u[q] for q in first], [s[q] for q in first]),
        "std_draws": sum(key == sets[0] for key in sets[1:]),
        "distinct_routes": len(first),
    }


def _draw_reference() -> pl.Expr:
    from analysis.kernel import DRAW_FIELDS, DRAW_TYPES

    fields = ("std_prob", "alt_probs", "std_route_logprob", "alt_route_logprobs")
    wide = {f: pl.Float64 if DRAW_TYPES[f].is_float() else pl.Int64 for f in DRAW_FIELDS}
    drawn = pl.struct(*fields, "std_route", "alt_routes").map_elements(
        _draw_row, return_dtype=pl.Struct(wide)
    )
    return pl.struct(drawn.struct.field(f).cast(DRAW_TYPES[f]) for f in DRAW_FIELDS)


def _kernel_columns(lf: pl.LazyFrame, keys: tuple[str, ...]) -> pl.LazyFrame:
    """The same columns from the compiled kernel, one call per streamed batch."""
    from analysis.kernel import ALL_FIELDS, route_metrics

    routes = pl.struct(
        "std_prob",
        "alt_probs",
        "std_route_logprob",
        "alt_route_logprobs",
        "std_route",
        "alt_routes",
    )
    metrics = routes.map_batches(
        route_metrics, return_dtype=pl.Struct(ALL_FIELDS), is_elementwise=True
    )
    return lf.select(
        *GROUP_KEYS,
        *keys,
        pl.col("std_prob").cast(pl.Float64).alias("u_std"),
        metrics.alias("_k"),
    ).unnest("_k")


def token_metrics(
    lf: pl.LazyFrame, cfg: AnalysisConfig, *, fast: bool = True, keep: tuple[str, ...] = ()
) -> pl.LazyFrame:
    """Per token: model, layer, dataset, problem_id, sample_idx, u_std, max_alt, pbar, rank_std,
    rho, n_routes, bin, gain, win, win_strict, and the draw columns pbar_split, max_split,
    rho_distinct, std_draws, distinct_routes, bin_split, bin_std, gain_split, win_split
    (lazily), and the columns `keep`. `fast=False` uses the reference (Polars lists, a plain
    per-row function for the draw columns) instead of the kernel."""
    keys = (*TRAJECTORY, *keep)
    out = _kernel_columns(lf, keys) if fast else _reference_columns(lf, keys)
    confident = pl.lit(cfg.confident, dtype=pl.Float32)
    fragile = pl.lit(cfg.fragile, dtype=pl.Float32)

    def bin_of(pbar: pl.Expr) -> pl.Expr:
        return (
            pl.when(pbar.is_null())
            .then(None)
            .when(pbar >= confident)
            .then(pl.lit("confident"))
            .when(pbar < fragile)
            .then(pl.lit("fragile"))
            .otherwise(pl.lit("ambiguous"))
        )

    gain_split = pl.col("max_split") - pl.col("u_std")
    return out.with_columns(
        bin_of(pl.col("pbar")).alias("bin"),
        bin_of(pl.col("pbar_split")).alias("bin_split"),
        bin_of(pl.col("u_std").cast(pl.Float32)).alias("bin_std"),
        gain_split.alias("gain_split"),
        (gain_split > cfg.margin).alias("win_split"),
        (pl.col("max_alt") - pl.col("u_std")).alias("gain"),
        (pl.col("max_alt") > pl.col("u_std") + cfg.margin).alias("win"),
        (pl.col("max_alt") > pl.col("u_std")).alias("win_strict"),
    )


def gain_bucket(gain: pl.Expr, buckets: int) -> pl.Expr:
    """Index of `gain` in `buckets` equal-width buckets over [-1, 1] (gains are differences of
    probabilities, so they lie there; the last bucket is closed on the right)."""
    idx = ((gain + 1.0) * (buckets / 2.0)).floor().cast(pl.Int32)
    return idx.clip(0, buckets - 1).alias("gain_bucket")


def exact_sum(column: str) -> pl.Expr:
    """Sum of a float column in units of 1 / FIXED_POINT, as Int64 (order-independent)."""
    return (pl.col(column).cast(pl.Float64) * FIXED_POINT).round().cast(pl.Int64).sum()


def weighted_sum(column: str | None = None) -> pl.Expr:
    """exact_sum of column x weight (of the weights alone, for None; of the weights of the rows
    where the column is not null, for a column name prefixed "!"). Weight 1 leaves each term
    as exact_sum has it."""
    if column is None:
        value = pl.col("weight")
    elif column.startswith("!"):
        value = pl.when(pl.col(column[1:]).is_not_null()).then(pl.col("weight"))
    else:
        value = pl.col(column).cast(pl.Float64) * pl.col("weight")
    return (value * FIXED_POINT).round().cast(pl.Int64).sum()


def aggregate(lf: pl.LazyFrame, cfg: AnalysisConfig, *, fast: bool = True) -> pl.LazyFrame:
    """Sums per (model, layer, dataset, bin, bin_split, bin_std, trajectory, gain bucket): every
    table, histogram and interval (under every binning and cluster unit) derives from these
    exactly, so the shards are scanned once. `sum_*` columns are
    fixed-point Int64 (divide by FIXED_POINT).

    Size: one row per distinct (trajectory, bin, gain bucket), a few dozen per trajectory in
    practice (most of a trajectory's tokens share the bucket around zero gain), so it grows with
    the number of trajectories, not tokens."""
    tok = token_metrics(with_weights(lf), cfg, fast=fast, keep=("weight",)).with_columns(
        gain_bucket(pl.col("gain"), cfg.gain_buckets), (pl.col("n_routes") - 1).alias("n_draws")
    )
    keys = (*GROUP_KEYS, *BIN_COLUMNS.values(), *TRAJECTORY, "gain_bucket")
    # counts (tokens, *_tokens, wins*, draws) beside the weighted sums the means divide
    # (sum_weight*, sum_*: with_weights; all weights are 1 unless positions were budgeted)
    return tok.group_by(*keys).agg(
        pl.len().alias("tokens"),
        weighted_sum().alias("sum_weight"),
        weighted_sum("u_std").alias("sum_u_std"),
        weighted_sum("max_alt").alias("sum_max_alt"),
        pl.col("gain").count().alias("gain_tokens"),  # tokens with J >= 1
        weighted_sum("!gain").alias("sum_weight_gain"),
        weighted_sum("gain").alias("sum_gain"),
        pl.col("win").sum().cast(pl.Int64).alias("wins"),
        pl.col("win_strict").sum().cast(pl.Int64).alias("wins_strict"),
        weighted_sum("win").alias("sum_win"),
        weighted_sum("win_strict").alias("sum_win_strict"),
        weighted_sum("rank_std").alias("sum_rank"),
        weighted_sum("rho").alias("sum_rho"),
        pl.col("rho").count().alias("rho_tokens"),
        weighted_sum("!rho").alias("sum_weight_rho"),
        pl.col("n_routes").min().alias("min_routes"),
        pl.col("n_routes").max().alias("max_routes"),
        pl.col("gain_split").count().alias("split_tokens"),  # tokens with J >= 2
        weighted_sum("!gain_split").alias("sum_weight_split"),
        weighted_sum("max_split").alias("sum_max_split"),
        weighted_sum("gain_split").alias("sum_gain_split"),
        pl.col("win_split").sum().cast(pl.Int64).alias("wins_split"),
        weighted_sum("win_split").alias("sum_win_split"),
        weighted_sum("rho_distinct").alias("sum_rho_distinct"),
        pl.col("rho_distinct").count().alias("rho_distinct_tokens"),
        weighted_sum("!rho_distinct").alias("sum_weight_rho_distinct"),
        weighted_sum("std_draws").alias("sum_std_draws"),
        weighted_sum("n_draws").alias("sum_draws"),
        weighted_sum("distinct_routes").alias("sum_distinct"),
    )


def collect_stats(
    paths: Sequence[str | Path], cfg: AnalysisConfig, *, fast: bool = True
) -> pl.DataFrame:
    """Scan the shards once with the streaming engine (memory bounded by batches, not rows)."""
    cfg = resolve_margin(cfg, paths)
    return aggregate(scan_scores(paths), cfg, fast=fast).collect(engine="streaming")
