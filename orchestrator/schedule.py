"""The dry run's forecast of a sweep on N GPUs: the executor's dispatch rule on a virtual clock.

Contract: pure functions of the typed config and workers/assets/rates.csv (no Ray, no model).
`unit_seconds(cfg, model, positions)` gives one generation unit's and one scoring unit's
duration per layer position from the estimate's rates (the plan's upper bounds: every
completion reaches model.max_tokens, every trajectory is verified); `sweep_work` lays the plan
out as cells of units; `simulate` runs them through orchestrator.policy.decide, the function
the executor calls, with a model load of `load_s` per actor start, and returns a `Schedule`
(makespan, busy GPU-seconds per pool, the timeline of GPUs held per pool);
`describe_schedule` is the dry run's text and writes the timeline figure.

What the simulation leaves out: the driver's own time (sharding a cell, checking files),
failures and retries, nodes (a cluster is its GPU count: an actor fits wherever GPUs are free),
CPUs (sized per GPU on GPU nodes), and time to close an actor (its GPUs free at once).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.config import ModelConfig, RunConfig, actor_cap
from orchestrator.estimate import generation_rate, scoring_rate
from orchestrator.policy import MODEL_LOAD_S, PoolState, decide, free_resources
from workers.rates import read_rates


@dataclass(frozen=True)
class Cell:
    """One (model, dataset): its generation units, then the scoring units they unlock."""

    model: str
    generation: list[float]  # seconds of each generation unit on one actor
    scoring: list[float]  # seconds of each scoring unit on one actor, every layer


@dataclass(frozen=True)
class ModelWork:
    """The pools of one model: what an actor needs, its cap, and the model's cells."""

    name: str
    generator_gpus: int
    scorer_gpus: int
    generator_cap: int | None
    scorer_cap: int | None
    cells: list[Cell]
    # the executor's estimate of one unit (unit_costs), which orders the pools; None: the mean
    generation_cost: float | None = None
    scoring_cost: float | None = None


@dataclass(eq=False)
class SimPool:
    """A pool's counters, as the executor keeps them, and what it did."""

    name: str
    priority: tuple[int, ...]
    gpus: int  # per actor
    cap: int | None
    unit_cost: float
    expected: int = 0
    queue: deque[tuple[float, int]] = field(default_factory=deque)  # (seconds, cell)
    sealed: bool = False
    idle: int = 0
    starting: int = 0
    running: int = 0
    live: int = 0
    busy_s: float = 0.0  # GPU-seconds running units
    held_s: float = 0.0  # GPU-seconds held by its actors (loading, running or idle)
    starts: int = 0

    def state(self) -> PoolState:
        return PoolState(
            self.priority,
            queued=len(self.queue),
            idle=self.idle,
            starting=self.starting,
            running=self.running,
            live=self.live,
            cap=self.cap,
            need={"GPU": self.gpus},
            unit_cost=self.unit_cost,
            expected=self.expected,
            sealed=self.sealed,
        )

    def add(self, units: Iterable[tuple[float, int]]) -> None:
        before = len(self.queue)
        self.queue.extend(units)
        self.expected = max(0, self.expected - (len(self.queue) - before))


@dataclass
class Schedule:
    gpus: int
    makespan_s: float
    pools: list[SimPool]
    timeline: list[tuple[float, list[int]]]  # (time, GPUs held per pool) from that time on

    @property
    def busy_s(self) -> float:
        return sum(p.busy_s for p in self.pools)

    @property
    def utilization(self) -> float:
        """Busy GPU-seconds over the GPUs x makespan that a reserved cluster pays for."""
        return self.busy_s / (self.gpus * self.makespan_s) if self.makespan_s else 0.0


def simulate(
    models: list[ModelWork],
    gpus: int,
    *,
    max_gpus: int | None = None,
    load_s: float = MODEL_LOAD_S,
) -> Schedule:
    """The sweep on `gpus` GPUs: per model a generator pool (priority (i, 0)) holding every
    generation unit, sealed, and a scorer pool ((i, 1)) that gets a cell's scoring units
    when the cell's last generation unit is done, sealed when all its cells are; the pools
    served by orchestrator.policy.decide as the executor serves them."""
    sim = _Simulation(models, gpus, max_gpus, load_s)
    while True:
        sim.dispatch()
        if not sim.advance():
            break
    stuck = [p.name for p in sim.pools if p.queue or p.running]
    if stuck:
        raise RuntimeError(f"the simulation stopped with work left in {stuck}")
    return Schedule(gpus, sim.now, sim.pools, sim.timeline)


class _Simulation:
    """The state of one simulated sweep: pools, cells, the event queue and the clock."""

    def __init__(self, models: list[ModelWork], gpus: int, max_gpus: int | None, load_s: float):
        self.gpus, self.max_gpus, self.load_s = gpus, max_gpus, load_s
        self.pools: list[SimPool] = []
        self.scorer_of: dict[int, SimPool] = {}
        self.cells: list[Cell] = []
        self.unresolved: dict[str, int] = {}
        self.left: list[int] = []  # generation units not done, per cell
        for i, m in enumerate(models):
            self._add_model(i, m)
        for k, cell in enumerate(self.cells):
            if not cell.generation:
                self.resolve(k)
        self.events: list[tuple[float, int, str, SimPool, float, int]] = []  # time, seq, ...
        self.seq, self.now, self.waiting = 0, 0.0, False
        self.timeline: list[tuple[float, list[int]]] = []

    def _add_model(self, i: int, m: ModelWork) -> None:
        gen = [s for c in m.cells for s in c.generation]
        score = [s for c in m.cells for s in c.scoring]
        gen_cost = mean(gen) if m.generation_cost is None else m.generation_cost
        score_cost = mean(score) if m.scoring_cost is None else m.scoring_cost
        g = SimPool(f"{m.name} generation", (i, 0), m.generator_gpus, m.generator_cap, gen_cost)
        s = SimPool(f"{m.name} scoring", (i, 1), m.scorer_gpus, m.scorer_cap, score_cost)
        s.expected = len(score)
        for cell in m.cells:
            self.scorer_of[len(self.cells)] = s
            g.add((sec, len(self.cells)) for sec in cell.generation)
            self.left.append(len(cell.generation))
            self.cells.append(cell)
        self.unresolved[m.name] = len(m.cells)
        g.sealed = True
        self.pools += [g, s]

    def resolve(self, k: int) -> None:
        """Cell k's generation is done: its scoring units join its model's scorer pool."""
        pool, model = self.scorer_of[k], self.cells[k].model
        pool.add((sec, k) for sec in self.cells[k].scoring)
        self.unresolved[model] -= 1
        if not self.unresolved[model]:
            pool.sealed, pool.expected = True, 0

    def _push(self, at: float, kind: str, pool: SimPool, sec: float, k: int) -> None:
        heapq.heappush(self.events, (at, self.seq, kind, pool, sec, k))
        self.seq += 1

    def dispatch(self) -> None:
        """Assign queued units to idle actors, then apply the rule, until neither has more to
        do at this instant; record the GPUs held when they change."""
        while True:
            for p in self.pools:
                while p.queue and p.idle:
                    sec, k = p.queue.popleft()
                    p.idle, p.running = p.idle - 1, p.running + 1
                    self._push(self.now + sec, "done", p, sec, k)
            held = sum(p.live * p.gpus for p in self.pools)
            ours, total = {"GPU": held}, {"GPU": float(self.gpus)}
            decision = decide(
                [p.state() for p in self.pools],
                lambda ours=ours, total=total: free_resources(
                    total, {"GPU": self.gpus - ours["GPU"]}, ours, self.max_gpus
                ),
                self.waiting,
            )
            self.waiting = decision.waiting
            for i in decision.close:
                self.pools[i].live -= self.pools[i].idle
                self.pools[i].idle = 0
            for i in decision.start:
                p = self.pools[i]
                p.live, p.starting, p.starts = p.live + 1, p.starting + 1, p.starts + 1
                self._push(self.now + self.load_s, "ready", p, 0.0, -1)
            if not decision.close and not decision.start:
                break
        state = [p.live * p.gpus for p in self.pools]
        if not self.timeline or self.timeline[-1][1] != state:
            self.timeline.append((self.now, state))

    def advance(self) -> bool:
        """Move the clock to the next event and apply every event of that instant; False when
        there is none left."""
        if not self.events:
            return False
        t = self.events[0][0]
        for p in self.pools:
            p.held_s += p.live * p.gpus * (t - self.now)
        self.now = t
        while self.events and self.events[0][0] == t:
            _, _, kind, p, sec, k = heapq.heappop(self.events)
            if kind == "ready":
                p.starting, p.idle = p.starting - 1, p.idle + 1
                continue
            p.running, p.idle = p.running - 1, p.idle + 1
            p.busy_s += sec * p.gpus
            if p.priority[1] == 0:
                self.left[k] -= 1
                if not self.left[k]:
                    self.resolve(k)
        return True


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 1.0


# ----------------------------------------------------------------------------- from the plan


def model_gpus(model: ModelConfig, cfg: RunConfig) -> tuple[int, int]:
    """GPUs of one generator (vLLM: its tensor-parallel size) and of one scorer."""
    backend = model.generation_backend or cfg.generation.backend
    return (model.tensor_parallel_size if backend == "vllm" else 1), model.gpus


def unit_seconds(
    cfg: RunConfig, model: ModelConfig, positions: Iterable[str], rates: list | None = None
) -> tuple[float, dict[str, float]]:
    """Seconds per generated token of one generator, and per scored token of one scorer at
    each layer position: the estimate's rates (rows of cluster.gpu_type first), scaled to J.
    A model without a scoring row is taken at its generation rate / (J + 1), a scorer
    decoding J + 1 routes per token; without any rate, 1 s per token."""
    rates = read_rates() if rates is None else rates
    gpu, J = cfg.cluster.gpu_type, cfg.scoring.alternatives
    found = generation_rate(rates, model.name, gpu)
    gen = 1.0 / found[0].tokens_per_s if found else 1.0
    score = {}
    for position in positions:
        lk = scoring_rate(rates, model.name, position, model.max_tokens, gpu)
        if lk is None:
            score[position] = gen * (J + 1)
            continue
        rate = lk.tokens_per_s
        if lk.alternatives and lk.alternatives != J:
            rate *= (lk.alternatives + 1) / (J + 1)
        score[position] = 1.0 / rate
    return gen, score


def unit_costs(cfg: RunConfig, model: ModelConfig, layers: dict[str, int]) -> tuple[float, float]:
    """The executor's estimate of one generation unit and of one scoring unit (the mean over
    `layers`, spec -> index) of `model`, in seconds on one actor: they order the pools."""
    positions = {index: spec for spec, index in reversed(layers.items())}.values()
    gen_s, score_s = unit_seconds(cfg, model, positions)
    gen = cfg.generation.problems_per_shard * cfg.generation.samples_per_problem * gen_s
    score = cfg.scoring.trajectories_per_shard * sum(score_s.values()) / len(score_s)
    return gen * model.max_tokens, score * model.max_tokens


def sweep_work(cfg: RunConfig, cells: list, rates: list | None = None) -> list[ModelWork]:
    """The plan's cells (plan.CellEstimate) as units with durations, per model in plan order."""
    rates = read_rates() if rates is None else rates
    out: dict[str, ModelWork] = {}
    per_unit, size = cfg.generation.problems_per_shard, cfg.scoring.trajectories_per_shard
    n = cfg.generation.samples_per_problem
    for c in cells:
        model = c.cell.model
        positions = {}  # one spec per distinct layer index: units are per index
        for spec, index in c.cell.layers.items():
            positions.setdefault(index, spec)
        gen_s, score_s = unit_seconds(cfg, model, positions.values(), rates)
        tokens = model.max_tokens
        generation = [
            min(per_unit, c.problems - k * per_unit) * n * tokens * gen_s
            for k in range(c.generation_units)
        ]
        shards = [min(size, c.completions - k * size) for k in range(c.max_scoring_units_per_layer)]
        scoring = [t * tokens * score_s[p] for p in positions.values() for t in shards]
        if model.name not in out:
            gen_gpus, score_gpus = model_gpus(model, cfg)
            gen_cost, score_cost = unit_costs(cfg, model, c.cell.layers)
            out[model.name] = ModelWork(
                model.name,
                gen_gpus,
                score_gpus,
                actor_cap(cfg.cluster.generators),
                actor_cap(cfg.cluster.scorers),
                [],
                gen_cost,
                score_cost,
            )
        out[model.name].cells.append(Cell(model.name, generation, scoring))
    return list(out.values())


def describe_schedule(cfg: RunConfig, cells: list, run_dir: Path) -> str:
    """The dry run's schedule section on cluster.num_gpus GPUs; writes the timeline figure
    to run_dir/schedule-<N>gpus.png. Empty when cluster.num_gpus is not set."""
    gpus = cfg.cluster.num_gpus
    if not gpus:
        return ""
    models = sweep_work(cfg, cells)
    need = max(max(m.generator_gpus, m.scorer_gpus) for m in models)
    room = min(gpus, cfg.cluster.max_gpus or gpus)
    if need > room:
        return f"\nschedule: an actor needs {need} GPUs, more than the {room} the run may hold"
    sched = simulate(models, gpus, max_gpus=cfg.cluster.max_gpus)
    hours = sched.makespan_s / 3600
    busy = sched.busy_s / 3600
    lines = [
        "",
        f"schedule on {gpus} GPUs, simulated (the executor's dispatch rule on the unit times"
        f" above, {MODEL_LOAD_S / 60:g} min model load per actor start;"
        f" cluster.generators={cfg.cluster.generators} scorers={cfg.cluster.scorers}"
        f" max_gpus={cfg.cluster.max_gpus or 'all'})",
        f"  makespan {hours:,.1f} h; GPU utilization {sched.utilization:.1%}"
        f" ({busy:,.1f} busy of {gpus * hours:,.1f} GPU-hours reserved);"
        f" ideal (busy / GPUs) {busy / gpus:,.1f} h",
        f"  {'pool':<28} {'busy GPU-h':>11} {'held GPU-h':>11} {'starts':>7} {'longest unit':>13}",
    ]
    longest = {}
    for m in models:
        longest[f"{m.name} generation"] = max((s for c in m.cells for s in c.generation), default=0)
        longest[f"{m.name} scoring"] = max((s for c in m.cells for s in c.scoring), default=0)
    for p in sched.pools:
        lines.append(
            f"  {p.name:<28} {p.busy_s / 3600:>11,.1f} {p.held_s / 3600:>11,.1f} {p.starts:>7,}"
            f" {longest[p.name] / 3600:>11,.2f} h"
        )
    path = run_dir / f"schedule-{gpus}gpus.png"
    plot_schedule(sched, path)
    lines.append(f"  timeline (GPUs held per pool): {path}")
    return "\n".join(lines)


def plot_schedule(sched: Schedule, path: Path) -> None:
    """A stacked step plot of the GPUs each pool holds over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = [t / 3600 for t, _ in sched.timeline] + [sched.makespan_s / 3600]
    series = [[state[i] for _, state in sched.timeline] for i in range(len(sched.pools))]
    series = [s + s[-1:] for s in series]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.stackplot(times, series, labels=[p.name for p in sched.pools], step="post")
    ax.axhline(sched.gpus, color="black", linewidth=0.8)
    ax.set_xlabel("hours")
    ax.set_ylabel("GPUs held")
    ax.set_title(
        f"{sched.gpus} GPUs: makespan {sched.makespan_s / 3600:,.1f} h,"
        f" utilization {sched.utilization:.0%}"
    )
    ax.legend(loc="upper right", fontsize=7, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
