"""Per-token metrics and per-bin tables on hand-built score tables, answers worked out by hand.

Every table here has J = 3 alternatives, so J + 1 = 4 routes per token: u = [u(S), u(R_1),
u(R_2), u(R_3)] and s likewise. Average ranks are ascending for Spearman (1 = lowest) and
descending for the rank of S (1 = best); with 4 routes the mean rank is 2.5.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from analysis.metrics import (
    AnalysisConfig,
    collect_stats,
    find_shards,
    scan_scores,
    token_metrics,
)
from analysis.tables import summarise
from workers.io import write_arrow
from workers.schemas import SCORES_SCHEMA

SQRT10 = math.sqrt(10)

# name: (u over S + 3 alternatives, s over the same routes). Expected values are in HAND.
ROWS = {
    # pbar = 0.9 exactly (in the data's float32) -> Confident. u constant: no rank variance,
    # so rho is left out; every alternative ties S: gain 0, no win, rank 1 + 0 + 3/2 = 2.5.
    "A": ([0.9, 0.9, 0.9, 0.9], [-1.0, -2.0, -3.0, -4.0]),
    # pbar = (0.5 + 0.25 + 0.75 + 0.5) / 4 = 0.5 exactly -> Ambiguous (Fragile is < 0.5).
    # max alt 0.75: gain 0.25, win. Rank of S: 1 better, 1 tied -> 1 + 1 + 1/2 = 2.5.
    # ranks u = [2.5, 1, 4, 2.5], s = [4, 2, 3, 1]; centred du = [0, -1.5, 1.5, 0],
    # ds = [1.5, -0.5, 0.5, -1.5]: cov 1.5, var_u 4.5, var_s 5 -> rho = 1.5 / sqrt(22.5) = 1/sqrt(10).
    "B": ([0.5, 0.25, 0.75, 0.5], [-1.0, -3.0, -2.0, -4.0]),
    # pbar = 3.55 / 4 = 0.8875 -> Ambiguous. max 0.95: gain 0.15, win; 3 better -> rank 4.
    # ranks u = [1, 2.5, 4, 2.5], s = [4, 3, 2, 1]; du = [-1.5, 0, 1.5, 0], ds = [1.5, .5, -.5, -1.5]:
    # cov -2.25 - 0.75 = -3 -> rho = -3 / sqrt(22.5) = -2/sqrt(10).
    "C": ([0.8, 0.9, 0.95, 0.9], [-1.0, -2.0, -3.0, -4.0]),
    # pbar = 0.8 / 4 = 0.2 -> Fragile. max 0.4: gain 0.3, win; 2 better, 1 tied -> 3.5.
    # s constant (e.g. the same route drawn every time): rho left out, counted.
    "D": ([0.1, 0.2, 0.1, 0.4], [-1.0, -1.0, -1.0, -1.0]),
    # pbar = 1.0 / 4 = 0.25 -> Fragile. S is the best route: gain 0.3 - 0.4 = -0.1, no win,
    # rank 1. s and u in the same order -> rho = 1.
    "E": ([0.4, 0.3, 0.2, 0.1], [-1.0, -2.0, -3.0, -4.0]),
    # pbar = 3.8 / 4 = 0.95 -> Confident. max 1.0: gain 0.05, win; 1 better, 1 tied -> 2.5.
    # ranks u = [2.5, 4, 1, 2.5], s = [3.5, 2, 1, 3.5] (s ties too); du = [0, 1.5, -1.5, 0],
    # ds = [1, -0.5, -1.5, 1]: cov -0.75 + 2.25 = 1.5, var_u 4.5, var_s 4.5 -> rho = 1/3.
    "F": ([0.95, 1.0, 0.9, 0.95], [-1.0, -2.0, -3.0, -1.0]),
}
HAND = {  # name: (bin, u(S), max alt, gain, win, rank of S, rho)
    "A": ("confident", 0.9, 0.9, 0.0, False, 2.5, None),
    "B": ("ambiguous", 0.5, 0.75, 0.25, True, 2.5, 1 / SQRT10),
    "C": ("ambiguous", 0.8, 0.95, 0.15, True, 4.0, -2 / SQRT10),
    "D": ("fragile", 0.1, 0.4, 0.3, True, 3.5, None),
    "E": ("fragile", 0.4, 0.3, -0.1, False, 1.0, 1.0),
    "F": ("confident", 0.95, 1.0, 0.05, True, 2.5, 1 / 3),
}


def score_table(rows, *, model="m", layer=3, dataset="d", top_k=2, routes=None) -> pa.Table:
    """A SCORES_SCHEMA table from (u list, s list) pairs; routes are placeholders, all
    different, unless `routes` gives each row's J+1 routes (S first)."""
    data = {name: [] for name in SCORES_SCHEMA.names}
    for i, (u, s) in enumerate(rows):
        j = len(u) - 1
        data["problem_id"].append(f"p{i}")
        data["sample_idx"].append(0)
        data["position"].append(i)
        data["target_id"].append(7)
        row_routes = routes[i] if routes else [list(range(k, k + top_k)) for k in range(j + 1)]
        data["std_route"].append(row_routes[0])
        data["std_prob"].append(u[0])
        data["alt_routes"].append(row_routes[1:])
        data["alt_probs"].append(list(u[1:]))
        data["std_route_logprob"].append(s[0])
        data["alt_route_logprobs"].append(list(s[1:]))
        data["model"].append(model)
        data["layer"].append(layer)
        data["dataset"].append(dataset)
        # the next-token distribution columns: KL 0.1 x j, the argmax changed on odd draws
        data["std_argmax"].append(7)
        data["alt_kl"].append([0.1 * (q + 1) for q in range(j)])
        data["alt_argmax_changed"].append([q % 2 == 1 for q in range(j)])
        data["verified"].append(True)
    return pa.Table.from_pydict(data, schema=SCORES_SCHEMA)


def write_run(root, tables) -> None:
    """tables: {(model, layer, dataset, shard name): pa.Table}, written as complete shards."""
    for (model, layer, dataset, name), table in tables.items():
        path = root / "scores" / model / f"layer={layer}" / dataset / f"{name}.arrow"
        write_arrow(table, path, config_hash="test")


@pytest.mark.parametrize("fast", [True, False], ids=["kernel", "reference"])
def test_token_metrics_match_the_hand_computed_values(fast):
    lf = pl.from_arrow(score_table(list(ROWS.values()))).lazy()
    got = token_metrics(lf, AnalysisConfig(), fast=fast).collect()
    for name, row in zip(ROWS, got.iter_rows(named=True), strict=True):
        bin_, u_std, max_alt, gain, win, rank, rho = HAND[name]
        assert row["bin"] == bin_, name
        assert row["u_std"] == pytest.approx(u_std, rel=1e-6), name
        assert row["max_alt"] == pytest.approx(max_alt, rel=1e-6), name
        assert row["gain"] == pytest.approx(gain, abs=1e-6), name
        assert row["win"] is win, name
        assert row["rank_std"] == rank, name
        assert row["n_routes"] == 4
        if rho is None:
            assert row["rho"] is None, name
        else:
            assert row["rho"] == pytest.approx(rho, rel=1e-12), name


@pytest.mark.parametrize("fast", [True, False], ids=["kernel", "reference"])
def test_bins_at_the_thresholds(fast):
    just_below = float(np.nextafter(np.float32(0.5), np.float32(0)))
    rows = [
        ([0.9] * 4, [0.0, -1, -2, -3]),  # pbar = 0.9 -> confident (>=)
        ([0.5] * 4, [0.0, -1, -2, -3]),  # pbar = 0.5 -> ambiguous (fragile is strictly <)
        ([just_below] * 4, [0.0, -1, -2, -3]),  # one float32 step below 0.5 -> fragile
        ([0.89] * 4, [0.0, -1, -2, -3]),  # below 0.9 -> ambiguous
        ([1.0] * 4, [0.0, -1, -2, -3]),  # pbar = 1 -> confident
    ]
    got = token_metrics(
        pl.from_arrow(score_table(rows)).lazy(), AnalysisConfig(), fast=fast
    ).collect()
    assert got["bin"].to_list() == ["confident", "ambiguous", "fragile", "ambiguous", "confident"]
    # Moving the thresholds moves the bins: with confident=0.95 the 0.9 row is ambiguous.
    cfg = AnalysisConfig(confident=0.95, fragile=0.3)
    got = token_metrics(pl.from_arrow(score_table(rows)).lazy(), cfg, fast=fast).collect()
    assert got["bin"].to_list() == ["ambiguous"] * 4 + ["confident"]


def test_config_validation_of_the_interval_settings():
    for bad in ({"cluster": "token"}, {"bootstrap": -1}, {"level": 1.0}, {"win_margin": -1e-4}):
        with pytest.raises(ValueError):
            AnalysisConfig(**bad)
    assert AnalysisConfig(cluster="problem").cluster_keys == ("problem_id",)


def test_config_validation():
    assert AnalysisConfig() == AnalysisConfig(confident=0.9, fragile=0.5)
    AnalysisConfig(confident=1.0, fragile=0.01)
    for confident, fragile in [(0.5, 0.5), (0.4, 0.5), (1.1, 0.5), (0.9, 0.0), (0.9, -0.1)]:
        with pytest.raises(ValueError, match="0 < fragile < confident <= 1"):
            AnalysisConfig(confident=confident, fragile=fragile)


def test_per_bin_table_from_shards(tmp_path):
    names = list(ROWS)
    # Two shards of one job (split A B C | D E F), so sums cross files.
    write_run(
        tmp_path,
        {
            ("m", 3, "d", "shard-0"): score_table([ROWS[n] for n in names[:3]]),
            ("m", 3, "d", "shard-1"): score_table([ROWS[n] for n in names[3:]]),
        },
    )
    tables = summarise(collect_stats(find_shards(tmp_path), AnalysisConfig()), AnalysisConfig())
    by_bin = tables["by_bin"].filter(pl.col("dataset") == "d")
    assert by_bin["bin"].to_list() == ["confident", "ambiguous", "fragile", "all"]
    rows = {r["bin"]: r for r in by_bin.iter_rows(named=True)}
    # confident = A, F: u(S) (0.9 + 0.95) / 2; max (0.9 + 1.0) / 2; gain 100 (0 + 0.05) / 2;
    # one win of two; ranks (2.5 + 2.5) / 2; alignment = F's 1/3 alone (A has no variance).
    c = rows["confident"]
    assert c["tokens"] == 2 and c["share"] == pytest.approx(2 / 6)
    assert c["mean_u_std"] == pytest.approx(0.925, rel=1e-6)
    assert c["mean_max_alt"] == pytest.approx(0.95, rel=1e-6)
    assert c["gain_pp"] == pytest.approx(2.5, rel=1e-5)
    assert c["win_rate"] == 0.5 and c["mean_rank"] == 2.5
    assert c["alignment"] == pytest.approx(1 / 3) and c["alignment_tokens"] == 1
    assert c["no_variance"] == 1 and c["routes"] == 4
    # ambiguous = B, C: gain 100 (0.25 + 0.15) / 2 = 20; both win; ranks (2.5 + 4) / 2;
    # alignment (1 - 2) / sqrt(10) / 2.
    a = rows["ambiguous"]
    assert a["tokens"] == 2 and a["gain_pp"] == pytest.approx(20.0, rel=1e-5)
    assert a["mean_u_std"] == pytest.approx(0.65, rel=1e-6)
    assert a["mean_max_alt"] == pytest.approx(0.85, rel=1e-6)
    assert a["win_rate"] == 1.0 and a["mean_rank"] == 3.25
    assert a["alignment"] == pytest.approx(-1 / (2 * SQRT10)) and a["no_variance"] == 0
    # fragile = D, E: gain 100 (0.3 - 0.1) / 2 = 10; one win; ranks (3.5 + 1) / 2;
    # alignment = E's 1 (D's s is constant: left out, counted).
    f = rows["fragile"]
    assert f["tokens"] == 2 and f["gain_pp"] == pytest.approx(10.0, rel=1e-5)
    assert f["win_rate"] == 0.5 and f["mean_rank"] == 2.25
    assert f["alignment"] == pytest.approx(1.0) and f["no_variance"] == 1
    # all six: gain 100 * 0.65 / 6; 4 wins of 6; alignment over the 4 tokens with variance.
    t = rows["all"]
    assert t["tokens"] == 6 and t["share"] == 1.0
    assert t["gain_pp"] == pytest.approx(65 / 6, rel=1e-5)
    assert t["win_rate"] == pytest.approx(4 / 6)
    assert t["alignment"] == pytest.approx((1 / 3 + 1 / SQRT10 - 2 / SQRT10 + 1) / 4)
    assert t["no_variance"] == 2
    # counts: one row per job, bins side by side.
    assert tables["counts"].rows(named=True) == [
        {"model": "m", "layer": 3, "dataset": "d", "tokens": 6, "confident": 2, "ambiguous": 2,
         "fragile": 2, "no_variance": 2, "routes": 4}
    ]  # fmt: skip
    # gain histogram: 100 buckets of 2 pp over [-100, 100] pp; E's -10 pp is in [-10, -8).
    hist = tables["gain_hist"].filter((pl.col("dataset") == "d") & (pl.col("bin") == "fragile"))
    assert hist["tokens"].sum() == 2
    e = hist.filter(pl.col("lo_pp") < 0).row(0, named=True)
    assert e["lo_pp"] == pytest.approx(-10) and e["hi_pp"] == pytest.approx(-8)
    # One dataset: no dataset = "all" rows repeating it.
    assert "all" not in tables["by_bin"]["dataset"].to_list()
    assert c["chance_rank"] == 2.5  # (J + 2) / 2 with J = 3


def test_win_rate_needs_the_margin_and_the_strict_rate_is_kept(tmp_path):
    # Gains of 5e-5 (a rounding-sized difference), 2e-4 and exactly 0 (a repeated route).
    rows = [
        ([0.9, 0.90005, 0.9, 0.9], [-1.0, -2.0, -3.0, -4.0]),
        ([0.9, 0.9002, 0.9, 0.9], [-1.0, -2.0, -3.0, -4.0]),
        ([0.9, 0.9, 0.9, 0.9], [-1.0, -2.0, -3.0, -4.0]),
    ]
    write_run(tmp_path, {("m", 3, "d", "s0"): score_table(rows)})
    for margin, expected in ((1e-4, 1 / 3), (0.0, 2 / 3), (1e-3, 0.0)):
        cfg = AnalysisConfig(win_margin=margin, bootstrap=0)
        row = summarise(collect_stats(find_shards(tmp_path), cfg), cfg)["overall"].row(
            0, named=True
        )
        assert row["win_rate"] == pytest.approx(expected), margin
        assert row["win_rate_strict"] == pytest.approx(2 / 3)
        assert row["win_rate_lo"] is None  # bootstrap = 0: no intervals


def test_rollup_pools_datasets_by_tokens(tmp_path):
    # Dataset x holds B (gain 0.25), dataset y holds C and B (gains 0.15, 0.25): pooled mean
    # gain over 3 tokens = 100 * 0.65 / 3, not the mean of the two datasets' means.
    write_run(
        tmp_path,
        {
            ("m", 3, "x", "s0"): score_table([ROWS["B"]], dataset="x"),
            ("m", 3, "y", "s0"): score_table([ROWS["C"], ROWS["B"]], dataset="y"),
        },
    )
    cfg = AnalysisConfig()
    tables = summarise(collect_stats(find_shards(tmp_path), cfg), cfg)
    pooled = tables["by_bin"].filter((pl.col("dataset") == "all") & (pl.col("bin") == "ambiguous"))
    assert pooled["tokens"].to_list() == [3]
    assert pooled["gain_pp"][0] == pytest.approx(100 * 0.65 / 3, rel=1e-5)
    assert tables["overall"]["dataset"].to_list() == ["x", "y", "all"]


def test_a_shard_without_sidecar_is_never_read(tmp_path):
    write_run(tmp_path, {("m", 3, "d", "done"): score_table([ROWS["A"]])})
    # Not even valid Arrow: opening it would fail, so it must not be opened at all.
    (tmp_path / "scores" / "m" / "layer=3" / "d" / "partial.arrow").write_bytes(b"not arrow")
    shards = find_shards(tmp_path)
    assert [p.name for p in shards] == ["done.arrow"]
    stats = collect_stats(shards, AnalysisConfig())
    assert stats["tokens"].sum() == 1
    with pytest.raises(FileNotFoundError):
        scan_scores([])


def test_kernel_matches_reference_on_random_tables_with_ties():
    # Small integer-valued u and s make ties and constant rows common; J varies per row,
    # including J = 0 (S alone: no alternative, no variance).
    # Routes are 2 of 4 experts in either order, so sets repeat and S is often drawn again.
    rng = np.random.default_rng(1)
    rows, routes = [], []
    for _ in range(3000):
        j = int(rng.choice([0, 1, 2, 5, 32]))
        u = (rng.integers(0, 4, j + 1) / 4).tolist()
        s = (-rng.integers(0, 3, j + 1).astype(float)).tolist()
        rows.append((u, s))
        routes.append([rng.choice(4, 2, replace=False).tolist() for _ in range(j + 1)])
    lf = pl.from_arrow(score_table(rows, routes=routes)).lazy()
    cfg = AnalysisConfig()
    fast = token_metrics(lf, cfg, fast=True).collect()
    ref = token_metrics(lf, cfg, fast=False).collect()
    # The same columns (the two implementations may order them differently).
    expected = ["bin", "bin_split", "bin_std", "dataset", "distinct_routes", "gain",
                "gain_split", "layer", "max_alt", "max_split", "model", "n_routes", "pbar",
                "pbar_split", "problem_id", "rank_std", "rho", "rho_distinct", "sample_idx",
                "std_draws", "u_std", "win", "win_split", "win_strict"]  # fmt: skip
    assert sorted(fast.columns) == sorted(ref.columns) == expected
    ref = ref.select(fast.columns)
    assert fast["rho"].null_count() > 100  # the case is exercised
    assert (fast["std_draws"] > 0).sum() > 100 and (fast["distinct_routes"] < 7).sum() > 100
    for col in fast.columns:
        a, b = fast[col], ref[col]
        if a.dtype.is_float():
            assert np.allclose(
                a.to_numpy(), b.cast(a.dtype).to_numpy(), equal_nan=True, rtol=1e-12
            ), col
        else:
            assert a.cast(pl.String).to_list() == b.cast(pl.String).to_list(), col


# Repeated draws and split draws, J = 4 (h = 2: R1, R2 bin the token, R3, R4 give the gain).
# A route is a set: [3, 2] is [2, 3], [1, 0] is S. Duplicates carry the same u and s, as the
# scorer computes each distinct set once.
DRAWN = {
    # P: u = [.2, .9, .9, .2, .5], routes S, X, X, S, Y. pbar = 2.7 / 5 = 0.54 -> ambiguous;
    # split: mean(.9, .9) = .9 -> confident, gain over R3, R4 = .5 - .2 = .3; u(S) = .2 ->
    # fragile. One draw equals S; 3 distinct sets. All routes: ranks u [1.5, 4.5, 4.5, 1.5, 3],
    # s [4.5, 2.5, 2.5, 4.5, 1], centred cov -6, var 9 and 9 -> rho = -2/3. Distinct S, X, Y:
    # u [.2, .9, .5], s [-1, -2, -4] -> ranks [1, 3, 2], [3, 2, 1]: cov -1, var 2, 2 -> -1/2.
    "P": (
        ([0.2, 0.9, 0.9, 0.2, 0.5], [-1.0, -2.0, -2.0, -1.0, -4.0]),
        [[0, 1], [2, 3], [3, 2], [1, 0], [4, 5]],
    ),
    # Q: every draw is S: u and s constant (no rho either way), 4 of 4 draws equal S, one
    # distinct set. pbar = split pbar = u(S) = .3 -> fragile; gain 0 either way.
    "Q": (([0.3] * 5, [-1.0] * 5), [[0, 1], [1, 0], [0, 1], [1, 0], [0, 1]]),
    # T: J = 1, no split (h = 0): no split bin or gain. pbar .55 -> ambiguous; u(S) = .5 ->
    # ambiguous. Two distinct routes, u up and s down: rho = rho_distinct = -1.
    "T": (([0.5, 0.6], [-1.0, -2.0]), [[0, 1], [2, 3]]),
}
DRAWN_HAND = {  # bin, bin_split, bin_std, gain_split, std_draws, distinct, rho, rho_distinct
    "P": ("ambiguous", "confident", "fragile", 0.3, 1, 3, -2 / 3, -0.5),
    "Q": ("fragile", "fragile", "fragile", 0.0, 4, 1, None, None),
    "T": ("ambiguous", None, "ambiguous", None, 0, 2, -1.0, -1.0),
}


def drawn_table(names, **kw) -> pa.Table:
    return score_table([DRAWN[n][0] for n in names], routes=[DRAWN[n][1] for n in names], **kw)


@pytest.mark.parametrize("fast", [True, False], ids=["kernel", "reference"])
def test_split_draws_and_repeated_routes_match_the_hand_computed_values(fast):
    got = token_metrics(pl.from_arrow(drawn_table(DRAWN)).lazy(), AnalysisConfig(), fast=fast)
    for name, row in zip(DRAWN, got.collect().iter_rows(named=True), strict=True):
        bin_, bin_split, bin_std, gain_split, same, distinct, rho, rho_d = DRAWN_HAND[name]
        assert (row["bin"], row["bin_split"], row["bin_std"]) == (bin_, bin_split, bin_std)
        if gain_split is None:
            assert row["gain_split"] is None and row["win_split"] is None, name
        else:
            assert row["gain_split"] == pytest.approx(gain_split, abs=1e-6), name
        assert (row["std_draws"], row["distinct_routes"]) == (same, distinct), name
        for key, want in (("rho", rho), ("rho_distinct", rho_d)):
            assert row[key] == (None if want is None else pytest.approx(want, rel=1e-12)), key


def test_tables_under_each_binning_with_distinct_route_alignment(tmp_path):
    write_run(tmp_path, {("m", 3, "d", "s0"): drawn_table(["P", "Q", "T"])})
    cfg = AnalysisConfig(bootstrap=0)
    tables = summarise(collect_stats(find_shards(tmp_path), cfg), cfg)
    rows = {(r["binning"], r["bin"]): r for r in tables["binnings"].iter_rows(named=True)}
    # pbar bins (by_bin's): ambiguous = P, T. Gain over all draws (.7 + .1) / 2; over the
    # gain draws P's .3 alone (T has none); draws equal to S 1 of 4 + 0 of 1; alignment
    # (-2/3 - 1) / 2 over all draws, (-1/2 - 1) / 2 over distinct routes.
    a = rows[("pbar", "ambiguous")]
    assert a["tokens"] == 2 and a["gain_pp"] == pytest.approx(40.0, rel=1e-5)
    assert a["gain_split_pp"] == pytest.approx(30.0, rel=1e-5)
    assert a["share_std_draws"] == pytest.approx(1 / 5)
    assert a["alignment"] == pytest.approx(-5 / 6) and a["alignment_distinct"] == -0.75
    assert a["mean_distinct_routes"] == 2.5
    assert tables["by_bin"].filter(pl.col("bin") == "ambiguous")["gain_pp"].item() == a["gain_pp"]
    f = rows[("pbar", "fragile")]
    assert f["share_std_draws"] == 1.0 and f["alignment_distinct"] is None
    # Split bins: P confident, Q fragile, T left out (J = 1 cannot be split).
    assert rows[("split", "confident")]["tokens"] == 1
    assert rows[("split", "confident")]["gain_split_pp"] == pytest.approx(30.0, rel=1e-5)
    assert rows[("split", "confident")]["win_rate_split"] == 1.0
    assert rows[("split", "fragile")]["gain_split_pp"] == 0.0
    assert rows[("split", "all")]["tokens"] == 2 and ("split", "ambiguous") not in rows
    # u(S) bins: P and Q fragile (gains .7 and 0 over all draws), T ambiguous.
    assert rows[("std", "fragile")]["tokens"] == 2
    assert rows[("std", "fragile")]["gain_pp"] == pytest.approx(35.0, rel=1e-5)
    assert rows[("std", "ambiguous")]["tokens"] == 1
    # The headline is the split binning by default.
    assert tables["headline"].equals(
        tables["binnings"].filter(pl.col("binning") == "split").drop("binning")
    )


def test_per_trajectory_mean_weighs_each_trajectory_once(tmp_path):
    # Trajectory p0/0 holds B (gain .25) and C (gain .15), p1/0 holds B: token mean
    # (0.25 + 0.15 + 0.25) / 3, trajectory mean ((0.25 + 0.15) / 2 + 0.25) / 2.
    table = score_table([ROWS["B"], ROWS["C"], ROWS["B"]])
    table = table.set_column(0, "problem_id", pa.array(["p0", "p0", "p1"]))
    write_run(tmp_path, {("m", 3, "d", "s0"): table})
    cfg = AnalysisConfig(bootstrap=0)
    row = summarise(collect_stats(find_shards(tmp_path), cfg), cfg)["by_bin"]
    row = row.filter(pl.col("bin") == "ambiguous").row(0, named=True)
    assert row["gain_pp"] == pytest.approx(100 * 0.65 / 3, rel=1e-6)
    assert row["gain_pp_per_trajectory"] == pytest.approx(100 * (0.2 + 0.25) / 2, rel=1e-6)
    # alignment: p0's (1 - 2) / sqrt(10) / 2 and p1's 1 / sqrt(10), averaged.
    want = (-1 / (2 * SQRT10) + 1 / SQRT10) / 2
    assert row["alignment_per_trajectory"] == pytest.approx(want, rel=1e-6)


def test_compact_and_int32_list_layouts_give_identical_tables(tmp_path):
    """The scorer's layout (uint8 fixed-size routes, zstd) and the layout written before it
    (int32 variable lists, uncompressed), alone or mixed in one run, give the same tables;
    the mixed run also holds a model with uint16 ids, whose routes differ in type again."""
    from analysis.bench import make_scores
    from workers.schemas import as_list_routes

    cfg = AnalysisConfig(bootstrap=50)
    shards = {
        ("a", 0): make_scores(1500, alternatives=8, top_k=4, experts=64, seed=1, model="a"),
        ("a", 1): make_scores(1500, alternatives=8, top_k=4, experts=64, seed=2, model="a"),
        ("b", 0): make_scores(1000, alternatives=6, top_k=2, experts=300, seed=3, model="b"),
    }
    assert shards["a", 0].schema.field("std_route").type == pa.list_(pa.uint8(), 4)
    assert shards["b", 0].schema.field("std_route").type == pa.list_(pa.uint16(), 2)

    def run(name, old):
        for (model, i), table in shards.items():
            path = tmp_path / name / "scores" / model / "layer=12" / "synthetic" / f"{i}.arrow"
            if old(model, i):
                table = as_list_routes(table)
                assert table.schema == SCORES_SCHEMA
            packing = "none" if old(model, i) else "zstd"
            write_arrow(table, path, config_hash="x", compression=packing)
        return summarise(collect_stats(find_shards(tmp_path / name), cfg), cfg)

    before = run("before", lambda m, i: True)
    for after in (run("after", lambda m, i: False), run("mixed", lambda m, i: i == 1)):
        assert before.keys() == after.keys()
        for name in before:
            assert before[name].equals(after[name], null_equal=True), name
