"""The scorer's settings: every one declared here once, with its default, help and check.

Contract: `ScoreConfig(...)` is what `workers.scoring.scorer.Scorer` takes; building one checks every
value and raises ValueError("ScoreConfig: <field> must be ..., got <value>"). Whoever exposes
these settings derives them from `dataclasses.fields(ScoreConfig)` (the score CLI's options,
the driver's `scoring.<field>` keys), so a new setting is added here and nowhere else.
The closed lists come from the modules that implement them: samplers from workers.scoring.routes,
attention paths from workers.scoring.attention, dtypes from DTYPES below. Importing this module does
not import torch, so the driver checks a config in milliseconds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from workers.scoring.attention import ATTENTIONS
from workers.scoring.routes import SAMPLERS

if TYPE_CHECKING:
    import torch

ALL_POSITIONS = "all"  # the default position budget: every completion token
POSITIONS_RULE = "positions must be all, a fraction in (0, 1] or a whole count >= 1"
DTYPES = ("float32", "bfloat16")  # torch dtype names the scorer loads a model in
# Settings that change how a score is computed, not its value (equal up to float rounding):
# a resumed run may change them without redoing finished units.
SPEED_SETTINGS = ("device", "memory_budget_mb", "attention", "compile")


def _setting(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ScoreConfig:
    """How to score (docs/method.md). attention: both paths compute the same numbers up to
    rounding (on CUDA, flex refuses models with sliding windows or attention sinks: see
    workers.scoring.scorer.flex_refusal); memory_budget_mb bounds one micro-batch's activations
    (weights and the standard pass's keys/values come on top)."""

    alternatives: int = _setting(32, "J: alternative routes drawn per token")
    pool: int = _setting(32, "P: highest-scoring experts to draw from (capped at the expert count)")
    temperature: float = _setting(1.0, "tau of Gumbel-top-k")
    sampler: str = _setting("gumbel", f"route sampler, one of {', '.join(SAMPLERS)}")
    seed: int = _setting(0, "seed of every token's route draws")
    # float32 is what the exactness tests use; bfloat16 fits the hub models on one 80 GB GPU.
    dtype: str = _setting("float32", f"model weights and activations, one of {', '.join(DTYPES)}")
    device: str = _setting("cpu", "cpu, cuda or cuda:N")
    memory_budget_mb: int = _setting(1024, "bound on one micro-batch's activations (MB)")
    attention: str = _setting(
        "eager",
        "eager: the reference, fastest on CPU; flex: fused FlexAttention (GQA heads packed"
        " into query rows), for GPUs, where its kernel compiles once per key bucket",
    )
    compile: bool = _setting(
        False,
        "torch.compile decode steps with static shapes (keys padded to power-of-two buckets,"
        " micro-batches padded): one compile per layer and bucket, eager attention inside",
    )
    # A position budget: which completion positions of each trajectory are scored (a seeded
    # per-token draw, workers.scoring.scorer.select_positions); the standard pass is always whole.
    positions: str = _setting(
        ALL_POSITIONS,
        "completion positions scored per trajectory: all, a fraction in (0, 1] (e.g. 0.25)"
        " or a whole count >= 1 (e.g. 64), drawn per token from the seed",
    )
    # The direction and size of each alternative's layer-L MoE block output against S's
    # (two more list columns, workers.schemas.MOE_GEOMETRY); off: the files keep their layout.
    moe_geometry: bool = _setting(
        False,
        "also write alt_moe_cos and alt_moe_norm_ratio: each alternative's layer-L MoE output"
        " against S's (cosine, norm ratio)",
    )

    def __post_init__(self):
        _check(
            _is_int(self.alternatives) and self.alternatives >= 1,
            "alternatives must be an integer >= 1",
            self.alternatives,
        )
        _check(_is_int(self.pool) and self.pool >= 1, "pool must be an integer >= 1", self.pool)
        _check(
            isinstance(self.temperature, (int, float))
            and not isinstance(self.temperature, bool)
            and self.temperature > 0,
            "temperature must be a number > 0",
            self.temperature,
        )
        _check(
            self.sampler in SAMPLERS,
            f"sampler must be one of {', '.join(SAMPLERS)}",
            self.sampler,
        )
        _check(_is_int(self.seed), "seed must be an integer", self.seed)
        _check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}", self.dtype)
        _check(
            isinstance(self.device, str)
            and re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None,
            "device must be cpu, cuda or cuda:N",
            self.device,
        )
        _check(
            _is_int(self.memory_budget_mb) and self.memory_budget_mb >= 1,
            "memory_budget_mb must be an integer >= 1",
            self.memory_budget_mb,
        )
        _check(
            self.attention in ATTENTIONS,
            f"attention must be one of {', '.join(ATTENTIONS)}",
            self.attention,
        )
        _check(isinstance(self.compile, bool), "compile must be true or false", self.compile)
        _check(
            isinstance(self.moe_geometry, bool),
            "moe_geometry must be true or false",
            self.moe_geometry,
        )
        budget = parse_positions(self.positions)  # raises for a bad value
        # one spelling per budget ("0.25", "64", "all"), also when given as a number
        object.__setattr__(self, "positions", ALL_POSITIONS if budget is None else str(budget))

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)


def parse_positions(value) -> float | int | None:
    """A `positions` budget: None for all, a float in (0, 1] for a fraction, an int >= 1 for a
    count. Text with a decimal point or an exponent is a fraction, whole-number text a count
    (so "1" is one position, "1.0" all of them); ValueError for anything else."""
    text = str(value).strip() if isinstance(value, (str, int, float)) else ""
    if isinstance(value, bool) or not text:
        text = "?"
    if text == ALL_POSITIONS:
        return None
    if re.fullmatch(r"\+?\d+", text):
        count = int(text)
        _check(count >= 1, POSITIONS_RULE, value)
        return count
    try:
        fraction = float(text)
    except ValueError:
        fraction = math.nan
    _check(0.0 < fraction <= 1.0, POSITIONS_RULE, value)
    return fraction


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, message: str, value) -> None:
    if not ok:
        raise ValueError(f"ScoreConfig: {message}, got {value!r}")
