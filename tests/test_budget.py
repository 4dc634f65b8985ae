"""The position budget (scoring.positions): which positions are scored, that their rows are the
full run's, that the analysis weights them to estimate the full run, the hashes and the estimate.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from hydra import compose, initialize_config_dir
from moe_factories import make_model, make_trajectories, single_thread
from pipeline_runs import copy_run, run_inprocess, score_rows

from analysis.metrics import AnalysisConfig, aggregate, token_metrics, with_weights
from analysis.tables import summarise
from orchestrator import config as C
from orchestrator import plan
from orchestrator.stages.scoring import scoring_units
from workers.schemas import COMPLETION_TOKENS, SCORES_SCHEMA, as_list_routes
from workers.scoring.score_config import ScoreConfig
from workers.scoring.scorer import Scorer, select_positions

C.register_configs()
KEYS = ["layer", "problem_id", "sample_idx", "position"]
ROUTES = ["target_id", "std_route", "alt_routes", "std_route_logprob", "alt_route_logprobs"]


def make(*overrides: str) -> C.RunConfig:
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        return C.to_run_config(compose("config", overrides=list(overrides)), overrides)


# ------------------------------------------------------------------------------ selection


def test_selection_is_reproducible_and_depends_only_on_the_token():
    one = select_positions("0.25", 0, "p", 1, 10, 400)
    assert np.array_equal(one, select_positions("0.25", 0, "p", 1, 10, 400))
    assert 60 < len(one) < 140 and np.all(np.diff(one) > 0) and one.max() < 400
    # The same positions whatever the trajectory's length beyond them (a fraction keeps t
    # by its own draw alone) ...
    assert np.array_equal(select_positions("0.25", 0, "p", 1, 10, 200), one[one < 200])
    # ... and other ones for another seed, problem, sample or prompt offset.
    for args in [(1, "p", 1, 10), (0, "q", 1, 10), (0, "p", 0, 10), (0, "p", 1, 11)]:
        assert not np.array_equal(select_positions("0.25", *args, 400), one)
    # A smaller budget keeps a subset: the draws are compared with the budget, not resampled.
    assert set(select_positions("0.1", 0, "p", 1, 10, 400)) < set(one)
    assert set(select_positions("5", 0, "p", 1, 10, 400)) < set(
        select_positions("9", 0, "p", 1, 10, 400)
    )


def test_fraction_count_and_all_forms():
    assert np.array_equal(select_positions("all", 3, "p", 0, 4, 50), np.arange(50))
    assert np.array_equal(select_positions("1.0", 3, "p", 0, 4, 50), np.arange(50))
    assert len(select_positions("64", 3, "p", 0, 4, 1000)) == 64
    assert np.array_equal(select_positions("64", 3, "p", 0, 4, 20), np.arange(20))  # fewer: all
    shares = [len(select_positions("0.25", 0, f"p{i}", 0, 0, 1000)) / 1000 for i in range(20)]
    assert abs(np.mean(shares) - 0.25) < 0.01


@pytest.mark.parametrize("value", [1.5, "1.5", -3, "-3", "abc", 0, "0.0", "nan", True, None, 64.0])
def test_a_bad_budget_is_one_clear_error(value):
    with pytest.raises(ValueError) as err:
        ScoreConfig(positions=value)
    assert str(err.value) == (
        "ScoreConfig: positions must be all, a fraction in (0, 1] or a whole count >= 1,"
        f" got {value!r}"
    )


def test_a_budget_has_one_spelling():
    assert [ScoreConfig(positions=v).positions for v in (0.25, "0.250", 64, "64", "all")] == [
        "0.25", "0.25", "64", "64", "all",
    ]  # fmt: skip


# ------------------------------------------------------------------------- scored rows


@pytest.fixture(scope="module")
def model():
    with single_thread():
        yield make_model("qwen3_moe")


def _score(model, shard, positions="all", micro_batch=None):
    config = ScoreConfig(alternatives=4, pool=6, positions=positions)
    return Scorer("/models/tiny-moe", config, model=model, micro_batch=micro_batch).score_table(
        shard, 1
    )


def test_budgeted_rows_are_the_full_runs_rows_whatever_the_shard(model):
    shard = make_trajectories(lengths=(40, 33, 5), prompt_lens=(6, 4, 3), seed=2)
    # One (t, R) pair per decode step: the decode is then the same computation in both runs.
    full = pl.from_arrow(_score(model, shard, micro_batch=1))
    part = _score(model, shard, "0.25", micro_batch=1)
    assert as_list_routes(part).schema == SCORES_SCHEMA.append(COMPLETION_TOKENS)
    part = pl.from_arrow(part)
    assert 0 < part.height < full.height / 2
    lengths = [
        len(ids) - p
        for ids, p in zip(
            shard["input_ids"].to_pylist(), shard["prompt_len"].to_pylist(), strict=True
        )
    ]
    assert part["completion_tokens"].to_list() == [
        lengths[i]
        for i, pid in enumerate(shard["problem_id"].to_pylist())
        for _ in range((part["problem_id"] == pid).sum())
    ]
    joined = part.drop("completion_tokens").join(full, on=KEYS[1:], how="left", suffix="_full")
    for col in full.columns:
        if col not in KEYS:
            assert (joined[col] == joined[f"{col}_full"]).all(), col
    # Alone in a shard, a trajectory gets the same positions and rows.
    alone = pl.from_arrow(_score(model, shard.slice(1, 1), "0.25", micro_batch=1))
    assert alone.equals(part.filter(pl.col("problem_id") == alone["problem_id"][0]))
    # With the default micro-batches the pairs are batched differently from the full run: the
    # routes are still bitwise the same, u(R) equal up to float rounding (as memory_budget_mb).
    batched = pl.from_arrow(_score(model, shard, "0.25"))
    assert batched.select(KEYS[1:] + ROUTES).equals(part.select(KEYS[1:] + ROUTES))
    for col in ("std_prob", "alt_probs"):
        a = np.log(np.asarray(batched[col].to_list(), dtype=np.float64))
        b = np.log(np.asarray(part[col].to_list(), dtype=np.float64))
        assert np.abs(a - b).max() < 1e-5


def test_a_trajectory_without_scored_positions_has_no_rows(model):
    shard = make_trajectories(lengths=(8, 30), prompt_lens=(6, 4), seed=1)
    out = _score(model, shard, "0.03")
    kept = [
        len(select_positions("0.03", 0, pid, i, p - 1, len(ids) - p))
        for pid, i, ids, p in zip(
            *(
                shard[c].to_pylist()
                for c in ("problem_id", "sample_idx", "input_ids", "prompt_len")
            ),
            strict=True,
        )
    ]
    assert out.num_rows == sum(kept) and 0 in kept


# ------------------------------------------------------------------------- the analysis


def _rows(trajectory: str, n: int, u: float, total: int | None) -> dict:
    rows = {
        "problem_id": [trajectory] * n, "sample_idx": [0] * n, "position": list(range(n)),
        "target_id": [0] * n, "std_route": [[0, 1]] * n, "std_prob": [u] * n,
        "alt_routes": [[[1, 2], [2, 3]]] * n, "alt_probs": [[u / 2, u]] * n,
        "std_route_logprob": [-1.0] * n, "alt_route_logprobs": [[-2.0, -3.0]] * n,
        "model": ["m"] * n, "layer": [0] * n, "dataset": ["d"] * n,
    }  # fmt: skip
    if total is not None:
        rows["completion_tokens"] = [total] * n
    return rows


def _means(frame: pl.DataFrame) -> dict:
    cfg = AnalysisConfig(bootstrap=0)
    row = summarise(aggregate(frame.lazy(), cfg).collect(), cfg)["overall"].row(0, named=True)
    return {k: row[k] for k in ("tokens", "mean_u_std", "mean_max_alt", "gain_pp")}


def test_rows_of_a_fixed_count_are_weighted_by_their_trajectorys_length():
    # Trajectory a: 10 tokens, all u = 1.0; b: 2 tokens, u = 0.2; both scored at 2 positions.
    full = pl.concat(
        [pl.DataFrame(_rows("a", 10, 1.0, None)), pl.DataFrame(_rows("b", 2, 0.2, None))]
    )
    count = pl.concat([pl.DataFrame(_rows("a", 2, 1.0, 10)), pl.DataFrame(_rows("b", 2, 0.2, 2))])
    want, got = _means(full), _means(count)
    assert got["tokens"] == 4 and want["tokens"] == 12
    for key in ("mean_u_std", "mean_max_alt", "gain_pp"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    weights = with_weights(count.lazy()).collect()["weight"].to_list()
    assert weights == [5.0, 5.0, 1.0, 1.0]
    assert (
        token_metrics(with_weights(count.lazy()), AnalysisConfig(), keep=("weight",))
        .collect()["weight"]
        .to_list()
        == weights
    )


# ------------------------------------------------------------------ hashes and the estimate


def test_the_default_budget_keeps_every_hash_and_another_changes_the_units():
    base, budget = make(), make("scoring.positions=0.25")
    assert plan.derive_run_id(base, C.config_tree(base)) == "tiny-b2168886"  # as pinned
    assert plan.derive_run_id(budget, C.config_tree(budget)) != "tiny-b2168886"
    shards = [(plan.Path("/r/a.arrow"), "s0")]
    units = [
        {u.key: u.config_hash for u in scoring_units(plan.Path("/r"), cell, cfg.scoring, shards)}
        for cfg in (base, make("scoring.positions=all"), budget, make("scoring.positions=64"))
        for cell in plan.plan_cells(cfg)
    ]
    assert units[0] == units[1]
    assert len({json.dumps(u, sort_keys=True) for u in units}) == 3


def test_the_dry_run_scales_scoring_hours_by_the_budget(capsys):
    from orchestrator import estimate as E

    def hours(*overrides):
        cfg = make("sweep=paper", "cluster.gpu_type=H200", *overrides)
        cells = plan.estimate(cfg)
        parts = E.main_parts(cfg, cells, plan.scored_positions(cells))
        return E.group_tenths(parts)

    full, quarter = hours(), hours("scoring.positions=0.25")
    assert quarter["generation"] == full["generation"]
    # a quarter of the decode plus the standard pass over every token
    assert 0.25 * full["scoring"] < quarter["scoring"] < 0.4 * full["scoring"]
    cfg = make("sweep=paper", "scoring.positions=0.25")
    text = plan.describe_plan(cfg, "x", plan.Path("/r/x"))
    assert "positions=0.25" in text and "0.25 of positions" in text


# -------------------------------------------------------------- the demo, on a real Ray


@pytest.mark.usefixtures("local_ray")
def test_a_quarter_of_the_demos_positions_are_scored_as_in_the_full_run(reference, tmp_path):
    run_dir = copy_run(reference, tmp_path, "quarter", "problems", "trajectories")
    assert run_inprocess(tmp_path, "quarter", "scoring.positions=0.25") == 0
    full, part = score_rows(reference), score_rows(run_dir)
    assert 0.15 < part.height / full.height < 0.35
    sidecar = json.loads(next((run_dir / "scores").rglob("*.done.json")).read_text())
    assert sidecar["score_config"]["positions"] == "0.25"
    # The positions a trajectory gets are its seeded draws ...
    lengths = full.group_by("layer", "problem_id", "sample_idx").agg(
        pl.len().alias("n"), pl.col("position").min().alias("first")
    )
    want = _quarter(lengths, "0.25", 0)
    assert part.select(KEYS).equals(want.select(KEYS).sort(KEYS))
    assert (part["completion_tokens"] == part.join(lengths, on=KEYS[:3])["n"]).all()
    # ... and every budgeted row is the full run's row at its position: routes bitwise, u(R)
    # up to the float rounding of another batching of the decode.
    joined = part.join(full, on=KEYS, how="left", suffix="_full")
    for col in ROUTES:
        assert (joined[col] == joined[f"{col}_full"]).all(), col
    for col in ("std_prob", "alt_probs"):
        a = np.log(np.asarray(joined[col].to_list(), dtype=np.float64))
        b = np.log(np.asarray(joined[f"{col}_full"].to_list(), dtype=np.float64))
        assert np.abs(a - b).max() < 1e-4
    report = (run_dir / "report.md").read_text()
    assert (
        f"positions scored per trajectory: 0.25 ({part.height:,} of the {full.height:,}" in report
    )


def _quarter(lengths: pl.DataFrame, budget: str, seed: int) -> pl.DataFrame:
    """(layer, problem_id, sample_idx, position) of the positions `budget` scores."""
    rows = [
        (layer, pid, sample, first + int(i))
        for layer, pid, sample, n, first in lengths.select(*KEYS[:3], "n", "first").iter_rows()
        for i in select_positions(budget, seed, pid, sample, first, n)
    ]
    schema = {
        "layer": pl.Int32,
        "problem_id": pl.String,
        "sample_idx": pl.Int32,
        "position": pl.Int32,
    }
    return pl.DataFrame(rows, schema=schema, orient="row")


@pytest.mark.usefixtures("local_ray")
@pytest.mark.parametrize("budget", ["0.25", "16"])
def test_budgets_of_the_demo_estimate_the_full_runs_bins_and_gains(reference, budget):
    """A budgeted run's rows are the full run's rows at its positions (the test above), so a
    budget is drawn here from the full run's rows: over 20 selection seeds, every bin's mean
    u(S), mean max u(R), gain, win rate, rank and alignment averages to within the full run's
    95% interval. (One seed's estimate varies more than the full run's interval allows on
    trajectories this short: a quarter of ~55 tokens adds within-trajectory sampling noise that
    the full run does not have; the budgeted run's own intervals include it.)"""
    full = score_rows(reference)
    lengths = full.group_by("layer", "problem_id", "sample_idx").agg(
        pl.len().alias("n"), pl.col("position").min().alias("first")
    )
    rows = full.join(lengths.select(*KEYS[:3], pl.col("n").alias("completion_tokens")), on=KEYS[:3])
    rows = rows.with_columns(pl.col("completion_tokens").cast(pl.Int32))
    cfg = AnalysisConfig(bootstrap=0)
    means = ["mean_u_std", "mean_max_alt", "gain_pp", "win_rate", "mean_rank", "alignment"]
    estimates = []
    for seed in range(20):
        sample = rows.join(_quarter(lengths, budget, seed), on=KEYS)
        by_bin = summarise(aggregate(sample.lazy(), cfg).collect(), cfg)["by_bin"]
        estimates.append(by_bin.select("layer", "bin", *means))
    average = pl.concat(estimates).group_by("layer", "bin").agg(pl.col(means).mean())
    intervals = pl.read_parquet(reference / "tables" / "by_bin.parquet")
    checked = 0
    for row in average.join(intervals, on=["layer", "bin"], suffix="_full").iter_rows(named=True):
        for mean in means:
            # the full run's trajectory-resampled interval: a budget samples within trajectories
            lo, hi = row[f"{mean}_lo_trajectory"], row[f"{mean}_hi_trajectory"]
            if lo is not None and row[mean] is not None:
                assert lo <= row[mean] <= hi, (row["layer"], row["bin"], mean, row[mean], lo, hi)
                checked += 1
    assert checked >= 60
