"""What a run's report says besides the scores: its layer names and its generation stage.

Contract:
- `layer_labels(run_config)` -> {(model, decoder index): "final (L23)"}: the run's layer specs
  (sweep.layers, else scoring.layers) resolved against each model's MoE layers with the
  scorer's own rule (workers.layers). A model's shape is the one the run's config.yaml
  recorded (its `models`, every sweep entry as resolved; workers.runfiles.run_models), never
  today's conf/ files; a model that cannot be resolved gets no label (figures then say
  "L<index>").
- `generation_summary(run_dir, paths=None)` -> one row per (model, dataset) over the generated
  trajectory files `paths` (default: every `trajectories/<model>/<dataset>/generated/*.arrow`
  that verifies against its sidecar, analysis.inputs.select_generated_files):
  samples, verified, verified_share, mean and max completion length in tokens, and the finish
  reasons as "stop: 90, length: 6", and the generation backend(s) the files' sidecars record
  ("hf", "vllm"; "unrecorded" for files written before sidecars named it), and the data set's
  rows skipped at load as unpromptable (`dataset.skip_bad_rows`: the problems file's sidecar
  lists them; a prompt too long for a model shows as finish reason "prompt_too_long" instead).
  Empty (with its columns) when nothing was generated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from analysis.inputs import select_generated_files
from workers.io import read_sidecar
from workers.layers import LAYER_NAMES, resolve_layer
from workers.runfiles import run_models

GENERATION_COLUMNS = {
    "model": pl.String,
    "dataset": pl.String,
    "samples": pl.Int64,
    "verified": pl.Int64,
    "verified_share": pl.Float64,
    "mean_tokens": pl.Float64,
    "max_tokens": pl.Int64,
    "finish_reasons": pl.String,
    "backend": pl.String,
    "skipped_rows": pl.Int64,
}


def layer_labels(run_config: dict[str, Any] | None) -> dict[tuple[str, int], str]:
    if not run_config:
        return {}
    specs = (
        (run_config.get("sweep") or {}).get("layers")
        or (run_config.get("scoring") or {}).get("layers")
        or []
    )
    labels = {}
    for name, shape in run_models(run_config).items():
        moe, num = shape.get("moe_layers"), shape.get("num_layers")
        if not moe or num is None:
            continue
        for spec in specs:
            try:
                index = resolve_layer(str(spec), moe, num)
            except (ValueError, TypeError):  # a config.yaml edited by hand
                continue
            named = spec if spec in LAYER_NAMES else None
            labels[(name, index)] = f"{named} (L{index})" if named else f"L{index}"
    return labels


def generation_summary(run_dir: str | Path, paths: list[Path] | None = None) -> pl.DataFrame:
    if paths is None:
        paths = select_generated_files(run_dir)[0]
    sidecars = {p: read_sidecar(p) for p in paths}
    paths = [p for p, sidecar in sidecars.items() if sidecar is not None]
    if not paths:
        return pl.DataFrame(schema=GENERATION_COLUMNS)
    # trajectories/<model>/<dataset>/generated/<k>.arrow
    backends = (
        pl.DataFrame(
            {
                "model": [p.parts[-4] for p in paths],
                "dataset": [p.parts[-3] for p in paths],
                "backend": [str(sidecars[p].get("backend", "unrecorded")) for p in paths],
            }
        )
        .group_by("model", "dataset")
        .agg(pl.col("backend").unique().sort().str.join(", "))
    )
    frame = (
        pl.scan_ipc([str(p) for p in paths])
        .select(
            "model",
            "dataset",
            "verified",
            pl.col("finish_reason").fill_null("none"),
            (pl.col("input_ids").list.len() - pl.col("prompt_len")).alias("completion_tokens"),
        )
        .collect()
    )
    reasons = (
        frame.group_by("model", "dataset", "finish_reason")
        .len()
        .sort(
            "model",
            "dataset",
            pl.col("len"),
            "finish_reason",
            descending=[False, False, True, False],
        )
        .group_by("model", "dataset", maintain_order=True)
        .agg(
            pl.concat_str(pl.col("finish_reason"), pl.lit(": "), pl.col("len").cast(pl.String))
            .str.join(", ")
            .alias("finish_reasons")
        )
    )
    summary = frame.group_by("model", "dataset").agg(
        pl.len().cast(pl.Int64).alias("samples"),
        pl.col("verified").sum().cast(pl.Int64).alias("verified"),
        pl.col("verified").mean().alias("verified_share"),
        pl.col("completion_tokens").mean().alias("mean_tokens"),
        pl.col("completion_tokens").max().cast(pl.Int64).alias("max_tokens"),
    )
    datasets = sorted(set(summary["dataset"]))
    skipped = pl.DataFrame(
        {"dataset": datasets, "skipped_rows": [skipped_rows(run_dir, d) for d in datasets]},
        schema={"dataset": pl.String, "skipped_rows": pl.Int64},
    )
    return (
        summary.join(reasons, on=["model", "dataset"])
        .join(backends, on=["model", "dataset"], how="left")
        .join(skipped, on="dataset", how="left")
        .select(list(GENERATION_COLUMNS))
        .cast(GENERATION_COLUMNS)
        .sort("model", "dataset")
    )


def skipped_rows(run_dir: str | Path, dataset: str) -> int:
    """How many rows of `dataset` were skipped at load (its problems sidecar's list)."""
    sidecar = read_sidecar(Path(run_dir) / "problems" / f"{dataset}.arrow") or {}
    listed = sidecar.get("skipped_rows")
    return len(listed) if isinstance(listed, list) else 0
