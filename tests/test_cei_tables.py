"""CEI tables on hand-built rows: the hard/easy split, R_l, the expert table, intervals, CLI."""

import math

import polars as pl
import pyarrow as pa
import pytest

from analysis.cei import (
    CeiConfig,
    cei_section,
    expert_table,
    layer_sensitivity,
    main,
    with_difficulty,
)
from workers.io import write_arrow
from workers.schemas import CEI_SCHEMA


def _row(traj, pos, entropy, route, out, experts, cei_in, layer=3):
    return {
        "problem_id": f"p{traj}",
        "sample_idx": 0,
        "position": pos,
        "target_id": 5,
        "std_route": route,
        "std_prob": math.exp(-entropy),
        "std_entropy": entropy,
        "cei_out": out,
        "in_experts": experts,
        "cei_in": cei_in,
        "model": "m",
        "layer": layer,
        "dataset": "d",
    }


def _frame():
    """Two trajectories of four tokens: entropy 2, 1.5 (hard: top half) and 0.1, 0.2 (easy)."""
    rows = []
    for traj in (0, 1):
        rows += [
            _row(traj, 0, 2.0, [0, 1], [1.0, -0.5], [2, 3], [0.4, -0.2]),
            _row(traj, 1, 1.5, [0, 2], [0.5, 0.5], [1, 3], [0.0, 0.6]),
            _row(traj, 2, 0.1, [0, 1], [0.1, 0.1], [2, 3], [0.0, 0.0]),
            _row(traj, 3, 0.2, [0, 1], [0.0, 0.2], [2, 3], [0.0, 0.0]),
        ]
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=CEI_SCHEMA))


CFG = CeiConfig(hard_fraction=0.5, easy_fraction=0.5, bootstrap=200)


def test_difficulty_split_by_entropy_and_by_prob():
    f = with_difficulty(_frame(), CFG)
    assert f.filter(pl.col("difficulty") == "hard")["position"].to_list() == [0, 1, 0, 1]
    quarter = with_difficulty(_frame(), CeiConfig(hard_fraction=0.25, easy_fraction=0.25))
    assert quarter.filter(pl.col("difficulty") == "hard")["position"].to_list() == [0, 0]
    assert quarter.filter(pl.col("difficulty") == "easy")["position"].to_list() == [2, 2]
    by_prob = with_difficulty(
        _frame(), CeiConfig(hard_by="prob", hard_fraction=0.25, easy_fraction=0.25)
    )
    assert by_prob.filter(pl.col("difficulty") == "hard")["position"].to_list() == [0, 0]


def test_layer_sensitivity():
    t = layer_sensitivity(_frame(), CFG).row(0, named=True)
    # D: mean |cei_out| = 0.75, 0.5 (hard), 0.1, 0.1 (easy)
    assert (t["hard_tokens"], t["easy_tokens"]) == (4, 4)
    assert t["mean_hard"] == pytest.approx(0.625)
    assert t["mean_easy"] == pytest.approx(0.1)
    assert t["sensitivity"] == pytest.approx(0.525)
    assert t["ratio"] == pytest.approx(6.25)
    # the two trajectories are identical: every resample gives the same means
    assert t["sensitivity_lo"] == pytest.approx(0.525) and t["sensitivity_hi"] == pytest.approx(
        0.525
    )


def test_expert_table():
    t = {r["expert"]: r for r in expert_table(_frame(), CFG).iter_rows(named=True)}
    assert t[0]["sel_freq"] == pytest.approx(1.0) and t[0]["mean_cei_out"] == pytest.approx(0.75)
    assert t[0]["dormancy"] is None  # never a swap candidate: no evidence either way
    # expert 3: never selected on hard tokens, swapped in twice per trajectory: -0.2 and 0.6
    assert t[3]["selected"] == 0 and t[3]["in_pool"] == 4
    assert t[3]["mean_cei_in"] == pytest.approx(0.2)
    assert t[3]["mean_gain_in"] == pytest.approx(0.3)
    assert t[3]["dormancy"] == pytest.approx(0.3)
    # expert 2: selected on one of two hard tokens (CEI_out 0.5), swapped in once (0.4)
    assert t[2]["sel_freq"] == pytest.approx(0.5)
    assert t[2]["dormancy"] == pytest.approx(0.5 * 0.4)
    first = expert_table(_frame(), CFG).row(0, named=True)
    assert first["expert"] == 3  # sorted by dormancy


def test_intervals_resample_trajectories():
    rows = _frame().with_columns(
        cei_out=pl.when(pl.col("problem_id") == "p1")
        .then(pl.col("cei_out").list.eval(pl.element() * 3))
        .otherwise(pl.col("cei_out"))
    )
    t = layer_sensitivity(rows, CFG).row(0, named=True)
    assert t["sensitivity_lo"] < t["sensitivity"] < t["sensitivity_hi"]
    again = layer_sensitivity(rows, CFG).row(0, named=True)
    assert again == t  # seeded


def test_section_and_cli(tmp_path, capsys):
    lines = cei_section(layer_sensitivity(_frame(), CFG), expert_table(_frame(), CFG), CFG)
    assert lines[0] == "## Counterfactual Expert Impact" and any(
        "| m | 3 | d |" in x for x in lines
    )
    path = tmp_path / "cei.arrow"
    write_arrow(_frame().to_arrow().cast(CEI_SCHEMA), path, config_hash="x")
    assert main([str(path), "--out", str(tmp_path / "out"), "--bootstrap", "50"]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "layers.csv",
        "experts.csv",
        "cei.png",
        "cei.md",
    }
    assert main([str(tmp_path / "missing.arrow"), "--out", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "o2").exists()
