"""Brute-force reference for counterfactual route scores: one full forward pass per (t, R).

Contract: `brute_logprobs(model, ids, layer, positions, routes)` -> (M,) float32 tensor of
log p(ids[t+1] | ids, route R at (t, L)) for each query m = (positions[m], routes[m]);
`brute_distributions` (same arguments) -> (M, V): the whole next-token log-softmax, from
which `route_divergence` gives the argmax token and KL(p_S || p_R) that the scorer stores.
Each query reruns the whole sequence through the model's own forward (its configured
attention, no cache) with a forward hook on layer L's router that replaces, at position t
only, the chosen experts by R and their gate weights by the family's rule (workers.adapters);
every other position keeps its own route and every later layer routes normally on the
changed hidden state. Queries are batched as copies of the sequence, each with its own
overridden row. Slow by design (T x (J+1) full passes): it is the reference that the fast
scorer is tested against, and the baseline of tools.bench_score.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.adapters import adapter_for


def brute_logprobs(
    model: nn.Module,
    ids: list[int],
    layer: int,
    positions: torch.Tensor,
    routes: torch.Tensor,
    *,
    batch_size: int = 8,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p(ids[t+1]) with route routes[m] (k experts) at (positions[m], layer); with
    `weights` (M, k) those gate weights instead of the family's rule (a zero weight takes
    the expert out: the model adds its output times 0)."""
    if len(positions) == 0:
        return torch.empty(0, dtype=torch.float32)
    logp = brute_distributions(
        model, ids, layer, positions, routes, batch_size=batch_size, weights=weights
    )
    targets = torch.tensor(ids)[torch.as_tensor(positions).long().cpu() + 1]
    return logp.gather(1, targets[:, None])[:, 0]


def route_divergence(std_logp: torch.Tensor, logp: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(argmax of S, argmax of R, KL(p_S || p_R)) from log-softmax rows (..., V) of S and R."""
    kl = (std_logp.exp() * (std_logp - logp)).sum(dim=-1).clamp(min=0)
    return std_logp.argmax(dim=-1), logp.argmax(dim=-1), kl


@torch.inference_mode()
def brute_distributions(
    model: nn.Module,
    ids: list[int],
    layer: int,
    positions: torch.Tensor,
    routes: torch.Tensor,
    *,
    batch_size: int = 8,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next-token log-softmax (M, V) with route routes[m] at (positions[m], layer)
    (`weights`: as brute_logprobs)."""
    adapter = adapter_for(model)
    adapter.check_layer(layer)
    device = next(model.parameters()).device
    seq = torch.tensor(ids, device=device)
    n = seq.shape[0]
    positions = torch.as_tensor(positions, device=device).long()
    routes = torch.as_tensor(routes, device=device).long()
    if weights is not None:
        weights = torch.as_tensor(weights, device=device).float()
    out = None
    for a in range(0, positions.shape[0], batch_size):
        pos, chosen = positions[a : a + batch_size], routes[a : a + batch_size]
        given = None if weights is None else weights[a : a + batch_size]
        batch = pos.shape[0]
        rows = torch.arange(batch, device=device) * n + pos  # router rows are (batch * n)

        def override(module, args, output, rows=rows, chosen=chosen, given=given):
            return adapter.override_router_output(output, rows, chosen, given)

        hook = adapter.router(layer).register_forward_hook(override)
        try:
            logits = model(input_ids=seq[None].expand(batch, n), use_cache=False).logits
        finally:
            hook.remove()
        logp = torch.log_softmax(logits[torch.arange(batch, device=device), pos].float(), dim=-1)
        if out is None:
            out = torch.empty(positions.shape[0], logp.shape[-1], dtype=torch.float32)
        out[a : a + batch] = logp.cpu()
    return out
