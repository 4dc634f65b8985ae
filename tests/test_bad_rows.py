"""Rows that cannot be prompted: refused before Ray with one line naming the row, or skipped
and counted under `dataset.skip_bad_rows`; never a failed generation unit."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from hydra import compose, initialize_config_dir

from orchestrator import config as C
from orchestrator.__main__ import run
from orchestrator.errors import PipelineError
from orchestrator.problems import prepare_problems
from workers.io import read_arrow, read_sidecar

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent
# The bundled tiny model holds 256 positions; its tokenizer makes one token of each word.
TOO_LONG = " ".join(["what"] * 300)
C.register_configs()


def math_rows(tmp_path: Path, *problems: str) -> Path:
    """A math500 file of `problems`, with ids u/1, u/2, ..."""
    base = json.loads((FIXTURES / "math500.jsonl").read_text().splitlines()[0])
    rows = [{**base, "problem": p, "unique_id": f"u/{i}"} for i, p in enumerate(problems, 1)]
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def typed(tmp_path: Path, data: Path, *overrides: str) -> C.RunConfig:
    args = ["dataset=math500", f"dataset.path={data}", f"runs_dir={tmp_path}", *overrides]
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        return C.to_run_config(compose("config", overrides=args), args)


GOOD = "What is $1+1$?"


@pytest.mark.parametrize(
    ("problems", "overrides", "message"),
    [
        (["", GOOD], [], "row 1 (problem 'math500-u/1') has an empty q"),
        ([GOOD, " \n\t"], [], "row 2 (problem 'math500-u/2') has an empty q"),
        (
            [GOOD, GOOD, TOO_LONG],
            [],
            "row 3 (problem 'math500-u/3'): its prompt leaves no room to"
            " generate in the model's context of 256 tokens for model tiny",
        ),
        (
            [GOOD, " ".join(["what"] * 64)],  # the tiny model's template has no instruction
            ["generation=vllm", "model.engine.max_model_len=64"],
            "row 2 (problem 'math500-u/2'): its prompt leaves no room to"
            " generate in the model's context of 64 tokens",
        ),
    ],
)
def test_a_row_that_cannot_be_prompted_is_refused_before_anything_is_written(
    tmp_path, problems, overrides, message
):
    cfg = typed(tmp_path, math_rows(tmp_path, *problems), *overrides)
    with pytest.raises(PipelineError, match="^dataset math500: .*" + re.escape(message)):
        prepare_problems(cfg, tmp_path / "run")
    assert not list(tmp_path.rglob("*.done.json"))


def test_skip_bad_rows_leaves_blank_rows_out_and_lists_them(tmp_path, capsys):
    data = math_rows(tmp_path, GOOD, "", TOO_LONG, "  ", GOOD)
    cfg = typed(tmp_path, data, "dataset.skip_bad_rows=true")
    problems = prepare_problems(cfg, tmp_path / "run")
    path = tmp_path / "run" / "problems" / "math500.arrow"
    ids = read_arrow(path).column("problem_id").to_pylist()
    assert problems["math500"][0] == len(ids) == 3
    # The too-long row stays: its generator records it, per model, as "prompt_too_long".
    assert ids == ["math500-u/1", "math500-u/3", "math500-u/5"]
    assert [(s["row"], s["reason"]) for s in read_sidecar(path)["skipped_rows"]] == [
        (2, "empty_prompt"),
        (4, "empty_prompt"),
    ]
    assert "skipped 2 rows that cannot be prompted" in capsys.readouterr().err
    # Without the flag the same data is refused: the flag is part of the problems' hash.
    with pytest.raises(PipelineError, match="row 2 .* has an empty question"):
        prepare_problems(typed(tmp_path, data), tmp_path / "run")


def test_the_command_line_says_one_line_and_exits_2_before_ray(tmp_path):
    data = math_rows(tmp_path, GOOD, GOOD, "\n")
    runs = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "dataset=math500", f"dataset.path={data}",
         f"runs_dir={runs}", "run_id=bad", "wandb=disabled"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: dataset math500: "), lines
    assert "row 3 (problem 'math500-u/3') has an empty question" in lines[0]
    assert not list(runs.rglob("*.done.json")) and not (runs / "bad" / "trajectories").exists()


@pytest.mark.usefixtures("local_ray")
def test_a_run_with_skip_bad_rows_completes_and_its_report_counts_them(tmp_path):
    data = math_rows(tmp_path, GOOD, "", TOO_LONG, GOOD, GOOD)
    args = [
        "dataset=math500",
        f"dataset.path={data}",
        "dataset.skip_bad_rows=true",
        f"runs_dir={tmp_path / 'runs'}",
        "run_id=skip",
        "wandb=disabled",
        "model.max_tokens=4",
        "generation.samples_per_problem=1",
        "scoring.verified_only=false",
        "scoring.layers=[early]",
        "scoring.alternatives=4",
        "scoring.pool=8",
    ]
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        dcfg = compose("config", overrides=args)
    assert run(dcfg, overrides=args) == 0
    run_dir = tmp_path / "runs" / "skip"
    generated = pl.read_ipc(run_dir / "trajectories/tiny/math500/generated/00000.arrow")
    too_long = generated.filter(pl.col("problem_id") == "math500-u/3")
    assert too_long["verify_reason"].to_list() == ["prompt_too_long"]
    assert not (run_dir / "failures.jsonl").exists()
    table = pl.read_parquet(run_dir / "tables" / "generation.parquet").row(0, named=True)
    assert table["samples"] == 4 and table["skipped_rows"] == 1
    assert "prompt_too_long: 1" in table["finish_reasons"]
    report = (run_dir / "report.md").read_text()
    assert "skipped rows" in report and "prompt_too_long: 1" in report
    # Scored: the three rows that were prompted, not the one without tokens.
    scored = pl.concat([pl.read_ipc(p) for p in (run_dir / "scores").rglob("*.arrow")])
    assert scored["problem_id"].n_unique() == 3
    assert "math500-u/3" not in scored["problem_id"].to_list()
