"""Do the scorer's standard routes agree with the routes the generator itself took?

Contract: `route_agreement(score_files, generated_files) -> pl.DataFrame | None`. Generated
trajectory files written with `generation.record_routes` carry `gen_routes` (workers.schemas:
per completion token i, the generator's experts at each MoE layer for the forward pass at
position prompt_len - 1 + i). Each scored token (model, layer, problem_id, sample_idx, position)
is joined with the generator's route G at the same position and layer, and compared with the
scorer's standard route S as sets. One row per (model, layer): `tokens` (scored tokens with a
generator route), `same_set` (of them, S == G as sets), `share` = same_set / tokens and
`mean_overlap` = mean of |S ∩ G| / k. None when no generated file has routes. Polars over
the files; no model.

The two routes come from the same weights on the same prefix, so they differ only where the
generator's kernels (batched, KV-cached decoding; vLLM's fused MoE) and the scorer's full
forward pass round a near-tie in the router logits differently: a share below 1 measures that,
not a different model.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import polars as pl
import pyarrow as pa

from workers.schemas import GEN_ROUTES, gen_route_layers

AGREEMENT_COLUMNS = {
    "model": pl.String,
    "layer": pl.Int32,
    "tokens": pl.Int64,
    "same_set": pl.Int64,
    "share": pl.Float64,
    "mean_overlap": pl.Float64,
}


def route_layers(path: Path) -> list[int] | None:
    """The MoE layers of a generated file's `gen_routes`, or None when it has none."""
    with pa.memory_map(str(path)) as source:
        schema = pa.ipc.open_file(source).schema
    if GEN_ROUTES not in schema.names:
        return None
    return gen_route_layers(schema.field(GEN_ROUTES))


def generator_tokens(paths: list[Path]) -> pl.DataFrame:
    """One row per completion token of the files: problem_id, sample_idx, position, gen_routes
    (the token's routes at every recorded layer)."""
    frame = pl.concat(
        pl.read_ipc(p, columns=["problem_id", "sample_idx", "prompt_len", GEN_ROUTES])
        for p in paths
    )
    first = pl.col("prompt_len") - 1
    return (
        frame.with_columns(
            position=pl.int_ranges(first, first + pl.col(GEN_ROUTES).list.len(), dtype=pl.Int32)
        )
        .drop("prompt_len")
        .explode(GEN_ROUTES, "position")
        .drop_nulls("position")
    )


def compare_layer(scores: pl.DataFrame, gen: pl.DataFrame, slot: int, k: int) -> pl.DataFrame:
    """Per scored token of one layer: |S ∩ G| with G the generator's route in `slot`."""
    joined = scores.join(gen, on=["problem_id", "sample_idx", "position"], how="inner")
    route = pl.List(pl.Int32)
    g = pl.col(GEN_ROUTES).arr.get(slot).cast(route)
    return joined.select(
        "model",
        "layer",
        overlap=pl.col("std_route").cast(route).list.set_intersection(g).list.len(),
    ).with_columns(k=pl.lit(k))


def route_agreement(score_files: list[Path], generated_files: list[Path]) -> pl.DataFrame | None:
    """Per (model, layer): how often the scorer's standard route is the generator's, as sets."""
    # trajectories/<model>/<dataset>/generated/<k>.arrow; scores/<model>/layer=<L>/<dataset>/
    by_cell, layers = defaultdict(list), {}
    for path in generated_files:
        found = route_layers(path)
        if found is not None:
            by_cell[path.parts[-4], path.parts[-3]].append(path)
            layers[path.parts[-4], path.parts[-3]] = found
    if not by_cell:
        return None
    scored = defaultdict(list)
    for path in score_files:
        scored[path.parts[-4], path.parts[-2]].append(path)
    parts = []
    for cell, paths in sorted(by_cell.items()):
        if not scored.get(cell):
            continue
        gen = generator_tokens(paths)
        scores = pl.concat(
            pl.read_ipc(
                p, columns=["problem_id", "sample_idx", "position", "std_route", "layer"]
            ).with_columns(
                pl.lit(cell[0]).alias("model"), pl.col("std_route").cast(pl.List(pl.Int32))
            )
            for p in scored[cell]
        )
        for layer in scores["layer"].unique().sort().to_list():
            if layer not in layers[cell]:
                continue
            rows = scores.filter(pl.col("layer") == layer)
            k = int(rows["std_route"].list.len().max() or 0)
            parts.append(compare_layer(rows, gen, layers[cell].index(layer), k))
    if not parts:
        return pl.DataFrame(schema=AGREEMENT_COLUMNS)
    return (
        pl.concat(parts)
        .group_by("model", "layer")
        .agg(
            tokens=pl.len().cast(pl.Int64),
            same_set=(pl.col("overlap") == pl.col("k")).sum().cast(pl.Int64),
            mean_overlap=(pl.col("overlap") / pl.col("k")).mean(),
        )
        .with_columns(
            share=pl.col("same_set") / pl.col("tokens"), layer=pl.col("layer").cast(pl.Int32)
        )
        .select(list(AGREEMENT_COLUMNS))
        .sort("model", "layer")
    )
