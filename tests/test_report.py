"""The report is regenerated from the complete shards alone: tables, figures, report.md, CLI."""

from __future__ import annotations

import subprocess
import sys

import polars as pl
import pyarrow as pa
import pytest
from test_metrics import ROWS, score_table, write_run

from analysis.metrics import AnalysisConfig
from analysis.report import Report, build_report, main
from workers.io import write_arrow

PNG = b"\x89PNG\r\n\x1a\n"
CONFIG_YAML = """\
run_id: demo-1234
model: {name: tiny, hf_id: bundled, num_layers: 4, moe_layers: [0, 1, 2, 3]}
dataset: {name: demo}
scoring: {alternatives: 3, pool: 8, temperature: 1.0, sampler: gumbel, seed: 7, layers: [early, final], verified_only: true}
generation: {seed: 0}
sweep: {name: none, models: [], datasets: [], layers: []}
wandb: {mode: online, api_key: sk-live-DO-NOT-PRINT}
"""


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "runs" / "demo-1234"
    # Two jobs: layer 0 with all six hand rows over two shards, layer 3 with rows E and F.
    names = list(ROWS)
    write_run(
        run,
        {
            ("tiny", 0, "demo", "shard-00000"): score_table([ROWS[n] for n in names[:3]], model="tiny", layer=0, dataset="demo"),
            ("tiny", 0, "demo", "shard-00001"): score_table([ROWS[n] for n in names[3:]], model="tiny", layer=0, dataset="demo"),
            ("tiny", 3, "demo", "shard-00000"): score_table([ROWS["E"], ROWS["F"]], model="tiny", layer=3, dataset="demo"),
        },
    )  # fmt: skip
    # A shard still being written (no sidecar) must be ignored, and never opened.
    (run / "scores" / "tiny" / "layer=3" / "demo" / "shard-00001.arrow").write_bytes(b"partial")
    (run / "config.yaml").write_text(CONFIG_YAML)
    return run


def test_build_report_writes_tables_figures_and_markdown(run_dir):
    report = build_report(run_dir)
    assert isinstance(report, Report) and report.path == run_dir / "report.md"
    # Tables: Parquet and CSV, identical to the frames returned.
    for name in ("by_bin", "overall", "counts", "gain_hist"):
        on_disk = pl.read_parquet(run_dir / "tables" / f"{name}.parquet")
        assert on_disk.equals(report.tables[name]), name
        assert (run_dir / "tables" / f"{name}.csv").stat().st_size > 0
    counts = report.tables["counts"]
    assert counts.select("layer", "tokens", "confident", "ambiguous", "fragile").rows() == [
        (0, 6, 2, 2, 2),
        (3, 2, 1, 0, 1),  # the partial shard of layer 3 contributed nothing
    ]
    # Figures: the four PNGs.
    assert set(report.figures) == {"headline", "gain_hist", "alignment", "win_rate"}
    for path in report.figures.values():
        assert path.parent == run_dir / "figures" and path.read_bytes()[:8] == PNG
    # report.md: figures embedded by relative path, config summary, key numbers, no secrets.
    text = report.path.read_text()
    assert "![headline](figures/headline.png)" in text
    assert "- J (alternatives): 3" in text and "- P (pool): 8" in text and "- models: tiny" in text
    assert "- layers: early, final" in text and "- datasets: demo" in text
    assert "sk-live" not in text and "api_key" not in text
    assert "from 3 complete score shards;" in text
    assert "- 1 missing: scores/tiny/layer=3/demo/shard-00001.arrow" in text
    # The per-bin markdown row of layer 0, fragile: D (u(S) 0.1, gain 30 pp, a win) and E (0.4,
    # -10 pp, no win), each its own trajectory: a resample holds D twice, E twice or one each,
    # so every interval spans exactly from "E twice" to "D twice".
    assert (
        "| tiny | early (L0) | demo | fragile | 2 | 33.3% | 0.250 [0.100, 0.400] "
        "| 0.350 [0.300, 0.400] | 10.0 [-10.0, 30.0] | 50.0% [0.0%, 100.0%] "
        "| 50.0% [0.0%, 100.0%] | 2.25 [1.00, 3.50] | 1.000 [1.000, 1.000] | 1 |" in text
    )
    assert "- layer mapping: tiny: early (L0), tiny: final (L3)" in text
    assert "chance rank of S: 2.5" in text
    assert "## How to read this" in text and "dataset = all" not in text.split("## How")[0]
    # Key numbers in split bins (J = 3: R1 bins, R2 and R3 give the gain): fragile = B (R1
    # .25; gain .75 - .5), D (.2; .4 - .1), E (.3; .2 - .4): 100 x (.25 + .3 - .2) / 3 pp,
    # two wins of three.
    assert "- tiny early (L0), fragile: 3 tokens (50.0%); best gain draw beats S by 11.7 [" in text
    assert "wins on 66.7% [" in text
    assert "## Robustness: bins independent of the gain, repeated draws" in text
    # Fragile under pbar bins: D and E, gains 30 and -10 pp over all draws, 30 and -20 over the
    # gain draws; split bins B, D, E; u(S) bins D, E. Problems p0 (holding D) and p1 (E)
    # resampled: every interval spans "E twice" to "D twice".
    assert (
        "| tiny | early (L0) | fragile | 2 | 10.0 [-10.0, 30.0] | 5.0 [-20.0, 30.0] | 3 | "
        "11.7 [2.5, 30.0] | 2 | 10.0 [-10.0, 30.0] | 1.000 [1.000, 1.000] | 1.000 [1.000, 1.000] "
        "| 0.0% | 4.0 |" in text
    )
    # Layer 0 has no ambiguous token in split bins (B's R1 is .25, C's .9): listed from pbar's.
    assert (
        "| tiny | early (L0) | ambiguous | 2 | 20.0 [15.0, 25.0] | 20.0 [15.0, 25.0] | 0 | – |"
        in text
    )
    # The pbar bins on request: the paper's line.
    text = build_report(run_dir, config=AnalysisConfig(binning="pbar")).path.read_text()
    assert "(strictly: 50.0%)" in text and "fragile: 2 tokens (33.3%)" in text


def test_layers_are_labelled_from_the_runs_own_config_yaml(tmp_path):
    """A sweep's models as the run resolved them: `tiny` with a shape today's conf/model/tiny.yaml
    does not have (4 MoE layers there), and a model with no conf/ file at all."""
    import yaml

    run = tmp_path / "runs" / "sweep-1"
    rows = [ROWS["D"], ROWS["E"]]
    write_run(
        run,
        {
            ("tiny", 1, "demo", "shard-00000"): score_table(rows, model="tiny", layer=1, dataset="demo"),
            ("gone", 4, "demo", "shard-00000"): score_table(rows, model="gone", layer=4, dataset="demo"),
        },
    )  # fmt: skip
    config = yaml.safe_load(CONFIG_YAML)
    config["sweep"] |= {"name": "sweep", "models": ["tiny", "gone"]}
    config["models"] = [
        {"name": "tiny", "hf_id": "bundled", "num_layers": 2, "moe_layers": [0, 1]},
        {"name": "gone", "hf_id": "org/gone", "num_layers": 6, "moe_layers": [1, 2, 4]},
    ]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    text = build_report(run).path.read_text()
    assert (
        "- layer mapping: gone: early (L1), gone: final (L4), tiny: early (L0), tiny: final (L1)"
        in text
    )
    assert "| tiny | final (L1) | demo |" in text and "| gone | final (L4) | demo |" in text


def test_cli_regenerates_with_other_thresholds(run_dir, capsys):
    assert main([str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.md")
    # confident >= 0.95 moves row A (pbar 0.9) from confident to ambiguous.
    assert main([str(run_dir), "--confident", "0.95", "--fragile", "0.5"]) == 0
    by_bin = pl.read_parquet(run_dir / "tables" / "by_bin.parquet")
    layer0 = by_bin.filter((pl.col("layer") == 0) & (pl.col("dataset") == "demo"))
    assert dict(layer0.select("bin", "tokens").rows()) == {
        "confident": 1,
        "ambiguous": 3,
        "fragile": 2,
        "all": 6,
    }
    assert "Confident pbar ≥ 0.95" in (run_dir / "report.md").read_text()
    # --binning picks the headline's bins: u(S) alone puts B (u(S) = .5) in ambiguous.
    assert main([str(run_dir), "--binning", "std"]) == 0
    headline = pl.read_parquet(run_dir / "tables" / "headline.parquet")
    assert (
        headline.filter((pl.col("layer") == 0) & (pl.col("bin") == "ambiguous"))["tokens"][0] == 2
    )
    assert "- headline bins: u(S) alone" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{tmp}/missing"], "does not exist"),
        (["{tmp}"], "no complete score shards"),
        (["{run}", "--confident", "0.4"], "0 < fragile < confident <= 1"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, run_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = [a.format(tmp=empty, run=run_dir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_python_dash_m_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "analysis.report", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: run directory") and proc.stdout == ""


def test_only_complete_shards_are_counted_after_a_sidecar_appears(run_dir):
    # Rerunning after more shards complete picks them up (nothing is cached between runs).
    first = build_report(run_dir, config=AnalysisConfig())
    write_run(run_dir, {("tiny", 3, "demo", "shard-00002"): score_table([ROWS["B"]], model="tiny", layer=3, dataset="demo")})  # fmt: skip
    second = build_report(run_dir)
    tokens = {r[0]: r[1] for r in second.tables["counts"].select("layer", "tokens").rows()}
    assert tokens == {0: 6, 3: 3} and first.tables["counts"]["tokens"].to_list() == [6, 2]


def test_tables_are_bitwise_identical_whatever_the_order_the_shards_are_summed_in(tmp_path):
    """Resumed and uninterrupted runs must give identical tables: float sums would depend on
    the order batches are added in, so the sums are fixed-point integers."""
    from analysis.bench import write_sample_run
    from analysis.metrics import collect_stats
    from analysis.tables import summarise

    cfg = AnalysisConfig()
    paths = write_sample_run(
        tmp_path, models=("m",), layers=(0,), datasets=("d",), rows=6_000, shards=6
    )
    forward = summarise(collect_stats(paths, cfg), cfg)
    backward = summarise(collect_stats(paths[::-1], cfg), cfg)
    for name, frame in forward.items():
        assert frame.equals(backward[name]), name
    # Sums that match the plain float mean to far below the float32 resolution of the inputs.
    u = pl.concat([pl.read_ipc(p) for p in paths])["std_prob"].cast(pl.Float64)
    row = forward["by_bin"].filter(pl.col("bin") == "all", pl.col("dataset") == "d")
    assert abs(row["mean_u_std"][0] - u.mean()) < 1e-9


def test_gain_histogram_draws_empty_buckets_empty_and_fits_the_x_range():
    import math

    from analysis.figures import bucket_edges, bucket_shares

    # One fragile token in bucket 70 ([40, 42) pp), three in bucket 49 ([-2, 0) pp): the buckets
    # in between hold nothing and must not be drawn as a plateau.
    hist = pl.DataFrame(
        {"gain_bucket": [49, 70], "tokens": [3, 1], "lo_pp": [-2.0, 40.0], "hi_pp": [0.0, 42.0]}
    )
    edges, lo, hi = bucket_edges(hist)
    assert len(edges) == 101 and edges[0] == -100 and edges[49] == -2.0 and edges[70] == 40.0
    assert (lo, hi) == (-4.0, 44.0)  # the filled buckets and one bucket of margin
    share = bucket_shares(hist, 100)
    assert share[49] == 0.75 and share[70] == 0.25
    assert all(math.isnan(v) for i, v in enumerate(share) if i not in (49, 70))


def test_report_has_the_distribution_section_and_notes_old_score_files(run_dir):
    text = build_report(run_dir).path.read_text()
    section = text.split("## Beyond the realized token")[1].split("\n## ")[0]
    assert "KL best" in section and "written before" not in section
    assert "## Verified against unverified" not in text  # every scored row is verified
    # a score file written before the distribution columns: left out, and said so
    old = run_dir / "scores" / "tiny" / "layer=3" / "demo" / "shard-00000.arrow"
    with pa.OSFile(str(old)) as f:
        table = pa.ipc.open_file(f).read_all()
    columns = ["std_argmax", "alt_kl", "alt_argmax_changed", "verified"]
    write_arrow(table.drop_columns(columns), old, config_hash="test")
    report = build_report(run_dir)
    text = report.path.read_text()
    assert "1 of 3 score files were written before" in text
    assert set(report.tables["divergence"]["layer"]) == {0}


def test_report_splits_verified_and_unverified_trajectories(tmp_path):
    run = tmp_path / "runs" / "mixed"
    rows = [ROWS[n] for n in ROWS]
    table = score_table(rows, model="tiny", layer=0, dataset="demo")
    flags = pl.Series("verified", [i % 2 == 0 for i in range(len(rows))])
    table = pl.from_arrow(table).with_columns(flags).to_arrow()
    write_run(run, {("tiny", 0, "demo", "shard-00000"): table})
    report = build_report(run, config=AnalysisConfig(bootstrap=20))
    assert "## Verified against unverified trajectories" in report.path.read_text()
    split = report.tables["by_verified"].filter(pl.col("bin") == "all")
    assert dict(zip(split["verified"], split["tokens"], strict=True)) == {
        "verified": 3,
        "unverified": 3,
    }
