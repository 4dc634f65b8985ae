"""The reroute at generation: the router hook on every family, its expert count, the CoR budget
rule on hand-made tables, and rerouted generation in the HF backend."""

import json

import polars as pl
import pytest
import torch
import torch.nn.functional as F
from moe_factories import FAMILIES, VOCAB, make_model, save_model, single_thread

from analysis.cor_plan import RerouteConfig, cor_plan
from workers.adapters import adapter_for
from workers.generation import SamplingParams, make_backend
from workers.generation.reroute import (
    RerouteCounter,
    ReroutePlan,
    active_experts_per_token,
    baseline_active_per_token,
    plan_routes,
    rerouted,
)

IDS = torch.tensor([[5, 17, 42, 8, 77, 30, 61], [9, 9, 12, 50, 3, 88, 21]])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def models():
    return {name: make_model(name) for name in (*FAMILIES, "deepseek_v2_grouped")}


def _logits(model, plan=None):
    with torch.no_grad():
        if plan is None:
            return model(input_ids=IDS).logits
        with rerouted(model, plan) as counter:
            return model(input_ids=IDS).logits, counter


def _moved(adapter, forced=(5, 0)):
    """k - 1 at the first MoE layer, k + 1 at the last with `forced` experts there."""
    first, last = adapter.moe_layers[0], adapter.moe_layers[-1]
    k = dict.fromkeys(adapter.moe_layers, adapter.top_k)
    k[first], k[last] = adapter.top_k - 1, adapter.top_k + 1
    return ReroutePlan(k, {last: forced})


# --- (1) the standard plan changes nothing --------------------------------------------------------


@pytest.mark.parametrize("name", [*FAMILIES, "deepseek_v2_grouped"])
def test_the_standard_plan_leaves_the_logits_bitwise_equal(models, name):
    model = models[name]
    adapter = adapter_for(model)
    logits, counter = _logits(model, ReroutePlan.standard(adapter))
    assert torch.equal(logits, _logits(model))
    assert counter.tokens == dict.fromkeys(adapter.moe_layers, IDS.numel())
    assert active_experts_per_token(counter, adapter.moe_layers) == adapter.top_k * len(
        adapter.moe_layers
    )


# --- (2) a moved budget with forced experts equals brute force -----------------------------------


def _expert_out(model, layer, e, x):
    """Expert e's unweighted output on x (H,), written out from the fused weights."""
    ex = adapter_for(model).experts(layer)
    if model.config.model_type == "gpt_oss":
        gu = x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
        gate = gu[::2].clamp(max=ex.limit)
        up = gu[1::2].clamp(min=-ex.limit, max=ex.limit)
        h = (up + 1) * gate * torch.sigmoid(gate * ex.alpha)
        return h @ ex.down_proj[e] + ex.down_proj_bias[e]
    gate, up = (ex.gate_up_proj[e] @ x).chunk(2)
    return ex.down_proj[e] @ (F.silu(gate) * up)


def _gate(model, z, route):
    """The family's gating rule written out here, independently of workers.adapters."""
    cfg = model.config
    if cfg.model_type == "gpt_oss":
        return torch.softmax(z[route], -1)
    w = torch.softmax(z, -1)[route]
    if cfg.model_type == "deepseek_v2":
        return w * cfg.routed_scaling_factor
    return w / w.sum() if cfg.norm_topk_prob else w


def _block_io(model, layer, plan):
    """(input, output) of `layer`'s MoE block, (T, H) each, in a rerouted forward."""
    block, seen = adapter_for(model).moe_block(layer), {}
    pre = block.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    post = block.register_forward_hook(lambda m, a, o: seen.__setitem__("y", o))
    try:
        _logits(model, plan)
    finally:
        pre.remove()
        post.remove()
    y = seen["y"][0] if isinstance(seen["y"], tuple) else seen["y"]
    return seen["x"].flatten(0, -2), y.flatten(0, -2)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_moved_budget_with_forced_experts_equals_brute_force(models, name):
    model = models[name]
    adapter = adapter_for(model)
    plan = _moved(adapter)
    for layer in (adapter.moe_layers[0], adapter.moe_layers[-1]):
        x, y = _block_io(model, layer, plan)
        router = adapter.router(layer)
        bias = getattr(router, "bias", None)
        for t in (0, 9):
            z = F.linear(x[t], router.weight, bias)
            forced = list(plan.forced.get(layer, ()))
            rest = [e for e in torch.argsort(z, descending=True).tolist() if e not in forced]
            chosen = torch.tensor(forced + rest[: plan.k[layer] - len(forced)])
            assert len(set(chosen.tolist())) == plan.k[layer]
            w = _gate(model, z, chosen)
            want = sum(w[j] * _expert_out(model, layer, e, x[t]) for j, e in enumerate(chosen))
            if model.config.model_type == "deepseek_v2":
                want = want + adapter.moe_block(layer).shared_experts(x[t])
            torch.testing.assert_close(y[t], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["batched_mm", "grouped_mm"])
def test_the_fused_experts_kernels_take_k_from_the_routes(models, impl):
    """transformers' other experts implementations read k from the indices' width too."""
    model = models["deepseek_v2"]
    plan = _moved(adapter_for(model))
    eager, _ = _logits(model, plan)
    model.set_experts_implementation(impl)
    try:
        fused, counter = _logits(model, plan)
    finally:
        model.set_experts_implementation("eager")
    torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)
    assert active_experts_per_token(counter) == plan.active_per_token()


def test_grouped_selection_order_reproduces_the_router(models):
    """DeepSeek-V2 group_limited_greedy: the plan's top-k at the standard k is the router's."""
    model = models["deepseek_v2_grouped"]
    adapter = adapter_for(model)
    z = torch.randn(64, adapter.n_experts) * 3
    plan = ReroutePlan.standard(adapter)
    for layer in adapter.moe_layers:
        ours = plan_routes(adapter, plan, layer, z).sort(-1).values
        assert torch.equal(ours, adapter.standard_route(z).sort(-1).values)


def test_the_random_control_draws_outside_the_top_k_and_is_seeded(models):
    adapter = adapter_for(models["qwen3_moe"])
    layer = adapter.moe_layers[-1]
    plan = _moved(adapter, forced=(3,)).with_random(7)
    z = torch.randn(200, adapter.n_experts)
    top = torch.topk(z, plan.k[layer], dim=-1).indices

    def draw(seed):
        return plan_routes(adapter, plan, layer, z, torch.Generator().manual_seed(seed))

    routes = draw(1)
    assert routes.shape == (200, plan.k[layer])
    assert torch.equal(routes[:, : plan.k[layer] - 1], top[:, : plan.k[layer] - 1])
    assert not (routes[:, -1:] == top).any()  # the extra expert lies outside the top-k_l
    assert torch.equal(routes, draw(1)) and not torch.equal(routes, draw(2))
    # Uniform over the experts outside the top-k_l: every rank below k_l is drawn about as often.
    outside = torch.argsort(z, dim=-1, descending=True)[:, plan.k[layer] :]
    rank = (outside == routes[:, -1:]).int().argmax(-1)
    counts = torch.bincount(rank, minlength=adapter.n_experts - plan.k[layer])
    assert counts.shape == (5,) and counts.min() >= 25, counts


# --- (3) active experts per token ------------------------------------------------------------


def _tables(adapter):
    """Hand-made CEI tables for `adapter`'s MoE layers: R_l rising with the layer index."""
    layers = adapter.moe_layers
    frame = pl.DataFrame(
        {"model": "m", "dataset": "d", "layer": layers, "sensitivity": [0.1 * i for i in layers]}
    )
    experts = pl.DataFrame(
        {"model": "m", "dataset": "d", "layer": [layers[-1]] * 3, "expert": [6, 1, 4]}
        | {"dormancy": [0.5, 0.5, 0.0]}
    )
    return frame, experts


@pytest.mark.parametrize("name", FAMILIES)
def test_a_cor_plan_keeps_the_active_experts_and_static_adds_one_per_layer(models, name):
    model = models[name]
    adapter = adapter_for(model)
    baseline = baseline_active_per_token(adapter)
    plan = cor_plan(*_tables(adapter), adapter, RerouteConfig())
    assert plan.forced == {adapter.moe_layers[-1]: (1,)}  # dormancy tie: the lower id
    logits, counter = _logits(model, plan)
    assert active_experts_per_token(counter, adapter.moe_layers) == baseline
    assert plan.active_per_token() == baseline
    assert not torch.equal(logits, _logits(model))  # the reroute does change the prediction
    _, counter = _logits(model, plan.with_random(3))
    assert active_experts_per_token(counter, adapter.moe_layers) == baseline
    _, counter = _logits(model, ReroutePlan.static(adapter))
    assert active_experts_per_token(counter) == baseline + len(adapter.moe_layers)
    assert counter.pairs[adapter.moe_layers[0]] == IDS.numel() * (adapter.top_k + 1)


# --- (4) the hook goes away ------------------------------------------------------------------


def test_the_hooks_are_removed_after_the_block_and_after_an_error(models):
    model = models["gpt_oss"]
    adapter = adapter_for(model)
    before = _logits(model)
    plan = _moved(adapter)
    with rerouted(model, plan):
        assert all(adapter.router(i)._forward_hooks for i in adapter.moe_layers)
    with pytest.raises(RuntimeError, match="inside"):
        with rerouted(model, plan):
            raise RuntimeError("inside")
    with rerouted(model, plan), pytest.raises(ValueError, match="already rerouted"):
        with rerouted(model, ReroutePlan.standard(adapter)):
            pass
    assert not any(adapter.router(i)._forward_hooks for i in adapter.moe_layers)
    assert not any(hasattr(adapter.router(i), "_rerouted") for i in adapter.moe_layers)
    assert torch.equal(_logits(model), before)


def test_a_plan_that_does_not_fit_the_model_is_refused(models):
    adapter = adapter_for(models["deepseek_v2"])  # layer 0 is dense
    with pytest.raises(ValueError, match="not the model's MoE layers"):
        with rerouted(models["deepseek_v2"], ReroutePlan({0: 2, 1: 2, 2: 2})):
            pass
    for bad in (ReroutePlan({1: 9, 2: 2}), ReroutePlan({1: 2, 2: 2}, {2: (8,)})):
        with pytest.raises(ValueError):
            bad.check(adapter)
    plan = _moved(adapter).with_random(4)
    assert ReroutePlan(**json.loads(json.dumps(plan.as_dict()))) == plan
    with pytest.raises(ValueError, match="no router call"):
        active_experts_per_token(RerouteCounter())
    with pytest.raises(ValueError, match="no token passed"):
        _, counter = _logits(models["deepseek_v2"], ReroutePlan.standard(adapter))
        active_experts_per_token(counter, [0, *adapter.moe_layers])
    with pytest.raises(ValueError, match="random experts outside"):
        ReroutePlan({1: 1, 2: 7}, {2: (0, 1)}, random_seed=0).check(adapter)
    for k, forced in (
        ({1: 0}, {}),
        ({1: 2}, {1: (3, 3)}),
        ({1: 1}, {1: (3, 4)}),
        ({1: 1}, {2: (0,)}),
    ):
        with pytest.raises(ValueError):
            ReroutePlan(k, forced)


# --- (5) the budget rule ---------------------------------------------------------------------


def _rule_tables():
    layers = pl.DataFrame(
        {
            "model": "m",
            "dataset": "d",
            "layer": [0, 1, 2, 3, 4, 5],
            "sensitivity": [0.3, -0.2, 0.9, None, 0.3, 0.5],
        }
    )
    experts = pl.DataFrame(
        {
            "model": "m",
            "dataset": "d",
            "layer": [2, 2, 2, 2, 5, 5, 0],
            "expert": [7, 2, 5, 1, 3, 6, 4],
            "dormancy": [0.4, 0.4, 0.1, None, 0.05, 0.0, 2.0],
        }
    )
    return layers, experts


MODEL = ([0, 1, 2, 3, 4, 5], 4, 16)  # moe_layers, k, n_experts


def test_the_budget_rule_moves_shift_from_the_least_to_the_most_sensitive_layers():
    layers, experts = _rule_tables()
    plan = cor_plan(layers, experts, MODEL, RerouteConfig(shift=2, layers_moved=2, forced=3))
    # By (R_l, layer): 1, 0, 4, 5, 2 (layer 3 has no R_l); 0 and 4 tie at 0.3: 0 gives.
    assert plan.k == {0: 2, 1: 2, 2: 6, 3: 4, 4: 4, 5: 6}
    assert sum(plan.k.values()) == 4 * 6 and all(1 <= n <= 16 for n in plan.k.values())
    # Dormancy > 0, descending, ties by id; layer 5 has one candidate; layer 0 gives, none forced.
    assert plan.forced == {2: (2, 7, 5), 5: (3,)}
    plan = cor_plan(layers, experts, MODEL, RerouteConfig(forced=2, min_dormancy=0.2))
    assert plan.k == {0: 4, 1: 3, 2: 5, 3: 4, 4: 4, 5: 4} and plan.forced == {2: (2, 7)}
    assert cor_plan(layers, experts, MODEL, RerouteConfig(forced=0)).forced == {}


def test_the_budget_rule_refuses_what_it_cannot_do():
    layers, experts = _rule_tables()
    for cfg in (dict(shift=0), dict(layers_moved=0), dict(forced=-1), dict(min_dormancy=-1.0)):
        with pytest.raises(ValueError, match="must be"):
            RerouteConfig(**cfg)
    with pytest.raises(ValueError, match="needs 6 layers with an R_l"):
        cor_plan(layers, experts, MODEL, RerouteConfig(layers_moved=3))
    with pytest.raises(ValueError, match="outside"):
        cor_plan(layers, experts, MODEL, RerouteConfig(shift=4))
    with pytest.raises(ValueError, match="outside"):
        cor_plan(layers, experts, ([0, 1, 2, 3, 4, 5], 4, 4), RerouteConfig())
    with pytest.raises(ValueError, match="forced 6"):
        cor_plan(layers, experts, MODEL, RerouteConfig(forced=6))
    with pytest.raises(ValueError, match="not MoE layers"):
        cor_plan(layers, experts, ([1, 2, 3, 4, 5], 4, 16), RerouteConfig())
    two = pl.concat([layers, layers.with_columns(dataset=pl.lit("e"))])
    with pytest.raises(ValueError, match="several datasets"):
        cor_plan(two, experts, MODEL, RerouteConfig())


# --- the HF backend --------------------------------------------------------------------------


def test_the_hf_backend_generates_rerouted(tmp_path, models):
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(tok_models.WordLevel(words, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="w0", bos_token="w1", eos_token="w2", unk_token="w3"
    )
    path = save_model(models["olmoe"], tmp_path / "olmoe")
    fast.save_pretrained(path)
    prompts = [("a", "w5 w17 w42 w8"), ("b", "w9 w12 w50")]
    params = SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=3)
    plain = make_backend("hf", str(path), batch_size=4)
    adapter = adapter_for(plain.model)
    plan = cor_plan(*_tables(adapter), adapter, RerouteConfig())
    backend = make_backend("hf", str(path), batch_size=4, plan=plan)
    out = backend.generate(prompts, params)
    with rerouted(plain.model, plan):
        assert plain.generate(prompts, params) == out
    assert plain.generate(prompts, params) != out
    counter = backend.reroute_counter
    assert active_experts_per_token(counter, adapter.moe_layers) == plan.active_per_token()
    assert counter.tokens[adapter.moe_layers[0]] > 4 * 4  # prompts and decode steps
    with pytest.raises(ValueError, match="MoE layers"):
        make_backend("hf", str(path), plan=ReroutePlan({0: 2}))
