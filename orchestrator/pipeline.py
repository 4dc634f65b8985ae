"""The main stages of a run: generation -> shards -> scoring of every (model, dataset) cell.

Contract: `run_stages` (Ray initialised, problems written by orchestrator/problems.py) plans,
runs and finishes the main stages and returns a `RunSummary`; it reads top to bottom. Stages
talk only through files in the run dir (orchestrator/plan.py has the layout); a unit is
skipped when its stage says it is complete (its file verifies against its sidecar,
workers.io.verify: name, rows, config hash and, unless `verify_checksums=false`, sha256), so
truncated, corrupted or tampered files are redone. Failed units go to failures.jsonl
(orchestrator/summary.py) and the run goes on; cells whose inputs failed are skipped.

All stages share one executor (orchestrator/executor.py), one pool of actors per (stage,
model): a cell's shards are written and its scoring units queued as soon as its last
generation unit lands (`CellFlow`, the generation stage's `landed` hook), so a model's scorers
run while its other data sets, or later models, still generate; an actor is started when the
cluster has room for it and closed as soon as its pool has nothing left to do, so the next
pool can take its GPUs. A hook never raises: an error (a shard that cannot be written, no
trajectory to score) stops the executor's queues and is raised once the executor is done.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from orchestrator import plan
from orchestrator.actors import DEFAULT_WORKERS, Workers
from orchestrator.config import RunConfig
from orchestrator.errors import PipelineError
from orchestrator.executor import Executor, Outcome, Pool
from orchestrator.progress import StageProgress
from orchestrator.schedule import unit_costs
from orchestrator.shards import prune, write_shards
from orchestrator.stage import incomplete, stage_pool
from orchestrator.stages.cei import run_cei
from orchestrator.stages.generation import GenerationStage, generation_units
from orchestrator.stages.scoring import ScoringStage, expected_scoring_units, scoring_units
from orchestrator.summary import JobSink, RunSummary, Sink, record_failures
from workers.io import is_complete


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
    """The main stages over Ray; `sink` gets progress metrics, `job_sink` each scoring job
    (model, layer, dataset) whose last unit this session wrote (e.g. WandbSession.log_job);
    `workers` the actor classes (tests pass failing ones)."""
    summary = RunSummary(run_id=run_id, run_dir=run_dir)
    # 1. Plan: every generation unit of every cell; generated files of another plan go.
    gen_units = plan_generation(cfg, run_dir, problems)
    # 2. The pools: per model (in the plan's order) its generators, then its scorers; a
    # cell's scoring units come when its generation has landed.
    executor = Executor(max_gpus=cfg.cluster.max_gpus)
    generation, scoring = (
        GenerationStage(cfg, workers.generator),
        ScoringStage(cfg, workers.scorer),
    )
    stages = (generation, scoring)
    flow = CellFlow(cfg, run_dir, summary, gen_units, stages, sink, job_sink, executor.stop)
    generation.landed, scoring.landed = flow.generated, flow.scored
    for i, (model, cells) in enumerate(flow.models()):
        gen_cost, score_cost = unit_costs(cfg, model, cells[0].layers)
        pool = executor.add(flow.generator_pool(generation, model, (i, 0), gen_cost))
        pool.add(u for c in cells for u in flow.todo[c])
        pool.seal()
        flow.scorers[model.name] = executor.add(
            flow.scorer_pool(scoring, model, (i, 1), score_cost, cells)
        )
    flow.start()  # cells generated already: their scoring is queued from the start
    # 3. Run every pool until drained.
    executor.run()
    # 4. Finish: the stages' metrics, then the run's error, if a hook met one.
    summary.stages["scoring"] = flow.score_progress.close()
    if flow.error is not None:
        raise flow.error
    # 5. Counterfactual Expert Impact of the scored shards, when asked for.
    if cfg.scoring.cei:
        outcomes, summary.stages["cei"] = run_cei(cfg, run_dir, flow.shards, workers.scorer, sink)
        record_failures(summary, outcomes)
    return summary


def plan_generation(
    cfg: RunConfig, run_dir: Path, problems: dict[str, tuple[int, str]]
) -> dict[plan.Cell, list[plan.Unit]]:
    """Every generation unit of every cell of the plan; stale generated files pruned."""
    gen_units = {
        cell: generation_units(
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
    return gen_units


class CellFlow:
    """What happens when a main-stage unit lands, per (model, dataset) cell.

    When a cell's last generation unit is settled, its trajectories to score (verified ones by
    default) are split into shards and its scoring units are planned, pruned of stale files,
    recorded in plan.json (rewritten whole, so a report takes only planned files) and queued;
    a model's scorer pool is sealed once all its cells are. Generation is over when every cell
    is: then the generation summary is printed, and a run in which no cell kept a trajectory
    ends with PipelineError before any scoring. Errors are kept in `error`, never raised here.
    """

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: Path,
        summary: RunSummary,
        gen_units: dict[plan.Cell, list[plan.Unit]],
        stages: tuple[GenerationStage, ScoringStage],
        sink: Sink | None,
        job_sink: JobSink | None,
        stop: Any,
    ):
        self.cfg, self.run_dir, self.summary, self.gen_units = cfg, run_dir, summary, gen_units
        self.scoring, self.stop = stages[1], stop  # stop: ends the run's queues (Executor.stop)
        checksum = cfg.verify_checksums
        self.todo = {c: incomplete(stages[0], us, checksum) for c, us in gen_units.items()}
        total = sum(map(len, gen_units.values()))
        skipped = total - sum(map(len, self.todo.values()))
        self.gen_progress = StageProgress("generation", total, skipped=skipped, sink=sink)
        self.score_progress = StageProgress("scoring", 0, sink=sink)
        self.jobs = JobTracker({}, job_sink) if job_sink else None
        self.cell_of = {u.key: c for c, us in self.todo.items() for u in us}
        self.left = {c: {u.key for u in us} for c, us in self.todo.items()}  # not settled yet
        self.unresolved = Counter(c.model.name for c in gen_units)  # cells per model
        self.score_units: dict[plan.Cell, list[plan.Unit]] = {}
        self.shards: dict[plan.Cell, list[tuple[Path, str]]] = {}  # of the cells scored
        self.empty: list[plan.Cell] = []  # generated, nothing kept: planned when generation ends
        self.kept = 0
        self.scorers: dict[str, Pool] = {}
        self.error: Exception | None = None

    def models(self) -> list[tuple[Any, list[plan.Cell]]]:
        """(model, its cells) in the plan's order."""
        out: dict[str, tuple[Any, list[plan.Cell]]] = {}
        for cell in self.gen_units:
            out.setdefault(cell.model.name, (cell.model, []))[1].append(cell)
        return list(out.values())

    def generator_pool(self, stage: GenerationStage, model: Any, priority, cost: float) -> Pool:
        return stage_pool(stage, model, self.gen_progress, priority=priority, unit_cost=cost)

    def scorer_pool(
        self, stage: ScoringStage, model: Any, priority, cost: float, cells: list[plan.Cell]
    ) -> Pool:
        """The model's scorers, expecting the units its cells bring (an upper bound: every
        trajectory verified)."""
        pool = stage_pool(stage, model, self.score_progress, priority=priority, unit_cost=cost)
        pool.expected = sum(expected_scoring_units(c, self.gen_units[c], self.cfg) for c in cells)
        return pool

    def start(self) -> None:
        for cell, left in self.left.items():
            if not left:  # complete already: scored from the start
                self.settled(cell)

    def generated(self, outcome: Outcome) -> None:
        if not outcome.ok:
            self.guarded(record_failures, self.summary, [outcome])
        cell = self.cell_of[outcome.unit.key]
        self.left[cell].discard(outcome.unit.key)
        if not self.left[cell]:
            self.settled(cell)

    def scored(self, outcome: Outcome) -> None:
        if not outcome.ok:
            self.guarded(record_failures, self.summary, [outcome])
        elif self.jobs is not None:
            self.jobs.done(outcome.unit, outcome.result or {})

    def guarded(self, step: Any, *args: Any) -> None:
        """`step(*args)`, its error kept for the end of the run and every queue stopped."""
        if self.error is not None:
            return
        try:
            step(*args)
        except (PipelineError, OSError) as err:
            self.error = err
            self.stop()

    def settled(self, cell: plan.Cell) -> None:
        """The cell's generation is settled: its scoring planned; the model's scorers sealed
        once all its cells are, generation over once every cell is."""
        self.guarded(self.resolve, cell)
        self.unresolved[cell.model.name] -= 1
        if not self.unresolved[cell.model.name]:
            self.scorers[cell.model.name].seal()
        if not any(self.unresolved.values()):
            self.summary.stages["generation"] = self.gen_progress.close()
            self.guarded(self.generation_over)

    def resolve(self, cell: plan.Cell) -> None:
        """The cell's shards, then its scoring units (or why not)."""
        units = self.gen_units[cell]
        name = f"{cell.model.name}/{cell.dataset.name}"
        # Just checked or written by this run: the sidecars suffice here.
        if any(not is_complete(u.path, u.config_hash, checksum=False) for u in units):
            self.summary.warnings.append(f"{name}: generation incomplete, not scored")
            return
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

    def plan_scoring(self, cell: plan.Cell, shards: list[tuple[Path, str]]) -> None:
        """One unit per (layer, shard); the incomplete ones queued on the model's scorers."""
        units = scoring_units(self.run_dir, cell, self.cfg.scoring, shards)
        self.score_units[cell] = units
        if shards:
            self.shards[cell] = shards
        prune(self.run_dir, plan.scores_dirs(self.run_dir, cell), units)
        todo = incomplete(self.scoring, units, self.cfg.verify_checksums)
        self.score_progress.add(len(units), skipped=len(units) - len(todo))
        if self.jobs is not None:
            self.jobs.add({cell: units})
            self.jobs.expect(todo)
        self.scorers[cell.model.name].add(todo)

    def generation_over(self) -> None:
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
