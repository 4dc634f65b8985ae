"""Measure the tiny model on fresh demo problems: sampled accuracy and fragile share.

    python -m tools.demo_eval [--model DIR] [--problems 100] [--seed 1234] [--samples 1]

1. Sample completions at temperature 1.0, top_p 1.0, no top-k (one batched `generate`).
2. Verify each completion by exact match of its final answer with the gold answer.
3. Run a plain forward pass over every verified trajectory and read the model's probability
   of each completion token (the token it sampled, under its own standard routing).
4. Report accuracy (verified / samples) and the fragile share: the share of completion tokens
   of verified trajectories with probability < 0.5. Completion tokens are the ones the model
   produced, its final EOS token included when it produced one.

The science needs both: enough right answers to score, and low-probability tokens inside them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from workers.generation import demo_task

FRAGILE = 0.5  # docs/method.md: a token is fragile when its probability is below 0.5


def load_model(model_dir: str | Path):
    """Tokenizer and float32 model in eval mode, from safetensors, offline."""
    from transformers import AutoTokenizer

    from workers.models import load_causal_lm

    model = load_causal_lm(model_dir, dtype=torch.float32)
    return AutoTokenizer.from_pretrained(model_dir), model


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], *, samples: int, max_new_tokens: int):
    """(prompt ids, completion ids) per sample, `samples` consecutive rows per prompt.

    Completion ids stop at the first EOS and include it; without EOS they run to the limit.
    """
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **batch,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=samples,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    width = batch["input_ids"].shape[1]
    pairs = []
    for row, seq in enumerate(out.tolist()):
        problem = row // samples
        prompt_row = batch["input_ids"][problem][batch["attention_mask"][problem] == 1]
        completion = seq[width:]
        if tokenizer.eos_token_id in completion:
            completion = completion[: completion.index(tokenizer.eos_token_id) + 1]
        pairs.append((prompt_row.tolist(), completion))
    return pairs


@torch.no_grad()
def completion_token_probs(model, pairs, *, pad_id: int, batch_size: int = 64) -> list[list[float]]:
    """p(token | prefix) of every completion token, from a plain forward (right padding)."""
    probs = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        seqs = [p + c for p, c in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for i, (p, c) in enumerate(chunk):
            # positions len(p)-1 .. len(p)+len(c)-2 predict the completion tokens
            rows = logprobs[i, len(p) - 1 : len(p) + len(c) - 1]
            probs.append(rows.gather(-1, torch.tensor(c)[:, None])[:, 0].exp().tolist())
    return probs


def evaluate_model(
    model,
    tokenizer,
    n_problems: int = 100,
    seed: int = 1234,
    *,
    samples: int = 1,
    difficulty: int = 1,
) -> dict:
    """Accuracy and fragile share of an in-memory model (see the module docstring)."""
    started = time.perf_counter()
    problems = demo_task.make_problems(n_problems, seed, difficulty).to_pylist()
    torch.manual_seed(seed)  # generation draws from torch's global generator
    pairs = sample_completions(
        model,
        tokenizer,
        [p["prompt"] for p in problems],
        samples=samples,
        max_new_tokens=demo_task.max_completion_tokens(difficulty) + 9,
    )
    verified = []
    for row, (prompt_ids, completion) in enumerate(pairs):
        text = tokenizer.decode(completion, skip_special_tokens=True)
        if demo_task.extract_answer(text) == problems[row // samples]["gold_answer"]:
            verified.append((prompt_ids, completion))
    probs = completion_token_probs(model, verified, pad_id=tokenizer.pad_token_id)
    flat = [q for seq in probs for q in seq]
    n_fragile = sum(q < FRAGILE for q in flat)
    return {
        "problems": n_problems,
        "samples": len(pairs),
        "verified": len(verified),
        "accuracy": len(verified) / max(1, len(pairs)),
        "stopped": sum(c[-1:] == [tokenizer.eos_token_id] for _, c in pairs),
        "verified_tokens": len(flat),
        "fragile_tokens": n_fragile,
        "fragile_share": n_fragile / max(1, len(flat)),
        "mean_completion_tokens": sum(len(c) for _, c in pairs) / max(1, len(pairs)),
        "seed": seed,
        "difficulty": difficulty,
        "seconds": round(time.perf_counter() - started, 2),
    }


def evaluate(
    model_dir: str | Path | None = None,
    n_problems: int = 100,
    seed: int = 1234,
    *,
    samples: int = 1,
    difficulty: int = 1,
) -> dict:
    """Load the model directory (default: the bundled tiny model) and evaluate it."""
    tokenizer, model = load_model(model_dir or demo_task.bundled_model_path())
    return evaluate_model(
        model, tokenizer, n_problems, seed, samples=samples, difficulty=difficulty
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(demo_task.bundled_model_path()))
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--difficulty", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = evaluate(
        args.model, args.problems, args.seed, samples=args.samples, difficulty=args.difficulty
    )
    print(
        f"accuracy {result['accuracy']:.3f} ({result['verified']}/{result['samples']}), "
        f"fragile share {result['fragile_share']:.3f} "
        f"({result['fragile_tokens']}/{result['verified_tokens']} tokens with p < {FRAGILE})"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
