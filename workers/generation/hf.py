"""Transformers generation backend (CPU or one GPU): batched `generate` with the KV cache.

Each (problem_id, sample_idx) draws its tokens from its own torch.Generator seeded from
sha256(seed, problem_id, sample_idx), so a sample does not depend on which other samples share
its batch, on batch size, or on order. `_RowSampler` (a LogitsProcessor) applies temperature,
top-k, min-p and top-p, draws one token per row by inverse CDF with that row's generator, and
masks every other token to -inf; `generate(do_sample=False)` then picks exactly that token. (Transformers'
own sampling uses one global RNG over the whole batch, which would tie samples together.)

Prompts are left-padded (position ids follow the attention mask); a completion ends at the
first EOS ("stop", EOS included in `completion_ids`) or after its budget ("length"):
`max_tokens`, clipped to the model's `max_position_embeddings` minus the prompt. A batch runs
for its longest budget and each row is cut at its own, which is the completion it would get
alone (its tokens come from its own generator).

With a `plan` (workers.generation.reroute.ReroutePlan) every batch generates rerouted: the plan's
router hooks are on for the call and `reroute_counter` sums the active experts over all calls.
With `route_layers` (decoder indices of MoE layers), forward hooks on those layers' routers keep
the experts each forward pass picked (the router's own chosen indices, as the scorer reads S):
the prefill's last prompt position, then each decode step's one position, so each completion
token i gets the route at position prompt_len - 1 + i (`Completion.routes`). This is one
device-to-host copy per layer per batch, after generation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
)

from workers.adapters import adapter_for
from workers.generation import (
    DTYPES,
    Completion,
    SamplingParams,
    check_budgets,
    encode_prompt,
    sample_seed,
)
from workers.generation.reroute import RerouteCounter, ReroutePlan, rerouted
from workers.models import load_causal_lm

_DTYPES = {**{name: getattr(torch, name) for name in DTYPES}, "auto": "auto"}


class _RowSampler(LogitsProcessor):
    """Samples one token per row with that row's generator; returns 0 there, -inf elsewhere."""

    def __init__(
        self,
        seeds: Sequence[int],
        temperature: float,
        top_p: float,
        top_k: int = 0,
        min_p: float = 0.0,
    ) -> None:
        self.generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.min_p = min_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            choice = scores.argmax(dim=-1)
        else:
            # float64 so a row's probabilities do not shift with the batch's other rows.
            probs = torch.softmax(scores.double() / self.temperature, dim=-1)
            sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
            if self.top_k or self.min_p:
                # Top-k, then min-p relative to the top token, then top-p over what is left
                # (renormalised): vLLM's order.
                if self.top_k:
                    sorted_probs[:, self.top_k :] = 0.0
                if self.min_p:
                    floor = self.min_p * sorted_probs[:, :1]
                    sorted_probs = sorted_probs.masked_fill(sorted_probs < floor, 0.0)
                sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
            if self.top_p < 1:
                # Keep the smallest prefix whose mass reaches top_p (always the top token).
                before = sorted_probs.cumsum(dim=-1) - sorted_probs
                sorted_probs = sorted_probs.masked_fill(before >= self.top_p, 0.0)
            cdf = sorted_probs.cumsum(dim=-1)
            # One uniform draw per row per step: this is the only randomness a sample sees.
            u = torch.stack(
                [torch.rand((), generator=g, dtype=torch.float64) for g in self.generators]
            )
            u = u.to(cdf.device).unsqueeze(1) * cdf[:, -1:]
            index = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
            choice = order.gather(-1, index).squeeze(1)
        masked = torch.full_like(scores, float("-inf"))
        masked.scatter_(1, choice.unsqueeze(1), 0.0)
        return masked


class HFBackend:
    """Loads a causal LM once (safetensors only) and generates completions in batches."""

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 32,
        plan: ReroutePlan | None = None,
        route_layers: Sequence[int] | None = None,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = load_causal_lm(model_path, dtype=_DTYPES[dtype], device=str(self.device))
        self.max_length = getattr(self.model.config, "max_position_embeddings", None)
        self.eos_ids = _eos_ids(self.model.generation_config, self.tokenizer)
        if not self.eos_ids:
            raise ValueError(
                f"{model_path}: neither the tokenizer nor generation_config names an EOS token"
            )
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        # A fresh config: the checkpoint's sampling defaults (top_k, repetition_penalty, ...)
        # must not leak into the raw distribution our sampler draws from.
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id
        )
        self.plan = plan
        self.reroute_counter = RerouteCounter() if plan is not None else None
        if plan is not None:
            plan.check(adapter_for(self.model))  # a plan for another model fails here, not later
        self.routes_field, self._steps = None, None
        if route_layers is not None and plan is not None:
            raise ValueError("recording routes under a reroute plan is not supported")
        if route_layers is not None:
            self._record_routes(list(route_layers))

    def _record_routes(self, layers: list[int]) -> None:
        """Hook the routers of `layers`: each forward appends the chosen experts of every row's
        last position, (batch, k) per layer, to `self._steps` while it is a list."""
        from workers.schemas import gen_routes_field

        adapter = adapter_for(self.model)
        for layer in layers:
            adapter.check_layer(layer)
        self.routes_field = gen_routes_field(adapter.n_experts, adapter.top_k, layers)
        self._ids_dtype = np.uint8 if adapter.n_experts <= 256 else np.uint16

        def keep(slot: int):
            def hook(module, args, output):
                if self._steps is None:
                    return
                z, chosen = adapter.parse_router_output(output)
                chosen = adapter.standard_route(z) if chosen is None else chosen
                rows = chosen.reshape(self._batch_rows, -1, adapter.top_k)
                self._steps[slot].append(rows[:, -1])  # each row's last position

            return hook

        self._batch_rows, self._n_route_layers = 0, len(layers)
        for slot, layer in enumerate(layers):
            adapter.router(layer).register_forward_hook(keep(slot))

    def generate(
        self, prompts: Sequence[tuple[str, str]], params: SamplingParams
    ) -> list[Completion]:
        """`params.n` completions per (problem_id, prompt text), in prompt then sample order."""
        encoded = [encode_prompt(self.tokenizer, text) for _, text in prompts]
        budgets = check_budgets([len(ids) for ids in encoded], params.max_tokens, self.max_length)
        rows = [(p, k) for p in range(len(prompts)) for k in range(params.n)]
        # Longest first: rows of similar length share a batch and waste less padding.
        order = sorted(range(len(rows)), key=lambda r: -len(encoded[rows[r][0]]))
        results: list[Completion | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = [
                (prompts[p][0], k, encoded[p], budgets[p]) for p, k in (rows[r] for r in chunk)
            ]
            for r, completion in zip(chunk, self._generate_batch(batch, params), strict=True):
                results[r] = completion
        return results

    def _generate_batch(
        self, batch: list[tuple[str, int, list[int], int]], params: SamplingParams
    ) -> list[Completion]:
        width = max(len(ids) for _, _, ids, _ in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (_, _, ids, _) in enumerate(batch):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention_mask[i, width - len(ids) :] = 1
        sampler = _RowSampler(
            [sample_seed(params.seed, pid, k) for pid, k, _, _ in batch],
            params.temperature,
            params.top_p,
            params.top_k,
            params.min_p,
        )
        reroute = (
            rerouted(self.model, self.plan, self.reroute_counter)
            if self.plan is not None
            else contextlib.nullcontext()
        )
        if self.routes_field is not None:
            self._steps, self._batch_rows = [[] for _ in range(self._n_route_layers)], len(batch)
        with torch.inference_mode(), reroute:
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                max_new_tokens=max(budget for _, _, _, budget in batch),
                do_sample=False,
                logits_processor=LogitsProcessorList([sampler]),
            )
        new_tokens = out[:, width:].tolist()  # one device-to-host copy per batch
        routes = self._take_routes()
        eos = set(self.eos_ids)
        completions = []
        for row, ((pid, k, ids, budget), tokens) in enumerate(zip(batch, new_tokens, strict=True)):
            tokens = tokens[:budget]
            stop = next((i for i, t in enumerate(tokens) if t in eos), None)
            if stop is not None:
                tokens, reason = tokens[: stop + 1], "stop"
            else:
                reason = "length"
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            kept = None if routes is None else routes[row, : len(tokens)]
            completions.append(Completion(pid, k, list(ids), tokens, text, reason, routes=kept))
        return completions

    def _take_routes(self) -> np.ndarray | None:
        """The routes the hooks kept for the last batch: (batch, forward passes, layers, k)."""
        if self._steps is None:
            return None
        steps, self._steps = self._steps, None
        per_layer = [torch.stack(s, dim=1).cpu() for s in steps]  # (batch, passes, k) each
        return torch.stack(per_layer, dim=2).numpy().astype(self._ids_dtype)


def _eos_ids(generation_config: Any, tokenizer: Any) -> list[int]:
    """EOS ids from the checkpoint's generation_config (may be a list) and the tokenizer."""
    ids: list[int] = []
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        configured = [configured]
    for token in [*(configured or []), tokenizer.eos_token_id]:
        if token is not None and token not in ids:
            ids.append(int(token))
    return ids
