"""Virtual ablation (CEI) equals brute force on every family, with both gatings."""

import math

import pytest
import torch
from moe_factories import VARIANTS, make_model, make_trajectories, single_thread

from workers.adapters import adapter_for
from workers.schemas import CEI_SCHEMA
from workers.scoring.brute import brute_logprobs
from workers.scoring.cei import cei_table, standard_entropy
from workers.scoring.scorer import ScoreConfig, Scorer

POOL = 5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def models():
    return {name: make_model(name) for name in VARIANTS}


def _router(model, layer, ids):
    """Router logits (T, E), the model's chosen experts (T, k) and its log p (T, V)."""
    ad, seen = adapter_for(model), {}
    hook = ad.router(layer).register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(ids)[None]).logits[0]
    hook.remove()
    z, chosen = ad.parse_router_output(seen["out"])
    return z.float(), chosen, torch.log_softmax(logits.float(), -1)


def _gate(model, z, route):
    """The family's gating written out here, independently of workers.adapters."""
    cfg = model.config
    if cfg.model_type == "gpt_oss":
        return torch.softmax(z[route], -1)
    w = torch.softmax(z, -1)[route]
    if cfg.model_type == "deepseek_v2":
        return w * cfg.routed_scaling_factor
    return w / w.sum() if cfg.norm_topk_prob else w


def _queries(model, rows, z, gating):
    """(positions, routes, weights, fast log u) of every ablation and swap in `rows`."""
    pos, rts, ws, fast = [], [], [], []
    for r in rows:
        t, s = r["position"], torch.tensor(r["std_route"])
        lu = math.log(r["std_prob"])
        full = _gate(model, z[t], s)
        for i, c in enumerate(r["cei_out"]):
            keep = [j for j in range(len(s)) if j != i]
            w = torch.zeros(len(s))
            w[keep] = full[keep] if gating == "keep" else _gate(model, z[t], s[keep])
            pos.append(t), rts.append(s), ws.append(w), fast.append(lu - c)
        weakest = int(z[t][s].argmin())
        for e, c in zip(r["in_experts"], r["cei_in"], strict=True):
            swapped = s.clone()
            swapped[weakest] = e
            pos.append(t), rts.append(swapped), ws.append(_gate(model, z[t], swapped))
            fast.append(lu + c)
    return (
        torch.tensor(pos),
        torch.stack(rts),
        torch.stack(ws),
        torch.tensor(fast, dtype=torch.float64),
    )


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("gating", ["family", "keep"])
def test_cei_matches_brute_force(models, name, gating):
    model = models[name]
    scorer = Scorer("/models/tiny-moe", ScoreConfig(pool=POOL), model=model)
    layer = scorer.resolve_layer("early" if gating == "family" else "final")
    table = make_trajectories(lengths=(11,), prompt_lens=(5,))
    out = cei_table(scorer, table, layer, gating=gating)
    assert out.schema == CEI_SCHEMA
    rows = out.to_pylist()
    ids = table["input_ids"][0].as_py()
    z, chosen, logp = _router(model, layer, ids)
    assert [r["position"] for r in rows] == list(range(4, 10))
    for r in rows:
        t = r["position"]
        assert r["std_route"] == chosen[t].tolist()
        assert abs(math.log(r["std_prob"]) - logp[t, ids[t + 1]].item()) < 1e-4
        entropy = -(logp[t].exp() * logp[t]).sum().item()
        assert abs(r["std_entropy"] - entropy) < 1e-4
        pool = torch.topk(z[t], POOL).indices.tolist()
        assert r["in_experts"] == [e for e in pool if e not in r["std_route"]]
    pos, rts, ws, fast = _queries(model, rows, z, gating)
    brute = brute_logprobs(model, ids, layer, pos, rts, weights=ws).double()
    assert (brute - fast).abs().max().item() < 1e-4
    # the interventions visibly move the prediction, so the comparison means something
    assert max(abs(c) for r in rows for c in r["cei_out"] + r["cei_in"]) > 1e-2


def test_entropy_in_chunks_is_the_entropy_at_once(models):
    model = models["qwen3_moe"]
    final = torch.randn(7, model.config.hidden_size)
    with torch.no_grad():
        assert torch.allclose(
            standard_entropy(model, final, rows=2), standard_entropy(model, final)
        )
