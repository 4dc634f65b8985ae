"""Architecture adapters: where an MoE layer keeps its router and experts, and its gating rule.

Contract: `adapter_for(model)` returns one small adapter per model family, as the family is
implemented in transformers 5.x (experts are one fused module, the router its own module):
Qwen3-MoE, OLMoE, DeepSeek-V2, GPT-OSS. For a decoder layer index an adapter gives
- `moe_layers`: the layers with routed experts; `resolve_layer(spec)` for an index or
  "early" / "middle" / "final" (first, `moe_layers[len(moe_layers) // 2]`, last);
- the modules: `router(i)`, `experts(i)`, `moe_norm(i)` (the norm whose input is the residual
  entering the MoE block and whose output is the block's input);
- `standard_route(z)`: the family's own top-k rule on router logits z (DeepSeek-V2
  group-limited selection where configured), experts in descending score;
- `route_weights(z, routes)`: the family's gating rule applied to any chosen sets
  (docs/method.md, "Routes");
- `moe_output(i, x, token, routes, weights)`: the block's output for given routes, each
  (token, expert) pair computed once and recombined per route, shared experts added.
It knows nothing about scoring, sampling or files.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.layers import resolve_layer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (`model.model.layers` in all supported families)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers at .model.layers")
    return layers


class MoeAdapter:
    """Shared logic; subclasses set the module names and the gating rule."""

    family = ""
    router_attr = "gate"

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.layers = decoder_layers(model)
        self.moe_layers = [i for i, layer in enumerate(self.layers) if self._is_moe(layer)]
        if not self.moe_layers:
            raise ValueError(f"{type(model).__name__} has no layer with routed experts")
        first = self.router(self.moe_layers[0])
        self.n_experts = int(first.weight.shape[0])
        self.top_k = int(first.top_k)

    # -- modules -------------------------------------------------------------------------------

    def _is_moe(self, layer: nn.Module) -> bool:
        block = getattr(layer, "mlp", None)
        return hasattr(block, "experts") and hasattr(block, self.router_attr)

    def moe_block(self, layer: int) -> nn.Module:
        self.check_layer(layer)
        return self.layers[layer].mlp

    def router(self, layer: int) -> nn.Module:
        return getattr(self.layers[layer].mlp, self.router_attr)

    def experts(self, layer: int) -> nn.Module:
        return self.moe_block(layer).experts

    def moe_norm(self, layer: int) -> nn.Module:
        return self.layers[layer].post_attention_layernorm

    def check_layer(self, layer: int) -> int:
        """`layer` itself if it is an int naming an MoE layer (workers.layers' rule)."""
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"layer must be an int index, got {layer!r}")
        return self.resolve_layer(layer)

    def resolve_layer(self, spec: int | str) -> int:
        """An MoE layer index from an index or "early" | "middle" | "final"."""
        return resolve_layer(spec, self.moe_layers, len(self.layers))

    # -- router ----------------------------------------------------------------------------------

    def router_slots(self, output) -> dict[str, int]:
        """Which element of a router's output tuple is what, by dtype and width rather than by
        position (the tuple's order is not the same in every release): logits (.., E),
        weights (.., k) floating, indices (.., k) integer."""
        slots = {}
        for i, item in enumerate(output):
            if not isinstance(item, torch.Tensor):
                continue
            width, floating = item.shape[-1], item.dtype.is_floating_point
            if floating and width == self.n_experts and "logits" not in slots:
                slots["logits"] = i
            elif floating and width == self.top_k:
                slots["weights"] = i
            elif not floating and width == self.top_k:
                slots["indices"] = i
        if "logits" not in slots:
            raise ValueError(f"cannot find router logits in a {self.family} router output")
        return slots

    def parse_router_output(self, output) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(router logits z, the router's own chosen indices or None) from a router's output."""
        if isinstance(output, torch.Tensor):
            return output, None
        slots = self.router_slots(output)
        return output[slots["logits"]], output[slots["indices"]] if "indices" in slots else None

    def standard_route(self, z: torch.Tensor) -> torch.Tensor:
        """Top-k of the router logits (softmax is monotone), descending; (N, E) -> (N, k)."""
        return torch.topk(z.float(), self.top_k, dim=-1).indices

    def route_weights(self, z: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
        """Float32 gate weights of `routes` (..., k) given logits z (..., E) broadcast over routes."""
        raise NotImplementedError

    def weight_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the model multiplies expert outputs by (its router's weight dtype)."""
        return model_dtype

    def override_router_output(
        self, output, rows: torch.Tensor, routes: torch.Tensor, weights: torch.Tensor | None = None
    ):
        """The router's output with rows `rows` routed to `routes` (brute-force reference), with
        the family's gate weights for them or the given `weights`."""
        slots = self.router_slots(output)
        if "weights" not in slots or "indices" not in slots:
            raise ValueError(f"cannot find the chosen experts in a {self.family} router output")
        out = list(output)
        chosen, indices = out[slots["weights"]].clone(), out[slots["indices"]].clone()
        z = out[slots["logits"]][rows].float()
        given = self.route_weights(z, routes) if weights is None else weights
        chosen[rows] = given.to(chosen.dtype)
        indices[rows] = routes.to(indices.dtype)
        out[slots["weights"]], out[slots["indices"]] = chosen, indices
        return type(output)(out)

    # -- experts ---------------------------------------------------------------------------------

    def expert_outputs(self, layer: int, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Unweighted output of expert experts[m] on x[m]: (M, H), (M,) -> (M, H).

        Runs the model's own fused experts module with one expert per row and weight 1 (exact).
        """
        module = self.experts(layer)
        ones = torch.ones(experts.shape[0], 1, dtype=x.dtype, device=x.device)
        return module(x, experts[:, None], ones)

    def shared_output(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """Output of the always-on shared experts (None for families without them)."""
        return None

    def moe_output(
        self,
        layer: int,
        x: torch.Tensor,
        token: torch.Tensor,
        routes: torch.Tensor,
        weights: torch.Tensor,
        shared: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MoE block output of route m = routes[m] with gate weights[m] on input x[token[m]].

        x: (N, H) normalised block input; token: (M,); routes, weights: (M, k) -> (M, H).
        Every distinct (token, expert) pair runs once. Terms are added in ascending expert order,
        each cast to the model dtype first, as the model's own experts loop does. `shared`, if
        given, is the shared experts' output per token (N, H), added after the routed experts.
        """
        n_experts = self.n_experts
        order = routes.argsort(dim=-1)
        routes = routes.gather(-1, order)
        weights = weights.gather(-1, order)
        pair = token[:, None] * n_experts + routes  # (M, k) unique id of (token, expert)
        uniq, inverse = torch.unique(pair.reshape(-1), return_inverse=True)
        outputs = self.expert_outputs(layer, x[uniq // n_experts], uniq % n_experts)
        terms = outputs[inverse.view(pair.shape)]  # (M, k, H)
        w = weights.to(self.weight_dtype(x.dtype))
        out = torch.zeros(routes.shape[0], x.shape[-1], dtype=x.dtype, device=x.device)
        for j in range(routes.shape[1]):
            out = out + (terms[:, j] * w[:, j, None]).to(x.dtype)
        if shared is not None:
            out = out + shared[token]
        return out


class _SoftmaxTopK(MoeAdapter):
    """Qwen3-MoE and OLMoE: softmax over all experts, take the chosen, renormalise if
    `norm_topk_prob`."""

    def route_weights(self, z, routes):
        w = _take(torch.softmax(z.float(), dim=-1), routes)
        if self.router(self.moe_layers[0]).norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return w


class Qwen3MoeAdapter(_SoftmaxTopK):
    family = "qwen3_moe"


class OlmoeAdapter(_SoftmaxTopK):
    family = "olmoe"


class DeepseekV2Adapter(MoeAdapter):
    """DeepSeek-V2: softmax over all routed experts, take the chosen, times
    `routed_scaling_factor`; shared experts always added unchanged. The transformers 5.x router
    does not renormalise (it ignores `norm_topk_prob`), and neither do we."""

    family = "deepseek_v2"

    def _router_cfg(self):
        return self.router(self.moe_layers[0])

    def standard_route(self, z):
        router = self._router_cfg()
        scores = torch.softmax(z.float(), dim=-1)
        if router.topk_method == "group_limited_greedy":
            n, groups = scores.shape[0], router.num_group
            group_scores = scores.view(n, groups, -1).max(dim=-1).values
            keep = torch.topk(group_scores, router.topk_group, dim=-1).indices
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            mask = mask[:, :, None].expand(n, groups, self.n_experts // groups).reshape(n, -1)
            scores = scores.masked_fill(~mask, 0.0)
        elif router.topk_method != "greedy":
            raise ValueError(f"unsupported DeepSeek-V2 topk_method {router.topk_method!r}")
        return torch.topk(scores, self.top_k, dim=-1).indices

    def route_weights(self, z, routes):
        probs = torch.softmax(z.float(), dim=-1)
        return _take(probs, routes) * self._router_cfg().routed_scaling_factor

    def weight_dtype(self, model_dtype):
        return torch.float32  # the router computes in float32 and the experts multiply by it

    def shared_output(self, layer, x):
        return self.moe_block(layer).shared_experts(x)


class GptOssAdapter(MoeAdapter):
    """GPT-OSS: softmax over the chosen experts' biased logits only."""

    family = "gpt_oss"
    router_attr = "router"

    def route_weights(self, z, routes):
        return torch.softmax(_take(z.float(), routes), dim=-1)


# One adapter per name of workers.families.FAMILIES (the list the config is checked against).
ADAPTERS: dict[str, type[MoeAdapter]] = {
    "qwen3_moe": Qwen3MoeAdapter,
    "olmoe": OlmoeAdapter,
    "deepseek_v2": DeepseekV2Adapter,
    "gpt_oss": GptOssAdapter,
}


def adapter_for(model: nn.Module) -> MoeAdapter:
    """The adapter of `model`'s family (by `config.model_type`)."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type](model)


def _take(values: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
    """values[..., routes]: values (..., E) per token, routes (..., k) or (..., R, k) per token."""
    if values.dim() == routes.dim() - 1:
        values = values.unsqueeze(-2).expand(*routes.shape[:-1], values.shape[-1])
    return values.gather(-1, routes)
