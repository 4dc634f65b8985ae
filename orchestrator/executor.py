"""Work units on pools of Ray actors, several pools at once, from one loop on the driver.

Contract: a `Pool` is the actors of one kind for one (stage, model): `spawn()` makes an actor,
`call(actor, unit)` returns the ObjectRef of the unit's result, a small dict of counts (a unit
reads and writes files; no table passes through Ray's object store). `Executor.run()` drives
every pool it holds from one `ray.wait` loop until each is sealed (`seal()`: no more units will
come) and drained; `on_outcome` callbacks may queue units, add pools and seal them meanwhile,
and `stop()` drops every queued unit (a callback keeps its error for after `run()`, it does not
raise it). The executor knows Ray actors and nothing of what a unit computes or which stage
it belongs to (orchestrator/stage.py makes a stage's pools).

Per unit: one that raises is retried `retries` times, on any actor of its pool; an actor that
dies (process killed, node lost) or whose unit runs past `unit_timeout_s` is killed (released)
and the unit counted as a failed attempt; a unit out of attempts becomes a failed `Outcome`
while the others go on. Per actor: it gets units once started (`__ray_ready__` answered); one
whose __init__ raises, or that does not start within `start_timeout_s` (the cluster lacks what
it asks for, or a load hangs), stops the run with `ActorStartError`: every unit would fail. One
that dies while starting without raising (its node lost) is replaced, up to `retries` times
in a row (the actors asked for before such a loss, lost with it, e.g. on the same node, count
once).

Which pool gets the cluster: orchestrator/policy.py decides (a pure function, the one the
dry run's schedule simulation runs too): the model with the most remaining estimated work
first (`unit_cost` x units queued, running and `expected`), its generators before its
scorers; a pool grows up to `actors` actors (None: as many as the cluster has room for and its
queued work pays a model load for) while it has more queued units than idle and starting
actors and the cluster has the actor's `need` free: `ray.available_resources()`, capped by the cluster's total less what our own live actors
need (Ray counts a new actor's resources only once it is placed) and the GPUs by `max_gpus`. A
pool that cannot start one holds back the pools after it: no overtaking, so an actor that needs
many GPUs is not starved by smaller ones. While no actor of ours is alive, the first pool with
work starts one regardless, so an actor no node can hold still ends the run after
`start_timeout_s` with its one-line error. An idle actor whose pool has nothing queued is
closed at once when its pool is sealed or when another pool waits for resources: it is asked
to shut its engine down (`close()`, at most `close_timeout_s`), then killed and passed to
`release` (e.g. to remove its placement group); a drained, sealed pool's `on_close` runs then.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from orchestrator.errors import ActorStartError, last_line
from orchestrator.plan import Unit
from orchestrator.policy import Decision, PoolState, decide, free_resources
from orchestrator.progress import StageProgress

# How soon a pool waiting for resources looks again: Ray frees a killed actor's resources a
# moment after the kill, and other jobs on the cluster come and go without telling us.
POLL_S = 0.5


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
    if isinstance(err, RayError):  # e.g. OutOfMemoryError: its first line says what happened
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
    return f"{type(err).__name__}: {last_line(err)}"


@dataclass(eq=False)
class Pool:
    """The actors of one kind and the units queued for them (see the module docstring)."""

    spawn: Callable[[], Any]
    call: Callable[[Any, Unit], Any]
    actors: int | None  # most live actors; None: as many as the cluster has room for
    retries: int
    progress: StageProgress
    priority: tuple[int, ...] = ()
    need: dict[str, float] | None = None  # resources of one actor; None: never checked
    start_timeout_s: float | None = None
    unit_timeout_s: float | None = None
    release: Callable[[Any], None] | None = None
    on_close: Callable[[], None] | None = None
    describe: Callable[[], str] = lambda: "an actor"
    on_outcome: Callable[[Outcome], None] | None = None
    unit_cost: float = 1.0  # estimated seconds of one unit: orders pools by remaining work
    expected: int = 0  # units still to come (not queued yet), counted as remaining work
    queue: deque[tuple[Unit, int]] = field(default_factory=deque, init=False)  # (unit, try)
    live: list[Any] = field(default_factory=list, init=False)  # every actor not yet killed
    idle: list[Any] = field(default_factory=list, init=False)
    outcomes: list[Outcome] = field(default_factory=list, init=False)
    sealed: bool = field(default=False, init=False)
    closed: bool = field(default=False, init=False)
    starting: int = field(default=0, init=False)  # actors not yet ready
    running: int = field(default=0, init=False)  # units being run
    closing: int = field(default=0, init=False)  # actors asked to close, not yet killed
    lost_starts: int = field(default=0, init=False)  # actors lost while starting, in a row

    def add(self, units: Iterable[Unit]) -> None:
        if self.sealed:
            raise RuntimeError("units added to a sealed pool")
        before = len(self.queue)
        self.queue.extend((unit, 1) for unit in units)
        self.expected = max(0, self.expected - (len(self.queue) - before))

    def seal(self) -> None:
        """No more units will come: the pool closes its actors once they are idle."""
        self.sealed, self.expected = True, 0

    def state(self) -> PoolState:
        """What the dispatch rule (orchestrator/policy.py) reads of this pool."""
        return PoolState(
            self.priority,
            queued=len(self.queue),
            idle=len(self.idle),
            starting=self.starting,
            running=self.running,
            live=len(self.live),
            closing=self.closing,
            cap=self.actors,
            need=self.need or {},
            unit_cost=self.unit_cost,
            expected=self.expected,
            sealed=self.sealed,
        )


class Executor:
    """Runs the units of all its pools (see the module docstring for the rules)."""

    def __init__(self, close_timeout_s: float = 60.0, max_gpus: float | None = None):
        self.pools: list[Pool] = []
        self.close_timeout_s = close_timeout_s
        self.max_gpus = max_gpus  # GPUs our live actors may hold together; None: the cluster's
        self.starting: dict[Any, tuple[Pool, Any, float]] = {}  # ready ref -> pool, actor, t0
        # ready ref -> its pool's lost_starts when it was asked for: actors lost together (with
        # their node) were asked for in one wave, and a wave counts once against `retries`
        self.waves: dict[Any, int] = {}
        self.pending: dict[Any, tuple[Pool, Any, Unit, int, float]] = {}  # +unit, try
        self.closing: dict[Any, tuple[Pool, Any, float]] = {}  # close() ref -> pool, actor, t0
        self.waiting = False  # some pool wanted an actor the cluster could not hold

    def add(self, pool: Pool) -> Pool:
        self.pools.append(pool)
        self.pools.sort(key=lambda p: p.priority)  # stable: equal priorities keep their order
        return pool

    def stop(self) -> None:
        """No more units: the queued ones are dropped and every pool sealed; the running ones
        finish (their outcomes still land). For a caller that met an error it raises later."""
        for pool in self.pools:
            pool.queue.clear()
            pool.seal()

    def run(self) -> None:
        """Until every pool is drained; the actors are closed whatever happens."""
        try:
            while True:
                self.assign()
                self.apply(
                    decide([p.state() for p in self.pools], self.free_resources, self.waiting)
                )
                refs = [*self.starting, *self.pending, *self.closing]
                if not refs:
                    if not self.waiting:
                        break  # nothing runs: no callback can queue more work
                    time.sleep(POLL_S)  # only idle actors hold the cluster: shrink closes them
                    continue
                timeout = self.next_deadline()
                if self.waiting:
                    timeout = POLL_S if timeout is None else min(timeout, POLL_S)
                ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
                if not ready:
                    self.expire()
                elif ready[0] in self.starting:
                    self.started(ready[0])
                elif ready[0] in self.pending:
                    self.finished(ready[0])
                else:
                    self.closed_one(ready[0])
        finally:
            self.shutdown()

    # ----------------------------------------------------------------------- scheduling

    def assign(self) -> None:
        for pool in self.pools:
            while pool.queue and pool.idle:
                actor, (unit, attempt) = pool.idle.pop(), pool.queue.popleft()
                ref = pool.call(actor, unit)
                self.pending[ref] = (pool, actor, unit, attempt, time.monotonic())
                pool.running += 1

    def apply(self, decision: Decision) -> None:
        """Close the idle actors and start the actors the dispatch rule decided on."""
        for i in decision.close:
            pool = self.pools[i]
            for actor in pool.idle:
                self.close(pool, actor)
            pool.idle.clear()
        for pool in self.pools:
            if pool.sealed and not pool.queue and not pool.live and not pool.closed:
                pool.closed = True
                if pool.on_close is not None:
                    pool.on_close()
        for i in decision.start:
            self.start(self.pools[i])
        self.waiting = decision.waiting

    def free_resources(self) -> dict[str, float]:
        ours: Counter[str] = Counter()
        for pool in self.pools:
            for key, value in (pool.need or {}).items():
                ours[key] += value * len(pool.live)
        total, available = ray.cluster_resources(), ray.available_resources()
        return free_resources(total, available, ours, self.max_gpus)

    # ----------------------------------------------------------------------- events

    def start(self, pool: Pool) -> None:
        actor = pool.spawn()
        pool.live.append(actor)
        ref = actor.__ray_ready__.remote()
        self.starting[ref] = (pool, actor, time.monotonic())
        self.waves[ref] = pool.lost_starts
        pool.starting += 1

    def started(self, ref: Any) -> None:
        pool, actor, _ = self.starting.pop(ref)
        wave = self.waves.pop(ref, pool.lost_starts)
        pool.starting -= 1
        try:
            ray.get(ref)
        except RayActorError as err:
            same_wave = wave < pool.lost_starts  # asked for before a loss already counted
            if not err.actor_init_failed and (same_wave or pool.lost_starts <= pool.retries):
                # Its process or node went while it loaded (__init__ did not raise): another
                # actor takes its place, as for a unit's actor that dies. The first loss of a
                # wave counts; the others asked for with it went the same way.
                pool.lost_starts += not same_wave
                self.drop(pool, actor)
                return
            raise ActorStartError(f"{pool.describe()} failed to start: {last_line(err)}") from None
        except RayError as err:  # e.g. the node ran out of memory and killed it while loading
            raise ActorStartError(
                f"{pool.describe()} failed to start: {describe_error(err)}"
            ) from None
        pool.lost_starts = 0
        pool.idle.append(actor)

    def finished(self, ref: Any) -> None:
        pool, actor, unit, attempt, _ = self.pending.pop(ref)
        pool.running -= 1
        try:
            result = ray.get(ref)
        except RayActorError as err:
            if err.actor_init_failed:
                raise ActorStartError(last_line(err)) from None
            # The process is gone (killed, OOM, node lost): a fresh actor takes its place.
            self.drop(pool, actor)
            self.failed(pool, unit, attempt, describe_error(err))
        except RayTaskError as err:
            pool.idle.append(actor)
            self.failed(pool, unit, attempt, describe_error(err))
        except RayError as err:  # e.g. OutOfMemoryError: the node killed the worker mid-unit
            self.drop(pool, actor)
            self.failed(pool, unit, attempt, describe_error(err))
        else:
            pool.progress.computed_one(int(result.get("tokens", 0)))
            pool.idle.append(actor)
            self.settle(pool, Outcome(unit, attempt, result=result))

    def failed(self, pool: Pool, unit: Unit, attempt: int, error: str) -> None:
        if attempt <= pool.retries:
            pool.progress.retried_one()
            pool.queue.append((unit, attempt + 1))
        else:
            pool.progress.failed_one()
            self.settle(pool, Outcome(unit, attempt, error=error))

    def settle(self, pool: Pool, outcome: Outcome) -> None:
        pool.outcomes.append(outcome)
        if pool.on_outcome is not None:
            pool.on_outcome(outcome)

    def next_deadline(self) -> float | None:
        """Seconds until the next start, unit or close deadline (None: none)."""
        due = [t0 + p.start_timeout_s for p, _, t0 in self.starting.values() if p.start_timeout_s]
        due += [t0 + p.unit_timeout_s for p, *_, t0 in self.pending.values() if p.unit_timeout_s]
        due += [t0 + self.close_timeout_s for *_, t0 in self.closing.values()]
        return max(0.0, min(due) - time.monotonic()) if due else None

    def expire(self) -> None:
        """An actor not started by its deadline ends the run; a unit past its deadline is a
        failed attempt, and its actor (perhaps hung in its engine) is killed; an actor slow
        to close is killed."""
        now = time.monotonic()
        for pool, _, t0 in self.starting.values():
            if pool.start_timeout_s and now - t0 >= pool.start_timeout_s:
                raise ActorStartError(
                    f"{pool.describe()} did not start within {pool.start_timeout_s:g} s"
                    f" (cluster.actor_start_timeout_s); the cluster has {cluster_resources()}"
                )
        for ref, (pool, actor, unit, attempt, t0) in list(self.pending.items()):
            if pool.unit_timeout_s and now - t0 >= pool.unit_timeout_s:
                del self.pending[ref]
                pool.running -= 1
                self.drop(pool, actor)
                self.failed(
                    pool,
                    unit,
                    attempt,
                    f"timed out after {pool.unit_timeout_s:g} s (cluster.unit_timeout_s)",
                )
        for ref, (*_, t0) in list(self.closing.items()):
            if now - t0 >= self.close_timeout_s:
                self.closed_one(ref)

    # ----------------------------------------------------------------------- actors going

    def close(self, pool: Pool, actor: Any) -> None:
        """Ask the actor to shut its engine down; it is killed once it has (or at the deadline)."""
        if hasattr(actor, "close"):
            self.closing[actor.close.remote()] = (pool, actor, time.monotonic())
            pool.closing += 1
        else:
            self.drop(pool, actor)

    def closed_one(self, ref: Any) -> None:
        pool, actor, _ = self.closing.pop(ref)
        pool.closing -= 1
        self.drop(pool, actor)

    def drop(self, pool: Pool, actor: Any) -> None:
        ray.kill(actor, no_restart=True)
        pool.live.remove(actor)
        if pool.release is not None:
            pool.release(actor)

    def shutdown(self) -> None:
        """Every actor closed (idle ones asked first) and killed; every pool's on_close run."""
        idle = [(pool, actor) for pool in self.pools for actor in pool.idle]
        refs = [actor.close.remote() for _, actor in idle if hasattr(actor, "close")]
        refs += list(self.closing)
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=self.close_timeout_s)
        self.starting.clear()
        self.waves.clear()
        self.pending.clear()
        self.closing.clear()
        for pool in self.pools:
            pool.idle.clear()
            pool.starting = pool.running = pool.closing = 0
            for actor in list(pool.live):
                self.drop(pool, actor)
            if not pool.closed:
                pool.closed = True
                if pool.on_close is not None:
                    pool.on_close()


def dispatch(
    units: list[Unit],
    *,
    spawn: Callable[[], Any],
    call: Callable[[Any, Unit], Any],
    actors: int | None,
    retries: int,
    progress: StageProgress,
    start_timeout_s: float | None = None,
    unit_timeout_s: float | None = None,
    release: Callable[[Any], None] | None = None,
    describe: Callable[[], str] = lambda: "an actor",
    on_done: Callable[[Unit, dict[str, Any]], None] | None = None,
) -> list[Outcome]:
    """`units` on one pool of up to `actors` actors, alone on the executor; one Outcome per
    unit, in completion order. `on_done(unit, result)` is told of each success as it lands."""
    pool = Pool(
        spawn,
        call,
        actors,
        retries,
        progress,
        start_timeout_s=start_timeout_s,
        unit_timeout_s=unit_timeout_s,
        release=release,
        describe=describe,
        on_outcome=(lambda o: on_done(o.unit, o.result) if o.ok else None) if on_done else None,
    )
    pool.add(units)
    pool.seal()
    executor = Executor()
    executor.add(pool)
    executor.run()
    return pool.outcomes


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
