"""Which actors to start and which idle ones to close: the dispatch rule, as a pure function.

Contract: `decide(pools, free, waiting)` takes a `PoolState` per pool (counts, the resources
one actor needs, its cap, its remaining estimated work) and the cluster's free resources, and
returns a `Decision`: the pools whose idle actors close, the pools that start an actor (one
entry per actor, in order) and whether some pool waits for resources. No Ray, no clock, no
I/O: the executor (orchestrator/executor.py) calls it with its live pools and the free
resources Ray reports, the schedule simulation (orchestrator/schedule.py) with a virtual
cluster and clock, so the run and its forecast follow one rule.

The rule. Pools are served in `order`: the group (a model: its generators and its scorers) with
the most remaining estimated work first, so the dominant model's scorers take the cluster early
and the sweep's tail is short; within a group by priority (generators before scorers, whose
work comes from them); ties in the given priority order. A pool starts an actor when it has
more queued units than idle and starting actors, the cluster has the actor's `need` free, and
it has fewer live actors than its cap, or, without a cap, its queued work shared among one more
actor is at least a model load (MODEL_LOAD_S) each: it grows to what the cluster has free
without paying more loads than its units are worth. A pool that cannot start one holds back
the pools after it: no overtaking, so an actor that needs many GPUs is not starved by smaller
ones. While no actor is alive the first pool with work starts one regardless (an actor no node
can hold then fails the run by its start deadline, not by waiting forever). An idle actor whose
pool has nothing queued is closed when its pool is sealed or when another pool waited for
resources at the last decision.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

# One actor start: placement, the weights read from shared storage into GPU memory, an engine's
# warm-up (vLLM profiles memory and captures its graphs). A few minutes for the paper models; in
# the units of `PoolState.unit_cost`.
MODEL_LOAD_S = 300.0


@dataclass(frozen=True)
class PoolState:
    """What the rule reads of one pool."""

    priority: tuple[int, ...]  # (model index, stage) in the pipeline; its first entry: the group
    queued: int
    idle: int = 0
    starting: int = 0
    running: int = 0  # units being run
    live: int = 0  # actors not yet killed, closing ones included
    closing: int = 0
    cap: int | None = None  # most live actors (None: as many as the cluster holds)
    need: Mapping[str, float] = field(default_factory=dict)  # resources of one actor
    unit_cost: float = 1.0  # estimated seconds of one unit on one actor
    expected: int = 0  # units still to come (e.g. scoring units of cells still generating)
    sealed: bool = False

    @property
    def work(self) -> float:
        """Remaining estimated actor-seconds: units queued, running and still to come."""
        return self.unit_cost * (self.queued + self.running + self.expected)

    def wants(self, extra: int = 0, load_s: float = MODEL_LOAD_S) -> bool:
        """One more actor (after `extra` started in this decision) would find a unit waiting,
        and, without a cap, the queued work shared among one more actor pays for its load."""
        if self.queued <= self.idle + self.starting + extra:
            return False
        actors = self.live - self.closing + extra
        if self.cap is not None:
            return actors < self.cap
        return actors == 0 or self.unit_cost * self.queued >= load_s * (actors + 1)


@dataclass
class Decision:
    close: list[int]  # pools whose idle actors are all closed
    start: list[int]  # one pool index per actor to start, in start order
    waiting: bool  # a pool wanted an actor the cluster could not hold


def order(pools: list[PoolState]) -> list[int]:
    """Pool indices in serving order: the group with the most remaining work first."""
    group_work: dict[tuple[int, ...], float] = {}
    for p in pools:
        group_work[p.priority[:1]] = group_work.get(p.priority[:1], 0.0) + p.work
    return sorted(
        range(len(pools)), key=lambda i: (-group_work[pools[i].priority[:1]], pools[i].priority, i)
    )


def decide(
    pools: list[PoolState],
    free: Callable[[], Mapping[str, float]],
    waiting: bool = False,
) -> Decision:
    """The actors to close and to start now (see the module docstring). `free` is called at
    most once, only when some pool wants an actor while one is alive (it may cost a Ray
    call); `waiting` is the previous decision's."""
    close = [i for i, p in enumerate(pools) if p.idle and not p.queued and (p.sealed or waiting)]
    start: list[int] = []
    alive = any(p.live for p in pools)
    left: dict[str, float] | None = None
    taken: dict[str, float] = {}  # by the starts decided before `left` was asked for
    for i in order(pools):
        pool, extra = pools[i], 0
        while pool.wants(extra):
            need = {k: v for k, v in pool.need.items() if v > 0}
            if alive and need:
                if left is None:
                    left = {k: v - taken.get(k, 0.0) for k, v in free().items()}
                if any(left.get(k, 0.0) < v for k, v in need.items()):
                    return Decision(close, start, waiting=True)
            for k, v in need.items():
                if left is None:
                    taken[k] = taken.get(k, 0.0) + v
                else:
                    left[k] = left.get(k, 0.0) - v
            start.append(i)
            alive, extra = True, extra + 1
    return Decision(close, start, waiting=False)


def free_resources(
    total: Mapping[str, float],
    available: Mapping[str, float],
    ours: Mapping[str, float],
    max_gpus: float | None = None,
) -> dict[str, float]:
    """What our next actor may take: the available resources, capped by the total less what
    our live actors hold (Ray counts a new actor only once it is placed), and the GPUs by
    `max_gpus` less ours (a budget for the whole run; None: none)."""
    free = {k: min(available.get(k, 0.0), total[k] - ours.get(k, 0.0)) for k in total}
    if max_gpus is not None:
        free["GPU"] = min(free.get("GPU", 0.0), max_gpus - ours.get("GPU", 0.0))
    return free
