"""Next-token distribution tables (KL, argmax changes) and the verified split, by hand."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from analysis.divergence import divergence_files, divergence_table, verified_table
from analysis.metrics import AnalysisConfig
from workers.io import write_arrow
from workers.schemas import SCORES_SCHEMA

CFG = AnalysisConfig(win_margin=1e-4, binning="pbar", bootstrap=50)
# pid: (verified, u over S + 3 draws, KL of the draws, argmax changed per draw)
TOKENS = {
    # pbar 0.25: fragile. Best draw 0 (0.5): KL 0.2, changed; wins; draws 0 and 1 win.
    "a": (True, [0.1, 0.5, 0.3, 0.1], [0.2, 0.4, 0.0], [True, False, False]),
    # pbar 0.95: confident. Best draw 2 (1.0): KL 0.05, unchanged; wins; only draw 2 wins.
    "b": (True, [0.95, 0.95, 0.9, 1.0], [0.0, 0.1, 0.05], [False, False, False]),
    # pbar 0.125: fragile, unverified. Ties: best is draw 0; no win; all changed.
    "c": (False, [0.2, 0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [True, True, True]),
}


def _row(pid, verified, u, kl, changed, *, old=False):
    row = {
        "problem_id": pid, "sample_idx": 0, "position": 0, "target_id": 1,
        "std_route": [0, 1], "std_prob": u[0], "alt_routes": [[2, 3], [4, 5], [6, 7]],
        "alt_probs": u[1:], "std_route_logprob": -1.0, "alt_route_logprobs": [-2.0, -3.0, -4.0],
        "model": "m", "layer": 3, "dataset": "d",
    }  # fmt: skip
    if not old:
        row |= {"std_argmax": 9, "alt_kl": kl, "alt_argmax_changed": changed, "verified": verified}
    return row


def _write(path, rows, *, old=False):
    schema = pa.schema(list(SCORES_SCHEMA)[:13]) if old else SCORES_SCHEMA
    write_arrow(pa.Table.from_pylist(rows, schema=schema), path, config_hash="t")
    return path


@pytest.fixture
def paths(tmp_path):
    new = _write(tmp_path / "new.arrow", [_row(p, *v) for p, v in TOKENS.items()])
    old = _write(tmp_path / "old.arrow", [_row("z", None, *TOKENS["a"][1:], old=True)], old=True)
    return new, old


def _get(frame, verified, bin_name):
    rows = frame.filter((pl.col("verified") == verified) & (pl.col("bin") == bin_name))
    assert rows.height == 1
    return rows.row(0, named=True)


def test_divergence_means_match_the_hand_computed_values(paths):
    new, old = paths
    assert divergence_files([new, old]) == [new]  # files scored before the columns are skipped
    table = divergence_table([new, old], CFG)
    fragile = _get(table, "all", "fragile")  # a and c
    assert fragile["mean_kl_best"] == pytest.approx((0.2 + 1.0) / 2)
    assert fragile["mean_kl_draws"] == pytest.approx((0.6 + 3.0) / 6)
    assert fragile["share_changed"] == pytest.approx(4 / 6)
    assert fragile["share_best_changed"] == pytest.approx(1.0)
    assert fragile["share_wins_best_changed"] == pytest.approx(1.0)  # a only wins
    assert fragile["share_win_draws_changed"] == pytest.approx(1 / 2)
    assert fragile["mean_kl_win_draws"] == pytest.approx(0.3)
    both = _get(table, "verified", "all")  # a and b
    assert both["mean_kl_best"] == pytest.approx(0.125)
    assert both["share_changed"] == pytest.approx(1 / 6)
    assert both["share_win_draws_changed"] == pytest.approx(1 / 3)
    d = np.array([0.4, 0.2, 0.0, 0.0, -0.05, 0.05])
    k = np.array([0.2, 0.4, 0.0, 0.0, 0.1, 0.05])
    assert both["corr_gain_kl"] == pytest.approx(np.corrcoef(d, k)[0, 1], abs=1e-5)
    assert both["mean_kl_best_lo"] <= both["mean_kl_best"] <= both["mean_kl_best_hi"]
    assert _get(table, "unverified", "fragile")["share_changed"] == pytest.approx(1.0)
    assert divergence_table([old], CFG) is None


def test_verified_table_splits_the_headline_by_the_trajectories_flag(paths, tmp_path):
    new, old = paths
    table = verified_table([new, old], CFG)
    assert set(table["verified"]) == {"verified", "unverified"}
    rows = table.filter((pl.col("bin") == "all") & (pl.col("dataset") == "d"))
    tokens = dict(zip(rows["verified"], rows["tokens"], strict=True))
    assert tokens == {"verified": 2, "unverified": 1}
    gain = _get(table, "unverified", "fragile")["gain_pp"]
    assert gain == pytest.approx(-10.0, abs=1e-4)  # c: best 0.1 against u(S) 0.2
    only = _write(tmp_path / "v.arrow", [_row(p, *TOKENS[p]) for p in "ab"])
    assert verified_table([only], CFG) is None  # nothing unverified to compare with
