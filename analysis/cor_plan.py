"""The CoR budget rule: a compute-preserving reroute plan from the CEI tables (docs/method.md,
"Counterfactual Expert Impact", "The reroute at generation").

Contract: `cor_plan(layers, experts, model, cfg)` reads analysis.cei's layer table (R_l, column
`sensitivity`) and expert table (`dormancy`) of one (model, dataset), and returns a
workers.generation.reroute.ReroutePlan for `model` (an adapter, or (moe_layers, k, n_experts)):
- the layers with an R_l, ordered by (R_l, layer index); the `layers_moved` (m) first give
  `shift` experts each (k_l = k - shift), the m last receive them (k_l = k + shift); every
  other MoE layer keeps k. So sum_l delta_l = 0 and the experts run per token are those of the
  standard route.
- at each receiving layer, the `forced` (f) experts of highest dormancy (ties to the lower id)
  among those with dormancy > `min_dormancy` are forced into every token's route (fewer where
  fewer qualify); the rest of the route is the top-(k_l - f) by the family's selection order.
ValueError when the tables or the budget do not allow it (m too large for the scored layers,
k - shift < 1, k + shift > n_experts, f > k + shift, several models or datasets).
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from workers.generation.reroute import ReroutePlan


@dataclass(frozen=True)
class RerouteConfig:
    """The budget rule's choices (the paper gives none; this project's reading)."""

    shift: int = 1  # experts moved from each giving layer to one receiving layer
    layers_moved: int = 1  # m: layers giving (lowest R_l) and as many receiving (highest R_l)
    forced: int = 1  # f: dormant experts forced in per receiving layer (the budget it gains)
    min_dormancy: float = 0.0  # an expert is a candidate only above this dormancy (nats)
    seed: int = 0  # the random control's seed (ReroutePlan.with_random)

    def __post_init__(self) -> None:
        for name in ("shift", "layers_moved"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.forced, int) or self.forced < 0:
            raise ValueError(f"forced must be an int >= 0, got {self.forced!r}")
        if self.min_dormancy < 0:
            raise ValueError(f"min_dormancy must be >= 0, got {self.min_dormancy}")


def _model_shape(model) -> tuple[list[int], int, int]:
    if isinstance(model, tuple):
        moe_layers, k, n_experts = model
        return [int(layer) for layer in moe_layers], int(k), int(n_experts)
    return list(model.moe_layers), int(model.top_k), int(model.n_experts)


def _one_group(frame: pl.DataFrame, name: str) -> pl.DataFrame:
    for key in ("model", "dataset"):
        if key in frame.columns and frame[key].n_unique() > 1:
            raise ValueError(f"the {name} table holds several {key}s; keep one (the calibration)")
    return frame


def ranked_layers(layers: pl.DataFrame, moe_layers: list[int]) -> list[int]:
    """The MoE layers with an R_l, by ascending (R_l, layer)."""
    table = (
        _one_group(layers, "layer")
        .drop_nulls("sensitivity")
        .filter(~pl.col("sensitivity").is_nan())
    )
    unknown = set(table["layer"].to_list()) - set(moe_layers)
    if unknown:
        raise ValueError(f"the layer table names layers that are not MoE layers: {sorted(unknown)}")
    return table.sort(["sensitivity", "layer"])["layer"].to_list()


def dormant_experts(experts: pl.DataFrame, layer: int, n: int, cfg: RerouteConfig) -> tuple:
    """Up to n experts of `layer` by descending dormancy (ties: lower id), dormancy > floor."""
    table = _one_group(experts, "expert").filter(
        (pl.col("layer") == layer) & (pl.col("dormancy") > cfg.min_dormancy)
    )
    table = table.filter(~pl.col("dormancy").is_nan()).sort(
        ["dormancy", "expert"], descending=[True, False]
    )
    return tuple(int(e) for e in table["expert"].head(n).to_list())


def cor_plan(layers: pl.DataFrame, experts: pl.DataFrame, model, cfg: RerouteConfig) -> ReroutePlan:
    """The compute-preserving plan of the module docstring."""
    moe_layers, k, n_experts = _model_shape(model)
    if k - cfg.shift < 1 or k + cfg.shift > n_experts:
        raise ValueError(f"shift {cfg.shift} leaves k_l outside [1, {n_experts}] (k = {k})")
    if cfg.forced > k + cfg.shift:
        raise ValueError(f"forced {cfg.forced} > k + shift = {k + cfg.shift}")
    order = ranked_layers(layers, moe_layers)
    m = cfg.layers_moved
    if 2 * m > len(order):
        raise ValueError(
            f"layers_moved {m} needs {2 * m} layers with an R_l, the table has {len(order)}"
        )
    plan_k = dict.fromkeys(moe_layers, k)
    forced = {}
    for layer in order[:m]:
        plan_k[layer] = k - cfg.shift
    for layer in order[-m:]:
        plan_k[layer] = k + cfg.shift
        forced[layer] = dormant_experts(experts, layer, cfg.forced, cfg)
    return ReroutePlan(plan_k, forced)
