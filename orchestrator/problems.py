"""Problems: each data set of a run loaded once into problems/<name>.arrow, on the driver.

Contract: `prepare_problems` (no Ray) writes problems/<dataset>.arrow for every data set of the
plan, skipped when complete, after checking that each local model of the run can prompt its
rows (`check_prompts`), and returns {dataset: (rows, sha256)} from verified sidecars: the
generation units are planned from them. A data set that cannot be loaded or prompted is a
PipelineError naming it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from orchestrator import plan
from orchestrator.config import ModelConfig, RunConfig, cor_datasets, model_path
from orchestrator.errors import PipelineError, last_line
from workers.io import (
    COMPRESSION,
    IncompleteFileError,
    done_path,
    read_verified,
    verify,
    write_arrow,
)


def prepare_problems(cfg: RunConfig, run_dir: Path) -> dict[str, tuple[int, str]]:
    """Load every dataset of the plan into problems/<name>.arrow (skipped when complete),
    after checking that each local model of the run can prompt its rows (check_prompts); the
    CoR evaluation's sets too, when `cor` is set (their ids are not returned).

    Runs on the driver before Ray starts, so a missing data file or a row that cannot be
    prompted fails fast. Returns {dataset name: (number of problems, sha256 of the file)}.
    """
    cells = plan.plan_cells(cfg)
    datasets = {c.dataset.name: c.dataset for c in cells}
    tokenizers: dict[str, Any] = {}

    def check(dataset: Any, table: pa.Table) -> None:
        models = [c.model for c in cells if c.dataset.name == dataset.name]
        check_prompts(table, dataset, models, cfg.generation.backend, tokenizers)

    problems = prepare_datasets(
        run_dir,
        list(datasets.values()),
        checksum=cfg.verify_checksums,
        check=check,
        compression=cfg.cluster.compression,
    )
    if cfg.cor.enabled:  # the CoR evaluation's questions too: a bad file fails before Ray
        prepare_datasets(
            run_dir,
            cor_datasets(cfg),
            checksum=cfg.verify_checksums,
            compression=cfg.cluster.compression,
        )
    return problems


def prepare_datasets(
    run_dir: Path,
    datasets: list[Any],
    *,
    checksum: bool = True,
    check: Callable[[Any, pa.Table], None] | None = None,
    compression: str = COMPRESSION,
) -> dict[str, tuple[int, str]]:
    """problems/<name>.arrow of each dataset (skipped when complete); {name: (rows, sha256)}.

    Rows and sha256 come from a sidecar that verified against its file: the number of
    generation units, and so which generated files are stale, is planned from them.
    A row that cannot be prompted (an empty question) is a PipelineError naming it, or, with
    the dataset's `skip_bad_rows`, left out: the problems file's sidecar lists it under
    "skipped_rows" ({row, problem_id, reason}) and the report counts it. `check(dataset,
    table)` runs on each dataset's problems before they are written (or once read back when
    complete) and may raise PipelineError."""
    from workers.generation.datasets import load_problems

    out = {}
    for dataset in datasets:
        path, want = plan.problems_path(run_dir, dataset), plan.problems_hash(dataset)
        try:  # a check reads the table, and read_verified hashes the bytes it parses
            if check is None:
                sidecar = verify(path, want, checksum=checksum)
            else:
                table, sidecar = read_verified(path, want)
        except IncompleteFileError:
            sidecar = None
        if sidecar is not None:
            if check is not None:
                check(dataset, table)
        else:
            skipped: list[dict[str, Any]] | None = [] if dataset.skip_bad_rows else None
            try:
                table = load_problems(
                    dataset.loader,
                    path=dataset.path,
                    limit=dataset.limit,
                    seed=dataset.seed,
                    skipped=skipped,
                    **dataset.options,
                )
            except (ValueError, RuntimeError, ImportError, OSError) as err:
                raise PipelineError(f"dataset {dataset.name}: {last_line(err)}") from err
            if table.num_rows == 0:
                raise PipelineError(f"dataset {dataset.name} has no problems (limit/options)")
            # The configured name, not the loader's: two data sets of one loader (demo and
            # demo_train, a local copy beside the hub's) stay apart in every table downstream.
            table = table.set_column(
                table.schema.get_field_index("dataset"),
                "dataset",
                pa.array([dataset.name] * table.num_rows, pa.string()),
            )
            if check is not None:
                check(dataset, table)
            if skipped:
                print(
                    f"warning: dataset {dataset.name}: skipped {len(skipped)} rows that cannot be"
                    f" prompted (dataset.skip_bad_rows), listed in {done_path(path)}",
                    file=sys.stderr,
                )
            extra = {"skipped_rows": skipped} if skipped is not None else None
            try:
                sidecar = write_arrow(
                    table,
                    path,
                    config_hash=want,
                    extra=extra,
                    root=run_dir,
                    compression=compression,
                )
            except OSError as err:  # a full disk or quota: write_arrow left nothing complete
                raise PipelineError(f"cannot write {path}: {err.strerror or err}") from None
        out[dataset.name] = (sidecar["rows"], sidecar["sha256"])
    return out


def check_prompts(
    table: pa.Table,
    dataset: Any,
    models: list[ModelConfig],
    backend: str,
    tokenizers: dict[str, Any],
) -> None:
    """PipelineError naming the first row of `table` that one of `models` cannot prompt (its
    prompt leaves no room for one new token in the model's context, or its template fails on
    it), where that can be known before Ray: the model is a local directory (the bundled
    model, `model.path`), so its tokenizer loads here (kept in `tokenizers`). The context is
    config.json's `max_position_embeddings`, or vLLM's `model.engine.max_model_len` when
    smaller. A hub model's rows are checked by its generators instead, and a dataset with
    `skip_bad_rows` leaves them to the generators too: there such a row becomes unverified
    samples with finish_reason "prompt_too_long" (workers.generation.generate), counted in the report,
    never a failed unit."""
    from workers.generation.generate import prompt_problem

    if dataset.skip_bad_rows:
        return
    rows = table.select(["problem_id", "prompt"]).to_pylist()
    for model in models:
        directory = Path(model_path(model))
        if not (directory / "config.json").is_file():
            continue
        max_length = context_length(model, backend, directory)
        if str(directory) not in tokenizers:
            from transformers import AutoTokenizer  # loads torch: only for a local model

            tokenizers[str(directory)] = AutoTokenizer.from_pretrained(str(directory))
        for i, row in enumerate(rows, 1):
            reason = prompt_problem(
                tokenizers[str(directory)],
                row["prompt"],
                max_length,
                instruction=dataset.instruction,
                template=model.template,
                use_chat_template=model.use_chat_template,
            )
            if isinstance(reason, str):
                what = (
                    f"leaves no room to generate in the model's context of {max_length} tokens"
                    if reason == "prompt_too_long"
                    else f"cannot be prompted ({reason})"
                )
                raise PipelineError(
                    f"dataset {dataset.name}: row {i} (problem {row['problem_id']!r}): its prompt"
                    f" {what} for model {model.name}; drop the row, or set"
                    " dataset.skip_bad_rows=true to record it as unverified"
                )


def context_length(model: ModelConfig, backend: str, directory: Path) -> int | None:
    """Tokens a sequence of `model` may hold: config.json's `max_position_embeddings`, capped
    by `model.engine.max_model_len` under vLLM; None when config.json does not say."""
    try:
        config = json.loads((directory / "config.json").read_text())
        length = config.get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    length = length if isinstance(length, int) and not isinstance(length, bool) else None
    engine = model.engine.max_model_len
    if (model.generation_backend or backend) == "vllm" and engine is not None:
        length = engine if length is None else min(length, engine)
    return length
