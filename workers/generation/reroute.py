"""Compute-preserving reroute at generation: per-layer k_l and forced experts, as a router hook
(docs/method.md, "Counterfactual Expert Impact", "The reroute at generation").

Contract: a `ReroutePlan` names, for every MoE layer l of a model, the number of routed experts
k_l each token gets and the experts `forced[l]` put into every token's route there. At layer l
the route of a token is forced[l] plus the top-(k_l - f_l) experts (f_l = len(forced[l])) of
the others by the family's own selection order (router logit, DeepSeek-V2's group limit where
configured; ties to the lower expert id): k_l distinct experts. Its gate weights follow the
family's gating rule applied to that set (workers.adapters `route_weights`). With
`random_seed` set the plan is the "random reroute at equal budget" control: the same k_l and
f_l, the f_l extra experts drawn per token uniformly without replacement from the experts
outside the top-k_l, from one torch.Generator per layer seeded with (random_seed, layer), so
draws follow the order of the router calls (the same model inputs in the same batches give the
same draws).

`rerouted(model, plan)` is a context manager: it installs a forward hook on the router of every
MoE layer of a transformers 5.x model (Qwen3-MoE, OLMoE, DeepSeek-V2, GPT-OSS), which replaces
the router's (weights, indices) by the plan's; the MoE blocks hand them to their fused experts,
which take the number of experts per token from the width of the indices (eager loop,
batched_mm and grouped_mm alike), so a layer may run any k_l. A layer whose plan is the
standard route (k_l = k, nothing forced) is left untouched, bitwise. It yields a
`RerouteCounter` (active (token, expert) pairs and tokens per layer, every padded position
included) and removes the hooks on exit, exceptions included. A MoE forward replaced by a hub
kernel (GPT-OSS with `use_kernels`) calls no router module: `active_experts_per_token` then
raises, since a layer saw no token.

Importing this module is cheap: torch loads with the hook.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ReroutePlan:
    k: dict[int, int]  # decoder layer index -> k_l, for every MoE layer
    forced: dict[int, tuple[int, ...]] = field(default_factory=dict)  # layer -> forced experts
    # Set: the random control; forced[l] then only gives the count f_l of random extra experts.
    random_seed: int | None = None

    def __post_init__(self) -> None:
        k = {int(layer): int(n) for layer, n in self.k.items()}
        forced = {int(layer): tuple(int(e) for e in ids) for layer, ids in self.forced.items()}
        if not k:
            raise ValueError("a reroute plan needs k_l for at least one MoE layer")
        for layer, n in k.items():
            ids = forced.get(layer, ())
            if n < 1:
                raise ValueError(f"k_l must be >= 1, got {n} at layer {layer}")
            if len(set(ids)) != len(ids) or any(e < 0 for e in ids):
                raise ValueError(
                    f"forced experts at layer {layer} must be distinct ids >= 0: {ids}"
                )
            if len(ids) > n:
                raise ValueError(f"layer {layer} forces {len(ids)} experts but k_l = {n}")
        if set(forced) - set(k):
            raise ValueError(
                f"forced experts at layers without k_l: {sorted(set(forced) - set(k))}"
            )
        object.__setattr__(self, "k", dict(sorted(k.items())))
        object.__setattr__(self, "forced", {a: b for a, b in sorted(forced.items()) if b})

    @classmethod
    def standard(cls, adapter) -> ReroutePlan:
        """The model's own routing: k_l = k at every MoE layer, nothing forced."""
        return cls({layer: adapter.top_k for layer in adapter.moe_layers})

    @classmethod
    def static(cls, adapter, extra: int = 1) -> ReroutePlan:
        """The "static k+extra" control: k + extra experts everywhere by router logit; it does
        not preserve compute (extra x MoE layers more active experts per token)."""
        return cls({layer: adapter.top_k + extra for layer in adapter.moe_layers})

    def as_dict(self) -> dict:
        """Plain lists and dicts for JSON (its string keys come back as ints:
        `ReroutePlan(**json.loads(json.dumps(plan.as_dict())))` is the same plan)."""
        return dataclasses.asdict(self)

    def with_random(self, seed: int) -> ReroutePlan:
        """The random reroute at equal budget: the same k_l and forced counts, random experts."""
        return ReroutePlan(self.k, self.forced, random_seed=seed)

    def active_per_token(self) -> int:
        """Routed experts per token over all MoE layers: sum of k_l."""
        return sum(self.k.values())

    def check(self, adapter) -> None:
        """ValueError unless the plan fits `adapter`'s model: k_l for exactly its MoE layers,
        k_l <= n_experts, forced ids < n_experts, room outside the top-k_l for random draws."""
        if set(self.k) != set(adapter.moe_layers):
            raise ValueError(
                f"the plan's layers {sorted(self.k)} are not the model's MoE layers"
                f" {adapter.moe_layers}"
            )
        for layer, n in self.k.items():
            ids = self.forced.get(layer, ())
            if n > adapter.n_experts:
                raise ValueError(f"k_l = {n} at layer {layer} > {adapter.n_experts} experts")
            if any(e >= adapter.n_experts for e in ids):
                raise ValueError(f"forced expert id out of range at layer {layer}: {ids}")
            if self.random_seed is not None and len(ids) > adapter.n_experts - n:
                raise ValueError(f"layer {layer}: {len(ids)} random experts outside top-{n}")

    def is_standard_at(self, layer: int, top_k: int) -> bool:
        return self.k[layer] == top_k and not self.forced.get(layer)


class RerouteCounter:
    """Active (token, expert) pairs and tokens per MoE layer, summed over router calls. Pairs
    stay on the device until read (reading them is a device-to-host sync)."""

    def __init__(self) -> None:
        self._pairs: dict[int, object] = {}
        self.tokens: dict[int, int] = {}

    def add(self, layer: int, indices) -> None:
        """Count the distinct experts of each row of `indices` (tokens, k_l)."""
        s = indices.sort(dim=-1).values
        distinct = indices.shape[0] + (s[:, 1:] != s[:, :-1]).sum()
        self._pairs[layer] = self._pairs.get(layer, 0) + distinct
        self.tokens[layer] = self.tokens.get(layer, 0) + int(indices.shape[0])

    @property
    def pairs(self) -> dict[int, int]:
        return {layer: int(n) for layer, n in sorted(self._pairs.items())}


def active_experts_per_token(counter: RerouteCounter, layers=None) -> float:
    """Sum over MoE layers of active (token, expert) pairs / tokens: the routed experts one token
    runs. `layers` (e.g. adapter.moe_layers): each must have seen tokens (ValueError if not)."""
    pairs = counter.pairs
    if not pairs:
        raise ValueError("the counter saw no router call")
    for layer in layers if layers is not None else pairs:
        if not counter.tokens.get(layer):
            raise ValueError(f"no token passed the router hook at layer {layer}")
    return sum(n / counter.tokens[layer] for layer, n in pairs.items())


def baseline_active_per_token(adapter) -> int:
    """The model's own routed experts per token: k x its MoE layers."""
    return adapter.top_k * len(adapter.moe_layers)


def ranked_experts(adapter, z):
    """All experts (N, E) in the family's selection order for router logits z (N, E):
    descending logit (ties to the lower id); DeepSeek-V2 with group_limited_greedy puts the
    experts of its kept groups first, as its router does."""
    import torch

    order = torch.sort(z.float(), dim=-1, descending=True, stable=True).indices
    router = adapter.router(adapter.moe_layers[0])
    if getattr(router, "topk_method", "greedy") == "group_limited_greedy":
        n, groups = z.shape[0], router.num_group
        scores = torch.softmax(z.float(), dim=-1).view(n, groups, -1).max(dim=-1).values
        keep = torch.topk(scores, router.topk_group, dim=-1).indices
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, keep, True)
        kept = kept.repeat_interleave(adapter.n_experts // groups, dim=1).gather(1, order)
        order = order.gather(1, torch.sort(kept.int(), dim=1, descending=True, stable=True).indices)
    return order


def plan_routes(adapter, plan: ReroutePlan, layer: int, z, generator=None):
    """The plan's routes (N, k_l) at `layer` for router logits z (N, E): forced experts first,
    then the top-(k_l - f_l) of the rest; random extras (plan.random_seed) from `generator`."""
    import torch

    n_k, ids = plan.k[layer], plan.forced.get(layer, ())
    order = ranked_experts(adapter, z)
    f = len(ids)
    if plan.random_seed is not None:
        outside = order[:, n_k:]  # experts outside the top-k_l
        keys = torch.rand(outside.shape, generator=generator).to(outside.device)
        extra = outside.gather(1, keys.argsort(dim=1)[:, :f])
        return torch.cat([order[:, : n_k - f], extra], dim=1)
    if f == 0:
        return order[:, :n_k]
    forced = torch.tensor(ids, dtype=order.dtype, device=order.device)
    is_forced = (order[:, :, None] == forced).any(-1)
    rest = order.gather(1, torch.sort(is_forced.int(), dim=1, stable=True).indices)
    return torch.cat([forced.expand(order.shape[0], f), rest[:, : n_k - f]], dim=1)


def _hook(adapter, plan: ReroutePlan, layer: int, counter: RerouteCounter):
    """A forward hook for `layer`'s router: the plan's (weights, indices) in the router output."""
    import torch

    generator = None
    if plan.random_seed is not None:
        generator = torch.Generator().manual_seed(plan.random_seed * 1_000_003 + layer)
    standard = plan.is_standard_at(layer, adapter.top_k)

    def hook(module, args, output):
        slots = adapter.router_slots(output)
        if standard:
            counter.add(layer, output[slots["indices"]])
            return None  # the router's own output, untouched
        z = output[slots["logits"]].reshape(-1, adapter.n_experts)
        routes = plan_routes(adapter, plan, layer, z, generator)
        weights = adapter.route_weights(z.float(), routes)
        out = list(output)
        out[slots["weights"]] = weights.to(output[slots["weights"]].dtype)
        out[slots["indices"]] = routes.to(output[slots["indices"]].dtype)
        counter.add(layer, routes)
        return type(output)(out)

    return hook


_MARK = "_rerouted"  # set on a router while its hook is installed


@contextlib.contextmanager
def rerouted(model, plan: ReroutePlan, counter: RerouteCounter | None = None):
    """Route `model` by `plan` inside the block; yields the counter (a new one unless given)."""
    from workers.adapters import adapter_for

    adapter = adapter_for(model)
    plan.check(adapter)
    routers = [adapter.router(layer) for layer in adapter.moe_layers]
    # A second hook would see the first one's k_l-wide output: nesting is refused.
    if any(getattr(router, _MARK, False) for router in routers):
        raise ValueError("the model is already rerouted (nested rerouted() blocks)")
    counter = RerouteCounter() if counter is None else counter
    handles = []
    try:
        for layer, router in zip(adapter.moe_layers, routers, strict=True):
            handles.append(router.register_forward_hook(_hook(adapter, plan, layer, counter)))
            setattr(router, _MARK, True)
        yield counter
    finally:
        for handle in handles:
            handle.remove()
        for router in routers:
            if hasattr(router, _MARK):
                delattr(router, _MARK)
