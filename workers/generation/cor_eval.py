"""The CoR evaluation's scores of one model on TruthfulQA (multiple choice) and TriviaQA.

Contract: `evaluate_questions(model, tokenizer, problems, settings, condition, kind)` -> one
row per question in
`EVAL_SCHEMA`, for problems tables of workers.generation.datasets' "truthful_qa" or
"trivia_qa" layout (the answers in `metadata`). The model runs as it is handed over: the
caller installs whatever routing it evaluates (workers.generation.reroute) around the call.
Definitions (docs/method.md, "Evaluating a reroute plan"):
- option log-likelihood: the sum of log p of the option's tokens after the prompt, where the
  prompt is `settings.mc_template` with the question filled in and the option's tokens are
  those of " " + option, appended to the prompt's;
- MC1: 1 when the mc1 option with the highest log-likelihood is the true one (ties: the first);
- MC2: sum over true mc2 options of exp(log-likelihood) / sum over all mc2 options;
- TriviaQA EM: the greedy continuation of `settings.qa_template` (at most
  `settings.max_new_tokens` tokens), cut at the first of `settings.stop`, normalised by the
  SQuAD rule (`normalize_answer`), 1 when it equals one of the normalised aliases.
Question and option text are data: they only ever become token ids.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

EVAL_SCHEMA = pa.schema(
    [
        ("condition", pa.string()),  # the routing the caller installed (standard, cor, ...)
        ("problem_id", pa.string()),
        ("dataset", pa.string()),
        ("mc1", pa.float64()),  # TruthfulQA only (null for TriviaQA)
        ("mc2", pa.float64()),
        ("em", pa.float64()),  # TriviaQA only
        ("prediction", pa.string()),  # the chosen mc1 option's index, or the normalised answer
        ("tokens", pa.int64()),  # tokens the model ran over for this question
    ]
)
KINDS = ("truthful_qa", "trivia_qa")


@dataclass(frozen=True)
class EvalSettings:
    """How questions are put to the model (config: cor.*; every field is hashed)."""

    mc_template: str = "Q: {question}\nA:"
    qa_template: str = "Q: {question}\nA:"
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ("\n",)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The SQuAD rule: lowercase, drop punctuation, drop the articles a/an/the, collapse
    whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def mc_scores(
    mc1_logliks: list[float], mc1_labels: list[int], mc2_logliks: list[float], mc2_labels: list[int]
) -> tuple[float, float]:
    """(MC1, MC2) from option log-likelihoods and their 0/1 labels."""
    import numpy as np

    best = int(np.argmax(mc1_logliks))
    mc1 = float(mc1_labels[best] == 1)
    ll = np.asarray(mc2_logliks, dtype=np.float64)
    p = np.exp(ll - ll.max())  # the ratio is unchanged by the shift; exp(ll) may underflow
    mc2 = float(p[np.asarray(mc2_labels) == 1].sum() / p.sum())
    return mc1, mc2


def option_logliks(model: Any, tokenizer: Any, prompt: str, options: list[str]) -> list[float]:
    """Log-likelihood of each option after `prompt`: one right-padded forward for all."""
    import torch

    from workers.generation import encode_prompt

    prompt_ids = encode_prompt(tokenizer, prompt)
    conts = [tokenizer(" " + o, add_special_tokens=False)["input_ids"] for o in options]
    if any(not c for c in conts):
        raise ValueError("an option encodes to no tokens")
    rows = [prompt_ids + list(c) for c in conts]
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    out = []
    start = len(prompt_ids)
    for i, cont in enumerate(conts):
        target = ids[i, start : start + len(cont)]
        picked = logp[i, start - 1 : start - 1 + len(cont)].gather(1, target[:, None])
        out.append(float(picked.sum()))
    return out


def greedy_answer(
    model: Any, tokenizer: Any, prompt: str, settings: EvalSettings
) -> tuple[str, int]:
    """(the greedy continuation cut at the first stop string, tokens run)."""
    import torch

    from workers.generation import encode_prompt

    prompt_ids = encode_prompt(tokenizer, prompt)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=settings.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    new = out[0, len(prompt_ids) :].tolist()
    text = tokenizer.decode(new, skip_special_tokens=True)
    for stop in settings.stop:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text, len(prompt_ids) + len(new)


def evaluate_question(
    model: Any, tokenizer: Any, row: dict, settings: EvalSettings, kind: str
) -> dict:
    """One EVAL_SCHEMA row for one problems row of layout `kind` (its loader)."""
    meta = json.loads(row["metadata"])
    out = {"problem_id": row["problem_id"], "dataset": row["dataset"]}
    out |= {"mc1": None, "mc2": None, "em": None}
    if kind == "truthful_qa":
        prompt = settings.mc_template.format(question=row["prompt"])
        ll1 = option_logliks(model, tokenizer, prompt, meta["mc1_choices"])
        ll2 = option_logliks(model, tokenizer, prompt, meta["mc2_choices"])
        out["mc1"], out["mc2"] = mc_scores(ll1, meta["mc1_labels"], ll2, meta["mc2_labels"])
        out["prediction"] = str(max(range(len(ll1)), key=ll1.__getitem__))
        out["tokens"] = sum(
            len(encode_prompt_text(tokenizer, prompt, o))
            for o in [*meta["mc1_choices"], *meta["mc2_choices"]]
        )
    elif kind == "trivia_qa":
        prompt = settings.qa_template.format(question=row["prompt"])
        text, tokens = greedy_answer(model, tokenizer, prompt, settings)
        answer = normalize_answer(text)
        out["em"] = float(answer in set(meta["normalized_aliases"]))
        out["prediction"], out["tokens"] = answer, tokens
    else:
        raise ValueError(f"no CoR evaluation of {kind!r} questions; valid: {KINDS}")
    return out


def encode_prompt_text(tokenizer: Any, prompt: str, option: str) -> list[int]:
    from workers.generation import encode_prompt

    return (
        encode_prompt(tokenizer, prompt)
        + tokenizer(" " + option, add_special_tokens=False)["input_ids"]
    )


def evaluate_questions(
    model: Any,
    tokenizer: Any,
    problems: pa.Table,
    settings: EvalSettings,
    condition: str,
    kind: str,
) -> pa.Table:
    """EVAL_SCHEMA rows of every question of `problems` (loaded by the `kind` loader:
    truthful_qa or trivia_qa), in its order, labelled `condition`."""
    rows = [
        {"condition": condition, **evaluate_question(model, tokenizer, r, settings, kind)}
        for r in problems.to_pylist()
    ]
    return pa.Table.from_pylist(rows, schema=EVAL_SCHEMA)
