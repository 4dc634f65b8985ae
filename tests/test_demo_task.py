"""The demo task: deterministic problems, disjoint splits, answer extraction, rendered solutions."""

import json
import random

import pytest

from workers.generation import demo_task
from workers.schemas import PROBLEMS_SCHEMA


def test_make_problems_is_deterministic_and_follows_the_schema():
    table = demo_task.make_problems(50, seed=7)
    assert table.schema == PROBLEMS_SCHEMA
    assert table.equals(demo_task.make_problems(50, seed=7))
    assert not table.equals(demo_task.make_problems(50, seed=8))
    assert table.column("problem_id").to_pylist() == [f"demo-7-{i}" for i in range(50)]
    assert set(table.column("dataset").to_pylist()) == {"demo"}
    # a prefix of a longer table is the shorter table: n does not reshuffle earlier rows
    assert demo_task.make_problems(10, seed=7).equals(table.slice(0, 10))


def test_problems_are_consistent_with_their_gold_answer_and_metadata():
    for row in demo_task.make_problems(100, seed=3).to_pylist():
        meta = json.loads(row["metadata"])
        x = int(row["gold_answer"])
        assert meta["a"] * x + meta["b"] == meta["c"]
        assert 1 <= x <= meta["x_max"] == 9 and meta["difficulty"] == 1
        assert row["prompt"] == (
            f"solve {meta['a']} * x + {meta['b']} = {meta['c']} for x in 1 .. {meta['x_max']}"
        )


def test_eval_problems_never_appear_in_training():
    train = {(p.a, p.b, p.x) for p in demo_task.problem_pool(1, "train")}
    evals = {(p.a, p.b, p.x) for p in demo_task.problem_pool(1, "eval")}
    assert train and evals and not train & evals
    assert len(train | evals) == 8 * 21 * 9  # together they are every problem of difficulty 1
    for row in demo_task.make_problems(300, seed=11).to_pylist():
        meta = json.loads(row["metadata"])
        assert (meta["a"], meta["b"], int(row["gold_answer"])) in evals


def test_bad_arguments_say_what_is_valid():
    with pytest.raises(ValueError, match="difficulty must be one of"):
        demo_task.make_problems(3, seed=0, difficulty=9)
    with pytest.raises(ValueError, match="n must be"):
        demo_task.make_problems(-1, seed=0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3 * x = 18 ; try 2 : 6 - 18 = -12 ; try 6 : 18 - 18 = 0 ; answer 6", "6"),
        ("answer 12", "12"),
        ("answer 06 ", "6"),
        ("try 6 : 18 - 18 = 0 ; answer 6 </s>", "6"),
        ("", None),
        ("3 * x = 18 ; try 2 : 6 - 18 = -12 ; try 6 :", None),  # cut off before the answer
        ("answer", None),
        ("answer x", None),
        ("answer -6", None),
        ("answer 6 ; try 3 : 9 - 18 = -9 ;", None),  # kept going after answering
        ("reanswer 6", None),
    ],
)
def test_extract_answer(text, expected):
    assert demo_task.extract_answer(text) == expected


def test_rendered_solutions_verify_and_fork():
    rng = random.Random(0)
    first_guesses = set()
    for problem in rng.sample(demo_task.problem_pool(1, "train"), 300):
        text = demo_task.render_solution(problem, rng)
        assert demo_task.extract_answer(text) == problem.gold
        head, *tries, tail = text.split(";")
        assert head.split() == [str(problem.a), "*", "x", "=", str(problem.c - problem.b)]
        guesses = []
        for step in tries:
            _, guess, _, product, _, target, _, diff = step.split()
            assert int(product) == problem.a * int(guess) and int(target) == problem.c - problem.b
            assert int(diff) == int(product) - int(target)
            guesses.append(int(guess))
        assert len(set(guesses)) == len(guesses) and guesses[-1] == problem.x  # stops at 0
        assert tail.split() == ["answer", problem.gold]
        first_guesses.add(guesses[0])
    assert first_guesses == set(range(1, 10))  # the first guess is a real fork


def test_training_example_round_trips_through_the_tokenizer():
    from tools.train_tiny import build_tokenizer, encode_example

    tokenizer = build_tokenizer()
    problem = demo_task.problem_pool(3, "train")[-1]  # the largest numbers of any difficulty
    ids, labels = encode_example(tokenizer, problem, random.Random(1))
    assert tokenizer.unk_token_id not in ids and ids[-1] == tokenizer.eos_token_id
    prompt_len = len(tokenizer(problem.prompt)["input_ids"])
    assert labels[:prompt_len] == [-100] * prompt_len and labels[prompt_len:] == ids[prompt_len:]
    completion = tokenizer.decode(ids[prompt_len:], skip_special_tokens=True)
    assert tokenizer.decode(ids[:prompt_len]) == problem.prompt
    assert demo_task.extract_answer(completion) == problem.gold
