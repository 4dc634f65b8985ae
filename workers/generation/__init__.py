"""Generation backends: rendered prompts in, sampled completions (token ids and text) out.

Contract: `backend.generate(prompts, params) -> list[Completion]` where `prompts` is a sequence
of (problem_id, rendered prompt text) and the result holds `params.n` completions per prompt,
in prompt order then sample order. `make_backend("hf" | "vllm", model_path, **options)` builds
one; the backend loads its model once and serves many calls.

Both backends tokenize the prompt text the same way (`encode_prompt`) so `prompt_ids` do not
depend on the backend, and derive their randomness from (seed, problem_id, sample_idx) with
sha256 (`sample_seed`), never from Python's salted `hash()`.

Neither backend runs past the model's context: `max_length` is the most tokens a sequence may
hold (HF: the config's `max_position_embeddings`; vLLM: the engine's `max_model_len`), and each
prompt's `max_tokens` is clipped to `max_length - prompt length` (`completion_budget`; such a
completion ends with finish_reason "length"). A prompt that leaves no room for one token is a
ValueError; `workers.generation.generate` records such rows as unprompted samples before calling a backend.

Importing this package is cheap: torch/transformers load with the HF backend, vllm only inside
the vLLM backend's constructor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

BACKENDS = ("hf", "vllm")  # the names make_backend builds
DTYPES = ("bfloat16", "float16", "float32")  # model dtypes every backend loads (model.dtype)
FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # completions per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability; 0 = off
    max_tokens: int = 256  # new tokens per completion
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True)
class Completion:
    problem_id: str
    sample_idx: int
    prompt_ids: list[int]
    completion_ids: list[int]  # includes the EOS token when finish_reason == "stop"
    text: str  # the completion decoded without special tokens
    finish_reason: str  # "stop" (EOS produced) or "length" (max_tokens reached)
    # log p(token | prefix) of each completion token under the model's raw distribution
    # (before temperature/truncation), where the backend reports it (vLLM); None otherwise.
    logprobs: list[float] | None = None
    # The experts the generator's router picked for each completion token (the forward pass
    # at position prompt_len - 1 + i) at the backend's `route_layers`: an integer array
    # (completion tokens, layers, k), where the backend records them (`route_layers` given).
    routes: Any = None


class GenerationBackend(Protocol):
    tokenizer: Any
    max_length: int | None  # tokens a sequence may hold (prompt + completion); None = unknown
    # The `gen_routes` column (workers.schemas.gen_routes_field) of the routes each Completion
    # carries; None when routes are not recorded (the backend's `route_layers` option).
    routes_field: Any

    def generate(
        self, prompts: Sequence[tuple[str, str]], params: SamplingParams
    ) -> list[Completion]: ...


def make_backend(name: str, model_path: str, **options: Any) -> GenerationBackend:
    """A backend by name: "hf" (transformers, CPU or GPU) or "vllm" (vLLM on GPUs or its CPU build)."""
    if name == "hf":
        from workers.generation.hf import HFBackend

        return HFBackend(model_path, **options)
    if name == "vllm":
        from workers.generation.vllm_backend import VLLMBackend

        return VLLMBackend(model_path, **options)
    raise ValueError(f"unknown generation backend {name!r}; valid backends: {', '.join(BACKENDS)}")


def sample_seed(seed: int, problem_id: str, sample_idx: int | None = None) -> int:
    """A 63-bit seed from (seed, problem_id[, sample_idx]), the same on every machine and run."""
    key = f"{seed}\x00{problem_id}" + ("" if sample_idx is None else f"\x00{sample_idx}")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def completion_budget(prompt_len: int, max_tokens: int, max_length: int | None) -> int:
    """New tokens a prompt of `prompt_len` tokens may get: `max_tokens`, clipped so that prompt
    and completion fit `max_length`. Below 1 when the prompt leaves no room."""
    return max_tokens if max_length is None else min(max_tokens, max_length - prompt_len)


def check_budgets(prompt_lens: Sequence[int], max_tokens: int, max_length: int | None) -> list[int]:
    """`completion_budget` of each prompt; ValueError naming the first that has no room."""
    budgets = [completion_budget(n, max_tokens, max_length) for n in prompt_lens]
    for i, budget in enumerate(budgets):
        if budget < 1:
            raise ValueError(
                f"prompt {i} has {prompt_lens[i]} tokens: no room to generate within the"
                f" model's {max_length}"
            )
    return budgets


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt.

    A chat template usually writes the BOS token itself; adding special tokens again would
    double it, so they are added only when the text does not already start with BOS.
    """
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and text.startswith(bos))
    ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
    if not ids:
        raise ValueError(f"prompt {text[:40]!r} encodes to no tokens")
    return list(ids)
