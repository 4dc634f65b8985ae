"""Fused attention of the scorer's queries over one stored key sequence (PyTorch FlexAttention).

Contract: `flex_attend(...)` has exactly the signature and meaning of `workers.scoring.kv.attend`
(the eager reference): B queries, each at its own position, over the keys/values of one
sequence at positions 0..T-1, with causal rule, sliding window, GPT-OSS sinks and, for decode
steps, the query's own key/value; GQA and DeepSeek-V2's MLA (key dim != value dim) included.

How: the B queries of a micro-batch become the query-length axis of one flex_attention call
over the shared keys (no per-query copies, no dense (B, T) score matrix), with the `group` query
heads of one KV head packed into query rows (GQA packing: (B, heads, d) -> (kv_heads, B * group,
d)), so every key block read serves B * group rows. The block mask is built here from the rows'
positions (`position_block_mask`): per block of query rows the range of keys any of them may
see is listed, blocks every one of them sees fully are marked full (no mask evaluation), and
the rest are skipped (also keys padded past the sequence); the scorer sorts a micro-batch by
position, so a block of rows spans few positions and most of the (query, key) grid is never
touched. What the fused kernel cannot express is merged exactly afterwards through the
log-sum-exp it returns: the query's own key/value (a decode query's key is not in the store)
and the sink logits (one extra softmax column per head, without a value). With l = LSE over
the stored keys, s = the self logit, z = the sink: out = (e^l o + e^s v_self) / (e^l + e^s + e^z).
On CUDA the kernel is torch.compile'd with static shapes, one compiled function per role
(prefill, decode), each compiling once per shape: the scorer pads keys to buckets and
micro-batches to a fixed size (workers.scoring.scorer), so once per key bucket. On a CPU inductor
cannot lower flex_attention with the LSE (checked again with torch 2.13: "return_lse is not
supported yet"), so the uncompiled reference implementation runs: exact, slower than
`kv.attend`, and beside a compiled decode step, not inside it.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: the driver reads ATTENTIONS without loading torch
ATTENTIONS = ("eager", "flex")  # eager: workers.scoring.kv.attend, the reference
BLOCK_SIZE = 128  # FlexAttention's default tile; block masks must be a multiple of it on GPU


def _prefill_kernel(*args, **kwargs):  # one function per role: dynamo's recompile limit
    from torch.nn.attention.flex_attention import flex_attention  # counts per code object

    return flex_attention(*args, **kwargs)


def _decode_kernel(*args, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(*args, **kwargs)


@functools.cache
def _kernel(device_type: str, decode: bool):
    import torch

    role = _decode_kernel if decode else _prefill_kernel
    if device_type == "cuda":  # static shapes: the caller pads them to one per key bucket
        return torch.compile(role, dynamic=False)

    def reference(*args, **kwargs):  # its "call me compiled" warning says what the docstring says
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return role(*args, **kwargs)

    return reference


def _lse_request():
    """kwargs asking flex_attention for the LSE: `return_aux` since torch 2.9, else return_lse."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return {"return_lse": True}, lambda aux: aux
    return {"return_aux": AuxRequest(lse=True)}, lambda aux: aux.lse


def position_block_mask(
    positions: torch.Tensor,
    n_keys: int,
    *,
    include_own: bool,
    window: int | None = None,
    block_size: int = BLOCK_SIZE,
):
    """A BlockMask over (len(positions) queries, n_keys keys): query i sees key j iff
    j <= positions[i] (`include_own`, prefill) or j < positions[i] (decode), and, with a
    sliding window, j > positions[i] - window. Built in O(query blocks x key blocks)."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    device = positions.device
    n_q = positions.shape[0]
    q_blocks = -(-n_q // block_size)
    kv_blocks = max(1, -(-n_keys // block_size))
    # pad by repeating the last position: padded rows are never read, and the mask's lookups
    # lo[q], hi[q] stay in range whatever the kernel does with the ragged last block
    pos = positions.long()
    pos = torch.cat([pos, pos[-1:].expand(q_blocks * block_size - n_q)])
    hi = pos + 1 if include_own else pos  # exclusive upper bound of visible keys
    lo = (pos - window + 1).clamp(min=0) if window else torch.zeros_like(pos)
    lo_b, hi_b = lo.view(q_blocks, block_size), hi.view(q_blocks, block_size)
    start = torch.arange(kv_blocks, device=device) * block_size
    end = (start + block_size).clamp(max=n_keys)
    # a key block is touched if any query sees any key in it, full if every query sees all of it
    any_lo, any_hi = lo_b.amin(1, keepdim=True), hi_b.amax(1, keepdim=True)
    all_lo, all_hi = lo_b.amax(1, keepdim=True), hi_b.amin(1, keepdim=True)
    touched = (start < any_hi) & (end > any_lo) & (start < n_keys)
    full = (start >= all_lo) & (end <= all_hi) & (start + block_size <= n_keys)
    partial = touched & ~full

    def listed(blocks: torch.Tensor):
        count = blocks.sum(-1, dtype=torch.int32)
        order = torch.sort(blocks.to(torch.int32), dim=-1, descending=True, stable=True).indices
        return count[None, None], order.to(torch.int32)[None, None]

    kv_num, kv_idx = listed(partial)
    full_num, full_idx = listed(full)

    # One mask function for every case (bounds as tensors, no Python constants), so the
    # compiled kernel is specialised once, not per causal rule and window.
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= lo[q_idx]) & (kv_idx < hi[q_idx])

    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(n_q, n_keys),
        compute_q_blocks=False,  # only the backward pass reads them
    )


def flex_attend(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    scaling: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    self_key: torch.Tensor | None = None,
    self_value: torch.Tensor | None = None,
    *,
    block_size: int = BLOCK_SIZE,
    masks: dict | None = None,
) -> torch.Tensor:
    """`workers.scoring.kv.attend` through FlexAttention: query (B, heads, d_k), keys (kv_heads, T, d_k),
    values (kv_heads, T, d_v) -> (B, heads, d_v). See kv.attend for the masking rules. `masks`
    keeps the block masks built for these positions, for the next layer with the same window."""
    import torch

    batch, n_heads, d_k = query.shape
    kv_heads, n_keys = keys.shape[0], keys.shape[1]
    group = n_heads // kv_heads
    decode = self_key is not None
    # GQA packing: the `group` query heads of one kv head are consecutive query rows (b, g)
    rows = query.reshape(batch, kv_heads, group, d_k).transpose(0, 1).reshape(kv_heads, -1, d_k)
    rows = rows.contiguous()  # (a copy when group == 1) one layout, so one kernel per shape
    cache = {} if masks is None else masks
    if (window, decode, block_size) not in cache:
        cache[window, decode, block_size] = position_block_mask(
            positions.repeat_interleave(group),
            n_keys,
            include_own=not decode,
            window=window,
            block_size=block_size,
        )
    lse_kwargs, lse_of = _lse_request()
    out, aux = _kernel(query.device.type, decode)(
        rows[None],  # (1, kv_heads, B * group, d): the micro-batch is the query axis
        keys[None],
        values[None],
        block_mask=cache[window, decode, block_size],
        scale=scaling,
        **lse_kwargs,
    )

    def unpack(x):  # (1, kv_heads, B * group, ...) -> (B, heads, ...)
        return x[0].unflatten(1, (batch, group)).transpose(0, 1).flatten(1, 2)

    out, lse = unpack(out), unpack(lse_of(aux)).float()
    if not decode:
        if sinks is None:
            return out
        # e^l / (e^l + e^z) = sigmoid(l - z): every prefill query sees at least its own key
        weight = torch.sigmoid(lse - sinks.float()[None])
        return (out.float() * weight[..., None]).to(out.dtype)
    q = query.reshape(batch, kv_heads, group, -1)  # a view when the layout allows
    s_self = (q * self_key[:, :, None]).sum(-1, dtype=torch.float32).view(batch, n_heads) * scaling
    top = torch.maximum(lse, s_self)  # s_self is finite, so top is (a query at t=0 sees no key)
    if sinks is not None:
        top = torch.maximum(top, sinks.float()[None])
    w_keys, w_self = torch.exp(lse - top), torch.exp(s_self - top)
    denom = w_keys + w_self
    if sinks is not None:
        denom = denom + torch.exp(sinks.float()[None] - top)
    v_self = self_value[:, :, None].expand(-1, -1, group, -1).reshape(batch, n_heads, -1)
    merged = (out.float() * w_keys[..., None] + v_self.float() * w_self[..., None]) / denom[
        ..., None
    ]
    return merged.to(out.dtype)
