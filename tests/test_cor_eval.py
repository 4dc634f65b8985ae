"""The CoR evaluation's data, metrics and scores (workers.generation.cor_eval), without Ray."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workers.generation.cor_eval import (
    EvalSettings,
    evaluate_questions,
    mc_scores,
    normalize_answer,
    option_logliks,
)
from workers.generation.datasets import load_problems

TRUTHFUL = "tests/fixtures/truthful_qa.parquet"
TRIVIA = "tests/fixtures/trivia_qa.jsonl"
DEMO = "workers/assets/cor-demo/{}.jsonl"


def test_normalize_answer_is_the_squad_rule():
    assert normalize_answer("  The  Red-Planet, Mars! ") == "redplanet mars"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("Theatre") == "theatre"  # an article only as a whole word


def test_mc_scores():
    # mc1: the true option (index 1) has the highest log-likelihood
    mc1, mc2 = mc_scores([-3.0, -1.0, -2.0], [0, 1, 0], [-1.0, -1.0, math.log(2)], [1, 1, 0])
    assert mc1 == 1.0
    e = math.exp(-1.0)
    assert mc2 == pytest.approx(2 * e / (2 * e + 2))
    assert mc_scores([-1.0, -2.0], [0, 1], [-1.0, -2.0], [0, 1])[0] == 0.0
    # far below exp's range: the shift keeps the ratio
    assert mc_scores([-1.0], [1], [-2000.0, -2000.0], [1, 0])[1] == pytest.approx(0.5)


def test_hub_layouts_load():
    tq = load_problems("truthful_qa", path=TRUTHFUL).to_pylist()
    assert len(tq) == 3 and tq[1]["gold_answer"] == "Canberra"
    meta = json.loads(tq[1]["metadata"])
    assert meta["mc1_labels"] == [0, 1, 0] and meta["mc2_choices"][1] == "The capital is Canberra."
    tv = load_problems("trivia_qa", path=TRIVIA).to_pylist()
    assert [r["problem_id"] for r in tv] == ["trivia_qa-tc_1", "trivia_qa-tc_2", "trivia_qa-tc_3"]
    assert json.loads(tv[0]["metadata"])["normalized_aliases"] == [
        "mars",
        "planet mars",
        "red planet",
    ]


def test_bad_targets_are_refused(tmp_path):
    rows = pq.read_table(TRUTHFUL).to_pylist()
    rows[0]["mc1_targets"]["labels"] = [1, 1]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="exactly one true"):
        load_problems("truthful_qa", path=path)
    rows[0]["mc1_targets"] = "A"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="not {choices, labels}"):
        load_problems("truthful_qa", path=path)
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"question": "q", "question_id": "1", "answer": "Mars"}))
    with pytest.raises(ValueError, match="string `value`"):
        load_problems("trivia_qa", path=bad)


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoTokenizer

    from workers.generation.demo_task import bundled_model_path
    from workers.scoring.scorer import ScoreConfig, load_model

    path = str(bundled_model_path())
    return load_model(
        path, ScoreConfig(dtype="float32", device="cpu")
    ), AutoTokenizer.from_pretrained(path)


def test_option_logliks_match_one_forward_per_option(tiny):
    import torch

    model, tok = tiny
    prompt, options = "solve 3 * x + 7 = 25 for x in 1 .. 9", ["3 * x = 18 ;", "3 * x"]
    batched = option_logliks(model, tok, prompt, options)
    for option, value in zip(options, batched, strict=True):
        p = tok(prompt)["input_ids"]
        ids = p + tok(" " + option, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        ref = sum(float(logp[i - 1, ids[i]]) for i in range(len(p), len(ids)))
        assert value == pytest.approx(ref, abs=1e-4)
    assert batched[0] > -5  # the tiny model knows the first step


def test_demo_sets_score_on_the_bundled_model(tiny):
    model, tok = tiny
    settings = EvalSettings("{question}", "{question}", 6, (";",))
    tq_rows = load_problems("truthful_qa", path=DEMO.format("truthful_qa")).slice(0, 4)
    tv_rows = load_problems("trivia_qa", path=DEMO.format("trivia_qa")).slice(0, 4)
    tq = evaluate_questions(model, tok, tq_rows, settings, "standard", "truthful_qa")
    tv = evaluate_questions(model, tok, tv_rows, settings, "standard", "trivia_qa")
    assert tq.num_rows == tv.num_rows == 4
    assert set(tq.column("condition").to_pylist()) == {"standard"}
    assert all(v in (0.0, 1.0) for v in tq.column("mc1").to_pylist())
    assert all(0 < v < 1 for v in tq.column("mc2").to_pylist())
    assert tv.column("mc1").null_count == 4 and tv.column("em").to_pylist()[0] == 1.0
    assert isinstance(tv, pa.Table)
    with pytest.raises(ValueError, match="no CoR evaluation of 'demo'"):
        evaluate_questions(model, tok, tq_rows, settings, "standard", "demo")


def test_a_reroute_changes_scores_and_the_standard_plan_does_not(tiny):
    """Under the standard plan's hook the scores are the model's own; a plan that forces
    experts everywhere moves MC2 (the evaluation sees the routing the caller installs)."""
    from workers.adapters import adapter_for
    from workers.generation.reroute import ReroutePlan, active_experts_per_token, rerouted

    model, tok = tiny
    adapter = adapter_for(model)
    settings = EvalSettings("{question}", "{question}", 6, (";",))
    rows = load_problems("truthful_qa", path=DEMO.format("truthful_qa")).slice(0, 3)
    plain = evaluate_questions(model, tok, rows, settings, "standard", "truthful_qa")
    with rerouted(model, ReroutePlan.standard(adapter)) as counter:
        same = evaluate_questions(model, tok, rows, settings, "standard", "truthful_qa")
    assert same.column("mc2").to_pylist() == plain.column("mc2").to_pylist()
    k = adapter.top_k
    assert active_experts_per_token(counter) == k * len(adapter.moe_layers)
    forced = ReroutePlan(
        dict.fromkeys(adapter.moe_layers, k), dict.fromkeys(adapter.moe_layers, (0, 1))
    )
    with rerouted(model, forced):
        moved = evaluate_questions(model, tok, rows, settings, "forced", "truthful_qa")
    assert moved.column("mc2").to_pylist() != plain.column("mc2").to_pylist()
