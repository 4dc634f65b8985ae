"""The one way this project loads a model's weights for torch (scorer, HF generator, router
update, demo evaluation). vLLM loads its own.

Contract: `load_causal_lm(path, dtype, device)` returns transformers' AutoModelForCausalLM in
eval mode, from safetensors only, never with remote code (every family we score is native to
transformers), GPT-OSS's MXFP4 experts dequantized into plain modules (the scorer calls experts
one by one). `device` is "cpu", "cuda:N", or "cuda": then on the first visible GPU when the
weights fit it with `reserve_bytes` to spare, else spread layer by layer over the visible GPUs
(transformers' device_map "sequential": GPU 0 filled first, each GPU keeps `reserve_bytes`
free for the keys/values and activations of its layers). A spread model carries accelerate's
hooks, which move each layer's inputs to its device; `devices_of(model)` lists them.
`placement` is the decision alone, a pure function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

GiB = 2**30


def placement(weights_bytes: int, reserve_bytes: int, gpu_bytes: list[int]) -> str | None:
    """Where a model of `weights_bytes` goes among GPUs of `gpu_bytes` total memory each: "cuda:0"
    when GPU 0 holds it with `reserve_bytes` to spare, "spread" when the GPUs together do (each
    keeping its reserve), None when they do not."""
    if not gpu_bytes:
        return None
    if weights_bytes + reserve_bytes <= gpu_bytes[0]:
        return "cuda:0"
    if len(gpu_bytes) > 1 and weights_bytes <= sum(max(0, b - reserve_bytes) for b in gpu_bytes):
        return "spread"
    return None


def load_causal_lm(
    path: str | Path,
    *,
    dtype: torch.dtype,
    device: str = "cpu",
    reserve_bytes: int = 4 * GiB,
) -> nn.Module:
    """The model at `path` (a local directory), as the module docstring says. ValueError with
    the path for a missing or unreadable checkpoint or a model that cannot fit the GPUs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model directory at {path} (config.json missing)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a model config from {path}: {err}") from err
    kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, "trust_remote_code": False}
    if _quant_method(config) == "mxfp4":
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    device_map = _device_map(path, config, dtype, device, reserve_bytes)
    try:
        if device_map is not None:
            return AutoModelForCausalLM.from_pretrained(path, **device_map, **kwargs).eval()
        return AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    except OSError as err:  # no safetensors weights, unreadable files
        raise ValueError(f"cannot load model weights from {path}: {err}") from err


def devices_of(model: nn.Module) -> list[torch.device]:
    """The distinct devices holding `model`'s parameters, in module order (parameters that
    accelerate offloaded to the meta device, loaded only when their module runs, aside)."""
    seen: dict[torch.device, None] = {}
    for p in model.parameters():
        if p.device.type != "meta":
            seen.setdefault(p.device, None)
    return list(seen)


def weights_bytes(config: Any, dtype: torch.dtype) -> int:
    """The model's parameter bytes in `dtype`, counted on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _device_map(path, config, dtype, device, reserve_bytes) -> dict[str, Any] | None:
    """from_pretrained's placement kwargs, or None to load on the CPU and move."""
    if not device.startswith("cuda") or not _have_accelerate():
        return None
    if device != "cuda" or torch.cuda.device_count() < 2:
        return {"device_map": device}
    gpus = [
        torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())
    ]
    where = placement(weights_bytes(config, dtype), reserve_bytes, gpus)
    if where is None:
        raise ValueError(
            f"{path}: the weights do not fit {len(gpus)} GPU(s) of"
            f" {min(gpus) / GiB:.0f} GiB keeping {reserve_bytes / GiB:.1f} GiB free on each;"
            " reserve more GPUs per scorer (model.gpus) or use bfloat16"
        )
    if where != "spread":
        return {"device_map": where}
    budget = {i: max(0, b - reserve_bytes) for i, b in enumerate(gpus)}
    return {"device_map": "sequential", "max_memory": budget}


def _have_accelerate() -> bool:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return False
    return True


def _quant_method(config: Any) -> str | None:
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    return (
        quant.get("quant_method")
        if isinstance(quant, dict)
        else getattr(quant, "quant_method", None)
    )
