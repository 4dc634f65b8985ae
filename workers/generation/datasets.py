"""Benchmark problems as one Arrow table per data set.

Contract: `load_problems(name, *, path=None, limit=None, seed=0, skipped=None, **options) ->
pa.Table` in `PROBLEMS_SCHEMA` (problem_id, dataset, prompt, gold_answer, metadata JSON).
`prompt` is the question only; the instruction and chat template are added by
`workers.generation.prompts`. A row whose question is empty or only whitespace cannot be prompted: a
ValueError naming it (source, row number, problem id), or, when a `skipped` list is given,
left out and recorded there as {"row", "problem_id", "reason": "empty_prompt"}.

Sources: the Hugging Face dataset named in SPECS (read with the `datasets` library), or a local
file in the same column layout when `path` is given (.parquet, .jsonl, .json, or .csv for
GPQA's original csv). Rows keep the source file's order, so `limit=N` takes the same first N
problems on every run. `problem_id` is stable per source ("math500-<unique_id>",
"aime2024-<id>", "aime2025-<problem_idx>", "gpqa_diamond-<Record ID>", ...).

GPQA options are shuffled per problem from sha256(seed, Record ID), so the order is the same on
every machine and Python run; the gold answer is the correct option's letter and `metadata`
records the permutation (`permutation[k]` = source option shown as letter k, where source
option 0 is "Correct Answer" and 1-3 are "Incorrect Answer 1-3").

"truthful_qa" (the hub's "multiple_choice" layout) and "trivia_qa" ("rc.nocontext") are read
only by the CoR evaluation (workers.generation.cor_eval): their answers go to `metadata`
(mc1/mc2 choices and 0/1 labels, checked: one true mc1 choice, at least one true mc2 choice;
TriviaQA's normalized aliases), ids are "truthful_qa-<sha256 of the question>[:16]" and
"trivia_qa-<question_id>".
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from workers.generation.prompts import CHOICE_INSTRUCTION, MATH_INSTRUCTION
from workers.schemas import PROBLEMS_SCHEMA

LETTERS = "ABCD"
DEMO_DEFAULTS = {"n": 32, "difficulty": 1, "split": "eval"}


@dataclass(frozen=True)
class DatasetSpec:
    """Where a data set lives on the hub, which columns it needs, how answers are checked."""

    hf_id: str
    split: str
    columns: tuple[str, ...]
    verifier: str  # a workers.generation.verify kind
    instruction: str
    config: str | None = None
    objects: tuple[str, ...] = ()  # columns holding objects, checked by the layout's converter


SPECS: dict[str, DatasetSpec] = {
    "demo": DatasetSpec("", "", (), "exact", ""),
    "math500": DatasetSpec(
        "HuggingFaceH4/MATH-500",
        "test",
        ("problem", "answer", "subject", "level", "unique_id"),
        "math",
        MATH_INSTRUCTION,
    ),
    "aime2024": DatasetSpec(
        "HuggingFaceH4/aime_2024", "train", ("id", "problem", "answer"), "math", MATH_INSTRUCTION
    ),
    "aime2025": DatasetSpec(
        "MathArena/aime_2025",
        "train",
        ("problem_idx", "problem", "answer"),
        "math",
        MATH_INSTRUCTION,
    ),
    "hmmt_feb_2025": DatasetSpec(
        "MathArena/hmmt_feb_2025",
        "train",
        ("problem_idx", "problem", "answer"),
        "math",
        MATH_INSTRUCTION,
    ),
    "gpqa_diamond": DatasetSpec(
        "Idavidrein/gpqa",
        "train",
        (
            "Question",
            "Correct Answer",
            "Incorrect Answer 1",
            "Incorrect Answer 2",
            "Incorrect Answer 3",
            "Record ID",
        ),
        "choice",
        CHOICE_INSTRUCTION,
        config="gpqa_diamond",
    ),
    # Evaluation-only sets (the CoR evaluation, workers.generation.cor_eval): never sampled
    # from, so their verifier is a placeholder; the answers travel in `metadata`.
    "truthful_qa": DatasetSpec(
        "truthfulqa/truthful_qa",
        "validation",
        ("question", "mc1_targets", "mc2_targets"),
        "exact",
        "",
        config="multiple_choice",
        objects=("mc1_targets", "mc2_targets"),
    ),
    "trivia_qa": DatasetSpec(
        "mandarjoshi/trivia_qa",
        "validation",
        ("question", "question_id", "answer"),
        "exact",
        "",
        config="rc.nocontext",
        objects=("answer",),
    ),
}


def dataset_spec(name: str) -> DatasetSpec:
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(SPECS)}")
    return SPECS[name]


def load_problems(
    name: str,
    *,
    path: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    skipped: list[dict[str, Any]] | None = None,
    **options: Any,
) -> pa.Table:
    """The problems of data set `name` (see SPECS), at most `limit` of them.

    `limit` counts source rows: the first `limit` rows are read, and those that cannot be
    prompted are refused (ValueError) or, with a `skipped` list, left out and appended there.

    Options: "demo" takes `n`, `difficulty` and `split` (workers.generation.demo_task.make_problems); hub data
    sets take `split` to read another split. `seed` only matters for demo problems and for
    GPQA's option order.
    """
    spec = dataset_spec(name)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    if name == "demo":
        rows = _demo_rows(seed, options)
    else:
        _check_options(name, options, {"split"})
        records = _read_records(name, spec, path, options.get("split", spec.split))
        check_records(records, spec, name, where=str(path or spec.hf_id))
        rows = [_CONVERTERS[name](record, seed) for record in records]
    if limit is not None:
        rows = rows[:limit]
    rows = _drop_unpromptable(rows, skipped, where=str(path or spec.hf_id or name))
    ids = [row["problem_id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}: duplicate problem ids in the source")
    return pa.Table.from_pylist(rows, schema=PROBLEMS_SCHEMA)


# Columns that become the prompt's text: a list or a number there is a malformed source.
TEXT_COLUMNS = {
    "problem", "question", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
    "Incorrect Answer 3",
}  # fmt: skip


def check_records(records: list[Any], spec: DatasetSpec, name: str, *, where: str) -> None:
    """ValueError naming the first bad row: every record is an object holding each of the
    spec's columns as a non-null string or integer (text columns: strings only), so a null
    answer never becomes the gold answer 'None' and a list never becomes a prompt."""
    for i, record in enumerate(records, 1):  # rows count from 1, as lines do
        if not isinstance(record, dict):
            raise ValueError(f"{where}: row {i} is {type(record).__name__}, not an object")
        missing = [c for c in spec.columns if c not in record]
        if missing:
            raise ValueError(
                f"{where}: row {i} lacks columns {missing} needed for {name}; has {list(record)}"
            )
        for column in spec.columns:
            if column in spec.objects:
                continue
            value = record[column]
            ok = (str,) if column in TEXT_COLUMNS else (str, int)
            if not isinstance(value, ok) or isinstance(value, bool):
                wanted = "a string" if column in TEXT_COLUMNS else "a string or an integer"
                raise ValueError(
                    f"{where}: row {i} column {column!r} is {value!r} ({type(value).__name__}),"
                    f" not {wanted}"
                )


def _drop_unpromptable(
    rows: list[dict[str, Any]], skipped: list[dict[str, Any]] | None, *, where: str
) -> list[dict[str, Any]]:
    """`rows` without those whose question is blank; ValueError on the first unless `skipped`
    collects them. Row numbers count from 1 in source order, as check_records' do."""
    kept = []
    for i, row in enumerate(rows, 1):
        if row["prompt"].strip():
            kept.append(row)
        elif skipped is None:
            raise ValueError(
                f"{where}: row {i} (problem {row['problem_id']!r}) has an empty question;"
                " fix or drop it, or set dataset.skip_bad_rows=true to skip such rows"
            )
        else:
            skipped.append({"row": i, "problem_id": row["problem_id"], "reason": "empty_prompt"})
    return kept


def _check_options(name: str, options: dict[str, Any], valid: set[str]) -> None:
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown options {unknown} for dataset {name!r}; valid: {sorted(valid)}")


def _demo_rows(seed: int, options: dict[str, Any]) -> list[dict[str, Any]]:
    from workers.generation.demo_task import make_problems

    _check_options("demo", options, set(DEMO_DEFAULTS))
    settings = {**DEMO_DEFAULTS, **options}
    table = make_problems(
        int(settings["n"]),
        seed,
        difficulty=int(settings["difficulty"]),
        split=str(settings["split"]),
    )
    return table.select(PROBLEMS_SCHEMA.names).to_pylist()


# ---------------------------------------------------------------------------------------------
# Reading


def _read_records(name: str, spec: DatasetSpec, path: str | Path | None, split: str) -> list[dict]:
    if path is not None:
        return read_local_records(path)
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            f"loading {name} from the hub needs the `datasets` package (pip install datasets), "
            "or pass a local file as the dataset's `path`"
        ) from exc
    try:
        data = datasets.load_dataset(spec.hf_id, spec.config, split=split)
    except Exception as exc:  # offline, gated (GPQA), renamed, ...: all need the same advice
        raise RuntimeError(
            f"could not load {spec.hf_id!r} (config {spec.config!r}, split {split!r}) from the "
            f"Hugging Face hub: {type(exc).__name__}: {exc}. Download it where the hub is "
            "reachable and pass the file instead: set the dataset's `path` "
            f"(e.g. dataset.path=/data/{name}.parquet; .parquet, .jsonl, .json or .csv)"
        ) from exc
    return data.to_list()


def read_local_records(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a local .parquet, .jsonl, .json (a list of objects) or .csv file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".jsonl":
        records = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError as err:
                        raise ValueError(f"{path}: line {number} is not JSON: {err}") from None
        return records
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ValueError(f"{path} is not JSON: {err}") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects (or use .jsonl)")
        return data
    if suffix == ".csv":
        # csv, not pyarrow: GPQA's fields hold newlines, and every value must stay text.
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"unsupported dataset file {path}; use .parquet, .jsonl, .json or .csv")


# ---------------------------------------------------------------------------------------------
# One converter per source layout: a source record -> a PROBLEMS_SCHEMA row


def _row(problem_id: str, dataset: str, prompt: str, gold: Any, **metadata: Any) -> dict:
    return {
        "problem_id": problem_id,
        "dataset": dataset,
        "prompt": str(prompt).strip(),
        "gold_answer": str(gold).strip(),
        "metadata": json.dumps(metadata, sort_keys=True, default=str),
    }


def _math500(record: dict, seed: int) -> dict:
    return _row(
        f"math500-{record['unique_id']}",
        "math500",
        record["problem"],
        record["answer"],
        source=SPECS["math500"].hf_id,
        unique_id=record["unique_id"],
        subject=record["subject"],
        level=record["level"],
    )


def _aime2024(record: dict, seed: int) -> dict:
    return _row(
        f"aime2024-{record['id']}",
        "aime2024",
        record["problem"],
        record["answer"],
        source=SPECS["aime2024"].hf_id,
        id=record["id"],
        url=record.get("url"),
        year=record.get("year"),
    )


def _matharena(name: str) -> Callable[[dict, int], dict]:
    def convert(record: dict, seed: int) -> dict:
        return _row(
            f"{name}-{record['problem_idx']}",
            name,
            record["problem"],
            record["answer"],
            source=SPECS[name].hf_id,
            problem_idx=record["problem_idx"],
            problem_type=record.get("problem_type"),
        )

    return convert


def gpqa_permutation(record_id: str, seed: int) -> list[int]:
    """The displayed order of GPQA's four options: entry k is the source option shown as letter k.

    Sorted by sha256(seed, record id, option index): stable on every machine and Python run.
    """
    keys = [hashlib.sha256(f"{seed}:{record_id}:{j}".encode()).digest() for j in range(4)]
    return sorted(range(4), key=lambda j: keys[j])


def _gpqa(record: dict, seed: int) -> dict:
    record_id = str(record["Record ID"]).strip()
    source = [
        record["Correct Answer"],
        record["Incorrect Answer 1"],
        record["Incorrect Answer 2"],
        record["Incorrect Answer 3"],
    ]
    source = [str(option).strip() for option in source]
    permutation = gpqa_permutation(record_id, seed)
    options = "\n".join(f"{LETTERS[k]}) {source[j]}" for k, j in enumerate(permutation))
    return _row(
        f"gpqa_diamond-{record_id}",
        "gpqa_diamond",
        f"{str(record['Question']).strip()}\n\n{options}",
        LETTERS[permutation.index(0)],
        source=SPECS["gpqa_diamond"].hf_id,
        record_id=record_id,
        permutation=permutation,
        seed=seed,
        domain=record.get("High-level domain"),
        subdomain=record.get("Subdomain"),
    )


def _targets(record: dict, column: str, *, single: bool) -> tuple[list[str], list[int]]:
    """TruthfulQA's {choices, labels}: as many 0/1 labels as non-empty string choices, at
    least one true (exactly one when `single`, as mc1's)."""
    where = f"truthful_qa question {str(record['question'])[:60]!r}: {column}"
    value = record[column]
    if not isinstance(value, dict):
        raise ValueError(f"{where} is {type(value).__name__}, not {{choices, labels}}")
    choices, labels = value.get("choices"), value.get("labels")
    if not isinstance(choices, list) or not all(isinstance(c, str) and c for c in choices):
        raise ValueError(f"{where}.choices must be a list of non-empty strings")
    if not isinstance(labels, list) or len(labels) != len(choices) or not choices:
        raise ValueError(f"{where}.labels must be one label per choice")
    if any(label not in (0, 1) or isinstance(label, float) for label in labels):
        raise ValueError(f"{where}.labels must be 0 or 1")
    true = sum(labels)
    if true == 0 or (single and true != 1):
        raise ValueError(f"{where} needs {'exactly one' if single else 'a'} true choice")
    return choices, [int(label) for label in labels]


def _truthful_qa(record: dict, seed: int) -> dict:
    question = str(record["question"]).strip()
    mc1 = _targets(record, "mc1_targets", single=True)
    mc2 = _targets(record, "mc2_targets", single=False)
    digest = hashlib.sha256(question.encode()).hexdigest()[:16]
    return _row(
        f"truthful_qa-{digest}",
        "truthful_qa",
        question,
        mc1[0][mc1[1].index(1)],
        source=SPECS["truthful_qa"].hf_id,
        mc1_choices=mc1[0],
        mc1_labels=mc1[1],
        mc2_choices=mc2[0],
        mc2_labels=mc2[1],
    )


def _trivia_qa(record: dict, seed: int) -> dict:
    """The answer's value and its normalized aliases (computed from `aliases` and `value` by
    the SQuAD rule when the file has no `normalized_aliases`)."""
    from workers.generation.cor_eval import normalize_answer

    answer, qid = record["answer"], str(record["question_id"]).strip()
    where = f"trivia_qa question {qid!r}: answer"
    if not isinstance(answer, dict) or not isinstance(answer.get("value"), str):
        raise ValueError(f"{where} must be an object with a string `value`")
    aliases = answer.get("normalized_aliases")
    if aliases is None:
        aliases = [normalize_answer(a) for a in [answer["value"], *(answer.get("aliases") or [])]]
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        raise ValueError(f"{where}.normalized_aliases must be a list of strings")
    return _row(
        f"trivia_qa-{qid}",
        "trivia_qa",
        record["question"],
        answer["value"],
        source=SPECS["trivia_qa"].hf_id,
        question_id=qid,
        normalized_aliases=sorted(set(aliases) | {normalize_answer(answer["value"])}),
    )


_CONVERTERS: dict[str, Callable[[dict, int], dict]] = {
    "math500": _math500,
    "aime2024": _aime2024,
    "aime2025": _matharena("aime2025"),
    "hmmt_feb_2025": _matharena("hmmt_feb_2025"),
    "gpqa_diamond": _gpqa,
    "truthful_qa": _truthful_qa,
    "trivia_qa": _trivia_qa,
}
