"""Sample, verify and tabulate trajectories for one (model, data set) unit.

Contract: `generate_trajectories(backend, problems, params, *, model_name, verifier, tokenizer,
instruction="", template=None, use_chat_template=True) -> pa.Table` in TRAJECTORIES_SCHEMA
with ALL samples, verified or not (callers filter on `verified`). `problems` is a
PROBLEMS_SCHEMA table; `verifier` is a workers.verify kind ("exact", "math", "choice");
`input_ids` = prompt ids + completion ids and `prompt_len` is where the completion starts.
"""

from __future__ import annotations

import pyarrow as pa

from workers.generation import GenerationBackend, SamplingParams
from workers.prompts import render_prompt
from workers.schemas import TRAJECTORIES_SCHEMA
from workers.verify import verify_many


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
    prompts = [
        (
            row["problem_id"],
            render_prompt(
                tokenizer,
                row["prompt"],
                instruction=instruction,
                template=template,
                use_chat_template=use_chat_template,
            ),
        )
        for row in rows
    ]
    completions = backend.generate(prompts, params)
    verdicts = verify_many(
        verifier,
        [(c.text, by_id[c.problem_id]["gold_answer"]) for c in completions],
        timeout_s=verify_timeout_s,
    )
    records = []
    for completion, verdict in zip(completions, verdicts, strict=True):
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
    return pa.Table.from_pylist(records, schema=TRAJECTORIES_SCHEMA)
