"""The bundled tiny Qwen3-MoE: a standard model directory that loads offline and does the science.

The science needs right answers to score (sampled accuracy in [0.5, 0.9]) and low-probability
tokens inside them (fragile share >= 0.05): see tools/demo_eval.py.
"""

import json
import os

import pytest
import torch

from workers.generation import demo_task

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub; the directory is complete

MODEL_DIR = demo_task.bundled_model_path()


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, use_safetensors=True)
    return tokenizer, model.eval()


def test_model_directory_is_standard_and_small():
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (MODEL_DIR / name).is_file(), name
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 10 * 2**20  # it lives in git
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert config["model_type"] == "qwen3_moe" and config["norm_topk_prob"] is True
    assert (config["num_experts"], config["num_experts_per_tok"]) == (16, 4)
    assert (
        config["num_local_experts"] == 16
    )  # transformers 5 reads this key, 4 (and vLLM) the other
    assert config["num_hidden_layers"] == 4  # early, middle and final layers are distinct


def test_special_tokens_agree_between_tokenizer_config_and_generation_config(loaded):
    tokenizer, model = loaded
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(model.config, name) == getattr(tokenizer, name) is not None, name
        assert getattr(model.generation_config, name) == getattr(tokenizer, name), name
    assert len(tokenizer) <= model.config.vocab_size
    prompt = demo_task.make_problems(1, seed=0)["prompt"][0].as_py()
    ids = tokenizer(prompt)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == prompt
    assert ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]  # no BOS is added


def test_greedy_generation_solves_a_problem_in_the_task_format(loaded):
    tokenizer, model = loaded
    row = demo_task.make_problems(1, seed=5).to_pylist()[0]
    batch = tokenizer([row["prompt"]], return_tensors="pt")
    out = model.generate(**batch, do_sample=False, max_new_tokens=100)
    completion = out[0, batch["input_ids"].shape[1] :].tolist()
    assert completion[-1] == tokenizer.eos_token_id  # it stops by itself
    text = tokenizer.decode(completion, skip_special_tokens=True)
    assert text.split()[1:4] == ["*", "x", "="] and demo_task.extract_answer(text) is not None


@pytest.mark.slow
def test_sampled_accuracy_and_fragile_share_on_fresh_problems():
    from tools.demo_eval import evaluate

    torch.set_num_threads(2)
    result = evaluate(MODEL_DIR, n_problems=100, seed=1234)
    assert 0.5 <= result["accuracy"] <= 0.9, result
    assert result["fragile_share"] >= 0.05, result
    assert result["verified_tokens"] > 1000, result
