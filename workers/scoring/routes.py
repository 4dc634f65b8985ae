"""Alternative routes for a token and the noise that draws them (docs/method.md, "Routes").

Contract:
- `token_seed(seed, problem_id, sample_idx, position, layer)`: a 63-bit seed from the sha256
  of those five values, so a token gets the same alternatives whatever the batch, shard,
  device, worker or process that scores it.
- `sample_routes(z, seeds, ...)` -> (N, J, k) expert ids. Per token a CPU torch.Generator
  seeded with its seed draws U ~ Uniform[0, 1) in float64, shape (J, C) with C the candidate
  experts, and G = -log(-log U) (Gumbel(0, 1)). Samplers:
    "gumbel" (default): candidates = the pool, the P experts with the highest z (P capped at
      the number of experts); keep the k largest of z_e / tau + G per draw (Gumbel-top-k).
    "uniform_pool": k distinct experts uniformly from the pool (the k largest of G alone).
    "uniform_all": k distinct experts uniformly from all experts.
  Draws may repeat one another; every draw is kept. Within a route the experts are in the
  order picked (descending perturbed key), so a route list is an ordered set: compare sets.
- `router_logprob(z, routes)` = s(R) = sum over e in R of log_softmax(z)_e, over all routed
  experts, in float32.
Everything here runs on the CPU in float64 (z is cast), so draws do not depend on the device
beyond the float32 router logits themselves.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions: the driver checks a config's sampler against SAMPLERS
# without loading torch (~2 s).
SAMPLERS = ("gumbel", "uniform_pool", "uniform_all")


def token_seed(seed: int, problem_id: str, sample_idx: int, position: int, layer: int) -> int:
    """A seed that depends on exactly (seed, problem_id, sample_idx, position, layer)."""
    key = json.dumps([int(seed), str(problem_id), int(sample_idx), int(position), int(layer)])
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def pool_size(pool: int, n_experts: int, k: int, sampler: str) -> int:
    """The effective pool size P = min(pool, n_experts); a pool sampler needs P >= k."""
    size = min(pool, n_experts)
    if sampler != "uniform_all" and size < k:
        raise ValueError(
            f"pool of {size} experts is smaller than the route size k={k}; "
            f"use pool >= {k} (the model has {n_experts} routed experts)"
        )
    return size


def gumbel_noise(seeds: list[int], shape: tuple[int, int]) -> torch.Tensor:
    """Gumbel(0, 1) noise (N, *shape), float64 on the CPU, one generator per token."""
    import torch

    uniform = torch.empty(len(seeds), *shape, dtype=torch.float64)
    gen = torch.Generator(device="cpu")
    for i, s in enumerate(seeds):  # ~10 us per token; seeding per token is what makes it stable
        gen.manual_seed(s)
        torch.rand(shape, generator=gen, dtype=torch.float64, out=uniform[i])
    uniform.clamp_(min=torch.finfo(torch.float64).tiny)
    return -torch.log(-torch.log(uniform))


def sample_routes(
    z: torch.Tensor,
    seeds: list[int],
    *,
    k: int,
    alternatives: int,
    pool: int,
    temperature: float = 1.0,
    sampler: str = "gumbel",
) -> torch.Tensor:
    """J alternative routes per token: z (N, E) router logits -> (N, J, k) long (CPU)."""
    import torch

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    z = z.detach().to("cpu", torch.float64)
    n_tokens, n_experts = z.shape
    size = pool_size(pool, n_experts, k, sampler)
    if sampler == "uniform_all":
        candidates = torch.arange(n_experts).expand(n_tokens, n_experts)
    else:
        candidates = torch.topk(z, size, dim=-1).indices  # (N, P) descending z
    noise = gumbel_noise(seeds, (alternatives, candidates.shape[1]))  # (N, J, C)
    if sampler == "gumbel":
        keys = z.gather(-1, candidates)[:, None, :] / temperature + noise
    else:
        keys = noise
    picked = torch.topk(keys, k, dim=-1).indices  # (N, J, k) descending key
    return candidates[:, None, :].expand(-1, alternatives, -1).gather(-1, picked)


def router_logprob(z: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
    """s(R) = sum_{e in R} log_softmax(z)_e: z (N, E), routes (N, R, k) -> (N, R) float32."""
    import torch

    logp = torch.log_softmax(z.float(), dim=-1)
    logp = logp[:, None, :].expand(-1, routes.shape[1], -1)
    return logp.gather(-1, routes.to(logp.device)).sum(-1)
