"""pass@K: the estimator against hand-computed values, and the bootstrap tables."""

import math

import polars as pl
import pytest

from analysis.passk import count_correct, k_values, paired_diff, pass_at_k, passk_table


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 2 / 5),
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2) / C(5,2)
        (5, 2, 3, 1 - 1 / 10),  # 1 - C(3,3) / C(5,3)
        (5, 2, 4, 1.0),  # n - c < K: every K-subset holds a correct sample
        (10, 3, 3, 1 - 35 / 120),  # 1 - C(7,3) / C(10,3)
        (8, 0, 8, 0.0),
        (8, 8, 1, 1.0),
        (16, 1, 4, 4 / 16),
    ],
)
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    # C(2000, 1000) ~ 1e600 is not a float; the product form stays exact.
    assert pass_at_k(2000, 1, 1) == pytest.approx(1 / 2000, rel=1e-12)
    exact = 1 - math.comb(1990, 1000) / math.comb(2000, 1000)  # Python ints, then one division
    assert pass_at_k(2000, 10, 1000) == pytest.approx(exact, rel=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_k_values_double_up_to_n():
    assert k_values(1) == [1]
    assert k_values(8) == [1, 2, 4, 8]
    assert k_values(6) == [1, 2, 4, 6]


def counts(rows):
    return pl.DataFrame(rows, schema=["variant", "dataset", "problem_id", "n", "c"], orient="row")


def test_count_correct_counts_verified_samples_per_problem():
    samples = pl.DataFrame(
        {
            "variant": ["a"] * 5,
            "dataset": ["d"] * 5,
            "problem_id": ["p", "p", "q", "q", "q"],
            "verified": [True, False, False, False, True],
        }
    )
    out = count_correct(samples)
    assert out.select("problem_id", "n", "c").rows() == [("p", 2, 1), ("q", 3, 1)]


def test_passk_table_means_over_problems_with_an_interval_around_them():
    frame = counts([("a", "d", f"p{i}", 4, c) for i, c in enumerate([0, 1, 2, 4, 4, 3])])
    table = passk_table(frame, draws=500, seed=1)
    assert table["k"].to_list() == [1, 2, 4]
    expected_k1 = sum(c / 4 for c in [0, 1, 2, 4, 4, 3]) / 6
    row = table.filter(pl.col("k") == 1).row(0, named=True)
    assert row["pass_at_k"] == pytest.approx(expected_k1)
    assert row["lo"] < row["pass_at_k"] < row["hi"]
    assert table.filter(pl.col("k") == 4)["pass_at_k"].item() == pytest.approx(5 / 6)
    assert passk_table(frame, draws=500, seed=1).equals(table)  # seeded
    # Six problems give few distinct resample means: some seeds share the quantiles.
    assert any(not passk_table(frame, draws=500, seed=s).equals(table) for s in (2, 3, 4))


def test_passk_table_pools_datasets_as_all():
    frame = counts([("a", "x", "p", 2, 2), ("a", "x", "q", 2, 0), ("a", "y", "r", 2, 1)])
    table = passk_table(frame, draws=200)
    assert table["dataset"].unique().sort().to_list() == ["all", "x", "y"]
    k1 = table.filter((pl.col("dataset") == "all") & (pl.col("k") == 1))
    assert k1["pass_at_k"].item() == pytest.approx((1 + 0 + 0.5) / 3)


def test_paired_diff_is_zero_for_identical_variants_and_positive_for_uniform_gains():
    same = counts([(v, "d", f"p{i}", 4, c) for v in ("a", "b") for i, c in enumerate([0, 2, 3])])
    diff = paired_diff(same, "a", "b", draws=300)
    assert diff["diff"].to_list() == [0.0, 0.0, 0.0]
    assert diff["lo"].to_list() == [0.0, 0.0, 0.0] and diff["hi"].to_list() == [0.0, 0.0, 0.0]
    before = [("a", "d", f"p{i}", 4, c) for i, c in enumerate([0, 1, 2, 0])]
    after = [("b", "d", f"p{i}", 4, c + 1) for i, c in enumerate([0, 1, 2, 0])]
    diff = paired_diff(counts(before + after), "a", "b", draws=300)
    k1 = diff.filter(pl.col("k") == 1).row(0, named=True)
    # Every problem gains exactly one correct sample of four: +0.25 at K=1 in every resample.
    assert k1["diff"] == pytest.approx(0.25) and k1["lo"] == pytest.approx(0.25)
    assert (diff["lo"] >= 0).all() and (diff["diff"] > 0).all()


def test_paired_diff_needs_the_same_n():
    frame = counts([("a", "d", "p", 4, 1), ("b", "d", "p", 2, 1)])
    with pytest.raises(ValueError, match="same n"):
        paired_diff(frame, "a", "b")


def test_aime_2024_and_2025_are_pooled_as_in_the_paper_beside_each_dataset():
    # AIME 2024: p (2 of 2), q (0 of 2); AIME 2025: r (1 of 2); HMMT: h (2 of 2).
    frame = counts(
        [
            ("a", "aime2024", "p", 2, 2),
            ("a", "aime2024", "q", 2, 0),
            ("a", "aime2025", "r", 2, 1),
            ("a", "hmmt_feb_2025", "h", 2, 2),
        ]
    )
    table = passk_table(frame, draws=200)
    k1 = {r["dataset"]: r for r in table.filter(pl.col("k") == 1).iter_rows(named=True)}
    assert list(k1) == ["aime2024", "aime2025", "hmmt_feb_2025", "aime2024+2025", "all"]
    assert k1["aime2024+2025"]["problems"] == 3
    assert k1["aime2024+2025"]["pass_at_k"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert k1["all"]["pass_at_k"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    diff = paired_diff(frame.vstack(frame.with_columns(pl.lit("b").alias("variant"))), "a", "b")
    assert "aime2024+2025" in diff["dataset"].to_list()
    # Without both AIME years there is no pool.
    alone = passk_table(frame.filter(pl.col("dataset") != "aime2025"), draws=50)
    assert "aime2024+2025" not in alone["dataset"].to_list()


def test_a_groups_interval_does_not_depend_on_the_other_groups():
    x = [("b", "x", f"p{i}", 4, c) for i, c in enumerate([0, 1, 2, 4, 3])]
    others = [("a", "a", f"q{i}", 4, c) for i, c in enumerate([1, 4])]  # sorts before x and b
    others += [("b", "a", f"q{i}", 4, c) for i, c in enumerate([1, 4])]
    alone = passk_table(counts(x), draws=300, seed=5)
    beside = passk_table(counts(x + others), draws=300, seed=5)
    beside = beside.filter((pl.col("variant") == "b") & (pl.col("dataset") == "x"))
    assert beside.equals(alone)
    after = [("c", d, p, n, min(n, c + 1)) for _, d, p, n, c in x + others]
    before_after = counts(x + others + after)
    pair_x = paired_diff(before_after.filter(pl.col("dataset") == "x"), "b", "c", draws=300)
    pair_all = paired_diff(before_after, "b", "c", draws=300)
    assert pair_all.filter(pl.col("dataset") == "x").equals(pair_x)
