"""The one model loader: safetensors only, where the weights go, what it refuses."""

import json

import pytest
import torch
from moe_factories import make_config, make_model, save_model

from workers.generation import demo_task
from workers.models import devices_of, load_causal_lm, placement, weights_bytes

GB = 10**9


def test_placement_keeps_a_model_on_one_gpu_when_it_fits_and_spreads_it_only_when_not():
    assert placement(60 * GB, 10 * GB, [80 * GB, 80 * GB]) == "cuda:0"
    assert placement(75 * GB, 10 * GB, [80 * GB, 80 * GB]) == "spread"
    assert placement(75 * GB, 10 * GB, [80 * GB]) is None
    # each GPU keeps its reserve: 2 x (80 - 10) = 140 GB is what two GPUs hold
    assert placement(140 * GB, 10 * GB, [80 * GB, 80 * GB]) == "spread"
    assert placement(141 * GB, 10 * GB, [80 * GB, 80 * GB]) is None
    assert placement(1 * GB, 0, []) is None


def test_weights_bytes_counts_the_real_parameters_without_allocating_them():
    model = make_model("qwen3_moe")
    real = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights_bytes(make_config("qwen3_moe"), torch.float32) == real
    assert weights_bytes(make_config("qwen3_moe"), torch.bfloat16) == real // 2


def test_the_bundled_model_loads_in_the_requested_dtype_on_the_cpu_in_eval_mode():
    model = load_causal_lm(demo_task.bundled_model_path(), dtype=torch.bfloat16)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert devices_of(model) == [torch.device("cpu")]


def test_a_saved_checkpoint_loads_the_same_weights(tmp_path):
    model = make_model("olmoe")
    loaded = load_causal_lm(save_model(model, tmp_path / "m"), dtype=torch.float32)
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_missing_or_weightless_directory_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        load_causal_lm(tmp_path / "nothing", dtype=torch.float32)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(make_config("olmoe").to_dict()))
    with pytest.raises(ValueError, match="cannot load model weights from"):
        load_causal_lm(tmp_path / "m", dtype=torch.float32)
