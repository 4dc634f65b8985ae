"""The work-unit plan: which files a run writes, and the hash that makes each one complete.

Contract: every output path follows the run layout of docs/design.md,

    problems/<dataset>.arrow
    trajectories/<model>/<dataset>/generated/<k>.arrow     all samples of problem shard k
    trajectories/<model>/<dataset>/shards/<k>.arrow        the trajectories to score, shard k
    scores/<model>/layer=<L>/<dataset>/<k>.arrow

and a unit is complete when its file verifies against a sidecar whose config hash equals the
unit's (`workers.io.is_complete`). A unit's hash covers only what changes its output: its own
config slice and its inputs *by content* (the sha256 recorded in their verified sidecars), so
when a config changes under the same run id exactly the affected units, and everything
downstream of a changed file, are redone. Functions here are pure (no Ray, no model): the
dry run prints `describe_plan`; each stage (orchestrator/stages/) plans its units with these paths
and `model_identity`; `write_plan` records the scoring units in runs/<id>/plan.json
(workers.runfiles) for the report.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from orchestrator.config import (
    DatasetConfig,
    ModelConfig,
    RunConfig,
    ScoringConfig,
    model_path,
    resolve_layer,
    sweep_datasets,
    sweep_layers,
    sweep_models,
)
from orchestrator.tasks import ScoringTask
from workers.atomic import atomic_write
from workers.io import config_hash, file_sha256
from workers.runfiles import PLAN_FILE, plan_text
from workers.scoring.score_config import ALL_POSITIONS

TaskT = TypeVar("TaskT")


@dataclass(frozen=True)
class Unit(Generic[TaskT]):
    """One unit of work: write `path` (complete when its sidecar carries `config_hash`) by
    handing `task` (an orchestrator.tasks value) to its stage's worker."""

    stage: str  # "generation" | "scoring" | "router_*"
    key: str  # readable and unique within the stage, e.g. "tiny/layer=3/demo/00002"
    path: Path
    config_hash: str
    task: TaskT
    root: Path | None = None  # the run folder: no folder under it is written through a link


@dataclass(frozen=True, eq=False)  # hashed by identity: a dict key for the run's stages
class Cell:
    """One (model, dataset) pair of the sweep, with its layer specs resolved to indices."""

    model: ModelConfig
    dataset: DatasetConfig
    layers: dict[str, int]  # spec ("early", "5", ...) -> decoder layer index


# The config groups that decide a run's results: the run id hashes these alone.
RESULT_KEYS = ("model", "dataset", "generation", "scoring", "sweep", "models", "datasets")


def derive_run_id(cfg: RunConfig, resolved: dict[str, Any]) -> str:
    """`cfg.run_id`, or "<sweep-or-model>-<hash8>" of what decides the results.

    Cluster, W&B and paths are left out, so the same experiment on another cluster is the
    same run. `resolved` is the plain config tree (OmegaConf.to_container of the DictConfig).
    """
    if cfg.run_id:
        return cfg.run_id
    keep = without_unhashed({k: resolved[k] for k in RESULT_KEYS if k in resolved})
    prefix = cfg.sweep.name if cfg.sweep.models or cfg.sweep.datasets else cfg.model.name
    return f"{prefix}-{config_hash(keep)[:8]}"


# Keys that do not decide results and were added after runs were hashed without them: dropped
# from the run id's hash (anywhere in the tree) when they hold the value that keeps the old
# behaviour (ANY: always), so that adding them does not move the id of an existing run.
ANY = object()
UNHASHED: dict[str, Any] = {
    "attn_width": ANY,
    "skip_bad_rows": False,
    "positions": ALL_POSITIONS,
    "cei": False,
    "cei_gating": "family",
    "moe_geometry": False,
    "record_routes": False,
}


def without_unhashed(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {
            k: without_unhashed(v)
            for k, v in tree.items()
            if k not in UNHASHED or (UNHASHED[k] is not ANY and v != UNHASHED[k])
        }
    if isinstance(tree, list):
        return [without_unhashed(v) for v in tree]
    return tree


def plan_cells(cfg: RunConfig) -> list[Cell]:
    """Models x datasets of the run (one pair without a sweep), in sweep order."""
    specs = sweep_layers(cfg)
    cells = []
    for model in sweep_models(cfg):
        layers = {str(s): resolve_layer(model, s) for s in specs}
        cells.extend(Cell(model, dataset, layers) for dataset in sweep_datasets(cfg))
    return cells


FULL_HASH_BYTES = 1 << 30  # weights up to 1 GiB are hashed whole (the tiny model: ~10 ms)


def model_identity(model: ModelConfig) -> dict[str, Any]:
    """What identifies a model's weights: hub id and revision, plus, for a local directory,
    the files themselves (see `local_fingerprint`), so retrained weights redo their units."""
    ident: dict[str, Any] = {"hf_id": model.hf_id, "revision": model.revision}
    local = Path(model_path(model))
    if local.is_dir():
        ident["files"] = local_fingerprint(str(local.resolve()))
    return ident


def local_fingerprint(directory: str) -> dict[str, Any]:
    """sha256 of config.json and the weights, or, when the weights exceed FULL_HASH_BYTES
    (hashing 60 GB on every run costs minutes), their sizes and modification times."""
    root = Path(directory)
    files = [p for p in sorted([root / "config.json", *root.glob("*.safetensors")]) if p.is_file()]
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if sum(size for _, size, _ in stats) > FULL_HASH_BYTES:
        return {Path(p).name: [size, mtime] for p, size, mtime in stats}
    return hash_files(stats)


@functools.lru_cache(maxsize=16)
def hash_files(stats: tuple[tuple[str, int, int], ...]) -> dict[str, str]:
    """sha256 per file; cached on (path, size, mtime), so a run hashes each model once."""
    return {Path(p).name: file_sha256(p) for p, _, _ in stats}


def problems_path(run_dir: Path, dataset: DatasetConfig) -> Path:
    return run_dir / "problems" / f"{dataset.name}.arrow"


def problems_hash(dataset: DatasetConfig) -> str:
    """The problems file's hash: the loader settings and, for a local data file, its content
    (an edited file redoes the problems and everything downstream; the path alone does not
    count, so moving the file changes nothing)."""
    keep = {k: getattr(dataset, k) for k in ("loader", "limit", "seed", "options")}
    if dataset.skip_bad_rows:  # only then can the file lack rows of the source
        keep["skip_bad_rows"] = True
    if dataset.path is not None:
        source = Path(dataset.path).resolve()
        stat = source.stat()
        [keep["content"]] = hash_files(((str(source), stat.st_size, stat.st_mtime_ns),)).values()
    return config_hash(keep)


def generated_dir(run_dir: Path, model: ModelConfig, dataset: DatasetConfig) -> Path:
    return run_dir / "trajectories" / model.name / dataset.name / "generated"


def shard_dir(run_dir: Path, model: ModelConfig, dataset: DatasetConfig) -> Path:
    return run_dir / "trajectories" / model.name / dataset.name / "shards"


def scores_dir(run_dir: Path, model: ModelConfig, layer: int, dataset: DatasetConfig) -> Path:
    return run_dir / "scores" / model.name / f"layer={layer}" / dataset.name


def cei_dir(run_dir: Path, model: ModelConfig, layer: int, dataset: DatasetConfig) -> Path:
    return run_dir / "cei" / model.name / f"layer={layer}" / dataset.name


def scores_dirs(run_dir: Path, cell: Cell) -> list[Path]:
    """The score directories a cell owns: one per planned layer."""
    return [
        scores_dir(run_dir, cell.model, L, cell.dataset) for L in sorted(set(cell.layers.values()))
    ]


def shards_hash(scoring: ScoringConfig, generated_sha256: list[str]) -> str:
    """The hash of every scoring-input shard of a (model, dataset): which rows, split how."""
    return config_hash(
        {
            "verified_only": scoring.verified_only,
            "trajectories_per_shard": scoring.trajectories_per_shard,
            "generated": generated_sha256,
        }
    )


def write_plan(
    run_dir: Path, score_units: list[Unit[ScoringTask]] | None, unscored: list[str] | None = None
) -> None:
    """runs/<id>/plan.json: the score files this run's current config writes and the settings
    hash each sidecar must carry (read by analysis.inputs, so a report takes only those).
    `score_units=None` records that scoring is not planned yet (written first by each driver,
    so a report never trusts the plan of an earlier config)."""
    scores = None
    if score_units is not None:
        scores = [
            {
                "unit": u.key,
                "path": u.path.relative_to(run_dir).as_posix(),
                "config_hash": u.config_hash,
            }
            for u in score_units
        ]
    atomic_write(run_dir / PLAN_FILE, plan_text(scores, unscored or []), root=run_dir)


# ----------------------------------------------------------------------------- the dry run


@dataclass(frozen=True)
class CellEstimate:
    cell: Cell
    problems: int
    generation_units: int
    completions: int
    max_completion_tokens: int  # upper bound: every completion runs to max_tokens
    max_scoring_units_per_layer: int  # upper bound: every trajectory verified


def estimate(cfg: RunConfig) -> list[CellEstimate]:
    out = []
    for cell in plan_cells(cfg):
        n = min(cell.dataset.limit or cell.dataset.size, cell.dataset.size)
        completions = n * cfg.generation.samples_per_problem
        out.append(
            CellEstimate(
                cell=cell,
                problems=n,
                generation_units=math.ceil(n / cfg.generation.problems_per_shard),
                completions=completions,
                max_completion_tokens=completions * cell.model.max_tokens,
                max_scoring_units_per_layer=math.ceil(
                    completions / cfg.scoring.trajectories_per_shard
                ),
            )
        )
    return out


def describe_plan(cfg: RunConfig, run_id: str, run_dir: Path) -> str:
    """The work-unit plan as text: grid, units per stage, token estimates (upper bounds)."""
    from orchestrator.estimate import describe_estimate, positions_share

    cells = estimate(cfg)
    models = list(dict.fromkeys(c.cell.model.name for c in cells))
    datasets = list(dict.fromkeys(c.cell.dataset.name for c in cells))
    layers = sweep_layers(cfg)
    routes = cfg.scoring.alternatives + 1
    n_layers = {m: len(set(c.cell.layers.values())) for c in cells for m in [c.cell.model.name]}
    gen_units = sum(c.generation_units for c in cells)
    score_units = sum(c.max_scoring_units_per_layer * n_layers[c.cell.model.name] for c in cells)
    gen_tokens = sum(c.max_completion_tokens for c in cells)
    budget = cfg.scoring.positions
    share = {m.name: positions_share(cfg, m) for m in (c.cell.model for c in cells)}
    scored = sum(
        round(c.max_completion_tokens * share[c.cell.model.name]) * n_layers[c.cell.model.name]
        for c in cells
    )
    lines = [
        f"run {run_id} -> {run_dir}",
        f"grid: {len(models)} models x {len(layers)} layers x {len(datasets)} datasets"
        f" = {len(models) * len(layers) * len(datasets)} (model, layer, dataset) cells",
        f"models: {', '.join(models)}",
        f"layers: {', '.join(layers)}",
        f"datasets: {', '.join(datasets)}",
        f"generation: backend={cfg.generation.backend}"
        f" samples_per_problem={cfg.generation.samples_per_problem} seed={cfg.generation.seed}",
        f"scoring: J={cfg.scoring.alternatives} pool={cfg.scoring.pool}"
        f" tau={cfg.scoring.temperature} sampler={cfg.scoring.sampler} seed={cfg.scoring.seed}"
        f" verified_only={cfg.scoring.verified_only}"
        + (f" positions={budget}" if budget != ALL_POSITIONS else ""),
        "",
        "stage       units      estimate (upper bounds: every completion hits max_tokens,"
        " every trajectory verified)",
        f"problems    {len(datasets):>9,}  one file per dataset",
        f"generation  {gen_units:>9,}  {gen_tokens:,} completion tokens",
        f"shards      {len(cells):>9,}  one split per (model, dataset)",
        f"scoring   <={score_units:>9,}  {scored:,} scored tokens x {routes} routes"
        f" = {scored * routes:,} route evaluations",
        "",
        f"{'model':<16} {'dataset':<14} {'problems':>8} {'gen units':>9}"
        f" {'max tokens':>12}  layers (scoring units <= per layer)",
    ]
    for c in cells:
        spec = " ".join(f"{s}={i}" for s, i in c.cell.layers.items())
        lines.append(
            f"{c.cell.model.name:<16} {c.cell.dataset.name:<14} {c.problems:>8,}"
            f" {c.generation_units:>9,} {c.max_completion_tokens:>12,}"
            f"  {spec} ({c.max_scoring_units_per_layer:,})"
        )
    lines.append(describe_estimate(cfg, cells, scored_positions(cells)))
    from orchestrator.schedule import describe_schedule

    schedule = describe_schedule(cfg, cells, run_dir)  # empty without cluster.num_gpus
    return "\n".join(lines + ([schedule] if schedule else []))


def scored_positions(cells: list[CellEstimate]) -> dict[str, dict[str, int]]:
    """{model: {spec: index}}, one spec per distinct layer index: units are per index."""
    positions: dict[str, dict[str, int]] = {}
    for c in cells:
        seen = positions.setdefault(c.cell.model.name, {})
        for spec, index in c.cell.layers.items():
            if index not in seen.values():
                seen[spec] = index
    return positions
