"""Which decoder layer a layer spec names: one rule for the driver and the scorer.

Contract: `resolve_layer(spec, moe_layers, num_layers)` -> a decoder index with routed experts.
`spec` is an index (int or numeric string) or "early" | "middle" | "final": the first MoE
layer, `moe_layers[len(moe_layers) // 2]`, the last. The driver applies it to a model's YAML
before anything loads, the scorer to the loaded model; anything else is a ValueError that
lists the valid MoE layers. Plain Python, so a dry run imports no torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

LAYER_NAMES = ("early", "middle", "final")


def resolve_layer(spec: int | str, moe_layers: Sequence[int], num_layers: int) -> int:
    """The decoder index of the MoE layer named by `spec`, or one ValueError saying why not."""
    moe_layers = list(moe_layers)
    valid = f"valid MoE layers: {format_ranges(moe_layers)} (or {'/'.join(LAYER_NAMES)})"
    if isinstance(spec, str) and spec in LAYER_NAMES:
        named = dict(zip(LAYER_NAMES, (0, len(moe_layers) // 2, -1), strict=True))
        return moe_layers[named[spec]]
    if isinstance(spec, str) and re.fullmatch(r"-?\d+", spec.strip()):
        spec = int(spec)
    if not isinstance(spec, int) or isinstance(spec, bool):
        raise ValueError(f"layer {spec!r} is not an index or one of early/middle/final; {valid}")
    if spec not in moe_layers:
        kind = "has no routed experts" if 0 <= spec < num_layers else "is out of range"
        raise ValueError(f"layer {spec} {kind}; {valid}")
    return spec


def format_ranges(values: Sequence[int]) -> str:
    """[1, 2, 3, 5] -> '1-3, 5'."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)
