"""The demo task: solve `a * x + b = c` for a whole number x by guess-and-check.

Contract: `make_problems(n, seed, difficulty)` -> PROBLEMS_SCHEMA table (dataset "demo"), the
`prompt` column being the exact text the bundled tiny model sees; `extract_answer(text)` reads
the final answer of a completion; `bundled_model_path()` is the tiny MoE trained on this task.

Why guess-and-check: the scientific method scores tokens whose probability is low (fragile),
which real reasoning has at its forks. A chain of thought that is a pure function of the prompt
(digit-by-digit addition) has almost none. Here the solution first isolates a * x, then tries
candidates in a random order until the check comes out 0, so each guess is a genuine fork
(uniform over the untried candidates) while the final answer stays checkable by exact match.
One problem and a solution, as tokens (space-separated, one word or number per token):

    prompt:     solve 3 * x + 7 = 25 for x in 1 .. 9
    completion: 3 * x = 18 ; try 2 : 6 - 18 = -12 ; try 9 : 27 - 18 = 9 ; try 6 : 18 - 18 = 0 ;
                answer 6

Two designs were tried first and dropped because a 2-core training budget is too short for
the tiny model to learn one of their steps: `try 6 : 18 + 7 = 25 yes` (an equality check of
two numbers; ~7% accuracy) and adding a list in a free order (copying an unused number out of
the prompt; ~8%). Table lookups over a fixed candidate set and "is this 0" are learned fast.

Training and evaluation problems never overlap: every (a, b, x) belongs to exactly one split,
fixed by a hash of the triple (`split_of`); `make_problems` draws only from the eval split and
the trainer only from the train split.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from workers.schemas import PROBLEMS_SCHEMA

DATASET = "demo"
# Per difficulty: (largest a, largest b, largest x); a starts at 2, b at 0, x at 1. The bundled
# model is trained on difficulty 1 only; higher ones exist for harder (out-of-training) sweeps.
DIFFICULTIES = {1: (9, 20, 9), 2: (12, 40, 12), 3: (15, 60, 15)}
MAX_NUMBER = 299  # number tokens run from -MAX_NUMBER to MAX_NUMBER (c <= 15 * 15 + 60 = 285)
EVAL_SHARE = 5  # one problem in EVAL_SHARE (by hash) is held out for evaluation

_ANSWER_RE = re.compile(r"(?:^|\s)answer\s+(\d+)\s*(?:</s>\s*)?$")


@dataclass(frozen=True)
class DemoProblem:
    """One equation a * x + b = c with x in [1, x_max]."""

    a: int
    b: int
    x: int
    x_max: int

    @property
    def c(self) -> int:
        return self.a * self.x + self.b

    @property
    def prompt(self) -> str:
        return f"solve {self.a} * x + {self.b} = {self.c} for x in 1 .. {self.x_max}"

    @property
    def gold(self) -> str:
        return str(self.x)


def split_of(problem: DemoProblem) -> str:
    """The split of a problem, "eval" or "train": fixed per (a, b, x), so the two are disjoint."""
    digest = hashlib.sha256(f"{problem.a},{problem.b},{problem.x}".encode()).digest()
    return "eval" if digest[0] % EVAL_SHARE == 0 else "train"


def problem_pool(difficulty: int, split: str) -> list[DemoProblem]:
    """Every problem of one difficulty in one split, in a fixed order."""
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty!r}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    a_max, b_max, x_max = DIFFICULTIES[difficulty]
    pool = [
        DemoProblem(a, b, x, x_max)
        for a in range(2, a_max + 1)
        for b in range(0, b_max + 1)
        for x in range(1, x_max + 1)
    ]
    return [p for p in pool if split_of(p) == split]


def render_solution(problem: DemoProblem, rng: random.Random) -> str:
    """A chain of thought and final answer: guesses in a random order until the check is 0."""
    target = problem.c - problem.b
    steps = [f"{problem.a} * x = {target} ;"]
    order = list(range(1, problem.x_max + 1))
    rng.shuffle(order)
    for guess in order:
        product = problem.a * guess
        steps.append(f"try {guess} : {product} - {target} = {product - target} ;")
        if product == target:
            break
    return " ".join(steps) + f" answer {problem.x}"


def max_completion_tokens(difficulty: int = 1) -> int:
    """Tokens of the longest correct completion (every candidate tried), EOS included."""
    x_max = DIFFICULTIES[difficulty][2]
    return 6 + 8 * x_max + 2 + 1  # "a * x = T ;", "try g : P - T = R ;" each, "answer N", EOS


def make_problems(n: int, seed: int, difficulty: int = 1, split: str = "eval") -> pa.Table:
    """`n` problems of `split`, deterministic in (n, seed, difficulty, split), ids
    "demo-<seed>-<i>" (eval) or "demo-train-<seed>-<i>" (train).

    Problems are drawn without replacement from the split while it lasts (then it is
    reshuffled), so a table repeats a problem only when n exceeds the split's size. The train
    split is what the bundled model learned from; it serves as training data for the router
    update, whose evaluation stays on the eval split.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = problem_pool(difficulty, split)
    rng = random.Random(f"demo-{split}:{seed}:{difficulty}")  # str seeds hash with sha512: stable
    prefix = "demo" if split == "eval" else f"demo-{split}"
    chosen: list[DemoProblem] = []
    while len(chosen) < n:
        batch = pool[:]
        rng.shuffle(batch)
        chosen.extend(batch[: n - len(chosen)])
    rows = {name: [] for name in PROBLEMS_SCHEMA.names}
    for i, p in enumerate(chosen):
        rows["problem_id"].append(f"{prefix}-{seed}-{i}")
        rows["dataset"].append(DATASET)
        rows["prompt"].append(p.prompt)
        rows["gold_answer"].append(p.gold)
        meta = {"a": p.a, "b": p.b, "c": p.c, "x_min": 1, "x_max": p.x_max}
        meta |= {"difficulty": difficulty, "seed": seed, "split": split}
        rows["metadata"].append(json.dumps(meta, sort_keys=True))
    return pa.Table.from_pydict(rows, schema=PROBLEMS_SCHEMA)


def extract_answer(text: str) -> str | None:
    """The number after the final "answer", if the completion ends with it; else None."""
    match = _ANSWER_RE.search(text.strip())
    return str(int(match.group(1))) if match else None


def bundled_model_path() -> Path:
    """The bundled tiny Qwen3-MoE trained on this task (a Hugging Face model directory)."""
    return Path(__file__).resolve().parents[1] / "assets" / "tiny-moe"
