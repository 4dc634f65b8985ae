"""Compiled per-token route metrics: the fast path of `analysis.metrics.token_metrics`.

Contract: `route_metrics(batch)` takes a struct Series with fields std_prob, alt_probs,
std_route_logprob, alt_route_logprobs, std_route, alt_routes (a batch of score rows) and
returns a struct Series with pbar (float32), max_alt, rank_std, rho (float64; rho null where s
or u is constant over the routes) and n_routes (uint32) (KERNEL_FIELDS), and, when the batch
has the route columns, the draw columns (DRAW_TYPES) pbar_split
(float32), max_split, rho_distinct (float64; null when J < 2, resp. without variance),
std_draws and distinct_routes (uint32), with exactly the definitions of the reference in
`analysis.metrics` (checked against it in tests/test_metrics.py).

Why compiled: the Spearman correlation needs average ranks of u and s within every token's
J+1 routes. Polars' `list.eval(rank)` pays a per-list dispatch (~7 s per million J=32 rows
per ranked column on this machine) and numpy needs ~10 full passes over n x (J+1) arrays,
~2 s per million rows per column; one numba loop per row counts the ranks with vectorised
compares (~0.6 us per row for both columns). `nogil` lets Polars' streaming threads run
batches side by side. Integer rank sums keep rho exact up to its final division.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
from numba import njit

KERNEL_FIELDS = {
    "pbar": pl.Float32,
    "max_alt": pl.Float64,
    "rank_std": pl.Float64,
    "rho": pl.Float64,
    "n_routes": pl.UInt32,
}
# Computed too when the batch has the route columns (std_route, alt_routes).
DRAW_TYPES = {
    "pbar_split": pl.Float32,
    "max_split": pl.Float64,
    "rho_distinct": pl.Float64,
    "std_draws": pl.UInt32,
    "distinct_routes": pl.UInt32,
}
DRAW_FIELDS = tuple(DRAW_TYPES)
ALL_FIELDS = KERNEL_FIELDS | DRAW_TYPES


@njit(cache=True, nogil=True)
def _centred_ranks(x, y, m, cx, cy):  # pragma: no cover - compiled
    """cx[i] = 2 * (average rank of x[i] among x[:m] - (m + 1) / 2), exactly, in integers;
    the same for y into cy (one fused loop: twice the work per iteration, same overhead).

    With average ranks (ties share their mean rank), rank_i = #{x_j < x_i} + (#{x_j == x_i}
    + 1) / 2, so 2 * (rank_i - (m + 1) / 2) = #{x_j < x_i} - #{x_j > x_i}. Counting is O(m^2)
    but branch-free, and with the loop over i innermost LLVM turns it into 8-wide compares
    and adds: ~0.3 us per J=32 row and column, several times faster than sorting.
    """
    for i in range(m):
        cx[i] = 0
        cy[i] = 0
    for j in range(m):
        v = x[j]
        w = y[j]
        for i in range(m):
            cx[i] += np.int32(x[i] > v) - np.int32(x[i] < v)
            cy[i] += np.int32(y[i] > w) - np.int32(y[i] < w)


@njit(cache=True, nogil=True)
def _spearman(cu, cs, m):  # pragma: no cover - compiled
    """Spearman correlation from the centred ranks of _centred_ranks (Pearson of the ranks;
    the centred ranks times 2 give the same ratio); NaN where either side has no variance."""
    cov = 0
    var_u = 0
    var_s = 0
    for k in range(m):
        cov += cu[k] * cs[k]
        var_u += cu[k] * cu[k]
        var_s += cs[k] * cs[k]
    if var_u > 0 and var_s > 0:
        return cov / np.sqrt(np.float64(var_u) * np.float64(var_s))
    return np.nan


@njit(cache=True, nogil=True)
def _route_metrics(std_u, alt_u, u_off, std_s, alt_s, s_off):  # pragma: no cover - compiled
    n = std_u.shape[0]
    pbar = np.empty(n, np.float32)
    max_alt = np.empty(n, np.float64)
    rank_std = np.empty(n, np.float64)
    rho = np.empty(n, np.float64)
    n_routes = np.empty(n, np.uint32)
    width = 1
    for i in range(n):
        width = max(width, u_off[i + 1] - u_off[i] + 1)
    # float32 like the data, so ties are exactly the data's ties.
    u = np.empty(width, np.float32)
    s = np.empty(width, np.float32)
    cu = np.empty(width, np.int32)
    cs = np.empty(width, np.int32)
    for i in range(n):
        a0 = u_off[i]
        b0 = s_off[i]
        j = u_off[i + 1] - a0
        if s_off[i + 1] - b0 != j:
            raise ValueError("alt_probs and alt_route_logprobs differ in length in some row")
        m = j + 1
        u[0] = std_u[i]
        s[0] = std_s[i]
        total = np.float64(u[0])
        best = -np.inf
        for k in range(j):
            u[k + 1] = alt_u[a0 + k]
            s[k + 1] = alt_s[b0 + k]
            total += u[k + 1]
            best = max(best, np.float64(u[k + 1]))
        pbar[i] = np.float32(total / m)  # float64 mean, rounded once to the data's precision
        max_alt[i] = best if j > 0 else np.nan
        n_routes[i] = m
        _centred_ranks(u, s, m, cu, cs)
        # Descending rank of S (1 = best): (m + 1) / 2 - cu[0] / 2 = 1 + #above + #tied / 2.
        rank_std[i] = (m + 1 - cu[0]) / 2.0
        rho[i] = _spearman(cu, cs, m)
    return pbar, max_alt, rank_std, rho, n_routes


@njit(cache=True, nogil=True)
def _mix(x):  # pragma: no cover - compiled
    """splitmix64's finaliser: a well-spread 64-bit hash of one expert id."""
    z = np.uint64(x) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True)
def _load_route(values, lo, hi, out):  # pragma: no cover - compiled
    """out[:hi - lo] = values[lo:hi]; returns an order-free hash of the set (sum of hashes):
    no sort, so no data-dependent branches (sorting cost ~4x the rest of the kernel)."""
    key = np.uint64(hi - lo)
    for a in range(hi - lo):
        out[a] = values[lo + a]
        key += _mix(values[lo + a])
    return key


@njit(cache=True, nogil=True)
def _same_route(routes, lens, a, b):  # pragma: no cover - compiled
    """Whether routes a and b hold the same experts (each route's experts are distinct)."""
    if lens[a] != lens[b]:
        return False
    for e in range(lens[a]):
        found = False
        for f in range(lens[b]):
            found |= routes[a, e] == routes[b, f]
        if not found:
            return False
    return True


@njit(cache=True, nogil=True)
def _draw_metrics(
    std_u, alt_u, u_off, std_s, alt_s, std_r, std_off, alt_r, inner_off, outer_off
):  # pragma: no cover - compiled
    """Per row: the split-draw columns (first h = J // 2 draws bin the token, the rest give the
    gain) and the repeated-route columns (routes compared as sets of experts)."""
    n = std_u.shape[0]
    pbar_split = np.empty(n, np.float32)
    max_split = np.empty(n, np.float64)
    rho_distinct = np.empty(n, np.float64)
    std_draws = np.empty(n, np.uint32)
    distinct = np.empty(n, np.uint32)
    width, k = 1, 1
    for i in range(n):
        width = max(width, u_off[i + 1] - u_off[i] + 1)
        k = max(k, std_off[i + 1] - std_off[i])
    for q in range(inner_off.shape[0] - 1):
        k = max(k, inner_off[q + 1] - inner_off[q])
    routes = np.empty((width, k), np.int64)
    lens = np.empty(width, np.int64)
    keys = np.empty(width, np.uint64)
    du = np.empty(width, np.float32)
    ds = np.empty(width, np.float32)
    cu = np.empty(width, np.int32)
    cs = np.empty(width, np.int32)
    for i in range(n):
        a0 = u_off[i]
        j = u_off[i + 1] - a0
        if outer_off[i + 1] - outer_off[i] != j:
            raise ValueError("alt_probs and alt_routes differ in length in some row")
        h = j // 2
        total = 0.0
        best = -np.inf
        for q in range(j):
            if q < h:
                total += np.float64(np.float32(alt_u[a0 + q]))
            else:
                best = max(best, np.float64(np.float32(alt_u[a0 + q])))
        pbar_split[i] = np.float32(total / h) if h > 0 else np.nan
        max_split[i] = best if h > 0 else np.nan
        m = j + 1
        keys[0] = _load_route(std_r, std_off[i], std_off[i + 1], routes[0])
        lens[0] = std_off[i + 1] - std_off[i]
        for q in range(j):
            r = outer_off[i] + q
            keys[q + 1] = _load_route(alt_r, inner_off[r], inner_off[r + 1], routes[q + 1])
            lens[q + 1] = inner_off[r + 1] - inner_off[r]
        same = 0
        d = 0
        for q in range(m):
            if q > 0 and keys[q] == keys[0] and _same_route(routes, lens, q, 0):
                same += 1
            seen = False
            for p in range(q):
                if keys[p] == keys[q] and _same_route(routes, lens, p, q):
                    seen = True
                    break
            if not seen:  # the first draw of a route set keeps its u and s
                du[d] = std_u[i] if q == 0 else alt_u[a0 + q - 1]
                ds[d] = std_s[i] if q == 0 else alt_s[a0 + q - 1]
                d += 1
        std_draws[i] = same
        distinct[i] = d
        _centred_ranks(du, ds, d, cu, cs)
        rho_distinct[i] = _spearman(cu, cs, d)
    return pbar_split, max_split, rho_distinct, std_draws, distinct


def _flat(series: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(values as float32, absolute offsets) of a list column, zero-copy where Arrow allows."""
    arr = series.to_arrow()
    if hasattr(arr, "combine_chunks"):
        arr = arr.combine_chunks()
    values = arr.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values, np.asarray(arr.offsets, dtype=np.int64)


def _unnest(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(child values, absolute offsets into them) of a variable or fixed-size list array.
    A fixed-size list (the compact score layout) has no offsets: they are multiples of its
    size, and its child is sliced to the rows (`flatten`), where a list's offsets are absolute."""
    if pa.types.is_fixed_size_list(arr.type):
        size = arr.type.list_size
        return arr.flatten(), np.arange(len(arr) + 1, dtype=np.int64) * size
    return arr.values, np.asarray(arr.offsets, dtype=np.int64)


def _flat_ints(series: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """(values, absolute offsets) of a list-of-ints column, zero-copy where Arrow allows."""
    arr = series.to_arrow()
    if hasattr(arr, "combine_chunks"):
        arr = arr.combine_chunks()
    values, offsets = _unnest(arr)
    return values.to_numpy(zero_copy_only=False), offsets


def _flat_nested(series: pl.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, inner offsets, outer offsets) of a list-of-lists-of-ints column."""
    arr = series.to_arrow()
    if hasattr(arr, "combine_chunks"):
        arr = arr.combine_chunks()
    inner, outer = _unnest(arr)
    values, inner_off = _unnest(inner)
    return values.to_numpy(zero_copy_only=False), inner_off, outer


def route_metrics(batch: pl.Series) -> pl.Series:
    """Per-row pbar, max_alt, rank_std, rho, n_routes of a struct batch of score rows."""
    alt_u, u_off = _flat(batch.struct.field("alt_probs"))
    alt_s, s_off = _flat(batch.struct.field("alt_route_logprobs"))
    std_u = batch.struct.field("std_prob").cast(pl.Float32).to_numpy()
    std_s = batch.struct.field("std_route_logprob").cast(pl.Float32).to_numpy()
    pbar, max_alt, rank_std, rho, n_routes = _route_metrics(
        std_u, alt_u, u_off, std_s, alt_s, s_off
    )
    columns = {"pbar": pbar, "max_alt": max_alt, "rank_std": rank_std, "rho": rho}
    columns["n_routes"] = n_routes
    if "std_route" in batch.struct.fields:
        std_r, std_off = _flat_ints(batch.struct.field("std_route"))
        alt_r, inner_off, outer_off = _flat_nested(batch.struct.field("alt_routes"))
        draws = _draw_metrics(
            std_u, alt_u, u_off, std_s, alt_s, std_r, std_off, alt_r, inner_off, outer_off
        )
        columns |= dict(zip(DRAW_FIELDS, draws, strict=True))
    nan = ["max_alt", "rho", *(c for c in DRAW_FIELDS[:3] if c in columns)]
    out = pl.DataFrame(columns).with_columns(pl.col(*nan).fill_nan(None))
    return out.to_struct(batch.name)
