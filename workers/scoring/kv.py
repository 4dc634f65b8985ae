"""Keys and values of the standard pass, and attention of decode queries over them.

This is the only module that touches transformers' attention and cache machinery.

Contract:
- `standard_pass(model, input_ids, layers, budget_bytes)` runs the model's own forward once over
  one sequence, with no transformers Cache, and returns a `KVStore` holding, for every decoder
  layer in `layers`, the keys and values exactly as the layer's attention module hands them to
  its attention function: after projections, q/k norms, clipping and RoPE, and for DeepSeek-V2's
  MLA after the latent is expanded (nope and rope parts concatenated per head).
- `decode_layer(layer, hidden, positions, position_embeddings, keys, values)` runs one decoder
  layer on B single-token queries: query b (position positions[b]) attends to that layer's stored
  keys/values (passed in; any length > max(positions), the rest never seen) of positions
  < positions[b] plus its own, with the layer's own causal rule, sliding window and attention
  sinks. The keys travel as arguments, not as state, so a compiled decode step sees them as
  graph inputs: one graph per shape, whatever sequence they come from.
- `key_bucket(n, limit, floor)`: the padded key length of a sequence of n tokens (powers of two
  from `floor`, capped at `limit`); `standard_pass(..., capacity=...)` stores keys and values
  zero-padded to it, so decode steps of every sequence in a bucket have one shape.
- `rotary(model, hidden, positions)`: the model's position embeddings for those positions.
- `attention` ("eager" | "flex", both passes): `attend` below, the reference, or the fused
  `workers.scoring.attention.flex_attend`; both compute the same function. Under torch.compile the
  eager decode attention is traced into the caller's graph (`attention_in_graph`), flex runs
  beside it (CPU inductor cannot lower FlexAttention with its log-sum-exp; on CUDA its kernel
  is compiled on its own, workers.scoring.attention).

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

from workers.scoring.attention import ATTENTIONS, flex_attend

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
    capacity: int | None  # keys/values stored zero-padded to this length


_STATE: contextvars.ContextVar[_Capture | None] = contextvars.ContextVar(
    "moe_counterfactual_attention", default=None
)
# Decode attention traced into a compiled decode step (True) or run between its graphs. Eager
# attention inside: its masking and softmax fuse with the layer's elementwise work; on the tiny
# benchmark's shape (CPU, one thread, best of 7 alternating in one process) 812 tokens/s inside,
# 678 beside. Flex always beside: see the module docstring.
attention_in_graph = True
# Smallest padded key length: on GPUs a multiple of any kernel's key block, and few buckets
# (compiles); on a CPU eager attention's cost follows the padded length, and sequences there are
# short (tests, the demo): 128, FlexAttention's block.
KEY_BUCKET_FLOOR = {"cuda": 1024, "cpu": 128}


def key_bucket(n: int, limit: int, floor: int = 1024) -> int:
    """The padded key length for n tokens: the smallest power of two >= n from `floor` on,
    capped at `limit` (the model's maximum length), or n itself beyond it."""
    size = floor
    while size < n:
        size *= 2
    return max(n, min(size, limit))


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
    """The registered attention function; the mask comes from positions, never from the model.
    Decode steps pass their keys in `kwargs` (decode_layer); the standard pass reads _STATE."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    window = int(sliding_window) if sliding_window else None
    if "stored_keys" in kwargs:
        if query.shape[2] != 1:
            raise RuntimeError("decoding runs single-token queries")
        fused = kwargs["stored_fused"]
        attend_fn = _flex_beside if fused else (attend if attention_in_graph else _attend_beside)
        extra = {"masks": kwargs["stored_masks"]} if fused else {}
        out = attend_fn(
            query[:, :, 0],
            kwargs["stored_keys"],
            kwargs["stored_values"],
            kwargs["stored_positions"],
            scaling,
            window,
            s_aux,
            self_key=key[:, :, 0],
            self_value=value[:, :, 0],
            **extra,
        )
        return out[:, None], None  # (B, 1, heads, d_v)
    state = _STATE.get()
    if state is None:
        raise RuntimeError("moe_counterfactual attention called outside standard_pass/decoding")
    return _prefill(state, module.layer_idx, query, key, value, scaling, window, s_aux)


def _prefill(state: _Capture, layer, query, key, value, scaling, window, sinks):
    """Causal attention of the standard pass over its own keys, which it stores."""
    batch, n_heads, q_len, _ = query.shape
    if batch != 1:
        raise RuntimeError("standard_pass runs one sequence at a time")
    keys, values = key[0], value[0]
    size = max(q_len, state.capacity or 0)
    stored_k, stored_v = keys.contiguous(), values.contiguous()
    if state.capacity:  # zero keys beyond the sequence: never visible, never read as garbage
        # Held position-major, (size, kv_heads, d), seen through a (kv_heads, size, d) view: a
        # prefix [:, :n] then has the same strides whatever the bucket, so a compiled step
        # never re-specialises on them.
        stored_k = _position_major(keys, size)
        stored_v = _position_major(values, size)
    if layer in state.layers:
        state.store.keys[layer] = stored_k
        state.store.values[layer] = stored_v
    q = query[0].transpose(0, 1)  # (T, heads, d)
    if state.fused:  # no score matrix, so no chunks; padded queries repeat the last position
        pos = torch.arange(size, device=query.device).clamp(max=q_len - 1)
        q = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, size - q_len))
        out = flex_attend(q, stored_k, stored_v, pos, scaling, window, sinks)
        return out[None, :q_len], None
    pos = torch.arange(q_len, device=query.device)
    per_query = 4 * 3 * n_heads * keys.shape[1]
    chunk = max(1, state.budget_bytes // max(1, per_query))
    out = torch.cat(
        [
            attend(q[i : i + chunk], keys, values, pos[i : i + chunk], scaling, window, sinks)
            for i in range(0, q_len, chunk)
        ]
    )
    return out[None], None  # (1, T, heads, d_v)


def _position_major(x: torch.Tensor, size: int) -> torch.Tensor:
    """(heads, T, d) -> zero-padded to `size` positions, stored (size, heads, d), viewed back."""
    padded = x.new_zeros(size, x.shape[0], x.shape[2])
    padded[: x.shape[1]] = x.transpose(0, 1)
    return padded.transpose(0, 1)


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


_attend_beside = torch.compiler.disable(attend)  # a compiled step runs it between its graphs
_flex_beside = torch.compiler.disable(flex_attend)


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
    capacity: int | None = None,
) -> KVStore:
    """One forward pass of `model` over input_ids (1, T); keys/values of `layers` kept, padded
    with zeros to `capacity` keys if that is larger than T (and with flex, the pass's own
    attention runs at that padded shape, so its compiled kernel sees one shape per bucket).

    Forward hooks registered by the caller see the usual activations. Must run inside
    `attention_switched(model)`.
    """
    store = KVStore()
    capture = _Capture(store, frozenset(layers), budget_bytes, _fused(attention), capacity)
    token = _STATE.set(capture)
    try:
        getattr(model, "model", model)(input_ids=input_ids, use_cache=False)
    finally:
        _STATE.reset(token)
    missing = [i for i in layers if i not in store.keys]
    if missing:
        raise RuntimeError(f"attention of layers {missing} did not run through the hook")
    return store


def _fused(attention: str) -> bool:
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    return attention == "flex"


def rotary(model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor):
    """The model's position embeddings for B single tokens: hidden (B, H), positions (B,)."""
    base = getattr(model, "model", model)
    return base.rotary_emb(hidden[:, None], positions[:, None])


def decode_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    position_embeddings,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    fused: bool = False,
    masks: dict | None = None,
) -> torch.Tensor:
    """One decoder layer on B single-token queries: (B, H) -> (B, H), attending over the
    layer's stored `keys`/`values` (kv_heads, n, d) with n > max(positions); `fused`: through
    flex_attend, whose block masks are kept in `masks` for the other layers of the step."""
    out = layer(
        hidden[:, None],
        attention_mask=None,
        position_ids=positions[:, None],
        position_embeddings=position_embeddings,
        stored_keys=keys,
        stored_values=values,
        stored_positions=positions.to(keys.device),
        stored_fused=fused,
        stored_masks=masks,
    )
    out = out[0] if isinstance(out, tuple) else out
    return out[:, 0]
