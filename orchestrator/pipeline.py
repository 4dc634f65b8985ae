"""The stages of a run, from problems to the report, each skipping the units already complete.

Contract: `prepare_problems` (driver, no Ray) writes problems/<dataset>.arrow; `run_stages`
(Ray initialised) runs generation -> shards -> scoring for every (model, dataset) cell of the
plan and returns a `RunSummary`. Stages talk only through files in the run dir
(orchestrator/plan.py has the layout); a unit is skipped when `workers.io.is_complete` says
its file verifies against its sidecar (workers.io.verify: name, rows, config hash and, unless
`verify_checksums=false`, sha256), so truncated, corrupted or tampered files are redone; a
count or checksum the plan builds on is taken from a sidecar only once it has verified.
Failed units go to failures.jsonl and the run goes on; cells whose inputs failed are skipped;
`record_fixed` marks there the failures a later run completed. All stages share one executor (orchestrator/executor.py), one pool of actors per
(stage, model): a cell's shards are written and its scoring units queued as soon as its last
generation unit lands, so a model's scorers run while its other data sets, or later models,
still generate; an actor is started when the cluster has room for it and closed as soon as
its pool has nothing left to do, so the next pool can take its GPUs.
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
import ray

from orchestrator import plan
from orchestrator.actors import DEFAULT_WORKERS, GeneratorWorker, ScorerWorker, Workers
from orchestrator.config import ModelConfig, RunConfig, actor_cap, model_path
from orchestrator.errors import ActorStartError, PipelineError, last_line
from orchestrator.executor import Executor, Outcome, Pool, cluster_resources
from orchestrator.progress import StageProgress
from orchestrator.schedule import unit_costs
from workers.atomic import atomic_append, read_nofollow
from workers.io import (
    CorruptFile,
    IncompleteFileError,
    discard,
    done_path,
    is_complete,
    read_verified,
    verify,
    write_arrow,
)

Sink = Callable[[dict[str, Any]], None]
JobSink = Callable[[str, int, str, dict[str, Any]], None]


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
    """Load every dataset of the plan into problems/<name>.arrow (skipped when complete),
    after checking that each local model of the run can prompt its rows (check_prompts).

    Runs on the driver before Ray starts, so a missing data file or a row that cannot be
    prompted fails fast. Returns {dataset name: (number of problems, sha256 of the file)}.
    """
    cells = plan.plan_cells(cfg)
    datasets = {c.dataset.name: c.dataset for c in cells}
    tokenizers: dict[str, Any] = {}

    def check(dataset: Any, table: pa.Table) -> None:
        models = [c.model for c in cells if c.dataset.name == dataset.name]
        check_prompts(table, dataset, models, cfg.generation.backend, tokenizers)

    return prepare_datasets(
        run_dir, list(datasets.values()), checksum=cfg.verify_checksums, check=check
    )


def prepare_datasets(
    run_dir: Path,
    datasets: list[Any],
    *,
    checksum: bool = True,
    check: Callable[[Any, pa.Table], None] | None = None,
) -> dict[str, tuple[int, str]]:
    """problems/<name>.arrow of each dataset (skipped when complete); {name: (rows, sha256)}.

    Rows and sha256 come from a sidecar that verified against its file: the number of
    generation units, and so which generated files are stale, is planned from them.
    A row that cannot be prompted (an empty question) is a PipelineError naming it, or, with
    the dataset's `skip_bad_rows`, left out: the problems file's sidecar lists it under
    "skipped_rows" ({row, problem_id, reason}) and the report counts it. `check(dataset,
    table)` runs on each dataset's problems before they are written (or once read back when
    complete) and may raise PipelineError."""
    from workers.datasets import load_problems

    out = {}
    for dataset in datasets:
        path, want = plan.problems_path(run_dir, dataset), plan.problems_hash(dataset)
        try:  # a check reads the table, and read_verified hashes the bytes it parses
            if check is None:
                sidecar = verify(path, want, checksum=checksum)
            else:
                table, sidecar = read_verified(path, want)
        except IncompleteFileError:
            sidecar = None
        if sidecar is not None:
            if check is not None:
                check(dataset, table)
        else:
            skipped: list[dict[str, Any]] | None = [] if dataset.skip_bad_rows else None
            try:
                table = load_problems(
                    dataset.loader,
                    path=dataset.path,
                    limit=dataset.limit,
                    seed=dataset.seed,
                    skipped=skipped,
                    **dataset.options,
                )
            except (ValueError, RuntimeError, ImportError, OSError) as err:
                raise PipelineError(f"dataset {dataset.name}: {last_line(err)}") from err
            if table.num_rows == 0:
                raise PipelineError(f"dataset {dataset.name} has no problems (limit/options)")
            # The configured name, not the loader's: two data sets of one loader (demo and
            # demo_train, a local copy beside the hub's) stay apart in every table downstream.
            table = table.set_column(
                table.schema.get_field_index("dataset"),
                "dataset",
                pa.array([dataset.name] * table.num_rows, pa.string()),
            )
            if check is not None:
                check(dataset, table)
            if skipped:
                print(
                    f"warning: dataset {dataset.name}: skipped {len(skipped)} rows that cannot be"
                    f" prompted (dataset.skip_bad_rows), listed in {done_path(path)}",
                    file=sys.stderr,
                )
            extra = {"skipped_rows": skipped} if skipped is not None else None
            try:
                sidecar = write_arrow(table, path, config_hash=want, extra=extra, root=run_dir)
            except OSError as err:  # a full disk or quota: write_arrow left nothing complete
                raise PipelineError(f"cannot write {path}: {err.strerror or err}") from None
        out[dataset.name] = (sidecar["rows"], sidecar["sha256"])
    return out


def check_prompts(
    table: pa.Table,
    dataset: Any,
    models: list[ModelConfig],
    backend: str,
    tokenizers: dict[str, Any],
) -> None:
    """PipelineError naming the first row of `table` that one of `models` cannot prompt (its
    prompt leaves no room for one new token in the model's context, or its template fails on
    it), where that can be known before Ray: the model is a local directory (the bundled
    model, `model.path`), so its tokenizer loads here (kept in `tokenizers`). The context is
    config.json's `max_position_embeddings`, or vLLM's `model.engine.max_model_len` when
    smaller. A hub model's rows are checked by its generators instead, and a dataset with
    `skip_bad_rows` leaves them to the generators too: there such a row becomes unverified
    samples with finish_reason "prompt_too_long" (workers.generate), counted in the report,
    never a failed unit."""
    from workers.generate import prompt_problem

    if dataset.skip_bad_rows:
        return
    rows = table.select(["problem_id", "prompt"]).to_pylist()
    for model in models:
        directory = Path(model_path(model))
        if not (directory / "config.json").is_file():
            continue
        max_length = context_length(model, backend, directory)
        if str(directory) not in tokenizers:
            from transformers import AutoTokenizer  # loads torch: only for a local model

            tokenizers[str(directory)] = AutoTokenizer.from_pretrained(str(directory))
        for i, row in enumerate(rows, 1):
            reason = prompt_problem(
                tokenizers[str(directory)],
                row["prompt"],
                max_length,
                instruction=dataset.instruction,
                template=model.template,
                use_chat_template=model.use_chat_template,
            )
            if isinstance(reason, str):
                what = (
                    f"leaves no room to generate in the model's context of {max_length} tokens"
                    if reason == "prompt_too_long"
                    else f"cannot be prompted ({reason})"
                )
                raise PipelineError(
                    f"dataset {dataset.name}: row {i} (problem {row['problem_id']!r}): its prompt"
                    f" {what} for model {model.name}; drop the row, or set"
                    " dataset.skip_bad_rows=true to record it as unverified"
                )


def context_length(model: ModelConfig, backend: str, directory: Path) -> int | None:
    """Tokens a sequence of `model` may hold: config.json's `max_position_embeddings`, capped
    by `model.engine.max_model_len` under vLLM; None when config.json does not say."""
    try:
        config = json.loads((directory / "config.json").read_text())
        length = config.get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    length = length if isinstance(length, int) and not isinstance(length, bool) else None
    engine = model.engine.max_model_len
    if (model.generation_backend or backend) == "vllm" and engine is not None:
        length = engine if length is None else min(length, engine)
    return length


# ------------------------------------------------------------------------------- the stages


def run_stages(
    cfg: RunConfig,
    run_dir: Path,
    problems: dict[str, tuple[int, str]],
    *,
    run_id: str,
    sink: Sink | None = None,
    job_sink: JobSink | None = None,
    workers: Workers = DEFAULT_WORKERS,
) -> RunSummary:
    """The stages over Ray; `sink` gets progress metrics, `job_sink` each scoring job (model,
    layer, dataset) whose last unit this session wrote (e.g. WandbSession.log_job); `workers`
    the actor classes (tests pass failing ones)."""
    summary = RunSummary(run_id=run_id, run_dir=run_dir)
    # 1. Generation units: every sample of every problem, verified, one file per problem shard.
    gen_units = {
        cell: plan.generation_units(
            run_dir,
            cell.model,
            cell.dataset,
            cfg.generation,
            num_problems=problems[cell.dataset.name][0],
            problems_sha256=problems[cell.dataset.name][1],
        )
        for cell in plan.plan_cells(cfg)
    }
    for cell, units in gen_units.items():
        prune(run_dir, [plan.generated_dir(run_dir, cell.model, cell.dataset)], units)
    # 2. Generation, shards and scoring of every cell on one executor, overlapped.
    CellStages(cfg, run_dir, summary, gen_units, sink, job_sink, workers).run()
    return summary


class CellStages:
    """Generation -> shards -> scoring per (model, dataset) cell, on one executor.

    Pools: for each model (in the plan's order) its generators, then its scorers, each with an
    estimated unit time from the rates table and the scorers with the units their cells will
    bring, so the executor serves the model with the most remaining work first. When a cell's last generation unit is settled, its trajectories to score
    (verified ones by default) are split into shards and its scoring units are planned,
    pruned of stale files, recorded in plan.json (rewritten whole, so a report takes only
    planned files) and queued; a model's scorer pool is sealed once all its cells are.
    Generation is over when every cell is: then the generation summary is printed, and a run
    in which no cell kept a trajectory stops with PipelineError before any scoring.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        summary: RunSummary,
        gen_units: dict[plan.Cell, list[plan.Unit]],
        sink: Sink | None,
        job_sink: JobSink | None,
        workers: Workers,
    ):
        self.cfg, self.run_dir, self.summary, self.gen_units = cfg, run_dir, summary, gen_units
        todo = incomplete(gen_units, cfg.verify_checksums)
        total = sum(map(len, gen_units.values()))
        self.gen_progress = StageProgress(
            "generation", total, skipped=total - sum(map(len, todo.values())), sink=sink
        )
        self.score_progress = StageProgress("scoring", 0, sink=sink)
        self.jobs = JobTracker({}, job_sink) if job_sink else None
        self.cell_of = {u.key: c for c, us in todo.items() for u in us}
        self.left = {c: {u.key for u in us} for c, us in todo.items()}  # not settled yet
        self.unresolved = Counter(c.model.name for c in gen_units)  # cells per model
        self.score_units: dict[plan.Cell, list[plan.Unit]] = {}
        self.empty: list[plan.Cell] = []  # generated, nothing kept: planned when generation ends
        self.kept = 0
        self.executor = Executor(max_gpus=cfg.cluster.max_gpus)
        self.scorers: dict[str, Pool] = {}
        models = {c.model.name: c.model for c in gen_units}
        for i, model in enumerate(models.values()):
            cell = next(c for c in gen_units if c.model.name == model.name)
            gen_cost, score_cost = unit_costs(cfg, model, cell.layers)
            pool = self.executor.add(
                generator_pool(
                    model,
                    cfg,
                    workers,
                    self.gen_progress,
                    priority=(i, 0),
                    on_outcome=self.generated,
                    unit_cost=gen_cost,
                )
            )
            pool.add(u for c, us in todo.items() if c.model.name == model.name for u in us)
            pool.seal()
            self.scorers[model.name] = self.executor.add(
                scorer_pool(
                    model,
                    cfg,
                    workers,
                    self.score_progress,
                    priority=(i, 1),
                    on_outcome=self.scored,
                    unit_cost=score_cost,
                )
            )
            self.scorers[model.name].expected = sum(  # upper bound: every trajectory verified
                expected_scoring_units(c, us, cfg)
                for c, us in gen_units.items()
                if c.model.name == model.name
            )

    def run(self) -> None:
        for cell, left in self.left.items():
            if not left:  # complete already: scored from the start
                self.resolve(cell)
        self.executor.run()
        self.summary.stages["scoring"] = self.score_progress.close()

    def generated(self, outcome: Outcome) -> None:
        if not outcome.ok:
            record_failures(self.summary, [outcome])
        cell = self.cell_of[outcome.unit.key]
        self.left[cell].discard(outcome.unit.key)
        if not self.left[cell]:
            self.resolve(cell)

    def scored(self, outcome: Outcome) -> None:
        if not outcome.ok:
            record_failures(self.summary, [outcome])
        elif self.jobs is not None:
            self.jobs.done(outcome.unit, outcome.result or {})

    def resolve(self, cell: plan.Cell) -> None:
        """The cell's generation is settled: its shards, then its scoring units (or why not)."""
        units = self.gen_units[cell]
        name = f"{cell.model.name}/{cell.dataset.name}"
        # Just checked or written by this run: the sidecars suffice here.
        if any(not is_complete(u.path, u.config_hash, checksum=False) for u in units):
            self.summary.warnings.append(f"{name}: generation incomplete, not scored")
        else:
            shards, kept, total = write_shards(self.run_dir, cell, self.cfg, units)
            self.kept += kept
            print(
                f"[shards] {name}: {kept} of {total} trajectories"
                f" {'verified' if self.cfg.scoring.verified_only else 'kept'}, {len(shards)} shards",
                file=sys.stderr,
            )
            if kept:
                self.plan_scoring(cell, shards)
                self.write_plan()
            else:
                self.summary.warnings.append(f"{name}: 0 of {total} trajectories verified")
                self.empty.append(cell)
        self.unresolved[cell.model.name] -= 1
        if not self.unresolved[cell.model.name]:
            self.scorers[cell.model.name].seal()
        if not any(self.unresolved.values()):
            self.generation_over()

    def plan_scoring(self, cell: plan.Cell, shards: list[tuple[Path, str]]) -> None:
        """One unit per (layer, shard); the incomplete ones queued on the model's scorers."""
        units = plan.scoring_units(self.run_dir, cell, self.cfg.scoring, shards)
        self.score_units[cell] = units
        prune(self.run_dir, plan.scores_dirs(self.run_dir, cell), units)
        todo = incomplete({cell: units}, self.cfg.verify_checksums)[cell]
        self.score_progress.add(len(units), skipped=len(units) - len(todo))
        if self.jobs is not None:
            self.jobs.add({cell: units})
            self.jobs.expect(todo)
        self.scorers[cell.model.name].add(todo)

    def generation_over(self) -> None:
        self.summary.stages["generation"] = self.gen_progress.close()
        if self.empty and self.kept == 0 and not self.summary.failures:
            raise PipelineError(
                "no verified trajectories to score: "
                + "; ".join(w for w in self.summary.warnings if "verified" in w)
                + " (raise model.max_tokens or generation.samples_per_problem, or set"
                " scoring.verified_only=false; the generated trajectories are kept and reused)"
            )
        for cell in self.empty:
            self.plan_scoring(cell, [])  # no units: only its stale score files go
        self.write_plan()

    def write_plan(self) -> None:
        """plan.json: the units planned so far, in the plan's cell order, and the cells left
        unscored; a report made now takes only these units' files."""
        units = [u for c in self.gen_units for u in self.score_units.get(c, [])]
        plan.write_plan(self.run_dir, units, unscored=list(self.summary.warnings))


def incomplete(
    units: dict[plan.Cell, list[plan.Unit]], checksum: bool
) -> dict[plan.Cell, list[plan.Unit]]:
    return {
        c: [u for u in us if not is_complete(u.path, u.config_hash, checksum=checksum)]
        for c, us in units.items()
    }


def generate(actor: Any, unit: plan.Unit) -> Any:
    """The one call that runs a generation unit on a generator actor."""
    return actor.generate.remote(unit.task, str(unit.path), unit.config_hash, root=unit.root)


def score(actor: Any, unit: plan.Unit) -> Any:
    """The one call that runs a scoring unit on a scorer actor."""
    return actor.score.remote(unit.task, str(unit.path), unit.config_hash, root=unit.root)


def generator_pool(
    model: ModelConfig, cfg: RunConfig, workers: Workers, progress: StageProgress, **options: Any
) -> Pool:
    """A pool of up to `cluster.generators` generator actors of `model` (auto: no cap)."""
    spawn = GeneratorSpawner(model, cfg, workers.generator)
    return _pool(spawn, generate, actor_cap(cfg.cluster.generators), cfg, progress, **options)


def scorer_pool(
    model: ModelConfig, cfg: RunConfig, workers: Workers, progress: StageProgress, **options: Any
) -> Pool:
    """A pool of up to `cluster.scorers` scorer actors of `model` (auto: no cap), each loading
    it once."""
    spawn = ScorerSpawner(model, cfg, workers.scorer)
    return _pool(spawn, score, actor_cap(cfg.cluster.scorers), cfg, progress, **options)


def _pool(
    spawn, call, actors: int | None, cfg: RunConfig, progress: StageProgress, **options
) -> Pool:
    """A Pool of `spawn`'s actors under the run's retries and deadlines; a spawner that holds
    placement groups frees them (`release`, `close`)."""
    return Pool(
        spawn,
        call,
        actors,
        cfg.scoring.retries,
        progress,
        need=spawn.need(),
        start_timeout_s=cfg.cluster.actor_start_timeout_s,
        unit_timeout_s=cfg.cluster.unit_timeout_s,
        release=getattr(spawn, "release", None),
        on_close=getattr(spawn, "close", None),
        describe=spawn.describe,
        **options,
    )


def expected_scoring_units(cell: plan.Cell, units: list[plan.Unit], cfg: RunConfig) -> int:
    """The scoring units a cell brings when every trajectory it generates is kept."""
    problems = sum(u.task.rows[1] - u.task.rows[0] for u in units)
    trajectories = problems * cfg.generation.samples_per_problem
    shards = math.ceil(trajectories / cfg.scoring.trajectories_per_shard)
    return len(set(cell.layers.values())) * shards


def run_units(
    stage: str,
    units_by_cell: dict[plan.Cell, list[plan.Unit]],
    cfg: RunConfig,
    make_pool: Callable[..., Pool],
    summary: RunSummary,
    sink: Sink | None,
    workers: Workers = DEFAULT_WORKERS,
) -> dict[str, Any]:
    """Run a stage's incomplete units, all known up front, on one executor with a pool per
    model (`make_pool`: generator_pool or scorer_pool, served in model order); record
    failures; return the stage's final progress metrics."""
    todo = incomplete(units_by_cell, cfg.verify_checksums)
    total = sum(map(len, units_by_cell.values()))
    progress = StageProgress(stage, total, skipped=total - sum(map(len, todo.values())), sink=sink)
    executor = Executor()
    models = {c.model.name: c.model for c in todo}
    for i, model in enumerate(models.values()):
        units = [u for c, us in todo.items() if c.model.name == model.name for u in us]
        if units:
            pool = executor.add(
                make_pool(
                    model,
                    cfg,
                    workers,
                    progress,
                    priority=(i,),
                    on_outcome=lambda o: None if o.ok else record_failures(summary, [o]),
                )
            )
            pool.add(units)
            pool.seal()
    executor.run()
    return progress.close()


class JobTracker:
    """Tells `sink(model, layer, dataset, metrics)` when the last expected unit of a scoring
    job is written: a job finished by this session is logged now, not after the report."""

    def __init__(self, units_by_cell: dict[plan.Cell, list[plan.Unit]], sink: JobSink):
        self.sink = sink
        self.job_of: dict[str, tuple[str, int, str]] = {}
        self.total: Counter[tuple[str, int, str]] = Counter()
        self.left: dict[tuple[str, int, str], set[str]] = defaultdict(set)
        self.tokens: Counter[tuple[str, int, str]] = Counter()
        self.add(units_by_cell)

    def add(self, units_by_cell: dict[plan.Cell, list[plan.Unit]]) -> None:
        """More planned units (a cell planned after the others)."""
        for cell, units in units_by_cell.items():
            for u in units:
                job = (cell.model.name, u.task.layer, cell.dataset.name)
                if u.key not in self.job_of:
                    self.job_of[u.key] = job
                    self.total[job] += 1

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
    """Split a cell's trajectories to score (the verified ones, or with verified_only=false
    every sample that has tokens) into shards of `trajectories_per_shard` rows.

    Rows keep generation order (problem, then sample), so the split depends only on the
    files and the config; shards already complete with the same hash are left untouched.
    Returns ([(path, sha256)], trajectories kept, trajectories generated).
    """
    try:  # checksummed whatever verify_checksums says: the bytes are in memory anyway
        read = [read_verified(u.path, u.config_hash) for u in generated]
    except IncompleteFileError as err:  # only when verify_checksums=false let it through
        raise PipelineError(f"{err}; rerun with verify_checksums=true to redo it") from None
    table = pa.concat_tables([t for t, _ in read])
    total = table.num_rows
    if cfg.scoring.verified_only:
        table = table.filter(table.column("verified"))
    else:  # a row that could not be prompted has no tokens to score
        import pyarrow.compute as pc

        table = table.filter(pc.greater(pc.list_value_length(table["input_ids"]), 0))
    size = cfg.scoring.trajectories_per_shard
    want = plan.shards_hash(cfg.scoring, [sidecar["sha256"] for _, sidecar in read])
    out_dir = plan.shard_dir(run_dir, cell.model, cell.dataset)
    shards = []
    for k in range(math.ceil(table.num_rows / size)):
        path = out_dir / f"{k:05d}.arrow"
        try:
            sidecar = verify(path, want, checksum=cfg.verify_checksums)
        except IncompleteFileError:
            try:
                sidecar = write_arrow(
                    table.slice(k * size, size), path, config_hash=want, root=run_dir
                )
            except OSError as err:  # a full disk, or a folder replaced by a link
                raise PipelineError(f"cannot write {path}: {err.strerror or err}") from None
        shards.append((path, sidecar["sha256"]))
    prune(run_dir, [out_dir], [p for p, _ in shards])
    return shards, table.num_rows, total


def prune(run_dir: Path, dirs: list[Path], keep: list[plan.Unit] | list[Path]) -> int:
    """Discard data files in `dirs` that the plan does not write (left by an older config,
    e.g. a larger shard count), so that no reader counts them. Returns how many.

    Only files this project wrote are removed: inside `run_dir` and with a sidecar that
    verifies against its file, checksum included (workers.io.verify), so no field that was
    not checked decides a deletion. Anything else found there is left alone, whatever its
    name, and named on stderr.
    """
    root = run_dir.resolve()
    wanted = {getattr(k, "path", k) for k in keep}
    stale, kept = [], []
    for p in (
        p
        for d in dirs
        if d.is_dir() and d.resolve().is_relative_to(root)
        for p in sorted(d.glob("*.arrow"))
        if p not in wanted and p.resolve().is_relative_to(root)
    ):
        try:
            verify(p)
            stale.append(p)
        except CorruptFile as err:
            kept.append(str(err))
        except IncompleteFileError:
            pass
    for path in stale:
        discard(path)
    if stale:
        print(f"[plan] removed {len(stale)} stale files under {dirs[0].parent}", file=sys.stderr)
    for line in kept:
        print(f"warning: [plan] left in place, not verified: {line}", file=sys.stderr)
    return len(stale)


# ------------------------------------------------------------------------------- actors


class GeneratorSpawner:
    """Starts generator actors for one model with their resources.

    `cluster.use_gpus`: HF takes one GPU; vLLM takes `model.tensor_parallel_size` GPUs, as a
    placement group when > 1 (one per actor, removed by `release` when its actor goes and by
    `close`). Otherwise no GPU is asked for: HF runs on CPU, and so does vLLM's CPU build, with
    a fixed KV-cache size (`model.engine.cpu_kv_cache_gib`). `worker` is the class made remote.
    """

    def __init__(self, model: ModelConfig, cfg: RunConfig, worker: type = GeneratorWorker):
        self.model, self.cluster = absolute_path(model), cfg.cluster
        self.actor_cls = ray.remote(worker)
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
        need: dict[str, Any] = dict(self.need())
        if self.options.get("distributed_executor_backend") == "ray":
            need = {"bundles": f"{self.model.tensor_parallel_size} x {self.bundle()}"}
        return f"the {self.backend} generator actor of model {self.model.name}, needing {need},"

    def bundle(self) -> dict[str, float]:
        return {"GPU": 1, "CPU": self.cluster.cpus_per_actor}

    def need(self) -> dict[str, float]:
        """What one actor takes from the cluster (its placement group's bundles together)."""
        if self.options.get("distributed_executor_backend") == "ray":
            tp = self.model.tensor_parallel_size
            return {k: v * tp for k, v in self.bundle().items()}
        return {"CPU": self.resources["num_cpus"], "GPU": self.resources["num_gpus"]}

    def __call__(self) -> Any:
        resources, group = dict(self.resources), None
        if self.options.get("distributed_executor_backend") == "ray":
            group, strategy = self.placement()
            resources = {"num_cpus": 0, "num_gpus": 0, "scheduling_strategy": strategy}
        actor = self.actor_cls.options(max_restarts=0, **resources).remote(
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
        from ray.exceptions import GetTimeoutError
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles = [self.bundle()] * self.model.tensor_parallel_size
        group = placement_group(bundles, strategy="STRICT_PACK")
        try:
            ray.get(group.ready(), timeout=self.cluster.actor_start_timeout_s)
        except GetTimeoutError:
            remove_placement_group(group)
            raise ActorStartError(
                f"{self.describe()} could not be placed within"
                f" {self.cluster.actor_start_timeout_s:g} s (cluster.actor_start_timeout_s):"
                f" no node has {len(bundles)} x {self.bundle()} free;"
                f" the cluster has {cluster_resources()}"
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

    def __init__(self, model: ModelConfig, cfg: RunConfig, worker: type = ScorerWorker):
        self.model, self.cluster = absolute_path(model), cfg.cluster
        self.actor_cls = ray.remote(worker)
        device = "cuda" if self.cluster.use_gpus else "cpu"
        self.score_options = {**plan.score_args(cfg.scoring, model), "device": device}
        self.gpus = model.gpus if self.cluster.use_gpus else 0

    def __call__(self) -> Any:
        options = {"num_cpus": self.cluster.cpus_per_actor, "num_gpus": self.gpus}
        return self.actor_cls.options(max_restarts=0, **options).remote(
            self.model,
            self.score_options,
            torch_threads=self.cluster.torch_threads,
            provenance=driver_provenance(),
        )

    def need(self) -> dict[str, float]:
        return {"CPU": self.cluster.cpus_per_actor, "GPU": self.gpus}

    def describe(self) -> str:
        return f"the scorer actor of model {self.model.name}, needing {self.need()},"


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
    lines = []
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
        lines.append(json.dumps(entry) + "\n")
        summary.failures.append(entry)
    path = summary.run_dir / "failures.jsonl"
    atomic_append(path, "".join(lines), root=summary.run_dir)


def record_fixed(run_dir: Path) -> list[dict[str, Any]]:
    """Append `{"fixed": true, ...}` to failures.jsonl for each unit failed there that is
    complete now (a later attempt redid it), so the file tells what is still missing; return
    the records. A failure is open until a fixed record with its unit follows it."""
    path = run_dir / "failures.jsonl"
    content = read_nofollow(path)  # never through a planted link, nor a FIFO
    if content is None:
        return []
    still_open: dict[str, dict[str, Any]] = {}
    for line in content.decode("utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
            unit = str(entry["unit"])
        except (ValueError, KeyError, TypeError):
            continue
        if entry.get("fixed") is True:
            still_open.pop(unit, None)
        else:
            still_open[unit] = entry
    fixed = [
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stage": e.get("stage"),
            "unit": unit,
            "path": e.get("path"),
            "fixed": True,
        }
        for unit, e in still_open.items()
        if isinstance(e.get("path"), str)
        and is_complete(e["path"], e.get("config_hash"), checksum=False)
    ]
    if fixed:
        atomic_append(path, "".join(json.dumps(r) + "\n" for r in fixed), root=run_dir)
    return fixed
