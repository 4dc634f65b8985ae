"""Static shapes for compiled decoding: key buckets, padded micro-batches, one compile per bucket.

The recompile test scores trajectories of many lengths under
`torch.compiler.set_stance("fail_on_recompile")` once the buckets are warm, so any recompile
(a new sequence length, a new number of micro-batches, a new store of keys) fails it. On a CPU
the compiled step holds eager attention in its graph; flex runs beside it (CPU inductor cannot
lower FlexAttention with its log-sum-exp).
"""

import math

import pytest
import torch
from moe_factories import VARIANTS, make_model, make_trajectories, single_thread
from test_scorer import _pairs

from workers.scoring import kv
from workers.scoring.brute import brute_logprobs
from workers.scoring.scorer import ScoreConfig, Scorer

J = 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


def _scorer(model, **config):
    config = ScoreConfig(**{"alternatives": J, "pool": 6, **config})
    return Scorer("/models/tiny-moe", config, model=model, micro_batch=8, key_floor=16)


def test_key_buckets_are_powers_of_two_from_the_floor_up_to_the_limit():
    assert [kv.key_bucket(n, 4096) for n in (1, 1024, 1025, 3000, 4096)] == [
        1024,
        1024,
        2048,
        4096,
        4096,
    ]
    assert kv.key_bucket(35000, 40960) == 40960  # the model's maximum, not the next power
    assert kv.key_bucket(50000, 40960) == 50000  # beyond it: the sequence itself
    assert kv.key_bucket(17, 256, floor=16) == 32


def test_static_scorer_pads_stored_keys_to_the_bucket():
    """compile=True: the standard pass keeps keys and values zero-padded to the bucket; the
    default path keeps exactly the sequence."""
    model = make_model("qwen3_moe")
    ids = torch.tensor(make_trajectories(lengths=(20,), prompt_lens=(4,))["input_ids"][0].as_py())
    with kv.attention_switched(model), torch.inference_mode():
        padded = kv.standard_pass(model, ids[None], [2], 1 << 20, capacity=32)
        plain = kv.standard_pass(model, ids[None], [2], 1 << 20)
    assert padded.keys[2].shape[1] == 32 and plain.keys[2].shape[1] == 20
    assert torch.equal(padded.keys[2][:, :20], plain.keys[2])
    assert not padded.values[2][:, 20:].any()
    assert _scorer(model, compile=True)._key_length(19) == 32
    assert _scorer(model)._key_length(19) is None


@pytest.mark.parametrize("attention", ["eager", "flex"])
def test_compiled_decode_compiles_once_per_bucket(attention):
    """GPT-OSS at layer 1 (later layers: window 4 + sinks, then full attention).
    Warm-up: one sequence per key bucket (16 and 32 keys); then trajectories of other lengths,
    prompt lengths and micro-batch counts run without one recompile, equal to brute force."""
    model = make_model("gpt_oss")
    scorer = _scorer(model, compile=True, attention=attention)
    layer = 1
    torch._dynamo.reset()
    scorer.score_table(make_trajectories(lengths=(12, 30), prompt_lens=(5, 25)), layer)
    table = make_trajectories(lengths=(9, 17, 14, 25, 33), prompt_lens=(2, 3, 11, 4, 20), seed=1)
    with torch.compiler.set_stance("fail_on_recompile"):
        rows = scorer.score_table(table, layer).to_pylist()
    for i, ids in enumerate(table["input_ids"].to_pylist()):
        mine = [r for r in rows if r["problem_id"] == f"p1-{i}"]
        pos, rts, fast = _pairs(mine)
        brute = brute_logprobs(model, ids, layer, pos, rts).double()
        assert (brute - fast).abs().max().item() < 1e-4
        assert not math.isnan(fast.sum().item())


@pytest.fixture(scope="module")
def models():
    return {name: make_model(name) for name in VARIANTS}


@pytest.mark.slow  # 12 compiles: ~5 s each on an idle core
@pytest.mark.parametrize("attention", ["eager", "flex"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_compiled_paths_match_brute_force(models, name, attention):
    """compile and flex+compile, static shapes (a 16-key bucket, padded micro-batches), at the
    last MoE layer but one, so that a compiled step holds one later layer's attention (MLA's
    key dim != value dim, GPT-OSS's sinks) and the head; within 1e-4 of brute force."""
    model = models[name]
    scorer = _scorer(model, compile=True, attention=attention)
    layer = scorer.moe_layers[-2]
    table = make_trajectories(lengths=(13,), prompt_lens=(5,))
    pos, rts, fast = _pairs(scorer.score_table(table, layer).to_pylist())
    brute = brute_logprobs(model, table["input_ids"][0].as_py(), layer, pos, rts).double()
    assert (brute - fast).abs().max().item() < 1e-4
