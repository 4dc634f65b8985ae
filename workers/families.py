"""The MoE model families the scorer supports, by their Hugging Face `model_type`, and the
shape of a model as its config.json states it.

Contract: FAMILIES names them; workers.adapters implements one adapter per name (its ADAPTERS
registry has exactly these keys, which tests/test_adapters.py checks). The list lives apart
from the adapters, which import torch, so the driver checks `model.family` without torch.
`read_config_json(directory)` reads a model's config.json, `moe_shape(hf_config)` its decoder
and MoE layers, experts and top-k by each family's layer rule, `context_length(hf_config)` its
context; each raises ValueError (one line naming what is wrong) for what it cannot read. The
driver checks a model's YAML against them (orchestrator.config) and sizes prompts with them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FAMILIES = ("qwen3_moe", "olmoe", "deepseek_v2", "gpt_oss")

# Families whose attention has sliding windows or sinks: FlexAttention on CUDA is refused for
# them (workers.scoring.scorer.flex_refusal, which checks the loaded modules; this list lets the driver
# refuse the configuration before anything runs).
WINDOWS_OR_SINKS = ("gpt_oss",)

# config.json `model_type`s whose MoE shape `moe_shape` reads (the four families, and the
# siblings whose transformers implementations share their layer rules).
MODEL_TYPES = ("qwen3_moe", "qwen2_moe", "deepseek_v2", "deepseek_v3", "gpt_oss", "olmoe")


def read_config_json(directory: str | Path) -> dict[str, Any]:
    """<directory>/config.json as a dict; ValueError naming the file when it is missing, not
    JSON, or not a JSON object."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} not found")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not readable JSON: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object")
    return config


def moe_shape(hf_config: dict[str, Any]) -> dict[str, Any]:
    """num_layers, moe_layers, num_experts, top_k read from a Hugging Face config.json dict;
    ValueError for another model_type or a missing key.

    Mirrors the layer rules of the transformers implementations of the four families. Key
    names vary (transformers 5 writes Qwen3-MoE's `num_experts` as `num_local_experts`).
    """
    kind = hf_config.get("model_type")
    if kind not in MODEL_TYPES:
        raise ValueError(f"config.json model_type {kind!r} is not supported; valid: {FAMILIES}")
    missing = object()

    def first(*keys: str, default: Any = missing) -> Any:
        for key in keys:
            if key in hf_config:
                return hf_config[key]
        if default is not missing:
            return default
        raise ValueError(f"config.json of a {kind} model has none of {keys}")

    n = first("num_hidden_layers")
    top_k = first("num_experts_per_tok", "experts_per_token")
    experts = first("num_experts", "num_local_experts", "n_routed_experts")
    if kind in ("qwen3_moe", "qwen2_moe"):
        step, dense = first("decoder_sparse_step", default=1), first("mlp_only_layers", default=[])
        layers = [i for i in range(n) if i not in dense and (i + 1) % step == 0]
    elif kind in ("deepseek_v2", "deepseek_v3"):
        first_moe = first("first_k_dense_replace", default=0)
        freq = first("moe_layer_freq", default=1)
        layers = [i for i in range(n) if i >= first_moe and i % freq == 0]
    else:  # gpt_oss, olmoe: every layer
        layers = list(range(n))
    return {"num_layers": n, "moe_layers": layers, "num_experts": experts, "top_k": top_k}


def context_length(hf_config: dict[str, Any]) -> int | None:
    """Tokens a sequence may hold: config.json's `max_position_embeddings`; None when it does
    not say (or says something that is not an integer)."""
    length = hf_config.get("max_position_embeddings")
    return length if isinstance(length, int) and not isinstance(length, bool) else None
