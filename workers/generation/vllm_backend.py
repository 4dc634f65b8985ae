"""vLLM generation backend (GPUs, tensor parallel); install with `pip install .[vllm]`.

vllm is imported inside the constructor only, so nothing else in the project needs it. Prompts
go to vLLM as token ids (`encode_prompt`, the same rule as the HF backend), never as text, so
vLLM does not add a second BOS to a chat-templated prompt. Each prompt is one request with
`n` samples and its own seed derived from (seed, problem_id): results do not depend on how
vLLM batches requests. Sampling uses exactly the parameters given (temperature, top_p);
the checkpoint's generation_config defaults (e.g. top_k) only apply when none are given, and
we always give them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from workers.generation import Completion, SamplingParams, encode_prompt, sample_seed


class VLLMBackend:
    def __init__(
        self,
        model_path: str,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        seed: int = 0,
        **engine_kwargs: Any,
    ) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(
                "the vllm generation backend needs vLLM, which is not installed: "
                "pip install .[vllm] (GPU machines), or use generation backend 'hf'"
            ) from exc
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model_path,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            trust_remote_code=False,
            **engine_kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(
        self, prompts: Sequence[tuple[str, str]], params: SamplingParams
    ) -> list[Completion]:
        """`params.n` completions per (problem_id, prompt text), in prompt then sample order."""
        vllm = self._vllm
        requests = [
            {"prompt_token_ids": encode_prompt(self.tokenizer, text)} for _, text in prompts
        ]
        sampling = [
            vllm.SamplingParams(
                n=params.n,
                seed=sample_seed(params.seed, problem_id),
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_tokens,
            )
            for problem_id, _ in prompts
        ]
        # LLM.generate returns one RequestOutput per prompt, in input order.
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        completions = []
        for (problem_id, _), output in zip(prompts, outputs, strict=True):
            prompt_ids = list(output.prompt_token_ids)
            for sample in sorted(output.outputs, key=lambda o: o.index):
                completions.append(
                    Completion(
                        problem_id=problem_id,
                        sample_idx=sample.index,
                        prompt_ids=prompt_ids,
                        completion_ids=list(sample.token_ids),
                        text=sample.text,
                        finish_reason=str(sample.finish_reason),
                    )
                )
        return completions
