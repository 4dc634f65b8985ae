"""Tiny random-weight MoE models of every supported family, and trajectories for them.

Contract: `make_model(name, seed=0)` builds, offline and in well under a second, a float32
eval-mode model with eager attention from a transformers config: one of `FAMILIES`
(qwen3_moe, olmoe, deepseek_v2, gpt_oss) or a variant in `VARIANTS`. Router, expert
output and LM-head weights are scaled up so that the route at one layer visibly changes
next-token probabilities (random models at the default init are nearly indifferent to routing).
`make_trajectories(vocab, lengths, prompt_lens, seed)` gives a TRAJECTORIES_SCHEMA table of
random token ids. `save_model(model, path)` writes a loadable safetensors checkpoint.
`single_thread()` pins torch to one CPU thread (use it in an autouse fixture).

Shapes: 3-4 layers, hidden 32, 8 experts, top-2, vocab 96.
- qwen3_moe: GQA (4 heads, 2 kv heads), q/k norms, norm_topk_prob=True.
- olmoe: norm_topk_prob=False, full-width q/k norms, clip_qkv.
- deepseek_v2: layer 0 dense (first_k_dense_replace=1), MLA with q_lora_rank=None, a shared
  expert, routed_scaling_factor=1.5. Variants: deepseek_v2_qlora (q_lora_rank set, YaRN rope
  with mscale, as DeepSeek-V2-Lite), deepseek_v2_grouped (group_limited_greedy, 2 groups of 4, 1 kept).
- gpt_oss: 4 layers alternating sliding (window 4, shorter than the sequences) and full
  attention, attention sinks, router bias, attention bias.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pyarrow as pa
import torch

from workers.families import FAMILIES  # noqa: F401 (every supported family has a test model)
from workers.schemas import TRAJECTORIES_SCHEMA

VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    initializer_range=0.1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _qwen3_moe():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        **_COMMON,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
    )


def _olmoe():
    from transformers import OlmoeConfig

    return OlmoeConfig(
        **_COMMON,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        clip_qkv=4.0,
    )


def _deepseek_v2(**overrides):
    from transformers import DeepseekV2Config

    values = dict(
        **_COMMON,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=1.5,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
    )
    values.update(overrides)
    return DeepseekV2Config(**values)


def _gpt_oss():
    from transformers import GptOssConfig

    return GptOssConfig(
        **_COMMON,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 8,
        },
    )


VARIANTS = {
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v2_qlora": lambda: _deepseek_v2(
        q_lora_rank=12,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
        },
    ),
    "deepseek_v2_grouped": lambda: _deepseek_v2(
        topk_method="group_limited_greedy", n_group=2, topk_group=1
    ),
    "gpt_oss": _gpt_oss,
}


@contextlib.contextmanager
def single_thread():
    """One torch CPU thread for the duration: on a busy shared CPU, two threads that wait on each
    other made these tiny models ~50x slower (measured)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def make_config(name: str):
    if name not in VARIANTS:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[name]()


def make_model(
    name: str,
    seed: int = 0,
    *,
    router_scale: float = 2.0,
    expert_scale: float = 3.0,
    head_scale: float = 6.0,
):
    """A tiny random model of `name`, float32, eager attention, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        make_config(name), attn_implementation="eager", dtype=torch.float32
    )
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "top_k") and hasattr(module, "weight") and module.weight.dim() == 2:
                module.weight.mul_(router_scale)  # a router: sharper logits
            if type(module).__name__.endswith("Experts"):
                module.down_proj.mul_(expert_scale)  # the MoE output outweighs the residual
        model.lm_head.weight.mul_(head_scale)
    return model.eval()


def save_model(model, path: str | Path) -> Path:
    """Write a safetensors checkpoint that AutoModelForCausalLM.from_pretrained loads offline."""
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_trajectories(
    vocab: int = VOCAB,
    lengths: tuple[int, ...] = (14, 11),
    prompt_lens: tuple[int, ...] = (6, 4),
    seed: int = 0,
    *,
    model: str = "tiny",
    dataset: str = "demo",
) -> pa.Table:
    """Random trajectories: row i has lengths[i] tokens, the first prompt_lens[i] the prompt."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i, (n, p) in enumerate(zip(lengths, prompt_lens, strict=True)):
        ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
        rows.append(
            {
                "problem_id": f"p{seed}-{i}",
                "sample_idx": i % 2,
                "input_ids": ids,
                "prompt_len": p,
                "model": model,
                "dataset": dataset,
                "completion_text": "",
                "extracted_answer": None,
                "gold_answer": "",
                "verified": True,
                "verify_reason": "",
                "finish_reason": "stop",
                "seed": seed,
            }
        )
    return pa.Table.from_pylist(rows, schema=TRAJECTORIES_SCHEMA)
