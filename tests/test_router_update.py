"""The router update on tiny models of every family: token selection, the loss and the family's
selection rule, determinism, the router input, and the checkpoint (every tensor compared)."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from moe_factories import make_model, make_trajectories, save_model, single_thread
from safetensors.torch import load_file

from workers.adapters import adapter_for
from workers.router.update import (
    PREFERENCES_SCHEMA,
    UpdateConfig,
    add_router_inputs,
    control_targets,
    is_holdout,
    route_score,
    router_parameters,
    select_tokens,
    train_router,
    write_checkpoint,
)
from workers.schemas import SCORES_SCHEMA


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def update_cfg(**overrides):
    values = dict(
        margin=0.05,
        fragile=0.5,
        confident=0.9,
        beta=1.0,
        anchor_weight=1.0,
        steps=30,
        lr=0.05,
        max_anchor_tokens=100,
        holdout_share=0.0,
        seed=0,
    )
    return UpdateConfig(**{**values, **overrides})


def score_row(pid, position, std_prob, alt_probs, std_route=(0, 1), alt_routes=None):
    alt_routes = alt_routes or [[2 + j, 3 + j] for j in range(len(alt_probs))]
    return {
        "problem_id": pid,
        "sample_idx": 0,
        "position": position,
        "target_id": 5,
        "std_route": list(std_route),
        "std_prob": std_prob,
        "alt_routes": alt_routes,
        "alt_probs": alt_probs,
        "std_route_logprob": -1.0,
        "alt_route_logprobs": [-2.0] * len(alt_probs),
        "model": "m",
        "layer": 3,
        "dataset": "d",
    }


def test_select_tokens_takes_fragile_wins_above_the_margin_and_confident_anchors():
    rows = [
        score_row("p", 0, 0.1, [0.3, 0.5, 0.2]),  # fragile, best alt +0.4: prefer, winner alt 1
        score_row("p", 1, 0.3, [0.32, 0.1, 0.1]),  # fragile, best alt +0.02 <= margin: nothing
        score_row("p", 2, 0.95, [0.95, 0.96, 0.97]),  # confident: anchor
        score_row("p", 3, 0.7, [0.8, 0.6, 0.7]),  # ambiguous: nothing
    ]
    out = select_tokens(pa.Table.from_pylist(rows, schema=SCORES_SCHEMA), update_cfg())
    assert out.schema == PREFERENCES_SCHEMA
    got = out.select(["position", "kind", "winner", "loser"]).to_pylist()
    assert got == [
        {"position": 0, "kind": "prefer", "winner": [3, 4], "loser": [0, 1]},
        {"position": 2, "kind": "anchor", "winner": [0, 1], "loser": [0, 1]},
    ]
    assert out.column("u_winner").to_pylist()[0] == pytest.approx(0.5)


def test_select_tokens_leaves_held_out_problems_out_and_caps_anchors_deterministically():
    ids = [f"q{i}" for i in range(40)]
    rows = [score_row(p, t, 0.99, [0.99, 0.99]) for p in ids for t in range(3)]
    table = pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)
    cfg = update_cfg(holdout_share=0.5, max_anchor_tokens=10)
    out = select_tokens(table, cfg)
    held = {p for p in ids if is_holdout(p, 0.5, 0)}
    assert 0 < len(held) < len(ids)
    assert out.num_rows == 10
    assert not held & set(out.column("problem_id").to_pylist())
    assert select_tokens(table, cfg).equals(out)
    assert not select_tokens(
        table, update_cfg(holdout_share=0.5, max_anchor_tokens=10, seed=1)
    ).equals(out)


def test_control_targets_keep_the_tokens_and_anchors_and_change_only_the_winners():
    rows = [
        score_row(
            f"p{i}",
            0,
            0.1,
            [0.2 + 0.01 * j for j in range(6)],
            alt_routes=[[10 * i + j, 10 * i + j + 1] for j in range(6)],
        )
        for i in range(12)
    ] + [score_row("a", t, 0.99, [0.99, 0.99, 0.99, 0.99, 0.99, 0.99]) for t in range(5)]
    scores = pa.Table.from_pylist(rows, schema=SCORES_SCHEMA)
    real = select_tokens(scores, update_cfg())
    prefer = [r for r in real.to_pylist() if r["kind"] == "prefer"]
    assert len(prefer) == 12 and all(r["winner"][0] % 10 == 5 for r in prefer)  # the best
    fixed = [c for c in real.column_names if c not in ("winner", "u_winner")]

    shuffled = control_targets(real, scores, "shuffled", 0)
    assert shuffled.num_rows == real.num_rows and shuffled.select(fixed).equals(real.select(fixed))
    winners = [tuple(r["winner"]) for r in shuffled.to_pylist() if r["kind"] == "prefer"]
    assert sorted(winners) == sorted(tuple(r["winner"]) for r in prefer)  # a permutation
    assert winners != [tuple(r["winner"]) for r in prefer]
    assert control_targets(real, scores, "shuffled", 0).equals(shuffled)
    assert not control_targets(real, scores, "shuffled", 1).equals(shuffled)

    rand = control_targets(real, scores, "random", 0)
    assert rand.num_rows == real.num_rows and rand.select(fixed).equals(real.select(fixed))
    picked = [r for r in rand.to_pylist() if r["kind"] == "prefer"]
    for i, r in enumerate(picked):  # one of the token's own draws, with its u
        j = r["winner"][0] - 10 * i
        assert 0 <= j < 6 and r["winner"] == [10 * i + j, 10 * i + j + 1]
        assert r["u_winner"] == pytest.approx(0.2 + 0.01 * j)
    assert len({r["winner"][0] % 10 for r in picked}) > 1  # not always the best
    assert control_targets(real, scores, "random", 0).equals(rand)
    with pytest.raises(ValueError, match="unknown control"):
        control_targets(real, scores, "best", 0)


def synthetic_prefs(adapter, hidden, n_prefer=12, n_anchor=24, seed=0):
    """Random router inputs; winners are routes the original router does not pick."""
    gen = torch.Generator().manual_seed(seed)
    e, k = adapter.n_experts, adapter.top_k
    rows = []
    for i in range(n_prefer + n_anchor):
        x = torch.randn(hidden, generator=gen)
        perm = torch.randperm(e, generator=gen)
        kind = "prefer" if i < n_prefer else "anchor"
        win, lose = perm[:k], perm[k : 2 * k] if kind == "prefer" else perm[:k]
        rows.append(
            {
                "problem_id": f"p{i}",
                "sample_idx": 0,
                "dataset": "d",
                "position": i,
                "kind": kind,
                "winner": win.tolist(),
                "loser": lose.tolist(),
                "u_winner": 0.5,
                "u_loser": 0.1,
                "pbar": 0.3,
                "x": x.tolist(),
            }
        )
    return pa.Table.from_pylist(rows, schema=PREFERENCES_SCHEMA)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "deepseek_v2_grouped", "gpt_oss"])
def test_training_raises_the_dpo_margin_and_touches_only_router_parameters(family):
    model = make_model(family)
    adapter = adapter_for(model)
    layer = adapter.moe_layers[-1]
    params = router_parameters(model, adapter, layer)
    names = sorted(params)
    expected = ["weight", "bias"] if family == "gpt_oss" else ["weight"]
    assert sorted(n.rsplit(".", 1)[1] for n in names) == sorted(expected)
    weight = next(p for n, p in params.items() if n.endswith("weight"))
    bias = next((p for n, p in params.items() if n.endswith("bias")), None)
    prefs = synthetic_prefs(adapter, weight.shape[1])
    w1, b1, log, summary = train_router(weight, bias, prefs, adapter, update_cfg())
    # Step 0 is the original router: the DPO term is -log sigmoid(0) = log 2 and the KL is 0.
    assert log.column("pref_loss")[0].as_py() == pytest.approx(math.log(2), abs=1e-6)
    assert log.column("anchor_loss")[0].as_py() == pytest.approx(0.0, abs=1e-6)
    assert log.column("loss")[-1].as_py() < log.column("loss")[0].as_py()
    assert not torch.equal(w1, weight.detach())
    if family == "gpt_oss":
        assert not torch.equal(b1, bias.detach())
    else:
        assert b1 is None
    # The preferred routes gained score relative to the rejected ones, under the new router.
    x = torch.tensor(np.stack(prefs.column("x").to_pylist()), dtype=torch.float32)
    win = torch.tensor(prefs.column("winner").to_pylist())
    lose = torch.tensor(prefs.column("loser").to_pylist())
    kinds = np.array(prefs.column("kind").to_pylist()) == "prefer"
    keep = torch.tensor(kinds)
    if family == "deepseek_v2_grouped":  # 2 groups of 4 experts, 1 kept: R* must sit in one group
        groups = win // 4
        selectable = (groups == groups[:, :1]).all(dim=1)
        assert summary["dropped_unselectable"] == int((~selectable & keep).sum()) > 0
        keep &= selectable
    assert summary["prefer_tokens"] == int(keep.sum())

    def margin(w, b):
        z = x @ w.T.float() + (b.float() if b is not None else 0)
        return route_score(z, win) - route_score(z, lose)

    gained = margin(w1, b1) - margin(weight.detach(), bias.detach() if bias is not None else None)
    assert (gained[keep] > 0).float().mean() > 0.9


def test_training_is_deterministic_given_the_seed():
    model = make_model("qwen3_moe")
    adapter = adapter_for(model)
    weight = next(iter(router_parameters(model, adapter, adapter.moe_layers[-1]).values()))
    prefs = synthetic_prefs(adapter, weight.shape[1])
    a = train_router(weight, None, prefs, adapter, update_cfg())
    b = train_router(weight, None, prefs, adapter, update_cfg())
    assert torch.equal(a[0], b[0]) and a[2].equals(b[2]) and a[3] == b[3]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_router_inputs_give_the_routers_own_logits(family):
    model = make_model(family)
    adapter = adapter_for(model)
    layer = adapter.moe_layers[-1]
    traj = make_trajectories(lengths=(12, 9), prompt_lens=(5, 3))
    tokens = pa.Table.from_pylist(
        [
            {
                "problem_id": "p0-0",
                "sample_idx": 0,
                "dataset": "d",
                "position": 7,
                "kind": "anchor",
                "winner": [0, 1],
                "loser": [0, 1],
                "u_winner": 1.0,
                "u_loser": 1.0,
                "pbar": 1.0,
                "x": [],
            },
            {
                "problem_id": "p0-1",
                "sample_idx": 1,
                "dataset": "d",
                "position": 2,
                "kind": "anchor",
                "winner": [0, 1],
                "loser": [0, 1],
                "u_winner": 1.0,
                "u_loser": 1.0,
                "pbar": 1.0,
                "x": [],
            },
        ],
        schema=PREFERENCES_SCHEMA,
    )
    out = add_router_inputs(model, adapter, tokens, traj, layer)
    seen = {}
    hook = adapter.router(layer).register_forward_hook(
        lambda m, a, o: seen.__setitem__("z", adapter.parse_router_output(o)[0])
    )
    params = router_parameters(model, adapter, layer)
    w = next(p for n, p in params.items() if n.endswith("weight"))
    b = next((p for n, p in params.items() if n.endswith("bias")), None)
    try:
        for row, ids in zip(out.to_pylist(), traj.column("input_ids").to_pylist(), strict=True):
            with torch.no_grad():
                model(input_ids=torch.tensor(ids[:-1])[None], use_cache=False)
            x = torch.tensor(row["x"])
            z = x @ w.T + (b if b is not None else 0)
            torch.testing.assert_close(
                z, seen["z"].reshape(-1, z.shape[-1])[row["position"]].float()
            )
    finally:
        hook.remove()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_checkpoint_differs_from_the_original_in_exactly_the_final_router(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model(family)
    src = save_model(model, tmp_path / "src")
    adapter = adapter_for(model)
    final = adapter.moe_layers[-1]
    params = router_parameters(model, adapter, final)
    weight_name = next(n for n in params if n.endswith("weight"))
    bias_name = next((n for n in params if n.endswith("bias")), None)
    prefs = synthetic_prefs(adapter, params[weight_name].shape[1])
    w1, b1, _, _ = train_router(
        params[weight_name],
        params.get(bias_name) if bias_name else None,
        prefs,
        adapter,
        update_cfg(),
    )
    tensors = {weight_name: w1, **({bias_name: b1} if bias_name else {})}
    dst = write_checkpoint(src, tmp_path / "dst", tensors, "# changed\n")
    assert (dst / "README.md").read_text() == "# changed\n"
    before = {k: v for f in sorted(src.glob("*.safetensors")) for k, v in load_file(f).items()}
    after = {k: v for f in sorted(dst.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert set(before) == set(after)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(tensors)
    assert all(f".layers.{final}.mlp." in k for k in changed)
    assert all(before[k].dtype == after[k].dtype for k in before)
    loaded = AutoModelForCausalLM.from_pretrained(dst)
    new_params = dict(loaded.named_parameters())
    for name, value in tensors.items():
        assert torch.equal(new_params[name], value)
    assert not list(tmp_path.glob(".dst.*"))  # no temporary directory left


def test_checkpoint_refuses_a_tensor_it_cannot_find(tmp_path):
    src = save_model(make_model("qwen3_moe"), tmp_path / "src")
    with pytest.raises(ValueError, match="not found"):
        write_checkpoint(src, tmp_path / "dst", {"model.nope.weight": torch.zeros(1)}, "")
    assert not (tmp_path / "dst").exists()


def test_rescoring_with_given_draws_scores_the_same_alternatives_under_a_new_router():
    from workers.scoring.scorer import ScoreConfig, Scorer

    model = make_model("qwen3_moe")
    trajectories = make_trajectories()
    config = ScoreConfig(alternatives=6, pool=6)
    layer = adapter_for(model).moe_layers[-1]
    before = Scorer("/m/tiny", config, model=model).score_table(trajectories, layer)
    # The same model with its own draws given: the very same table.
    again = Scorer("/m/tiny", config, model=model).score_table(trajectories, layer, draws=before)
    assert again.equals(before)
    # Another router at that layer: fresh draws move, given draws are the original ones.
    with torch.no_grad():
        adapter_for(model).router(layer).weight.mul_(-3.0)
    fresh = Scorer("/m/tiny", config, model=model).score_table(trajectories, layer)
    same = Scorer("/m/tiny", config, model=model).score_table(trajectories, layer, draws=before)
    assert fresh.column("alt_routes") != before.column("alt_routes")
    assert same.column("alt_routes").equals(before.column("alt_routes"))
    assert same.column("std_route").equals(fresh.column("std_route"))  # S is the new router's
    with pytest.raises(ValueError, match="no given draws"):
        Scorer("/m/tiny", config, model=model).score_table(
            trajectories, layer, draws=before.slice(0, 3)
        )


def test_a_control_checkpoints_readme_says_it_is_a_control():
    from workers.router.update import describe_update

    summary = {"prefer_tokens": 3, "router_parameters": 10}
    real = describe_update(source="s", layer=3, names=["w"], summary=summary, cfg=update_cfg())
    control = describe_update(
        source="s",
        layer=3,
        names=["w"],
        summary={"control": "shuffled", **summary},
        cfg=update_cfg(),
    )
    assert "control" not in real and "This is a control (shuffled)" in control
