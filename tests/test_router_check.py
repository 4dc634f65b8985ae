"""The mechanism check on hand-built score files: which routes changed, split and flags."""

import polars as pl
import pyarrow as pa
import pytest

from analysis.router_check import mechanism_table, token_changes
from workers.io import write_arrow
from workers.schemas import SCORES_SCHEMA


def row(pid, position, std_route, std_prob, alt_probs):
    return {
        "problem_id": pid,
        "sample_idx": 0,
        "position": position,
        "target_id": 1,
        "std_route": std_route,
        "std_prob": std_prob,
        "alt_routes": [[4, 5]] * len(alt_probs),
        "alt_probs": alt_probs,
        "std_route_logprob": -1.0,
        "alt_route_logprobs": [-2.0, -3.0],
        "model": "m",
        "layer": 3,
        "dataset": "d",
    }


def write(path, rows):
    write_arrow(pa.Table.from_pylist(rows, schema=SCORES_SCHEMA), path, config_hash="x")
    return path


def test_route_changes_are_counted_per_split_and_group(tmp_path):
    before = write(
        tmp_path / "before.arrow",
        [
            row("train", 0, [0, 1], 0.1, [0.6, 0.2]),  # fragile, trained on
            row("train", 1, [0, 1], 0.95, [0.95, 0.96]),  # confident
            row("held", 0, [2, 3], 0.1, [0.7, 0.1]),  # fragile, passes the rule: flagged
            row("held", 1, [2, 3], 0.99, [0.99, 0.99]),  # confident
        ],
    )
    after = write(
        tmp_path / "after.arrow",
        [
            row("train", 0, [5, 4], 0.6, [0.6, 0.2]),  # now the winner {4, 5}
            row("train", 1, [1, 0], 0.95, [0.95, 0.96]),  # same set, other order: unchanged
            row("held", 0, [2, 3], 0.1, [0.7, 0.1]),
            row("held", 1, [2, 6], 0.98, [0.99, 0.99]),  # a confident route that moved
        ],
    )
    prefs = pl.DataFrame(
        {
            "dataset": ["d"],
            "problem_id": ["train"],
            "sample_idx": [0],
            "position": [0],
            "kind": ["prefer"],
        },
        schema_overrides={"sample_idx": pl.Int32, "position": pl.Int32},
    )
    tokens = token_changes([before], [after], prefs, lambda p: p == "held", margin=0.05)
    assert tokens.select(
        "problem_id", "position", "split", "bin", "flagged", "route_changed"
    ).rows() == [
        ("held", 0, "held-out", "fragile", True, False),
        ("held", 1, "held-out", "confident", False, True),
        ("train", 0, "train", "fragile", True, True),
        ("train", 1, "train", "confident", False, False),
    ]
    table = mechanism_table(tokens)
    flagged = table.filter((pl.col("split") == "train") & (pl.col("group") == "flagged")).row(
        0, named=True
    )
    assert flagged["tokens"] == 1 and flagged["changed"] == 1
    assert flagged["u_std_before"] == pytest.approx(0.1) and flagged[
        "u_std_after"
    ] == pytest.approx(0.6)
    held_conf = table.filter((pl.col("split") == "held-out") & (pl.col("group") == "confident"))
    assert held_conf["route_changed"].item() == 1.0
    assert table["split"].to_list()[0] == "train"  # fixed display order


def test_a_token_missing_after_the_update_is_an_error(tmp_path):
    before = write(tmp_path / "b.arrow", [row("p", 0, [0, 1], 0.1, [0.6, 0.2])])
    after = write(tmp_path / "a.arrow", [row("p", 1, [0, 1], 0.1, [0.6, 0.2])])
    empty = pl.DataFrame(
        schema={
            "dataset": pl.String,
            "problem_id": pl.String,
            "sample_idx": pl.Int32,
            "position": pl.Int32,
            "kind": pl.String,
        }
    )
    with pytest.raises(ValueError, match="matched after"):
        token_changes([before], [after], empty, lambda p: False, margin=0.05)


def test_mechanism_intervals_resample_problems():
    # Two problems in one (split, group): p1's 3 tokens all changed (u up by 0.3), p2's 1 token
    # unchanged (u unchanged). Resampling problems gives shares between 0 and 1; the point
    # values are token-weighted.
    tokens = pl.DataFrame(
        {
            "problem_id": ["p1", "p1", "p1", "p2"],
            "split": ["train"] * 4,
            "bin": ["fragile"] * 4,
            "flagged": [False] * 4,
            "route_changed": [True, True, True, False],
            "u_std": [0.1, 0.1, 0.1, 0.2],
            "u_std_after": [0.4, 0.4, 0.4, 0.2],
            "rho": [0.0, 0.0, None, 0.5],
            "rho_after": [0.5, 0.5, 0.5, 0.5],
        }
    )
    table = mechanism_table(tokens, draws=400, seed=0).row(0, named=True)
    assert table["route_changed"] == pytest.approx(0.75)
    assert table["route_changed_lo"] == 0.0 and table["route_changed_hi"] == 1.0
    assert table["u_std_diff"] == pytest.approx(0.225)
    assert table["u_std_diff_lo"] == pytest.approx(0.0) and table["u_std_diff_hi"] == pytest.approx(
        0.3
    )
    assert table["alignment_diff"] == pytest.approx(
        1 / 3
    )  # the token without rho before is left out
    again = mechanism_table(tokens, draws=400, seed=0)
    assert again.equals(mechanism_table(tokens, draws=400, seed=0))
    assert "route_changed_lo" not in mechanism_table(tokens).columns
