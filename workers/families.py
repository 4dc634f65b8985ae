"""The MoE model families the scorer supports, by their Hugging Face `model_type`.

Contract: FAMILIES names them; workers.adapters implements one adapter per name (its ADAPTERS
registry has exactly these keys, which tests/test_adapters.py checks). The list lives apart
from the adapters, which import torch, so the driver checks `model.family` without torch.
"""

FAMILIES = ("qwen3_moe", "olmoe", "deepseek_v2", "gpt_oss")

# Families whose attention has sliding windows or sinks: FlexAttention on CUDA is refused for
# them (workers.scorer.flex_refusal, which checks the loaded modules; this list lets the driver
# refuse the configuration before anything runs).
WINDOWS_OR_SINKS = ("gpt_oss",)
