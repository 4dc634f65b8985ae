"""The MoE model families the scorer supports, by their Hugging Face `model_type`.

Contract: FAMILIES names them; workers.adapters implements one adapter per name (its ADAPTERS
registry has exactly these keys, which tests/test_adapters.py checks). The list lives apart
from the adapters, which import torch, so the driver checks `model.family` without torch.
"""

FAMILIES = ("qwen3_moe", "olmoe", "deepseek_v2", "gpt_oss")
