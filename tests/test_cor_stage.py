"""The CoR evaluation: config, the paired table, the paper's dry run, and real runs on the bundled
model that resume (a rerun computes nothing; a killed driver's rerun does only what is missing,
to the same files)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import numpy as np
import polars as pl
import pytest
from hydra import compose, initialize_config_dir
from pipeline_runs import ROOT, cli_command, copy_run, run_inprocess, stage_counts

from analysis.cor_eval import evaluation_table, paired_interval
from orchestrator import config as C
from workers.io import is_complete

C.register_configs()
SMALL_COR = (
    "cor=demo",
    "cor.problems_limit=6",
    "cor.questions_per_unit=3",
    "cor.bootstrap_draws=200",
)


def make(*overrides: str) -> C.RunConfig:
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        return C.to_run_config(compose("config", overrides=list(overrides)))


@pytest.mark.parametrize("option", ["none", "demo", "paper"])
def test_every_cor_option_composes_and_validates(option):
    cfg = make(f"cor={option}", "dry_run=true", *(["sweep=paper"] if option == "paper" else []))
    assert isinstance(cfg.cor, C.CorConfig)
    assert cfg.cor.enabled == (option != "none")
    assert cfg.scoring.cei == (option != "none")  # the plan needs the run's CEI tables
    C.validate(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cor.datasets=[demo]", "is a demo set"),
        ("cor.datasets=[]", "must name"),
        ("cor.conditions=[cor]", "standard among them"),
        ("cor.conditions=[standard,best]", "cor.conditions"),
        ("cor.mc_template='{question} {answer}'", "cor.mc_template"),
        ("cor.questions_per_unit=0", "cor.questions_per_unit"),
        ("cor.calibration=math500", "not a dataset of this run"),
        ("cor.models=[qwen3-30b-a3b]", "not models of this run"),
        ("+cor.plan.shift=0", "cor.plan"),
        ("+cor.plan.moved=2", "cor.plan"),
    ],
)
def test_bad_cor_values_are_config_errors(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.validate(make("cor=demo", override))


def test_a_bad_question_file_is_one_error_line_before_ray(tmp_path):
    bad = tmp_path / "trivia.jsonl"
    bad.write_text('{"question": "Where?", "question_id": "q1", "answer": "Mars"}\n')
    override = f"+cor.paths.cor_demo_trivia_qa={bad}"
    assert make("cor=demo", override).cor.paths == {"cor_demo_trivia_qa": str(bad)}
    result = subprocess.run(
        cli_command(tmp_path / "runs", "bad", "cor=demo", override),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (
        "error: dataset cor_demo_trivia_qa: trivia_qa question 'q1': answer must be an object"
        " with a string `value`"
    )
    assert not (tmp_path / "runs" / "bad" / "trajectories").exists()  # stopped before Ray
    with pytest.raises(C.ConfigError, match="cor.paths names"):
        C.validate(make("cor=demo", f"+cor.paths.demo={bad}"))


def test_the_paired_interval_resamples_questions_jointly():
    # Standard varies a lot across questions; the condition is standard + 0.1 on every one:
    # paired, the difference is exactly 0.1 in every resample.
    rng = np.random.default_rng(0)
    standard = rng.uniform(0, 1, 50)
    frame = pl.DataFrame(
        {
            "condition": ["standard"] * 50 + ["cor"] * 50,
            "problem_id": [f"q{i}" for i in range(50)] * 2,
            "dataset": ["tq"] * 100,
            "mc1": [None] * 100,
            "mc2": [*standard, *(standard + 0.1)],
            "em": [None] * 100,
        },
        schema_overrides={"mc1": pl.Float64, "em": pl.Float64},
    )
    # rows of one condition in another order: pairing goes by question id
    frame = pl.concat([frame.head(50), frame.tail(50).reverse()])
    table = evaluation_table(frame, draws=500, seed=0, active={"standard": 16.0, "cor": 16.0})
    assert table["metric"].to_list() == ["mc2", "mc2"]
    cor = table.filter(pl.col("condition") == "cor").row(0, named=True)
    assert cor["diff"] == pytest.approx(0.1)
    assert cor["diff_lo"] == pytest.approx(0.1) and cor["diff_hi"] == pytest.approx(0.1)
    assert cor["active"] == 16.0 and cor["n"] == 50
    std = table.filter(pl.col("condition") == "standard").row(0, named=True)
    assert std["diff"] is None and std["mean"] == pytest.approx(standard.mean())
    # a noisy difference: the interval holds the mean and is seeded
    d, lo, hi = paired_interval(standard, np.zeros(50), 500, [0, 1], 0.95)
    assert lo < d < hi and (d, lo, hi) == paired_interval(standard, np.zeros(50), 500, [0, 1], 0.95)


def test_the_paper_dry_run_prints_the_units_and_their_cost():
    from orchestrator.cor_stage import describe_cor_plan

    text = describe_cor_plan(make("sweep=paper", "cor=paper", "dry_run=true"))
    assert "truthful_qa (817 questions), trivia_qa (17,944 questions)" in text
    assert "qwen3-30b-a3b      8         48  4 x 75 = 300" in text
    assert "CoR evaluation GPU-hours" in text and "total: cor" in text
    assert "qwen3-30b-a3b    truthful_qa x 4" in text


def cor_files(run_dir):
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted((run_dir / "cor").rglob("*.arrow"))
    }


@pytest.fixture(scope="module")
def cor_run(tmp_path_factory, local_ray):
    runs = tmp_path_factory.mktemp("cor") / "runs"
    code = run_inprocess(runs, "cor", *SMALL_COR)
    return runs / "cor", code


def test_demo_evaluation_runs_end_to_end_and_a_rerun_computes_nothing(cor_run, capsys):
    run_dir, code = cor_run
    assert code == 0
    root = run_dir / "cor" / "tiny"
    table = pl.read_csv(root / "tables" / "eval.csv")
    conditions = ["standard", "cor", "random", "static_k1"]
    assert table["condition"].unique(maintain_order=True).to_list() == conditions
    assert set(table["metric"]) == {"mc1", "mc2", "em"} and set(table["n"]) == {6}
    others = table.filter(pl.col("condition") != "standard")
    assert (others["diff_lo"] <= others["diff"]).all() and (
        others["diff"] <= others["diff_hi"]
    ).all()
    # the budget: the plan and its random control run k x layers experts a token, k+1 more
    active = dict(table.select("condition", "active").unique().rows())
    assert active["standard"] == active["cor"] == active["random"] == 16.0
    assert active["static_k1"] == 20.0
    assert {"layers.csv", "experts.csv"} <= {p.name for p in (root / "tables").iterdir()}
    report = (run_dir / "report.md").read_text()
    assert "## CoR evaluation: tiny" in report and "### Plans" in report
    assert report.count("# CoR evaluation\n") == 1
    before = (cor_files(run_dir), (root / "tables" / "eval.csv").read_bytes())
    assert len(before[0]) == 4 * 2 * 2  # conditions x datasets x shards of 3
    assert run_inprocess(run_dir.parent, "cor", *SMALL_COR) == 0
    counts = stage_counts(capsys.readouterr().err)
    assert counts["cor_eval"]["computed"] == 0 and counts["cor_eval"]["skipped"] == 16
    assert (cor_files(run_dir), (root / "tables" / "eval.csv").read_bytes()) == before
    assert (run_dir / "report.md").read_text().count("# CoR evaluation\n") == 1


@pytest.mark.slow
def test_a_killed_driver_resumes_the_evaluation_to_the_same_files(cor_run, tmp_path):
    reference, _ = cor_run
    parts = ("problems", "trajectories", "scores", "cei")
    run_dir = copy_run(reference, tmp_path, "k", *parts)
    driver = subprocess.Popen(
        cli_command(tmp_path, "k", *SMALL_COR),
        cwd=ROOT,  # the demo sets' paths are relative to the repository, as the README runs it
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its Ray processes share the group: cleaned up below
    )
    try:
        deadline = time.monotonic() + 240
        while not list((run_dir / "cor").rglob("*.done.json")):
            if driver.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no unit finished: {driver.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):  # the local Ray it started, if alive
            os.killpg(driver.pid, signal.SIGKILL)
    time.sleep(3)  # an actor inside a unit may still finish it (atomically)
    done = [p for p in (run_dir / "cor").rglob("*.arrow") if is_complete(p)]
    assert 1 <= len(done) < 16, "the driver was not killed mid-evaluation"
    result = subprocess.run(
        cli_command(tmp_path, "k", *SMALL_COR),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    counts = stage_counts(result.stderr)
    assert counts["cei"]["computed"] == 0
    assert counts["cor_eval"]["skipped"] >= len(done) and counts["cor_eval"]["failed"] == 0
    assert cor_files(run_dir) == cor_files(reference)
    name = "cor/tiny/tables/eval.csv"
    assert (run_dir / name).read_bytes() == (reference / name).read_bytes()
