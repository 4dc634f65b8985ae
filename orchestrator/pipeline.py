"""The stages of a run, from problems to the report, each skipping the units already complete.

Contract: `prepare_problems` (driver, no Ray) writes problems/<dataset>.arrow; `run_stages`
(Ray initialised) runs generation -> shards -> scoring -> report for every (model, dataset)
cell of the plan and returns a `RunSummary`. Stages talk only through files in the run dir
(orchestrator/plan.py has the layout); a unit is skipped when `workers.io.is_complete` says
its file matches its config hash (checksum included, so truncated or corrupted files are
redone). Failed units go to failures.jsonl and the run goes on; cells whose inputs failed are
skipped. Models are processed one after the other: a model's generators are released before
its scorers start, so both can use the same GPUs.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from orchestrator import plan
from orchestrator.config import ModelConfig, RunConfig
from orchestrator.progress import StageProgress
from workers.io import (
    IncompleteFileError,
    discard,
    is_complete,
    read_arrow,
    read_sidecar,
    write_arrow,
)

Sink = Callable[[dict[str, Any]], None]
JobSink = Callable[[str, int, str, dict[str, Any]], None]


class PipelineError(RuntimeError):
    """The run cannot go on (e.g. nothing verified to score); the message says why."""


@dataclass
class RunSummary:
    run_id: str
    run_dir: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    report_path: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failures


# ------------------------------------------------------------------------------- problems


def prepare_problems(cfg: RunConfig, run_dir: Path) -> dict[str, tuple[int, str]]:
    """Load every dataset of the plan into problems/<name>.arrow (skipped when complete).

    Runs on the driver before Ray starts, so a missing data file fails fast.
    Returns {dataset name: (number of problems, sha256 of the file)}.
    """
    datasets = {c.dataset.name: c.dataset for c in plan.plan_cells(cfg)}
    return prepare_datasets(run_dir, list(datasets.values()))


def prepare_datasets(run_dir: Path, datasets: list[Any]) -> dict[str, tuple[int, str]]:
    """problems/<name>.arrow of each dataset (skipped when complete); {name: (rows, sha256)}."""
    from workers.datasets import load_problems

    out = {}
    for dataset in datasets:
        path, want = plan.problems_path(run_dir, dataset), plan.problems_hash(dataset)
        if not is_complete(path, want):
            try:
                table = load_problems(
                    dataset.loader,
                    path=dataset.path,
                    limit=dataset.limit,
                    seed=dataset.seed,
                    **dataset.options,
                )
            except (ValueError, RuntimeError, ImportError, OSError) as err:
                raise PipelineError(f"dataset {dataset.name}: {last_line(err)}") from err
            if table.num_rows == 0:
                raise PipelineError(f"dataset {dataset.name} has no problems (limit/options)")
            try:
                write_arrow(table, path, config_hash=want)
            except OSError as err:  # a full disk or quota: write_arrow left nothing complete
                raise PipelineError(f"cannot write {path}: {err.strerror or err}") from None
        sidecar = read_sidecar(path)
        out[dataset.name] = (sidecar["rows"], sidecar["sha256"])
    return out


def last_line(err: BaseException | str) -> str:
    """The last non-empty line of an error message (tracebacks end with the cause)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


# ------------------------------------------------------------------------------- the stages


def run_stages(
    cfg: RunConfig,
    run_dir: Path,
    problems: dict[str, tuple[int, str]],
    *,
    run_id: str,
    sink: Sink | None = None,
    job_sink: JobSink | None = None,
) -> RunSummary:
    """The stages over Ray; `sink` gets progress metrics, `job_sink` each scoring job (model,
    layer, dataset) whose last unit this session wrote (e.g. WandbSession.log_job)."""
    summary = RunSummary(run_id=run_id, run_dir=run_dir)
    cells = plan.plan_cells(cfg)

    # 1. Generation: every sample of every problem, verified, one file per problem shard.
    gen_units = {
        cell: plan.generation_units(
            run_dir,
            cell.model,
            cell.dataset,
            cfg.generation,
            num_problems=problems[cell.dataset.name][0],
            problems_sha256=problems[cell.dataset.name][1],
        )
        for cell in cells
    }
    for cell in cells:
        prune(run_dir, [plan.generated_dir(run_dir, cell.model, cell.dataset)], gen_units[cell])
    summary.stages["generation"] = run_generation("generation", gen_units, cfg, summary, sink)

    # 2. Shards: the trajectories to score (verified ones by default), split for the scorers.
    shards: dict[plan.Cell, list[tuple[Path, str]]] = {}
    verified_total = 0
    for cell in cells:
        # Just checked or written by the stage above: the sidecars suffice here.
        if any(not is_complete(u.path, u.config_hash, checksum=False) for u in gen_units[cell]):
            summary.warnings.append(
                f"{cell.model.name}/{cell.dataset.name}: generation incomplete, not scored"
            )
            continue
        shards[cell], kept, total = write_shards(run_dir, cell, cfg, gen_units[cell])
        verified_total += kept
        print(
            f"[shards] {cell.model.name}/{cell.dataset.name}: {kept} of {total} trajectories"
            f" {'verified' if cfg.scoring.verified_only else 'kept'}, {len(shards[cell])} shards",
            file=sys.stderr,
        )
        if kept == 0:
            summary.warnings.append(
                f"{cell.model.name}/{cell.dataset.name}: 0 of {total} trajectories verified"
            )
    if shards and verified_total == 0 and not summary.failures:
        raise PipelineError(
            "no verified trajectories to score: "
            + "; ".join(w for w in summary.warnings if "verified" in w)
            + " (raise model.max_tokens or generation.samples_per_problem, or set"
            " scoring.verified_only=false; the generated trajectories are kept and reused)"
        )

    # 3. Scoring: one unit per (layer, shard); each scorer loads its model once. The plan
    # goes to plan.json first, so a report takes only these units' files.
    score_units = {c: plan.scoring_units(run_dir, c, cfg.scoring, s) for c, s in shards.items()}
    plan.write_plan(
        run_dir, [u for us in score_units.values() for u in us], unscored=list(summary.warnings)
    )
    for cell, units in score_units.items():
        prune(run_dir, plan.scores_dirs(run_dir, cell), units)
    summary.stages["scoring"] = run_scoring(
        "scoring",
        score_units,
        cfg,
        summary,
        sink,
        jobs=JobTracker(score_units, job_sink) if job_sink else None,
    )
    return summary


def run_generation(
    stage: str,
    units: dict[plan.Cell, list[plan.Unit]],
    cfg: RunConfig,
    summary: RunSummary,
    sink: Sink | None,
    jobs: JobTracker | None = None,
) -> dict[str, Any]:
    """`run_units` on `cluster.generators` generator actors per model."""
    from orchestrator import actors

    return run_units(
        stage,
        units,
        spawner=lambda model: GeneratorSpawner(model, cfg, actors),
        call=lambda actor, u: actor.generate.remote(u.task, str(u.path), u.config_hash),
        n_actors=cfg.cluster.generators,
        retries=cfg.scoring.retries,
        timeouts=(cfg.cluster.actor_start_timeout_s, cfg.cluster.unit_timeout_s),
        checksum=cfg.verify_checksums,
        summary=summary,
        sink=sink,
        jobs=jobs,
    )


def run_scoring(
    stage: str,
    units: dict[plan.Cell, list[plan.Unit]],
    cfg: RunConfig,
    summary: RunSummary,
    sink: Sink | None,
    jobs: JobTracker | None = None,
) -> dict[str, Any]:
    """`run_units` on `cluster.scorers` scorer actors per model, each loading it once."""
    from orchestrator import actors

    return run_units(
        stage,
        units,
        spawner=lambda model: ScorerSpawner(model, cfg, actors),
        call=lambda actor, u: actor.score.remote(u.task, str(u.path), u.config_hash),
        n_actors=cfg.cluster.scorers,
        retries=cfg.scoring.retries,
        timeouts=(cfg.cluster.actor_start_timeout_s, cfg.cluster.unit_timeout_s),
        checksum=cfg.verify_checksums,
        summary=summary,
        sink=sink,
        jobs=jobs,
    )


def run_units(
    stage: str,
    units_by_cell: dict[plan.Cell, list[plan.Unit]],
    *,
    spawner: Callable[[ModelConfig], Any],
    call: Callable[[Any, plan.Unit], Any],
    n_actors: int,
    retries: int,
    timeouts: tuple[float | None, float | None] = (None, None),
    checksum: bool,
    summary: RunSummary,
    sink: Sink | None,
    jobs: JobTracker | None = None,
) -> dict[str, Any]:
    """Run a stage's incomplete units, one model at a time (its actors shut down and freed
    before the next model's start); record failures; return the stage's final progress
    metrics. `timeouts` = (actor start, unit) deadlines in seconds, None for none."""
    from orchestrator.actors import dispatch

    todo = {
        c: [u for u in us if not is_complete(u.path, u.config_hash, checksum=checksum)]
        for c, us in units_by_cell.items()
    }
    total = sum(map(len, units_by_cell.values()))
    progress = StageProgress(stage, total, skipped=total - sum(map(len, todo.values())), sink=sink)
    if jobs is not None:
        jobs.expect(u for us in todo.values() for u in us)
    models = {c.model.name: c.model for c in todo}
    for name, model in models.items():
        units = [u for c, us in todo.items() if c.model.name == name for u in us]
        if not units:
            continue
        spawn = spawner(model)
        try:
            outcomes = dispatch(
                units,
                spawn=spawn,
                call=call,
                actors=n_actors,
                retries=retries,
                progress=progress,
                start_timeout_s=timeouts[0],
                unit_timeout_s=timeouts[1],
                release=spawn.release,
                describe=spawn.describe,
                on_done=jobs.done if jobs is not None else None,
            )
        finally:
            spawn.close()
        record_failures(summary, outcomes)
    return progress.close()


class JobTracker:
    """Tells `sink(model, layer, dataset, metrics)` when the last expected unit of a scoring
    job is written: a job finished by this session is logged now, not after the report."""

    def __init__(self, units_by_cell: dict[plan.Cell, list[plan.Unit]], sink: JobSink):
        self.sink = sink
        self.job_of = {
            u.key: (cell.model.name, u.task.layer, cell.dataset.name)
            for cell, units in units_by_cell.items()
            for u in units
        }
        self.total = Counter(self.job_of.values())
        self.left: dict[tuple[str, int, str], set[str]] = defaultdict(set)
        self.tokens: Counter[tuple[str, int, str]] = Counter()

    def expect(self, units: Iterable[plan.Unit]) -> None:
        """The units this session will run (the others are complete already)."""
        for u in units:
            self.left[self.job_of[u.key]].add(u.key)

    def done(self, unit: plan.Unit, result: dict[str, Any]) -> None:
        job = self.job_of[unit.key]
        self.tokens[job] += int(result.get("tokens", 0))
        left = self.left.get(job)
        if left is None:
            return
        left.discard(unit.key)
        if not left:
            del self.left[job]
            self.sink(*job, {"units": self.total[job], "tokens_this_session": self.tokens[job]})


def write_shards(
    run_dir: Path, cell: plan.Cell, cfg: RunConfig, generated: list[plan.Unit]
) -> tuple[list[tuple[Path, str]], int, int]:
    """Split a cell's trajectories to score into shards of `trajectories_per_shard` rows.

    Rows keep generation order (problem, then sample), so the split depends only on the
    files and the config; shards already complete with the same hash are left untouched.
    Returns ([(path, sha256)], trajectories kept, trajectories generated).
    """
    try:
        table = pa.concat_tables([read_arrow(u.path) for u in generated])
    except IncompleteFileError as err:  # only when verify_checksums=false let it through
        raise PipelineError(f"{err}; rerun with verify_checksums=true to redo it") from None
    total = table.num_rows
    if cfg.scoring.verified_only:
        table = table.filter(table.column("verified"))
    size = cfg.scoring.trajectories_per_shard
    want = plan.shards_hash(cfg.scoring, [read_sidecar(u.path)["sha256"] for u in generated])
    out_dir = plan.shard_dir(run_dir, cell.model, cell.dataset)
    shards = []
    for k in range(math.ceil(table.num_rows / size)):
        path = out_dir / f"{k:05d}.arrow"
        if not is_complete(path, want):
            write_arrow(table.slice(k * size, size), path, config_hash=want)
        shards.append((path, read_sidecar(path)["sha256"]))
    prune(run_dir, [out_dir], [p for p, _ in shards])
    return shards, table.num_rows, total


def prune(run_dir: Path, dirs: list[Path], keep: list[plan.Unit] | list[Path]) -> int:
    """Discard data files in `dirs` that the plan does not write (left by an older config,
    e.g. a larger shard count), so that no reader counts them. Returns how many.

    Only files this project wrote are removed: inside `run_dir` and with a sidecar of ours
    (workers.io.read_sidecar). Anything else found there is left alone, whatever its name.
    """
    root = run_dir.resolve()
    wanted = {getattr(k, "path", k) for k in keep}
    stale = [
        p
        for d in dirs
        if d.is_dir() and d.resolve().is_relative_to(root)
        for p in sorted(d.glob("*.arrow"))
        if p not in wanted and p.resolve().is_relative_to(root) and read_sidecar(p) is not None
    ]
    for path in stale:
        discard(path)
    if stale:
        print(f"[plan] removed {len(stale)} stale files under {dirs[0].parent}", file=sys.stderr)
    return len(stale)


# ------------------------------------------------------------------------------- actors


class GeneratorSpawner:
    """Starts generator actors for one model with their resources.

    `cluster.use_gpus`: HF takes one GPU; vLLM takes `model.tensor_parallel_size` GPUs, as a
    placement group when > 1 (one per actor, removed by `release` when its actor goes and by
    `close`). Otherwise no GPU is asked for: HF runs on CPU, and so does vLLM's CPU build, with
    a fixed KV-cache size (`model.engine.cpu_kv_cache_gib`).
    """

    def __init__(self, model: ModelConfig, cfg: RunConfig, actors: Any):
        self.model, self.cluster, self.actors = absolute_path(model), cfg.cluster, actors
        self.backend = model.generation_backend or cfg.generation.backend
        self.groups: dict[Any, Any] = {}  # actor -> its placement group
        gpus = self.cluster.use_gpus
        self.resources: dict[str, Any] = {"num_cpus": self.cluster.cpus_per_actor, "num_gpus": 0}
        if self.backend == "hf":
            self.options: dict[str, Any] = {
                "dtype": model.dtype,
                "batch_size": cfg.generation.batch_size,
                "device": "cuda" if gpus else "cpu",
            }
            self.resources["num_gpus"] = 1 if gpus else 0
            return
        engine, tp = model.engine, model.tensor_parallel_size if gpus else 1
        self.options = {
            "dtype": model.dtype,
            "tensor_parallel_size": tp,
            "seed": cfg.generation.seed,
            "max_model_len": engine.max_model_len,
            "enforce_eager": engine.enforce_eager,
            "max_num_seqs": engine.max_num_seqs,
        }
        if gpus:
            self.options["gpu_memory_utilization"] = engine.gpu_memory_utilization
            self.resources["num_gpus"] = tp
        else:
            self.options["kv_cache_memory_bytes"] = int(engine.cpu_kv_cache_gib * 2**30)
        if tp > 1:
            # vLLM starts one Ray worker per GPU itself: reserve the GPUs as a placement
            # group its workers inherit (vLLM's distributed_executor_backend="ray").
            self.options["distributed_executor_backend"] = "ray"

    def describe(self) -> str:
        need = {"CPU": self.resources["num_cpus"], "GPU": self.resources["num_gpus"]}
        if self.options.get("distributed_executor_backend") == "ray":
            need = {"bundles": f"{self.model.tensor_parallel_size} x {self.bundle()}"}
        return f"the {self.backend} generator actor of model {self.model.name}, needing {need},"

    def bundle(self) -> dict[str, float]:
        return {"GPU": 1, "CPU": self.cluster.cpus_per_actor}

    def __call__(self) -> Any:
        resources, group = dict(self.resources), None
        if self.options.get("distributed_executor_backend") == "ray":
            group, strategy = self.placement()
            resources = {"num_cpus": 0, "num_gpus": 0, "scheduling_strategy": strategy}
        actor = self.actors.GeneratorActor.options(max_restarts=0, **resources).remote(
            self.model,
            self.backend,
            self.options,
            torch_threads=self.cluster.torch_threads,
            provenance=driver_provenance(),
        )
        if group is not None:
            self.groups[actor] = group
        return actor

    def placement(self) -> tuple[Any, Any]:
        import ray
        from ray.exceptions import GetTimeoutError
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles = [self.bundle()] * self.model.tensor_parallel_size
        group = placement_group(bundles, strategy="STRICT_PACK")
        try:
            ray.get(group.ready(), timeout=self.cluster.actor_start_timeout_s)
        except GetTimeoutError:
            remove_placement_group(group)
            raise self.actors.ActorStartError(
                f"{self.describe()} could not be placed within"
                f" {self.cluster.actor_start_timeout_s:g} s (cluster.actor_start_timeout_s):"
                f" no node has {len(bundles)} x {self.bundle()} free;"
                f" the cluster has {self.actors.cluster_resources()}"
            ) from None
        return group, PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_capture_child_tasks=True
        )

    def release(self, actor: Any) -> None:
        """Free the placement group of an actor that is gone (dead, hung or done)."""
        from ray.util.placement_group import remove_placement_group

        group = self.groups.pop(actor, None)
        if group is not None:
            remove_placement_group(group)

    def close(self) -> None:
        for actor in list(self.groups):
            self.release(actor)


def absolute_path(model: ModelConfig) -> ModelConfig:
    """`model` with a relative `path` made absolute here, on the driver: actors run elsewhere."""
    if model.path and not Path(model.path).is_absolute():
        return replace(model, path=str(Path(model.path).resolve()))
    return model


class ScorerSpawner:
    """Starts scorer actors for one model; each loads the model once and takes many units."""

    def __init__(self, model: ModelConfig, cfg: RunConfig, actors: Any):
        import os

        self.model, self.cluster, self.actors = absolute_path(model), cfg.cluster, actors
        device = "cuda" if self.cluster.use_gpus else "cpu"
        self.score_options = {**plan.score_args(cfg.scoring, model), "device": device}
        self.gpus = model.gpus if self.cluster.use_gpus else 0
        env = (actors.FAULT_KILL_ENV, actors.FAULT_FAIL_ENV)
        self.faults = {k: os.environ[k] for k in env if os.environ.get(k)}

    def __call__(self) -> Any:
        options = {"num_cpus": self.cluster.cpus_per_actor, "num_gpus": self.gpus}
        return self.actors.ScorerActor.options(max_restarts=0, **options).remote(
            self.model,
            self.score_options,
            torch_threads=self.cluster.torch_threads,
            faults=self.faults,
            provenance=driver_provenance(),
        )

    def describe(self) -> str:
        need = {"CPU": self.cluster.cpus_per_actor, "GPU": self.gpus}
        return f"the scorer actor of model {self.model.name}, needing {need},"

    def release(self, actor: Any) -> None:
        pass

    def close(self) -> None:
        pass


def driver_provenance() -> dict[str, Any]:
    """The driver's part of a sidecar's provenance: the project's git commit."""
    from workers.provenance import git_commit

    return {"git_commit": git_commit()}


# ------------------------------------------------------------------------------- bookkeeping


def record_failures(summary: RunSummary, outcomes: list[Any]) -> None:
    """Append failed units to failures.jsonl (one JSON object per line) and the summary."""
    failed = [o for o in outcomes if not o.ok]
    if not failed:
        return
    with open(summary.run_dir / "failures.jsonl", "a", encoding="utf-8") as f:
        for o in failed:
            entry = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "stage": o.unit.stage,
                "unit": o.unit.key,
                "path": str(o.unit.path),
                "config_hash": o.unit.config_hash,
                "attempts": o.attempts,
                "error": o.error,
            }
            f.write(json.dumps(entry) + "\n")
            summary.failures.append(entry)
