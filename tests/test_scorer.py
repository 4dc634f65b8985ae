"""The fast scorer equals brute force on every family; routes, seeds, errors, kv attention."""

import copy
import math

import pyarrow as pa
import pytest
import torch
from moe_factories import FAMILIES, VARIANTS, make_model, make_trajectories, single_thread

from workers.adapters import adapter_for
from workers.schemas import SCORES_SCHEMA, as_list_routes, scores_schema
from workers.scoring import kv, routes
from workers.scoring.brute import brute_distributions, brute_logprobs, route_divergence
from workers.scoring.scorer import ScoreConfig, Scorer

J = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def models():
    return {name: make_model(name) for name in VARIANTS}


def _scorer(model, micro_batch=None, **config):
    config = ScoreConfig(**{"alternatives": J, "pool": 6, **config})
    return Scorer("/models/tiny-moe", config, model=model, micro_batch=micro_batch)


def _pairs(rows):
    """Flatten score rows into (positions, routes, log u) over S and the alternatives."""
    pos, rts, logu = [], [], []
    for r in rows:
        pos += [r["position"]] * (1 + len(r["alt_routes"]))
        rts += [r["std_route"], *r["alt_routes"]]
        logu += [math.log(p) for p in [r["std_prob"], *r["alt_probs"]]]
    return torch.tensor(pos), torch.tensor(rts), torch.tensor(logu, dtype=torch.float64)


def _router_choices(model, layer, ids):
    ad = adapter_for(model)
    seen = {}
    hook = ad.router(layer).register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids)[None]).logits[0]
    hook.remove()
    z, _, chosen = seen["out"]
    return z, chosen, torch.log_softmax(logits.float(), -1)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("spec", ["early", "final"])
def test_fast_scorer_matches_brute_force(models, name, spec):
    model = models[name]
    scorer = _scorer(model)
    layer = scorer.resolve_layer(spec)
    table = make_trajectories(lengths=(13,), prompt_lens=(5,))
    rows = scorer.score_table(table, layer).to_pylist()
    ids = table["input_ids"][0].as_py()
    pos, rts, fast = _pairs(rows)
    brute = brute_logprobs(model, ids, layer, pos, rts).double()
    assert (brute - fast).abs().max().item() < 1e-4
    # u(S) is the plain model's probability, and S is the router's own choice
    z, chosen, logp = _router_choices(model, layer, ids)
    for r in rows:
        t = r["position"]
        assert abs(math.log(r["std_prob"]) - logp[t, ids[t + 1]].item()) < 1e-4
        assert r["std_route"] == chosen[t].tolist()


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("spec", ["early", "final"])
def test_kl_and_argmax_match_brute_force(models, name, spec):
    """KL(p_S || p_R) and the argmax change per alternative, S's argmax: from brute force's
    whole next-token distributions, within 1e-4; S's own draws have KL 0, bitwise."""
    model = models[name]
    scorer = _scorer(model, pool=4)  # a small pool: some draws repeat S
    layer = scorer.resolve_layer(spec)
    table = make_trajectories(lengths=(13,), prompt_lens=(5,))
    rows = scorer.score_table(table, layer).to_pylist()
    pos, rts, _ = _pairs(rows)
    logp = brute_distributions(model, table["input_ids"][0].as_py(), layer, pos, rts)
    logp = logp.view(len(rows), J + 1, -1)
    std_arg, arg, kl = route_divergence(logp[:, :1], logp)
    for i, r in enumerate(rows):
        assert r["std_argmax"] == std_arg[i, 0].item()
        assert max(abs(a - b) for a, b in zip(r["alt_kl"], kl[i, 1:].tolist(), strict=True)) < 1e-4
        top2 = logp[i].topk(2, dim=-1).values
        for j, flag in enumerate(r["alt_argmax_changed"]):
            if (top2[j + 1, 0] - top2[j + 1, 1]).item() > 1e-4:  # not a rounding tie
                assert flag == (arg[i, j + 1] != std_arg[i, 0]).item()
            if sorted(r["alt_routes"][j]) == sorted(r["std_route"]):
                assert r["alt_kl"][j] == 0.0 and not flag
    assert max(max(r["alt_kl"]) for r in rows) > 1e-3  # routes do move the distribution
    assert len({r["std_argmax"] for r in rows}) > 1


def test_verified_flag_is_carried_into_score_rows(models):
    scorer = _scorer(models["qwen3_moe"])
    table = make_trajectories(lengths=(8, 9), prompt_lens=(3, 4)).drop_columns(["verified"])
    rows = scorer.score_table(table, 1).to_pylist()
    assert {r["verified"] for r in rows} == {None}
    flags = pa.array([True, False])
    rows = scorer.score_table(table.append_column("verified", flags), 1).to_pylist()
    assert {(r["problem_id"], r["verified"]) for r in rows} == {("p0-0", True), ("p0-1", False)}


@pytest.mark.parametrize("name", FAMILIES)
def test_route_choice_visibly_changes_probabilities(models, name):
    """The tiny models are sensitive enough to routing for the tests above to mean something."""
    scorer = _scorer(models[name], alternatives=8, pool=8)
    gaps = [
        max(abs(a - r["std_prob"]) for a in r["alt_probs"])
        for r in scorer.score_table(make_trajectories(), "early").to_pylist()
    ]
    assert max(gaps) > 0.02


@pytest.mark.parametrize("sampler", routes.SAMPLERS)
def test_alternatives_are_k_distinct_experts_from_the_pool(models, sampler):
    model = models["qwen3_moe"]
    scorer = _scorer(model, alternatives=16, pool=4, sampler=sampler)
    table = make_trajectories(lengths=(12,), prompt_lens=(4,))
    rows = scorer.score_table(table, 1).to_pylist()
    z, _, _ = _router_choices(model, 1, table["input_ids"][0].as_py())
    seen = set()
    for r in rows:
        pool = set(torch.topk(z[r["position"]], 4).indices.tolist())
        assert len(r["alt_routes"]) == 16
        for route in r["alt_routes"]:
            assert len(set(route)) == 2 and all(0 <= e < 8 for e in route)
            if sampler != "uniform_all":
                assert set(route) <= pool
            seen |= set(route)
    if sampler == "uniform_all":
        assert len(seen) == 8  # experts outside the pool are drawn too


def test_router_scores_and_identical_sets(models):
    model = models["gpt_oss"]
    scorer = _scorer(model, alternatives=16, pool=3)  # a small pool: draws repeat the std set
    table = make_trajectories(lengths=(12,), prompt_lens=(4,))
    rows = scorer.score_table(table, 2).to_pylist()
    z, _, _ = _router_choices(model, 2, table["input_ids"][0].as_py())
    repeats = 0
    for r in rows:
        logp = torch.log_softmax(z[r["position"]].float(), -1)
        assert r["std_route_logprob"] == pytest.approx(logp[r["std_route"]].sum().item(), abs=1e-5)
        for route, s, u in zip(
            r["alt_routes"], r["alt_route_logprobs"], r["alt_probs"], strict=True
        ):
            assert s == pytest.approx(logp[route].sum().item(), abs=1e-5)
            if set(route) == set(r["std_route"]):
                assert u == r["std_prob"]  # the same set is computed once: bitwise equal
                repeats += 1
    assert repeats > 0


def test_output_rows_and_columns(models):
    scorer = _scorer(models["olmoe"])
    table = make_trajectories(lengths=(14, 9, 11), prompt_lens=(6, 1, 10))
    out = scorer.score_table(table, "middle")
    k, j = scorer.adapter.top_k, scorer.config.alternatives
    assert out.schema == scores_schema(scorer.adapter.n_experts, k, j)
    assert out.schema.field("std_route").type == pa.list_(pa.uint8(), k)  # OLMoE: 64 experts
    assert as_list_routes(out).schema == SCORES_SCHEMA
    assert out.num_rows == (14 - 6) + (9 - 1) + (11 - 10)
    d = out.to_pydict()
    ids = table["input_ids"].to_pylist()
    expected = [
        (i, t) for i, (n, p) in enumerate([(14, 6), (9, 1), (11, 10)]) for t in range(p - 1, n - 1)
    ]
    assert [
        (int(pid.split("-")[1]), t) for pid, t in zip(d["problem_id"], d["position"], strict=True)
    ] == expected
    assert d["target_id"] == [ids[i][t + 1] for i, t in expected]
    assert set(d["model"]) == {"tiny"} and set(d["dataset"]) == {"demo"} and set(d["layer"]) == {1}
    assert all(
        len(a) == J and len(p) == J for a, p in zip(d["alt_routes"], d["alt_probs"], strict=True)
    )
    assert all(0 < p <= 1 for p in d["std_prob"])
    bare = table.select(["problem_id", "sample_idx", "input_ids", "prompt_len"])
    d = scorer.score_table(bare, 1).to_pydict()
    assert set(d["model"]) == {"tiny-moe"} and set(d["dataset"]) == {"unknown"}


def test_micro_batch_size_and_shard_do_not_change_results(models):
    model = models["deepseek_v2_qlora"]
    shard = make_trajectories(lengths=(12, 15, 9), prompt_lens=(3, 1, 2), seed=3)  # t=0 alone
    alone = _scorer(model, micro_batch=1).score_table(shard.slice(1, 1), 2).to_pydict()
    together = _scorer(model).score_table(shard, 2).to_pydict()
    first = len(shard["input_ids"][0].as_py()) - shard["prompt_len"][0].as_py()
    part = {k: v[first : first + len(alone["position"])] for k, v in together.items()}
    for key in ("problem_id", "position", "target_id", "std_route", "alt_routes"):
        assert part[key] == alone[key]  # same alternatives whatever the batch composition
    for key in ("std_prob", "std_route_logprob"):
        torch.testing.assert_close(
            torch.tensor(part[key]), torch.tensor(alone[key]), rtol=0, atol=1e-6
        )
    for key in ("alt_probs", "alt_route_logprobs"):
        torch.testing.assert_close(
            torch.tensor(part[key]), torch.tensor(alone[key]), rtol=0, atol=1e-6
        )


def test_seeds():
    a = routes.token_seed(0, "p", 1, 5, 2)
    assert a == routes.token_seed(0, "p", 1, 5, 2) == 5938329177780040521
    others = {
        routes.token_seed(*v)
        for v in [
            (1, "p", 1, 5, 2),
            (0, "q", 1, 5, 2),
            (0, "p", 0, 5, 2),
            (0, "p", 1, 6, 2),
            (0, "p", 1, 5, 3),
        ]
    }
    assert a not in others and len(others) == 5
    z = torch.randn(3, 8)
    seeds = [11, 12, 13]
    one = routes.sample_routes(z, seeds, k=2, alternatives=5, pool=6)
    assert torch.equal(one, routes.sample_routes(z, seeds, k=2, alternatives=5, pool=6))
    assert torch.equal(one[1:], routes.sample_routes(z[1:], seeds[1:], k=2, alternatives=5, pool=6))


def test_gumbel_top_k_follows_the_router():
    """With a low temperature Gumbel-top-k returns the top-k; at tau=1 frequencies follow softmax."""
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0]])
    cold = routes.sample_routes(z, [7], k=2, alternatives=50, pool=6, temperature=1e-3)
    assert all(r == [0, 1] for r in cold[0].tolist())  # in the order picked: descending
    first = routes.sample_routes(z.expand(400, -1), list(range(400)), k=1, alternatives=50, pool=6)
    share = (first == 0).double().mean().item()
    assert share == pytest.approx(torch.softmax(z, -1)[0, 0].item(), abs=0.02)


def test_errors(models):
    model = models["deepseek_v2"]
    with pytest.raises(ValueError, match="pool of 1 experts is smaller than the route size k=2"):
        _scorer(model, pool=1)
    scorer = _scorer(model)
    good = make_trajectories(lengths=(8,), prompt_lens=(3,))
    with pytest.raises(ValueError, match="has no routed experts.*1-2"):
        scorer.score_table(good, 0)
    with pytest.raises(ValueError, match="out of range"):
        scorer.score_table(good, 7)
    with pytest.raises(ValueError, match="empty"):
        scorer.score_table(good.slice(0, 0), 1)
    with pytest.raises(ValueError, match="lack column.*prompt_len"):
        scorer.score_table(good.drop_columns(["prompt_len"]), 1)
    for p in (0, 8, 9):
        bad = good.set_column(3, "prompt_len", pa.array([p], pa.int32()))
        with pytest.raises(
            ValueError, match=r"prompt_len \d must be in \[1, len\(input_ids\) - 1\] = \[1, 7\]"
        ):
            scorer.score_table(bad, 1)
    for token in (96, -1):
        ids = good["input_ids"][0].as_py()
        bad = good.set_column(
            2, "input_ids", pa.array([ids[:4] + [token] + ids[5:]], pa.list_(pa.int32()))
        )
        with pytest.raises(
            ValueError, match=rf"token id {token} is outside the model's vocabulary \[0, 96\)"
        ):
            scorer.score_table(bad, 1)


@pytest.mark.parametrize(
    "field, value",
    [
        ("alternatives", 0),
        ("pool", 0),
        ("temperature", 0.0),
        ("sampler", "top"),
        ("dtype", "fp8"),
        ("device", "tpu"),
        ("memory_budget_mb", 0),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=f"ScoreConfig: {field}"):
        ScoreConfig(**{field: value})


def test_every_scoring_dtype_is_a_torch_floating_dtype():
    from workers.scoring.score_config import DTYPES

    for name in DTYPES:
        assert ScoreConfig(dtype=name).torch_dtype.is_floating_point, name


def _naive_attention(q, keys, values, pos, scaling, window, sinks, self_k=None, self_v=None):
    """Per-query loops: the definition that kv.attend must match."""
    out = torch.zeros(q.shape[0], q.shape[1], values.shape[-1], dtype=torch.float64)
    group = q.shape[1] // keys.shape[0]
    for b in range(q.shape[0]):
        t = int(pos[b])
        for h in range(q.shape[1]):
            k, v = keys[h // group].double(), values[h // group].double()
            js = [
                j
                for j in range(keys.shape[1])
                if (j < t if self_k is not None else j <= t) and (window is None or j > t - window)
            ]
            logits = [float(q[b, h].double() @ k[j]) * scaling for j in js]
            vals = [v[j] for j in js]
            if self_k is not None:
                logits.append(float(q[b, h].double() @ self_k[b, h // group].double()) * scaling)
                vals.append(self_v[b, h // group].double())
            weights = torch.softmax(
                torch.tensor(logits + ([float(sinks[h])] if sinks is not None else [])), 0
            )
            out[b, h] = sum(w * x for w, x in zip(weights, vals, strict=False))  # sink: no value
    return out


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("decode", [False, True])
def test_attend_matches_the_definition(window, with_sinks, decode):
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, length, d = 4, 2, 7, 5
    q = torch.randn(6, heads, d, generator=gen)
    keys, values = (
        torch.randn(kv_heads, length, d, generator=gen),
        torch.randn(kv_heads, length, 3, generator=gen),
    )
    pos = torch.tensor([0, 1, 3, 6, 6, 2])
    sinks = torch.randn(heads, generator=gen) if with_sinks else None
    self_k = torch.randn(6, kv_heads, d, generator=gen) if decode else None
    self_v = torch.randn(6, kv_heads, 3, generator=gen) if decode else None
    got = kv.attend(q, keys, values, pos, 0.4, window, sinks, self_k, self_v)
    want = _naive_attention(q, keys, values, pos, 0.4, window, sinks, self_k, self_v)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


def test_kv_standard_pass_and_switch(models):
    model = models["gpt_oss"]
    before = model.config._attn_implementation
    ids = torch.tensor(make_trajectories(lengths=(10,), prompt_lens=(2,))["input_ids"][0].as_py())[
        None
    ]
    seen = {}
    hook = model.model.norm.register_forward_hook(lambda m, a, o: seen.__setitem__("h", o))
    with kv.attention_switched(model), torch.no_grad():
        assert model.config._attn_implementation == kv.ATTENTION_NAME
        store = kv.standard_pass(model, ids, [1, 3], budget_bytes=1 << 10)  # query chunks of 2
        switched = model.lm_head(seen["h"])  # the prefill path of kv.attention
    hook.remove()
    assert model.config._attn_implementation == before
    assert sorted(store.keys) == [1, 3]
    assert store.keys[1].shape == (2, 10, 8) and store.values[3].shape == (2, 10, 8)
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(switched, eager, rtol=0, atol=1e-5)
    with (
        pytest.raises(RuntimeError, match="outside standard_pass/decoding"),
        kv.attention_switched(model),
        torch.no_grad(),
    ):
        model(input_ids=ids, use_cache=False)


@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16_is_as_close_to_float32_as_the_model_itself(models, name):
    """In bf16 the fast scorer's error against the float32 reference stays within that of the
    model's own bf16 forward (brute force in bf16): no precision is lost beyond the model's."""
    model = models[name]
    table = make_trajectories(lengths=(12,), prompt_lens=(4,))
    ids = table["input_ids"][0].as_py()
    low = copy.deepcopy(model).to(torch.bfloat16)
    scorer = _scorer(copy.deepcopy(low), dtype="bfloat16")
    layer = scorer.resolve_layer("early")
    pos, rts, fast = _pairs(scorer.score_table(table, layer).to_pylist())
    reference = brute_logprobs(model, ids, layer, pos, rts).double()
    own = brute_logprobs(low, ids, layer, pos, rts).double()
    assert (fast - reference).abs().max() <= 2 * (own - reference).abs().max() + 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(VARIANTS))
def test_cuda_matches_cpu_brute_force(models, name):
    model = copy.deepcopy(models[name])
    scorer = _scorer(model, device="cuda")
    table = make_trajectories(lengths=(13,), prompt_lens=(5,))
    layer = scorer.resolve_layer("early")
    pos, rts, fast = _pairs(scorer.score_table(table, layer).to_pylist())
    brute = brute_logprobs(models[name], table["input_ids"][0].as_py(), layer, pos, rts).double()
    assert (brute - fast).abs().max().item() < 1e-4


@pytest.mark.parametrize("spec", ["early", "middle", "final"])
def test_bundled_model_matches_brute_force(spec):
    """The shipped tiny model, loaded from disk as the pipeline loads it, on a real solution."""
    import random

    from transformers import AutoTokenizer

    from workers.generation import demo_task

    scorer = Scorer(demo_task.bundled_model_path(), ScoreConfig(alternatives=J, pool=8))
    problem = demo_task.problem_pool(1, "eval")[0]
    tok = AutoTokenizer.from_pretrained(demo_task.bundled_model_path())
    prompt = tok(problem.prompt, add_special_tokens=False)["input_ids"]
    solution = demo_task.render_solution(problem, random.Random(0))
    completion = tok(solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = prompt + completion
    table = pa.table(
        {
            "problem_id": ["demo-x"],
            "sample_idx": pa.array([0], pa.int32()),
            "input_ids": pa.array([ids], pa.list_(pa.int32())),
            "prompt_len": pa.array([len(prompt)], pa.int32()),
        }
    )
    layer = scorer.resolve_layer(spec)
    rows = scorer.score_table(table, layer).to_pylist()
    assert [r["position"] for r in rows] == list(range(len(prompt) - 1, len(ids) - 1))
    rows = rows[:: max(1, len(rows) // 6)]  # a spread of positions keeps brute force cheap
    pos, rts, fast = _pairs(rows)
    brute = brute_logprobs(scorer.model, ids, layer, pos, rts).double()
    assert (brute - fast).abs().max().item() < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("spec", ["early", "final"])
def test_a_model_spread_over_two_devices_scores_as_on_one(models, name, spec):
    """Half the decoder layers on the GPU, half (and the head) on the CPU, each executing where
    its weights are (accelerate's hooks, as a model spread over several GPUs has them): layer
    L's routes cross devices on their way to the head, and the scores stay brute force's."""
    from accelerate import dispatch_model

    model = copy.deepcopy(models[name])
    layers = adapter_for(model).layers
    half = len(layers) // 2
    device_map = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    device_map |= {f"model.layers.{i}": 0 if i < half else "cpu" for i in range(len(layers))}
    model = dispatch_model(model, device_map=device_map, main_device="cpu")
    scorer = _scorer(model, device="cuda")
    assert {d.type for d in scorer.devices} == {"cuda", "cpu"}
    table = make_trajectories(lengths=(13,), prompt_lens=(5,))
    layer = scorer.resolve_layer(spec)
    pos, rts, fast = _pairs(scorer.score_table(table, layer).to_pylist())
    brute = brute_logprobs(models[name], table["input_ids"][0].as_py(), layer, pos, rts).double()
    assert (brute - fast).abs().max().item() < 1e-4


def _brute_moe_outputs(model, ids, layer, positions, routes_):
    """Layer L's MoE block output at (positions[m], layer) with route routes_[m] forced, from
    the model's own forward (workers.scoring.brute's router override), one query at a time."""
    block = adapter_for(model).moe_block(layer)
    seen = []

    def keep(module, args, output):
        seen.append((output[0] if isinstance(output, tuple) else output).detach().float())

    hook = block.register_forward_hook(keep)
    try:
        outs = []
        for t, r in zip(positions.tolist(), routes_, strict=True):
            seen.clear()
            brute_distributions(model, ids, layer, torch.tensor([t]), r[None], batch_size=1)
            outs.append(seen[0].reshape(-1, seen[0].shape[-1])[t])
    finally:
        hook.remove()
    return torch.stack(outs)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_moe_geometry_matches_the_models_own_block_output(models, name):
    """With moe_geometry, each alternative's cosine and norm ratio against S equal those of
    the MoE block outputs the model itself computes with that route forced (float32, 1e-4);
    without it the file keeps its layout, and the scores are the same either way."""
    model = models[name]
    scorer = _scorer(model, pool=4, moe_geometry=True)
    layer = scorer.resolve_layer("middle")
    table = make_trajectories(lengths=(11,), prompt_lens=(5,))
    got = scorer.score_table(table, layer)
    plain = _scorer(model, pool=4).score_table(table, layer)
    assert got.column_names == [*plain.column_names, "alt_moe_cos", "alt_moe_norm_ratio"]
    assert got.select(plain.column_names).equals(plain)
    rows = got.to_pylist()
    pos, rts, _ = _pairs(rows)
    out = _brute_moe_outputs(model, table["input_ids"][0].as_py(), layer, pos, rts)
    out = out.view(len(rows), J + 1, -1)
    cos = torch.nn.functional.cosine_similarity(out[:, 1:], out[:, :1], dim=-1)
    ratio = out[:, 1:].norm(dim=-1) / out[:, :1].norm(dim=-1)
    assert (torch.tensor([r["alt_moe_cos"] for r in rows]) - cos).abs().max() < 1e-4
    assert (torch.tensor([r["alt_moe_norm_ratio"] for r in rows]) - ratio).abs().max() < 1e-4
    assert cos.min() < 0.99  # other routes do point elsewhere
