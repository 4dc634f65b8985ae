"""The win margin follows the scoring dtype unless it is set, is recorded in the tables and the
report, and the bf16 default lies above bf16's measured deviation from float32."""

from __future__ import annotations

import polars as pl
import pytest
from test_metrics import score_table

from analysis.metrics import WIN_MARGINS, AnalysisConfig, resolve_margin
from analysis.report import build_report, main
from workers.io import write_arrow

# u(S) = 0.50, best alternative 0.52: a 2 pp gain, a win at float32's margin, not at bf16's.
ROW = ([0.5, 0.52, 0.3], [-1.0, -2.0, -3.0])


def _run(tmp_path, dtype: str | None):
    run = tmp_path / "runs" / f"r-{dtype}"
    path = run / "scores" / "m" / "layer=3" / "d" / "shard-00000.arrow"
    extra = {} if dtype is None else {"score_config": {"dtype": dtype, "alternatives": 2}}
    write_arrow(score_table([ROW]), path, config_hash="test", extra=extra)
    return run


def _all_row(report):
    frame = report.tables["by_bin"].filter(pl.col("bin") == "all")
    assert frame.height == 1
    return frame.row(0, named=True)


@pytest.mark.parametrize(
    "dtype, margin, wins",
    [("bfloat16", WIN_MARGINS["bfloat16"], 0.0), ("float32", 1e-4, 1.0), (None, 1e-4, 1.0)],
)
def test_the_default_margin_follows_the_scores_dtype(tmp_path, dtype, margin, wins):
    report = build_report(_run(tmp_path, dtype))
    row = _all_row(report)
    assert row["win_margin"] == margin and row["win_rate"] == wins
    assert row["scoring_dtype"] == (dtype or "float32")
    assert report.tables["overall"]["win_margin"].to_list() == [margin]
    text = report.path.read_text()
    assert f"- win margin: {margin:g} (default for {dtype or 'float32'} scores)" in text
    on_disk = pl.read_csv(report.path.parent / "tables" / "by_bin.csv")
    assert set(on_disk["win_margin"].to_list()) == {margin}


def test_an_explicit_margin_overrides_the_dtype_default(tmp_path):
    run = _run(tmp_path, "bfloat16")
    report = build_report(run, config=AnalysisConfig(win_margin=1e-3))
    row = _all_row(report)
    assert (row["win_margin"], row["win_rate"], row["scoring_dtype"]) == (1e-3, 1.0, "bfloat16")
    assert "- win margin: 0.001 (set)" in report.path.read_text()
    assert main([str(run), "--win-margin", "0.05", "--bootstrap", "0"]) == 0
    assert pl.read_parquet(run / "tables" / "by_bin.parquet")["win_margin"].unique().to_list() == [
        0.05
    ]


def test_a_run_mixing_dtypes_takes_the_larger_margin(tmp_path):
    paths = [next(_run(tmp_path / d, d).rglob("*.arrow")) for d in ("float32", "bfloat16")]
    assert resolve_margin(AnalysisConfig(), paths).win_margin == WIN_MARGINS["bfloat16"]
    assert resolve_margin(AnalysisConfig(), paths[:1]).win_margin == WIN_MARGINS["float32"]


def test_bf16_deviation_from_float32_stays_below_the_bf16_margin():
    """A real bf16 scoring of a tiny family against float32 brute force (tools.dtype_margin):
    the tokens' gain deviation, 99th percentile, is under the bf16 margin, while it is far
    above float32's margin (which is why bf16 needs its own)."""
    from moe_factories import make_model, make_trajectories, single_thread

    from tools.dtype_margin import measure

    table = make_trajectories(lengths=(30,), prompt_lens=(6,))
    with single_thread():
        d = measure(make_model("deepseek_v2"), "early", table, alternatives=16)
    assert d.du.numel() == 24 * 17
    assert d.dgain.quantile(0.99).item() < WIN_MARGINS["bfloat16"]
    assert d.dgain.max().item() > 10 * WIN_MARGINS["float32"]
    assert d.false_wins(WIN_MARGINS["bfloat16"], WIN_MARGINS["float32"]) == 0.0
