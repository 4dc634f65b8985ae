"""Problem loaders on fixture files written in each source's real column layout."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from workers.generation.datasets import SPECS, gpqa_permutation, load_problems
from workers.schemas import PROBLEMS_SCHEMA

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]
GOLDEN_PERMUTATION = [1, 0, 2, 3]


def _meta(table: pa.Table) -> list[dict]:
    return [json.loads(m) for m in table.column("metadata").to_pylist()]


def test_math500_from_jsonl():
    table = load_problems("math500", path=FIXTURES / "math500.jsonl")
    assert table.schema == PROBLEMS_SCHEMA
    assert table.column("problem_id").to_pylist() == [
        "math500-test/prealgebra/9001.json",
        "math500-test/algebra/9002.json",
        "math500-test/precalculus/9003.json",
    ]
    assert set(table.column("dataset").to_pylist()) == {"math500"}
    assert table.column("gold_answer").to_pylist()[0] == "\\frac{1}{2}"
    assert table.column("prompt").to_pylist()[1].startswith("Find all real $x$")
    assert "boxed" not in table.column("prompt").to_pylist()[0]  # question only, no instruction
    meta = _meta(table)[2]
    assert meta["subject"] == "Precalculus" and meta["level"] == 2
    assert meta["unique_id"] == "test/precalculus/9003.json"


def test_aime2024_from_parquet():
    table = load_problems("aime2024", path=FIXTURES / "aime2024.parquet")
    assert table.schema == PROBLEMS_SCHEMA
    assert table.column("problem_id").to_pylist() == ["aime2024-60", "aime2024-61", "aime2024-62"]
    assert table.column("gold_answer").to_pylist() == ["024", "24", "7"]
    assert _meta(table)[0]["year"] == "2024"


@pytest.mark.parametrize(
    ("name", "filename", "golds"),
    [
        ("aime2025", "aime2025.jsonl", ["76", "17", "125"]),
        ("hmmt_feb_2025", "hmmt_feb_2025.json", ["9", "10", "6\\pi"]),
    ],
)
def test_matharena_sources(name, filename, golds):
    table = load_problems(name, path=FIXTURES / filename)
    assert table.schema == PROBLEMS_SCHEMA
    assert table.column("problem_id").to_pylist() == [f"{name}-{i}" for i in (1, 2, 3)]
    assert table.column("gold_answer").to_pylist() == golds
    assert _meta(table)[0]["problem_type"]


def test_gpqa_from_csv_shuffles_options_and_keeps_gold():
    table = load_problems("gpqa_diamond", path=FIXTURES / "gpqa_diamond.csv", seed=0)
    assert table.schema == PROBLEMS_SCHEMA
    ids = table.column("problem_id").to_pylist()
    assert ids[0] == "gpqa_diamond-recTestPhys0000001"
    correct = ["hbar w", "Hemiacetal", "4"]
    for row, meta, answer in zip(table.to_pylist(), _meta(table), correct, strict=True):
        prompt, gold = row["prompt"], row["gold_answer"]
        assert gold in "ABCD"
        lines = prompt.split("\n")
        options = {line[0]: line[3:] for line in lines[-4:]}
        assert list(options) == list("ABCD")
        assert options[gold] == answer  # the gold letter labels the correct answer
        assert sorted(meta["permutation"]) == [0, 1, 2, 3]
        assert meta["permutation"]["ABCD".index(gold)] == 0
        assert meta["permutation"] == gpqa_permutation(meta["record_id"], 0)
    # Multi-line question kept; trailing whitespace of the option stripped.
    assert "energy levels?" in table.column("prompt").to_pylist()[0]
    assert "hbar w^2\n" not in table.column("prompt").to_pylist()[0]


def test_gpqa_permutation_is_seeded_and_stable():
    # Fixed values: the order must not change across machines, runs or Python versions
    # (sorted by sha256(f"{seed}:{record_id}:{j}"); recomputed by hand with hashlib).
    assert gpqa_permutation("recTestPhys0000001", 0) == GOLDEN_PERMUTATION
    golden = {seed: [gpqa_permutation(f"rec{i}", seed) for i in range(8)] for seed in (0, 1)}
    assert golden == {
        0: [[2, 1, 3, 0], [0, 1, 2, 3], [2, 1, 0, 3], [2, 1, 3, 0],
            [1, 2, 0, 3], [2, 1, 3, 0], [1, 3, 2, 0], [1, 3, 2, 0]],
        1: [[1, 3, 2, 0], [1, 0, 2, 3], [3, 0, 2, 1], [3, 2, 0, 1],
            [1, 0, 2, 3], [2, 1, 3, 0], [0, 1, 2, 3], [1, 0, 2, 3]],
    }  # fmt: skip
    code = "from workers.generation.datasets import gpqa_permutation as g; print([g(f'rec{i}', 0) for i in range(8)])"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, check=True
    )
    assert json.loads(out.stdout) == golden[0]
    a = load_problems("gpqa_diamond", path=FIXTURES / "gpqa_diamond.csv", seed=0)
    b = load_problems("gpqa_diamond", path=FIXTURES / "gpqa_diamond.csv", seed=0)
    c = load_problems("gpqa_diamond", path=FIXTURES / "gpqa_diamond.csv", seed=7)
    assert a.equals(b)
    assert a.column("prompt").to_pylist() != c.column("prompt").to_pylist()


def test_limit_takes_first_rows_in_file_order():
    full = load_problems("math500", path=FIXTURES / "math500.jsonl")
    two = load_problems("math500", path=FIXTURES / "math500.jsonl", limit=2)
    assert two.num_rows == 2
    assert two.equals(full.slice(0, 2))
    assert load_problems("math500", path=FIXTURES / "math500.jsonl", limit=0).num_rows == 0


def test_demo_delegates_to_demo_task():
    from workers.generation import demo_task

    table = load_problems("demo", seed=3, n=5, difficulty=1)
    assert table.schema == PROBLEMS_SCHEMA
    assert table.equals(demo_task.make_problems(5, 3, difficulty=1))
    assert load_problems("demo", seed=3, n=5, limit=2).num_rows == 2


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="valid names: demo, math500, aime2024"):
        load_problems("math5000")
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_problems("math500", path=missing)
    bad = tmp_path / "x.txt"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="unsupported dataset file"):
        load_problems("math500", path=bad)
    with pytest.raises(ValueError, match="lacks columns"):
        load_problems("math500", path=FIXTURES / "aime2025.jsonl")
    with pytest.raises(ValueError, match="unknown options"):
        load_problems("math500", path=FIXTURES / "math500.jsonl", shuffle=True)
    assert set(SPECS) == {
        "demo",
        "math500",
        "aime2024",
        "aime2025",
        "hmmt_feb_2025",
        "gpqa_diamond",
        "truthful_qa",
        "trivia_qa",
    }


def _write_records(path, records):
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


MATH_ROW = {"problem": "1+1?", "answer": "2", "subject": "a", "level": 1, "unique_id": "u/1.json"}


@pytest.mark.parametrize(
    "name, records, message",
    [
        ("rows.jsonl", [MATH_ROW, {k: v for k, v in MATH_ROW.items() if k != "answer"}],
         "row 2 lacks columns ['answer']"),
        ("numbers.json", [1, 2, 3], "row 1 is int, not an object"),
        ("list_prompt.parquet", [{**MATH_ROW, "problem": [1, 2]}],
         "row 1 column 'problem' is [1, 2] (list), not a string"),
        ("null_answer.jsonl", [MATH_ROW, {**MATH_ROW, "answer": None, "unique_id": "u/2"}],
         "row 2 column 'answer' is None (NoneType), not a string or an integer"),
        ("bool_answer.json", [{**MATH_ROW, "answer": True}], "column 'answer' is True (bool)"),
    ],
)  # fmt: skip
def test_malformed_rows_are_refused_naming_the_row(tmp_path, name, records, message):
    path = _write_records(tmp_path / name, records)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_problems("math500", path=path)


def test_a_jsonl_line_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MATH_ROW) + "\n{oops\n")
    with pytest.raises(ValueError, match="bad.jsonl: line 2 is not JSON"):
        load_problems("math500", path=path)


def test_unreachable_hub_says_to_pass_a_local_path():
    # Offline mode makes `datasets` fail at once instead of retrying for ~30 s.
    code = (
        "from workers.generation.datasets import load_problems\n"
        "try:\n    load_problems('aime2024')\n"
        "except RuntimeError as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert "HuggingFaceH4/aime_2024" in out.stdout
    assert "dataset.path=" in out.stdout


BLANKS = ["", " ", "\n\t  ", "\u3000\u2003", "\r\n"]


@pytest.mark.parametrize("blank", BLANKS)
@pytest.mark.parametrize("name", ["rows.jsonl", "rows.parquet", "rows.json"])
def test_a_blank_question_is_refused_naming_the_row(tmp_path, name, blank):
    records = [MATH_ROW, {**MATH_ROW, "problem": blank, "unique_id": "u/blank"}]
    path = _write_records(tmp_path / name, records)
    with pytest.raises(ValueError, match=r"row 2 \(problem 'math500-u/blank'\) has an empty q"):
        load_problems("math500", path=path)


def test_blank_questions_are_skipped_and_listed_when_asked(tmp_path):
    records = [{**MATH_ROW, "unique_id": f"u/{i}"} for i in range(6)]
    for i, blank in zip((1, 4), BLANKS[1:], strict=False):
        records[i] = {**records[i], "problem": blank}
    path = _write_records(tmp_path / "rows.jsonl", records)
    skipped = []
    table = load_problems("math500", path=path, skipped=skipped)
    assert table.column("problem_id").to_pylist() == [f"math500-u/{i}" for i in (0, 2, 3, 5)]
    assert skipped == [
        {"row": 2, "problem_id": "math500-u/1", "reason": "empty_prompt"},
        {"row": 5, "problem_id": "math500-u/4", "reason": "empty_prompt"},
    ]
    # `limit` counts source rows: the blank second row is among the first two.
    assert load_problems("math500", path=path, limit=2, skipped=[]).num_rows == 1
