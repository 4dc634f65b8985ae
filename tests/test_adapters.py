"""Adapters agree with the models' own routers and MoE blocks, for every family."""

import pytest
import torch
from moe_factories import FAMILIES, VARIANTS, make_model, single_thread

from workers.adapters import ADAPTERS, adapter_for
from workers.families import FAMILIES as SUPPORTED
from workers.layers import format_ranges


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def models():
    return {name: make_model(name) for name in VARIANTS}


def _router_io(model, layer, ids):
    """(block input x, router output) of `layer` in a plain forward pass over ids."""
    ad = adapter_for(model)
    seen = {}
    hooks = [
        ad.moe_norm(layer).register_forward_hook(
            lambda m, a, o: seen.__setitem__("x", o.flatten(0, -2))
        ),
        ad.router(layer).register_forward_hook(lambda m, a, o: seen.__setitem__("router", o)),
        ad.moe_block(layer).register_forward_hook(lambda m, a, o: seen.__setitem__("block", o)),
    ]
    with torch.no_grad():
        model(input_ids=torch.tensor(ids)[None])
    for h in hooks:
        h.remove()
    return seen


IDS = [5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 12, 50]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_standard_route_and_weights_match_the_router(models, name):
    model = models[name]
    ad = adapter_for(model)
    for layer in ad.moe_layers:
        seen = _router_io(model, layer, IDS)
        logits, weights, indices = seen["router"]
        std = ad.standard_route(logits)
        assert [set(r) for r in std.tolist()] == [set(r) for r in indices.tolist()]
        ours = ad.route_weights(logits, indices)
        torch.testing.assert_close(ours, weights.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_moe_output_of_the_standard_route_is_the_block_output(models, name):
    model = models[name]
    ad = adapter_for(model)
    layer = ad.moe_layers[-1]
    seen = _router_io(model, layer, IDS)
    x = seen["x"]
    logits, _, indices = seen["router"]
    block = seen["block"][0] if isinstance(seen["block"], tuple) else seen["block"]
    token = torch.arange(x.shape[0])
    with torch.no_grad():
        out = ad.moe_output(
            layer, x, token, indices, ad.route_weights(logits, indices), ad.shared_output(layer, x)
        )
    torch.testing.assert_close(out, block.flatten(0, -2), rtol=0, atol=1e-5)


def test_group_limited_route_differs_from_plain_top_k(models):
    """The grouped DeepSeek variant really exercises group-limited selection."""
    model = models["deepseek_v2_grouped"]
    ad = adapter_for(model)
    logits = _router_io(model, 1, IDS * 4)["router"][0]
    plain = torch.topk(logits, ad.top_k, dim=-1).indices
    grouped = ad.standard_route(logits)
    assert any(set(a) != set(b) for a, b in zip(plain.tolist(), grouped.tolist(), strict=True))
    groups = grouped // (ad.n_experts // 2)
    assert (groups == groups[:, :1]).all()  # topk_group=1: every chosen expert in one group


def test_gating_rules():
    z = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, 0.3, -0.2, 1.5]])
    route = torch.tensor([[0, 7]])
    probs = torch.softmax(z, -1)[0]
    qwen, olmoe = adapter_for(make_model("qwen3_moe")), adapter_for(make_model("olmoe"))
    deepseek, gpt = adapter_for(make_model("deepseek_v2")), adapter_for(make_model("gpt_oss"))
    torch.testing.assert_close(qwen.route_weights(z, route)[0], probs[[0, 7]] / probs[[0, 7]].sum())
    torch.testing.assert_close(olmoe.route_weights(z, route)[0], probs[[0, 7]])
    torch.testing.assert_close(deepseek.route_weights(z, route)[0], probs[[0, 7]] * 1.5)
    torch.testing.assert_close(gpt.route_weights(z, route)[0], torch.softmax(z[0, [0, 7]], -1))
    # routes (N, R, k) against logits (N, E)
    many = torch.tensor([[[0, 7], [1, 2], [3, 4]]])
    assert qwen.route_weights(z, many).shape == (1, 3, 2)


def test_one_adapter_per_supported_family():
    # The driver checks model.family against workers.families without importing the adapters.
    assert sorted(ADAPTERS) == sorted(SUPPORTED) == sorted(FAMILIES)
    assert all(ADAPTERS[name].family == name for name in ADAPTERS)


@pytest.mark.parametrize("name", FAMILIES)
def test_layer_selection(models, name):
    ad = adapter_for(models[name])
    expected = {
        "qwen3_moe": [0, 1, 2],
        "olmoe": [0, 1, 2],
        "deepseek_v2": [1, 2],
        "gpt_oss": [0, 1, 2, 3],
    }[name]
    assert ad.moe_layers == expected
    assert ad.resolve_layer("early") == expected[0]
    assert ad.resolve_layer("middle") == expected[len(expected) // 2]
    assert ad.resolve_layer("final") == expected[-1]
    assert ad.resolve_layer(str(expected[-1])) == expected[-1]


def test_layer_errors(models):
    ad = adapter_for(models["deepseek_v2"])
    with pytest.raises(ValueError, match=r"layer 0 has no routed experts.*valid MoE layers.*1-2"):
        ad.resolve_layer(0)
    for bad in (3, -1, 99):
        with pytest.raises(ValueError, match=r"out of range.*1-2"):
            ad.resolve_layer(bad)
    with pytest.raises(ValueError, match="early/middle/final"):
        ad.resolve_layer("deep")


def test_unsupported_family():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    with pytest.raises(ValueError, match="unsupported model_type 'llama'.*qwen3_moe"):
        adapter_for(LlamaForCausalLM(cfg))


def test_ranges():
    assert format_ranges([1, 2, 3, 5, 7, 8]) == "1-3, 5, 7-8"
