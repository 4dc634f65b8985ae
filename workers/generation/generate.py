"""Sample, verify and tabulate trajectories for one (model, data set) unit.

Contract: `generate_trajectories(backend, problems, params, *, model_name, verifier, tokenizer,
instruction="", template=None, use_chat_template=True) -> pa.Table` in TRAJECTORIES_SCHEMA
with ALL samples, verified or not (callers filter on `verified`). `problems` is a
PROBLEMS_SCHEMA table; `verifier` is a workers.generation.verify kind ("exact", "math", "choice");
`input_ids` = prompt ids + completion ids and `prompt_len` is where the completion starts.

A row that cannot be prompted never fails its unit: an empty question ("empty_prompt"), a
prompt the model's context cannot hold with one new token ("prompt_too_long": prompt tokens + 1
> the backend's `max_length`), or a template that fails on it ("prompt_error: <error>") gives
its `params.n` samples unverified, with that reason as `verify_reason` and `finish_reason`,
no tokens and no text; the other rows are generated as usual. (The driver rejects such rows
before Ray starts where it can, orchestrator.problems.check_prompts.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from workers.generation import Completion, GenerationBackend, SamplingParams, encode_prompt
from workers.generation.prompts import render_prompt
from workers.generation.verify import Verdict, verify_many
from workers.schemas import TRAJECTORIES_SCHEMA


def generate_trajectories(
    backend: GenerationBackend,
    problems: pa.Table,
    params: SamplingParams,
    *,
    model_name: str,
    verifier: str,
    tokenizer,
    instruction: str = "",
    template: str | None = None,
    use_chat_template: bool = True,
    verify_timeout_s: float = 5.0,
) -> pa.Table:
    """Render each problem's prompt, sample `params.n` completions, verify every one."""
    rows = problems.select(["problem_id", "dataset", "prompt", "gold_answer"]).to_pylist()
    by_id = {row["problem_id"]: row for row in rows}
    if len(by_id) != len(rows):
        raise ValueError("problems table has duplicate problem_id values")
    prompts, unprompted = [], {}
    for row in rows:
        checked = prompt_problem(
            tokenizer,
            row["prompt"],
            getattr(backend, "max_length", None),
            instruction=instruction,
            template=template,
            use_chat_template=use_chat_template,
        )
        if isinstance(checked, str):  # the reason it cannot be prompted
            unprompted[row["problem_id"]] = checked
        else:
            prompts.append((row["problem_id"], checked[0]))
    completions = backend.generate(prompts, params) if prompts else []
    verdicts = verify_many(
        verifier,
        [(c.text, by_id[c.problem_id]["gold_answer"]) for c in completions],
        timeout_s=verify_timeout_s,
    )
    for problem_id, reason in unprompted.items():
        for k in range(params.n):
            completions.append(Completion(problem_id, k, [], [], "", reason))
            verdicts.append(Verdict(False, None, reason))
    order = {row["problem_id"]: i for i, row in enumerate(rows)}
    ranked = sorted(
        zip(completions, verdicts, strict=True),
        key=lambda cv: (order[cv[0].problem_id], cv[0].sample_idx),
    )
    records = []
    for completion, verdict in ranked:
        problem = by_id[completion.problem_id]
        records.append(
            {
                "problem_id": completion.problem_id,
                "sample_idx": completion.sample_idx,
                "input_ids": completion.prompt_ids + completion.completion_ids,
                "prompt_len": len(completion.prompt_ids),
                "model": model_name,
                "dataset": problem["dataset"],
                "completion_text": completion.text,
                "extracted_answer": verdict.extracted,
                "gold_answer": problem["gold_answer"],
                "verified": verdict.verified,
                "verify_reason": verdict.reason,
                "finish_reason": completion.finish_reason,
                "seed": params.seed,
                "sample_logprobs": completion.logprobs,
            }
        )
    table = pa.Table.from_pylist(records, schema=TRAJECTORIES_SCHEMA)
    field = getattr(backend, "routes_field", None)
    if field is not None:  # generation.record_routes: the generator's routes, appended
        table = table.append_column(field, routes_column([c for c, _ in ranked], field))
    return table


def routes_column(completions: list[Completion], field: pa.Field) -> pa.Array:
    """The `gen_routes` column of `completions`: (tokens, layers, k) ids each, an empty list
    for a sample without tokens (unprompted), in one flat buffer (no per-token Python objects)."""
    layers = field.type.value_type.list_size
    k = field.type.value_type.value_type.list_size
    ids = field.type.value_type.value_type.value_type.to_pandas_dtype()
    parts = [
        np.zeros((0, layers, k), ids) if c.routes is None and not c.completion_ids
        else np.asarray(c.routes, dtype=ids)
        for c in completions
    ]  # fmt: skip
    for c, part in zip(completions, parts, strict=True):
        if part.shape != (len(c.completion_ids), layers, k):
            raise ValueError(
                f"routes of {c.problem_id}/{c.sample_idx}: shape {part.shape}, expected"
                f" {(len(c.completion_ids), layers, k)}"
            )
    flat = pa.array(np.concatenate([p.reshape(-1) for p in parts]) if parts else np.zeros(0, ids))
    per_route = pa.FixedSizeListArray.from_arrays(flat, k)
    per_token = pa.FixedSizeListArray.from_arrays(per_route, layers)
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), per_token).cast(field.type)


def prompt_problem(
    tokenizer,
    question: str,
    max_length: int | None,
    **prompt: Any,
) -> str | tuple[str, list[int]]:
    """Why `question` cannot be prompted (a reason), or (rendered prompt, its token ids).

    `prompt` holds render_prompt's keywords (instruction, template, use_chat_template)."""
    if not question.strip():
        return "empty_prompt"
    try:
        text = render_prompt(tokenizer, question, **prompt)
        ids = encode_prompt(tokenizer, text)
    except Exception as exc:  # a template or tokenizer failing on this row only
        return f"prompt_error: {type(exc).__name__}"
    if max_length is not None and len(ids) + 1 > max_length:
        return "prompt_too_long"
    return text, ids
