"""`python -m orchestrator.bench_dispatch [--units 100000 1000000] [--actors 1000]`: the
driver's cost of planning and dispatching a large sweep, without Ray or a model.

Planning: the scoring units of the paper's four models (3 layers, one data set each, shards of
`scoring.trajectories_per_shard`) built by orchestrator.stages.scoring.scoring_units (a config hash per
unit) and recorded in plan.json. Dispatch: executor Pools holding those units, served by
orchestrator.policy.decide on a virtual clock with `--actors` one-GPU actors: each completion
frees an actor, which takes the next unit, and the rule decides after every event, as the
executor's loop does. Ray's own cost per call (a `.remote()`, a `ray.wait`) is not included.
Prints CPU time per unit and the process's peak memory after each step.
"""

from __future__ import annotations

import argparse
import heapq
import resource
import tempfile
import time
from pathlib import Path

from orchestrator import plan
from orchestrator.config import CONF_DIR, register_configs, to_run_config
from orchestrator.executor import Pool
from orchestrator.policy import decide
from orchestrator.progress import StageProgress
from orchestrator.stages.scoring import scoring_units

# Qwen3-30B-A3B, GPT-OSS-20B, DeepSeek-V2-Lite, OLMoE-1B-7B: shares of the scoring units, as
# the paper sweep's scoring GPU-hours go.
SHARE = [0.87, 0.10, 0.02, 0.01]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def plan_units(total: int, run_dir: Path) -> dict[str, list[plan.Unit]]:
    """`total` scoring units spread over the paper's four models as their work is."""
    from hydra import compose, initialize_config_dir

    register_configs()
    overrides = ["sweep=paper", "sweep.datasets=[math500]"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = to_run_config(compose("config", overrides=overrides), overrides)
    out = {}
    for cell, share in zip(plan.plan_cells(cfg), SHARE, strict=True):
        name = cell.model.name
        shards = max(1, round(total * share / len(set(cell.layers.values()))))
        inputs = [(run_dir / f"shards/{name}/{k:07d}.arrow", f"{k:064x}") for k in range(shards)]
        out[name] = scoring_units(run_dir, cell, cfg.scoring, inputs)
    return out


def dispatch(units: dict[str, list[plan.Unit]], actors: int) -> tuple[int, int]:
    """Every unit through the rule; returns (units dispatched, decisions made)."""
    pools = []
    for i, (name, us) in enumerate(units.items()):
        pool = Pool(None, None, None, 0, StageProgress(name, len(us)), priority=(i, 1))
        pool.need, pool.unit_cost = {"GPU": 1.0}, 1.0 + 10 * (len(units) - i)
        pool.add(us)
        pool.seal()
        pools.append(pool)
    held = 0
    events: list[tuple[float, int, int]] = []  # (time, seq, pool index)
    seq = dispatched = decisions = 0
    now, waiting = 0.0, False
    while True:
        for i, pool in enumerate(pools):
            while pool.queue and pool.idle:
                pool.idle.pop()
                pool.queue.popleft()
                pool.running += 1
                dispatched += 1
                heapq.heappush(events, (now + pool.unit_cost, seq, i))
                seq += 1
        decision = decide(
            [p.state() for p in pools], lambda held=held: {"GPU": actors - held}, waiting
        )
        decisions += 1
        waiting = decision.waiting
        for i in decision.close:
            held -= len(pools[i].idle)
            pools[i].live = pools[i].live[len(pools[i].idle) :]
            pools[i].idle.clear()
        for i in decision.start:
            actor = object()
            pools[i].live.append(actor)
            pools[i].idle.append(actor)  # ready at once: the load is not the driver's cost
            held += 1
        if decision.start or decision.close:
            continue
        if not events:
            return dispatched, decisions
        now, _, i = heapq.heappop(events)
        pools[i].running -= 1
        pools[i].idle.append(object())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--units", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--actors", type=int, default=1000)
    args = parser.parse_args()
    print(f"{'units':>10} {'step':<9} {'CPU s':>8} {'CPU us/unit':>12} {'peak RSS MB':>12}")
    for total in args.units:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp)
            t0 = time.process_time()
            units = plan_units(total, run_dir)
            plan.write_plan(run_dir, [u for us in units.values() for u in us])
            n = sum(map(len, units.values()))
            cpu = time.process_time() - t0
            print(f"{n:>10,} {'plan':<9} {cpu:>8.1f} {cpu / n * 1e6:>12.1f} {peak_mb():>12,.0f}")
            t0 = time.process_time()
            dispatched, decisions = dispatch(units, args.actors)
            cpu = time.process_time() - t0
            print(
                f"{dispatched:>10,} {'dispatch':<9} {cpu:>8.1f} {cpu / dispatched * 1e6:>12.1f}"
                f" {peak_mb():>12,.0f}  ({decisions:,} decisions, {args.actors:,} actors)"
            )
            del units


if __name__ == "__main__":
    main()
