"""Bootstrap intervals: the cluster-sum fast path against resampling the tokens themselves."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from analysis.bench import make_scores
from analysis.intervals import group_seed, resample_weights
from analysis.metrics import AnalysisConfig, collect_stats, find_shards, scan_scores, token_metrics
from analysis.tables import summarise
from workers.io import write_arrow


def _write(root, dataset: str, seed: int) -> None:
    """1,200 tokens: 4 problems x 3 samples x 100 tokens, paper-like bins (bench generator)."""
    table = make_scores(1_200, alternatives=4, top_k=2, seed=seed, layer=5, dataset=dataset)
    traj = np.arange(table.num_rows) // 100
    table = table.set_column(0, "problem_id", pa.array([f"q{t % 4}" for t in traj]))
    table = table.set_column(1, "sample_idx", pa.array((traj // 4).astype(np.int32)))
    write_arrow(table, root / "scores" / "synthetic-moe" / "layer=5" / dataset / "s.arrow",
                config_hash="t")  # fmt: skip


def _brute_force(tokens: pl.DataFrame, cfg: AnalysisConfig, dataset: str, bin_name: str):
    """Resample clusters with the same weights, rebuild each replicate's token list, take plain
    means: what the cluster sums must reproduce."""
    keys = ["dataset", *cfg.cluster_keys]
    clusters = tokens.select(keys).unique().sort(keys).rows()
    by_cluster = tokens.partition_by(keys, as_dict=True)
    rng = np.random.default_rng(group_seed(cfg, "synthetic-moe", 5, dataset))
    weights = resample_weights(rng, len(clusters), cfg.bootstrap)
    assert (weights.sum(axis=1) == len(clusters)).all()  # each replicate: n draws of n clusters
    names = ["mean_u_std", "gain_pp", "win_rate", "mean_rank", "alignment", "gain_split_pp"]
    reps = {k: [] for k in [*names, "alignment_distinct", "share_std_draws"]}
    for w in weights:
        parts = [by_cluster[c] for c, k in zip(clusters, w, strict=True) for _ in range(k)]
        t = pl.concat(parts)
        if bin_name != "all":
            t = t.filter(pl.col("bin") == bin_name)
        if t.is_empty():
            continue
        reps["mean_u_std"].append(t["u_std"].mean())
        reps["gain_pp"].append(100 * t["gain"].mean())
        reps["win_rate"].append(t["win"].mean())
        reps["mean_rank"].append(t["rank_std"].mean())
        reps["alignment"].append(t["rho"].drop_nulls().mean())
        reps["gain_split_pp"].append(100 * t["gain_split"].drop_nulls().mean())
        reps["alignment_distinct"].append(t["rho_distinct"].drop_nulls().mean())
        reps["share_std_draws"].append(t["std_draws"].sum() / (t["n_routes"] - 1).sum())
    tail = (1 - cfg.level) / 2
    return {k: np.nanquantile(np.array(v, dtype=float), [tail, 1 - tail]) for k, v in reps.items()}


@pytest.mark.parametrize("cluster", ["trajectory", "problem"])
def test_intervals_equal_resampling_the_tokens_of_whole_clusters(tmp_path, cluster):
    _write(tmp_path, "x", seed=1)
    _write(tmp_path, "y", seed=2)
    cfg = AnalysisConfig(cluster=cluster, bootstrap=200, level=0.9, seed=3)
    shards = find_shards(tmp_path)
    by_bin = summarise(collect_stats(shards, cfg), cfg)["by_bin"]
    tokens = token_metrics(scan_scores(shards), cfg).collect()
    for dataset in ("x", "all"):  # one dataset, and both pooled (clusters never merge across)
        sub = tokens if dataset == "all" else tokens.filter(pl.col("dataset") == dataset)
        for bin_name in ("fragile", "all"):
            row = by_bin.filter((pl.col("dataset") == dataset) & (pl.col("bin") == bin_name))
            row = row.row(0, named=True)
            expected = _brute_force(sub, cfg, dataset, bin_name)
            for mean, (lo, hi) in expected.items():
                assert row[f"{mean}_lo"] == pytest.approx(lo, rel=1e-7, abs=1e-9), (mean, bin_name)
                assert row[f"{mean}_hi"] == pytest.approx(hi, rel=1e-7, abs=1e-9), (mean, bin_name)
                assert row[f"{mean}_lo"] <= row[mean] <= row[f"{mean}_hi"]
                assert row[f"{mean}_lo_{cluster}"] == row[f"{mean}_lo"]


def test_intervals_are_a_function_of_the_seed(tmp_path):
    _write(tmp_path, "x", seed=1)
    shards = find_shards(tmp_path)
    cfg = AnalysisConfig(bootstrap=100)
    first = summarise(collect_stats(shards, cfg), cfg)["by_bin"]
    again = summarise(collect_stats(shards, cfg), cfg)["by_bin"]
    assert first.equals(again)
    other = AnalysisConfig(bootstrap=100, seed=1)
    moved = summarise(collect_stats(shards, other), other)["by_bin"]
    assert not first["gain_pp_lo"].equals(moved["gain_pp_lo"])
    assert first["gain_pp"].equals(moved["gain_pp"])  # the point estimates do not move


def test_problem_intervals_are_the_default_and_trajectory_ones_are_kept_beside(tmp_path):
    _write(tmp_path, "x", seed=1)
    shards = find_shards(tmp_path)
    default = AnalysisConfig(bootstrap=100)
    assert default.cluster == "problem"
    by_problem = summarise(collect_stats(shards, default), default)["by_bin"]
    traj = AnalysisConfig(bootstrap=100, cluster="trajectory")
    by_traj = summarise(collect_stats(shards, traj), traj)["by_bin"]
    assert by_problem["gain_pp_lo"].equals(by_problem["gain_pp_lo_problem"])
    assert by_problem["gain_pp_lo_trajectory"].equals(by_traj["gain_pp_lo"])
    assert by_problem["gain_pp_hi_trajectory"].equals(by_traj["gain_pp_hi"])
    assert not by_problem["gain_pp_lo"].equals(by_problem["gain_pp_lo_trajectory"])
