"""Keys and values of the standard pass, and attention of decode queries over them.

This is the only module that touches transformers' attention and cache machinery.

Contract:
- `standard_pass(model, input_ids, layers, budget_bytes)` runs the model's own forward once over
  one sequence, with no transformers Cache, and returns a `KVStore` holding, for every decoder
  layer in `layers`, the keys and values exactly as the layer's attention module hands them to
  its attention function: after projections, q/k norms, clipping and RoPE, and for DeepSeek-V2's
  MLA after the latent is expanded (nope and rope parts concatenated per head).
- `decode_layer(layer, hidden, positions, position_embeddings)` runs one decoder layer on B
  single-token queries inside `decoding(store, positions)`: query b (position positions[b])
  attends to the stored keys/values of positions < positions[b] plus its own, with the
  layer's own causal rule, sliding window and attention sinks.
- `rotary(model, hidden, positions)`: the model's position embeddings for those positions.
- `attention` ("eager" | "flex", both passes): `attend` below, the reference, or the fused
  `workers.attention.flex_attend`; both compute the same function.

How: both passes run the model's own modules with `config._attn_implementation` switched (for
the duration of a `with`) to an attention function registered here, so every projection,
norm, RoPE variant and MLA expansion stays the model's code and only the softmax(QK^T)V step
is ours. Why not a transformers Cache: across 5.x releases the cache kwarg was renamed
(`past_key_values` -> `cache`), DynamicCache's storage moved (`key_cache` lists -> `layers[i]
.keys`), sliding-window layers keep only the last window of keys (we need every position's
keys, since query t needs keys < t), and DeepSeek-V2 switched from caching expanded keys to the
compressed latent. The attention-function interface (query, key, value, scaling,
sliding_window, s_aux) has stayed the same, so this works across 5.x without version checks.
Attention probabilities are computed in float32 as the models' eager attention does.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from workers.attention import ATTENTIONS, flex_attend

ATTENTION_NAME = "moe_counterfactual"


@dataclass
class KVStore:
    """Per layer: keys (n_kv_heads, T, d_k) and values (n_kv_heads, T, d_v) of one sequence."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Capture:
    store: KVStore
    layers: frozenset[int]
    budget_bytes: int
    fused: bool  # flex_attend instead of attend


@dataclass
class _Decode:
    store: KVStore
    positions: torch.Tensor  # (B,) long, on the model's device
    n_keys: int  # max(positions): no query sees a stored key at or beyond it
    fused: bool
    copies: dict[torch.device, torch.Tensor] = field(default_factory=dict)

    def positions_on(self, device: torch.device) -> torch.Tensor:
        """`positions` on `device`: a model spread over devices attends on each layer's own."""
        if device == self.positions.device:
            return self.positions
        if device not in self.copies:
            self.copies[device] = self.positions.to(device)
        return self.copies[device]


_STATE: contextvars.ContextVar[_Capture | _Decode | None] = contextvars.ContextVar(
    "moe_counterfactual_attention", default=None
)


@torch.compiler.disable  # a compiled decode step runs attention between its graphs, as is
def attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The registered attention function; the mask comes from positions, never from the model."""
    state = _STATE.get()
    if state is None:
        raise RuntimeError("moe_counterfactual attention called outside standard_pass/decoding")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    window = int(sliding_window) if sliding_window else None
    layer = module.layer_idx
    batch, n_heads, q_len, _ = query.shape
    if isinstance(state, _Capture):
        if batch != 1:
            raise RuntimeError("standard_pass runs one sequence at a time")
        keys, values = key[0], value[0]
        if layer in state.layers:
            state.store.keys[layer] = keys.contiguous()
            state.store.values[layer] = values.contiguous()
        q = query[0].transpose(0, 1)  # (T, heads, d)
        pos = torch.arange(q_len, device=query.device)
        if state.fused:  # no score matrix, so no chunks
            return flex_attend(q, keys, values, pos, scaling, window, s_aux)[None], None
        per_query = 4 * 3 * n_heads * keys.shape[1]
        chunk = max(1, state.budget_bytes // max(1, per_query))
        out = torch.cat(
            [
                attend(q[i : i + chunk], keys, values, pos[i : i + chunk], scaling, window, s_aux)
                for i in range(0, q_len, chunk)
            ]
        )
        return out[None], None  # (1, T, heads, d_v)
    if q_len != 1:
        raise RuntimeError("decoding runs single-token queries")
    n_keys = state.n_keys
    keys = state.store.keys[layer]
    out = (flex_attend if state.fused else attend)(
        query[:, :, 0],
        keys[:, :n_keys],
        state.store.values[layer][:, :n_keys],
        state.positions_on(keys.device),
        scaling,
        window,
        s_aux,
        self_key=key[:, :, 0],
        self_value=value[:, :, 0],
    )
    return out[:, None], None  # (B, 1, heads, d_v)


def attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    scaling: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    self_key: torch.Tensor | None = None,
    self_value: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of B queries over one shared key sequence, each with its own position.

    query (B, heads, d_k); keys (kv_heads, T, d_k) and values (kv_heads, T, d_v) at positions
    0..T-1. Without `self_key`, query b sees keys j <= positions[b] (prefill). With `self_key` /
    `self_value` (B, kv_heads, d) it sees keys j < positions[b] plus its own key (decode). A
    sliding window keeps j > positions[b] - window; `sinks` (heads,) add one logit per head to
    the softmax's denominator only (GPT-OSS). Query heads h*g .. h*g+g-1 share kv head h.
    Cost: one (kv_heads, B*g, T) matmul against the shared keys; no per-query key copies.
    """
    batch, n_heads, d_k = query.shape
    kv_heads, length = keys.shape[0], keys.shape[1]
    group = n_heads // kv_heads
    # Queries laid out (kv head, group, query) so one GEMM per kv head serves every query and a
    # (query, key) mask broadcasts over heads without copies.
    q = query.reshape(batch, kv_heads, group, d_k).permute(1, 2, 0, 3)  # (kv, g, B, d)
    scores = torch.bmm(q.reshape(kv_heads, group * batch, d_k), keys.transpose(1, 2)) * scaling
    scores = scores.view(kv_heads, group, batch, length)
    j = torch.arange(length, device=keys.device)
    pos = positions[:, None]
    allowed = j[None, :] < pos if self_key is not None else j[None, :] <= pos
    if window is not None:
        allowed = allowed & (j[None, :] > pos - window)
    scores.masked_fill_(~allowed, -math.inf)
    columns = [scores]  # logits beyond the shared keys: the query's own key, the sink
    if self_key is not None:
        k_self = self_key.permute(1, 0, 2)[:, None]  # (kv, 1, B, d)
        s_self = (q * k_self).sum(-1, dtype=torch.float32).to(scores.dtype) * scaling
        columns.append(s_self[..., None])
    if sinks is not None:
        columns.append(sinks.to(scores.dtype).view(kv_heads, group, 1, 1).expand(-1, -1, batch, 1))
    if len(columns) > 1:
        scores = torch.cat(columns, dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)  # eager attention's precision
    weights = probs[..., :length].to(values.dtype).reshape(kv_heads, group * batch, length)
    out = torch.bmm(weights, values).view(kv_heads, group, batch, -1)
    if self_value is not None:
        p_self = probs[..., length : length + 1].to(values.dtype)
        out = out + p_self * self_value.permute(1, 0, 2)[:, None]
    return out.permute(2, 0, 1, 3).reshape(batch, n_heads, -1)


@contextlib.contextmanager
def attention_switched(model: nn.Module):
    """Route every attention module of `model` through `attention` for the duration."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, attention)  # idempotent
    configs = {id(model.config): model.config}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            configs[id(cfg)] = cfg
    saved = [(cfg, cfg._attn_implementation) for cfg in configs.values()]
    try:
        for cfg, _ in saved:
            cfg._attn_implementation = ATTENTION_NAME
        yield
    finally:
        for cfg, old in saved:
            cfg._attn_implementation = old


def standard_pass(
    model: nn.Module,
    input_ids: torch.Tensor,
    layers: list[int],
    budget_bytes: int,
    attention: str = "eager",
) -> KVStore:
    """One forward pass of `model` over input_ids (1, T); keys/values of `layers` kept.

    Forward hooks registered by the caller see the usual activations. Must run inside
    `attention_switched(model)`.
    """
    store = KVStore()
    token = _STATE.set(_Capture(store, frozenset(layers), budget_bytes, _fused(attention)))
    try:
        getattr(model, "model", model)(input_ids=input_ids, use_cache=False)
    finally:
        _STATE.reset(token)
    missing = [i for i in layers if i not in store.keys]
    if missing:
        raise RuntimeError(f"attention of layers {missing} did not run through the hook")
    return store


@contextlib.contextmanager
def decoding(store: KVStore, positions: torch.Tensor, attention: str = "eager"):
    """Inside, attention modules attend single-token queries at `positions` over `store`."""
    # one device sync; at least one key, so that no kernel sees an empty sequence (a query at
    # t=0 still sees none: the mask says j < 0)
    n_keys = max(1, int(positions.max()))
    token = _STATE.set(_Decode(store, positions, n_keys, _fused(attention)))
    try:
        yield
    finally:
        _STATE.reset(token)


def _fused(attention: str) -> bool:
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    return attention == "flex"


def rotary(model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor):
    """The model's position embeddings for B single tokens: hidden (B, H), positions (B,)."""
    base = getattr(model, "model", model)
    return base.rotary_emb(hidden[:, None], positions[:, None])


def decode_layer(
    layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor, position_embeddings
) -> torch.Tensor:
    """One decoder layer on B single-token queries: (B, H) -> (B, H). Run inside `decoding`."""
    out = layer(
        hidden[:, None],
        attention_mask=None,
        position_ids=positions[:, None],
        position_embeddings=position_embeddings,
    )
    out = out[0] if isinstance(out, tuple) else out
    return out[:, 0]
