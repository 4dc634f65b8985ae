"""Ray actors and the loop that feeds them work units.

Contract: `GeneratorWorker` and `ScorerWorker` are plain classes (usable without Ray) that load
one model once in `__init__` and then run many units, each unit = read an input file, write
one Arrow file with its completion sidecar (`workers.io.write_arrow`), return a small dict of
counts. `GeneratorActor` / `ScorerActor` are the same classes made remote in one line.
`dispatch` runs units over a pool of such actors as they free up (`ray.wait`); a unit that
raises is retried `retries` times, on any actor; an actor that dies (its process killed, its
node lost) or whose unit runs past its deadline is replaced by a fresh one and its unit
resubmitted as the next attempt; a unit out of attempts is returned as failed while the
others go on. An actor whose `__init__` raises (bad model, wrong shape), or that does not
start in time (e.g. it asks for resources no node has), stops the stage with
`ActorStartError`: every unit would fail.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from orchestrator.config import ModelConfig, check_model_shape, model_path
from orchestrator.pipeline import PipelineError, last_line
from orchestrator.plan import Unit
from orchestrator.progress import StageProgress
from orchestrator.tasks import GenerationTask, ScoringTask

# Test-only hooks, read by the driver and handed to scorer actors: with KILL set to a path that
# does not exist yet, the first scorer to start its second unit creates it and SIGKILLs itself
# (once per run); with FAIL set, every unit whose output path contains it raises.
FAULT_KILL_ENV = "ORCHESTRATOR_FAULT_KILL_SCORER"
FAULT_FAIL_ENV = "ORCHESTRATOR_FAULT_FAIL_SCORE"


class ActorStartError(PipelineError):
    """An actor could not be created (its __init__ raised); the message is the cause."""


def setup_process(torch_threads: int) -> None:
    """Torch threads per actor (so actors do not oversubscribe cores); no loading bars in logs."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(torch_threads)
    hf_logging.disable_progress_bar()


def worker_provenance(path: str, driver: dict[str, Any] | None) -> dict[str, Any]:
    """What a worker's sidecars record: the driver's git commit (workers may have no .git),
    this node's library versions, the scoring code it runs and the model revision it loaded."""
    from workers.provenance import library_versions, model_revision, scoring_code_version

    return {
        **(driver or {}),
        "versions": library_versions(),
        "scoring_code": scoring_code_version(),
        "model_revision": model_revision(path),
    }


def local_model_dir(model: ModelConfig) -> str:
    """A directory with the model's files: model.path, the bundled model, or a snapshot of
    hf_id at model.revision in this node's Hugging Face cache (downloaded on first use; point
    HF_HOME at shared storage to download once per cluster). Its shape is checked here."""
    path = model_path(model)
    if not Path(path).is_dir():
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            model.hf_id,
            revision=model.revision,
            ignore_patterns=["*.bin", "*.pt", "*.pth", "original/*", "metal/*"],
        )
    check_model_shape(model, json.loads((Path(path) / "config.json").read_text()))
    return path


class GeneratorWorker:
    """Samples, verifies and writes trajectory shards of one model (workers.generate)."""

    def __init__(
        self,
        model: ModelConfig,
        backend: str,
        backend_options: dict[str, Any],
        *,
        torch_threads: int,
        provenance: dict[str, Any] | None = None,
    ):
        setup_process(torch_threads)
        from workers.generation import make_backend

        path = local_model_dir(model)
        self.backend = make_backend(backend, path, **backend_options)
        self.backend_name = backend  # recorded in each sidecar: the report says who generated
        self.provenance = worker_provenance(path, provenance)

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        """Shut the backend's engine down (vLLM: its worker processes, its device memory)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def generate(self, task: GenerationTask, out_path: str, config_hash: str) -> dict[str, Any]:
        from workers.generate import generate_trajectories
        from workers.io import read_arrow, write_arrow

        started = time.time()
        start, stop = task.rows
        problems = read_arrow(task.problems_path).slice(start, stop - start)
        table = generate_trajectories(
            self.backend,
            problems,
            task.sampling,
            model_name=task.model_name,
            verifier=task.verifier,
            tokenizer=self.backend.tokenizer,
            instruction=task.instruction,
            template=task.template,
            use_chat_template=task.use_chat_template,
        )
        write_arrow(
            table,
            out_path,
            config_hash=config_hash,
            started=started,
            extra={"provenance": self.provenance, "backend": self.backend_name},
        )
        lengths = table.column("input_ids").to_pylist()
        prompt_lens = table.column("prompt_len").to_pylist()
        tokens = sum(len(ids) - p for ids, p in zip(lengths, prompt_lens, strict=True))
        verified = sum(table.column("verified").to_pylist())
        return {"rows": table.num_rows, "tokens": tokens, "verified": verified}


class ScorerWorker:
    """Scores trajectory shards of one model at any of its MoE layers (workers.scorer)."""

    def __init__(
        self,
        model: ModelConfig,
        score_options: dict[str, Any],
        *,
        torch_threads: int,
        faults: dict[str, str] | None = None,
        provenance: dict[str, Any] | None = None,
    ):
        setup_process(torch_threads)
        from workers.scorer import ScoreConfig, Scorer

        path = local_model_dir(model)
        self.scorer = Scorer(path, ScoreConfig(**score_options))
        self.provenance = worker_provenance(path, provenance)
        self.faults = faults or {}
        self.units = 0

    def pid(self) -> int:
        return os.getpid()

    def score(self, task: ScoringTask, out_path: str, config_hash: str) -> dict[str, Any]:
        from workers.scorer import score_file

        self.units += 1
        self.inject_faults(out_path)
        sidecar = score_file(
            self.scorer,
            task.in_path,
            task.layer,
            out_path,
            config_hash=config_hash,
            extra={"provenance": self.provenance},
        )
        return {"rows": sidecar["rows"], "tokens": sidecar["rows"]}

    def inject_faults(self, out_path: str) -> None:
        marker = self.faults.get(FAULT_KILL_ENV)
        if marker and self.units == 2 and not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        fail = self.faults.get(FAULT_FAIL_ENV)
        if fail and fail in out_path:
            raise RuntimeError(f"injected failure for {out_path} ({FAULT_FAIL_ENV})")


GeneratorActor = ray.remote(GeneratorWorker)
ScorerActor = ray.remote(ScorerWorker)


@dataclass
class Outcome:
    unit: Unit
    attempts: int
    result: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def describe_error(err: BaseException) -> str:
    """One line: the exception raised inside the unit, or how its actor died."""
    if isinstance(err, RayTaskError):
        cause = err.cause if err.cause is not None else err
        return f"{type(cause).__name__}: {last_line(cause)}"
    if isinstance(err, RayActorError):
        return f"actor died: {last_line(err)}"
    return f"{type(err).__name__}: {last_line(err)}"


def dispatch(
    units: list[Unit],
    *,
    spawn: Callable[[], Any],
    call: Callable[[Any, Unit], Any],
    actors: int,
    retries: int,
    progress: StageProgress,
    start_timeout_s: float | None = None,
    unit_timeout_s: float | None = None,
    release: Callable[[Any], None] | None = None,
    describe: Callable[[], str] = lambda: "an actor",
    on_done: Callable[[Unit, dict[str, Any]], None] | None = None,
) -> list[Outcome]:
    """Run `units` on up to `actors` actors made by `spawn`; `call(actor, unit)` -> ObjectRef.

    An actor gets units only once started (Ray's `__ray_ready__` answered). One that does not
    start within `start_timeout_s` (unschedulable: the cluster lacks what it asks for; or a
    load that hangs) raises ActorStartError with `describe()` in the message. A unit still running after
    `unit_timeout_s` counts as a failed attempt: its actor is killed and replaced. `release(a)`
    is called for every actor that goes (e.g. to free its placement group); `on_done(unit,
    result)` is told of each success as it happens. Returns one Outcome per unit (in completion
    order). The actors are shut down (`close`) and killed at the end.
    """
    pool = _Pool(
        spawn, call, retries, progress, start_timeout_s, unit_timeout_s, release, describe, on_done
    )
    return pool.run(units, actors)


class _Pool:
    """dispatch's state: actors starting, idle or busy, and the units queued or running."""

    def __init__(self, spawn, call, retries, progress, start_timeout_s, unit_timeout_s, release,
                 describe, on_done):  # fmt: skip
        self.spawn, self.call, self.retries, self.progress = spawn, call, retries, progress
        self.start_timeout_s, self.unit_timeout_s = start_timeout_s, unit_timeout_s
        self.release, self.describe, self.on_done = release, describe, on_done
        self.queue: deque[tuple[Unit, int]] = deque()
        self.starting: dict[Any, tuple[Any, float]] = {}  # ready ref -> (actor, spawned at)
        self.pending: dict[Any, tuple[Any, Unit, int, float]] = {}  # ref -> (actor, unit, try, t0)
        self.live: list[Any] = []
        self.idle: list[Any] = []
        self.outcomes: list[Outcome] = []

    def run(self, units: list[Unit], actors: int) -> list[Outcome]:
        self.queue.extend((unit, 1) for unit in units)
        for _ in range(min(actors, len(units))):
            self.start()
        try:
            while self.queue or self.pending:
                while self.queue and self.idle:
                    actor, (unit, attempt) = self.idle.pop(), self.queue.popleft()
                    ref = self.call(actor, unit)
                    self.pending[ref] = (actor, unit, attempt, time.monotonic())
                ready, _ = ray.wait(
                    [*self.starting, *self.pending], num_returns=1, timeout=self.next_deadline()
                )
                if not ready:
                    self.expire()
                elif ready[0] in self.starting:
                    self.started(ready[0])
                else:
                    self.finished(ready[0])
        finally:
            close_all([a for a in self.live if a in self.idle])
            for actor in list(self.live):
                self.drop(actor)
        return self.outcomes

    def start(self) -> None:
        actor = self.spawn()
        self.live.append(actor)
        self.starting[actor.__ray_ready__.remote()] = (actor, time.monotonic())

    def started(self, ref: Any) -> None:
        actor, _ = self.starting.pop(ref)
        try:
            ray.get(ref)
        except RayActorError as err:
            raise ActorStartError(f"{self.describe()} failed to start: {last_line(err)}") from None
        self.idle.append(actor)

    def finished(self, ref: Any) -> None:
        actor, unit, attempt, _ = self.pending.pop(ref)
        try:
            result = ray.get(ref)
        except RayActorError as err:
            if err.actor_init_failed:
                raise ActorStartError(last_line(err)) from None
            # The process is gone (killed, OOM, node lost): a fresh actor takes its place.
            self.replace(actor)
            self.failed(unit, attempt, describe_error(err))
        except RayTaskError as err:
            self.idle.append(actor)
            self.failed(unit, attempt, describe_error(err))
        else:
            self.outcomes.append(Outcome(unit, attempt, result=result))
            self.progress.computed_one(int(result.get("tokens", 0)))
            if self.on_done is not None:
                self.on_done(unit, result)
            self.idle.append(actor)

    def failed(self, unit: Unit, attempt: int, error: str) -> None:
        if attempt <= self.retries:
            self.progress.retried_one()
            self.queue.append((unit, attempt + 1))
        else:
            self.outcomes.append(Outcome(unit, attempt, error=error))
            self.progress.failed_one()

    def next_deadline(self) -> float | None:
        """Seconds until the next start or unit deadline (None: wait as long as it takes)."""
        due = [
            t0 + self.start_timeout_s for _, t0 in self.starting.values() if self.start_timeout_s
        ]
        due += [t0 + self.unit_timeout_s for *_, t0 in self.pending.values() if self.unit_timeout_s]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def expire(self) -> None:
        """An actor not started by its deadline ends the stage; a unit past its deadline is a
        failed attempt, and its actor (perhaps hung in its engine) is replaced."""
        now = time.monotonic()
        if any(now - t0 >= self.start_timeout_s for _, t0 in self.starting.values()):
            raise ActorStartError(
                f"{self.describe()} did not start within {self.start_timeout_s:g} s"
                f" (cluster.actor_start_timeout_s); the cluster has {cluster_resources()}"
            )
        for ref, (actor, unit, attempt, t0) in list(self.pending.items()):
            if now - t0 >= self.unit_timeout_s:
                del self.pending[ref]
                self.replace(actor)
                self.failed(
                    unit,
                    attempt,
                    f"timed out after {self.unit_timeout_s:g} s (cluster.unit_timeout_s)",
                )

    def replace(self, actor: Any) -> None:
        self.drop(actor)
        self.start()

    def drop(self, actor: Any) -> None:
        ray.kill(actor, no_restart=True)
        self.live.remove(actor)
        if self.release is not None:
            self.release(actor)


def cluster_resources() -> str:
    """The cluster's total resources, short: {'CPU': 2.0, 'GPU': 0, ...} without Ray internals."""
    total = ray.cluster_resources()
    keep = {
        k: v
        for k, v in sorted(total.items())
        if not k.startswith(("node:", "memory", "object_store"))
    }
    keep.setdefault("GPU", 0)
    return str(keep)


def close_all(actors: list[Any], timeout_s: float = 60.0) -> None:
    """Ask actors that hold an engine to shut it down before they are killed, so its worker
    processes and device memory are gone before the next actors take the devices."""
    refs = [a.close.remote() for a in actors if hasattr(a, "close")]
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
