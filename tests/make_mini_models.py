"""Write tiny random-weight checkpoints of the four families as Hugging Face directories.

    python tests/make_mini_models.py .cache/mini-models     # then: python -m orchestrator sweep=mini

Contract: `write_mini_models(root)` writes root/<family>/ for qwen3_moe, olmoe, deepseek_v2 and
gpt_oss (config.json, model.safetensors, the bundled model's tokenizer) and returns
{family: path}; each is written under a temporary name and renamed, and one already there is kept. The
shapes are tests/moe_factories.py's (DeepSeek-V2: dense layer 0 and a shared expert; GPT-OSS:
sliding-window layers and attention sinks) with two changes that vLLM's kernels need: the
bundled tokenizer's vocabulary (640), and a head size of 32 (vLLM's CPU attention supports
32, 64, 80, ...; the factories' 8 is too small).
The conf/model/mini-*.yaml files describe these checkpoints; the shapes are checked on load.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_factories import FAMILIES, make_config  # noqa: E402

from workers.generation.demo_task import bundled_model_path  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
VOCAB = 640  # the bundled tiny model's vocabulary, so its tokenizer serves every family


def mini_config(family: str):
    config = make_config(family)
    config.vocab_size = VOCAB
    config.hidden_size = 128
    if family == "deepseek_v2":  # MLA: the head size is qk_nope + qk_rope (v: v_head_dim)
        config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim = 32, 32, 32
        config.qk_head_dim = 64
        config.kv_lora_rank = 64
        config.num_hidden_layers = 4  # dense layer 0, then three MoE layers: early, middle, final
    else:
        config.head_dim = 32
    return config


def write_mini_models(root: str | Path, seed: int = 0) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM, GenerationConfig

    root = Path(root)
    out = {}
    for family in FAMILIES:
        path = root / family
        out[family] = path
        if (path / "config.json").is_file():
            continue
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(mini_config(family), dtype=torch.float32)
        model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0)
        tmp = root / f".{family}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            shutil.copy(bundled_model_path() / name, tmp / name)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python tests/make_mini_models.py DIR", file=sys.stderr)
        sys.exit(2)
    for family, path in write_mini_models(sys.argv[1]).items():
        print(f"{family}: {path}")
