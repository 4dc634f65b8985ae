"""`python -m orchestrator.status RUN_DIR [--watch [S]] [--json] [--checksum]`: how a run stands.

Contract: reads a run folder, never writes it, starts no Ray and loads no model; works while a
driver runs and after. A run on object storage (`s3://bucket/prefix/<run_id>`) is read from its
local mirror, brought to the store's state first (`local_run`; the store is not written).
Per stage and cell (model, dataset, and the layer for scoring) it counts units done / failed / pending / running, the tokens and GPU-hours their sidecars record
against the dry run's estimate (orchestrator/estimate.py, from the run's own config.yaml), the
throughput and an ETA, and the open failures of failures.jsonl with their first error line.

- The units: generation's are planned from the config and the problems files' verified
  sidecars (orchestrator/stages/generation.py), scoring's are plan.json's. A cell whose
  scoring is not planned yet counts its upper bound (every trajectory verified) as pending,
  marked `estimated`.
- Done: the unit's file verifies against its sidecar and the unit's hash (workers.io.verify;
  sha256 only with --checksum). A corrupt or stale file is pending, with a note.
- Running: a live lease (orchestrator/lock.py: heartbeat younger than its TTL, pid alive when
  on this host) means its driver has queued every unit of the plan that is not complete, so
  those units are `running` (in flight or queued); a failure recorded before that driver
  started is being retried and runs too. Without a live lease they are `pending`.
- GPU-hours: sidecar seconds x the GPUs an actor of that stage reserves (0 on a CPU run).
- Throughput: tokens / sidecar seconds (per actor). ETA: with a live driver, the units left at
  the pace of the stage's units finished since it started (counted from one mean unit before
  the first of them landed); otherwise the sidecar seconds per unit times
  the units left, divided by the stage's actor cap (cluster.generators / cluster.scorers).

Files are read without following links (workers.atomic.read_nofollow, workers.io), and their
text is printed with control characters escaped. `--json` prints `status_json`'s shape
(`"version": 1`). A folder that is not a run: one `error:` line, exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

JSON_VERSION = 1
STAMP = "%Y-%m-%dT%H:%M:%S%z"  # the time format of sidecars, leases and failures.jsonl


class StatusError(ValueError):
    """The folder cannot be read as a run; the message is one line."""


@dataclass
class Row:
    """One stage of one cell: its unit counts and what its complete units cost."""

    stage: str
    model: str
    dataset: str
    layer: int | None
    done: int = 0
    failed: int = 0
    pending: int = 0
    running: int = 0
    estimated: bool = False  # pending is the estimate's upper bound: units not planned yet
    tokens: int = 0
    seconds: float = 0.0
    gpus: int = 0  # per actor of this stage
    gpu_hours: float = 0.0
    estimate_tokens: int = 0
    estimate_gpu_hours: float | None = None  # None: no rate for it
    finished_at: list[float] = field(default_factory=list)  # not in the JSON
    notes: list[str] = field(default_factory=list)


def clean(text: Any) -> str:
    """Untrusted text as one printable line: control characters escaped, never emitted."""
    text = str(text)
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def parse_time(value: Any) -> float | None:
    try:
        return datetime.strptime(value, STAMP).timestamp()
    except (TypeError, ValueError):
        return None


def load_config(run_dir: Path) -> Any:
    """The run's RunConfig from its config.yaml (workers.runfiles), or StatusError."""
    from omegaconf import OmegaConf

    from orchestrator.config import RunConfig, check_names
    from workers.atomic import read_nofollow
    from workers.runfiles import CONFIG_FILE, read_run_config

    if not run_dir.is_dir():
        raise StatusError(f"{clean(run_dir)} is not a folder")
    path = run_dir / CONFIG_FILE
    if path.is_symlink() or read_nofollow(path) is None:
        raise StatusError(f"{clean(run_dir)} is not a run: no {CONFIG_FILE} (a regular file)")
    try:
        data = read_run_config(run_dir) or {}
    except ValueError as err:
        raise StatusError(clean(err)) from None
    known = {f.name for f in fields(RunConfig)}
    try:
        node = OmegaConf.merge(
            OmegaConf.structured(RunConfig), {k: v for k, v in data.items() if k in known}
        )
        cfg = OmegaConf.to_object(node)
        check_names(cfg)  # names become paths: none may leave the run folder
        return cfg
    except Exception as err:  # omegaconf's validation errors share no narrower base
        message = clean(str(err).strip().splitlines()[0] if str(err).strip() else err)
        raise StatusError(f"{clean(path)} does not fit this code's config: {message}") from None


def read_lease(run_dir: Path) -> dict[str, Any] | None:
    """The driver's lease as {host, pid, started, heartbeat_age_s, live}, or None."""
    from orchestrator.lock import LOCK_NAME, RunLock
    from workers.atomic import read_nofollow

    content = read_nofollow(run_dir / LOCK_NAME)
    try:
        holder = json.loads(content) if content is not None else None
    except ValueError:
        holder = None
    if not isinstance(holder, dict):
        return None
    heartbeat = holder.get("heartbeat")
    age = time.time() - heartbeat if isinstance(heartbeat, (int, float)) else None
    return {
        "host": clean(holder.get("host")),
        "pid": holder.get("pid") if isinstance(holder.get("pid"), int) else None,
        "started": clean(holder.get("started")),
        "heartbeat_age_s": round(age, 1) if age is not None and math.isfinite(age) else None,
        "live": not RunLock(run_dir).expired(holder),
    }


def generated_tokens(path: Path, sidecar: dict[str, Any]) -> int:
    """Completion tokens of a verified generated file: the sidecar's `tokens` when it records
    them, else counted from the file's columns (memory-mapped: only their offsets are read)."""
    import pyarrow as pa

    from workers.schemas import completion_tokens

    if isinstance(sidecar.get("tokens"), int):
        return sidecar["tokens"]
    with pa.memory_map(str(path), "r") as source:
        return completion_tokens(pa.ipc.open_file(source).read_all())


def classify(row: Row, key: str, path: Path, unit_hash: str, ctx: Context) -> None:
    """Count one planned unit in `row` (see the module docstring for the rules)."""
    from workers.io import CorruptFile, IncompleteFileError, StaleFile, verify

    try:
        sidecar = verify(path, unit_hash, checksum=ctx.checksum)
    except (StaleFile, CorruptFile) as err:
        kind = "stale" if isinstance(err, StaleFile) else "corrupt"
        row.notes.append(f"{kind}, counted as not done: {clean(err)}")
        sidecar = None
    except IncompleteFileError:
        sidecar = None
    if sidecar is not None:
        row.done += 1
        row.seconds += sidecar.get("seconds") or 0.0
        try:
            row.tokens += (
                sidecar["rows"] if row.stage == "scoring" else generated_tokens(path, sidecar)
            )
        except Exception as err:  # a file that verified but lacks the columns counted
            row.notes.append(f"{clean(path.name)}: tokens not counted ({clean(err)})")
        stamp = parse_time(sidecar.get("finished_at"))
        if stamp is not None:
            row.finished_at.append(stamp)
        return
    failure = ctx.failures.get(key)
    if failure is not None:
        ctx.missing.append(key)
    failed_at = parse_time(failure.get("time")) if failure else None
    if failure is not None and not (ctx.live and (failed_at or 0) < ctx.started):
        row.failed += 1
    elif ctx.live:
        row.running += 1
    else:
        row.pending += 1


@dataclass
class Context:
    run_dir: Path
    cfg: Any
    checksum: bool
    lease: dict[str, Any] | None
    failures: dict[str, dict[str, Any]]
    missing: list[str] = field(default_factory=list)  # failed units not complete now
    notes: list[str] = field(default_factory=list)  # about the run's own files

    @property
    def live(self) -> bool:
        return bool(self.lease and self.lease["live"])

    @property
    def started(self) -> float:
        return (self.lease and parse_time(self.lease["started"])) or 0.0


def generation_rows(ctx: Context, cells: list) -> list[Row]:
    """One row per cell: its generation units, planned as the driver plans them."""
    from orchestrator.plan import problems_path
    from orchestrator.stages.generation import GeneratorSpawner, generation_units
    from workers.io import read_sidecar

    rows = []
    for c in cells:
        cell = c.cell
        row = Row("generation", cell.model.name, cell.dataset.name, None)
        row.gpus = int(GeneratorSpawner(cell.model, ctx.cfg).need()["GPU"])
        problems = read_sidecar(problems_path(ctx.run_dir, cell.dataset))
        if problems is None:
            row.pending, row.estimated = c.generation_units, True
            row.notes.append("problems not written yet: units from the estimate")
        else:
            units = generation_units(
                ctx.run_dir,
                cell.model,
                cell.dataset,
                ctx.cfg.generation,
                num_problems=problems["rows"],
                problems_sha256=problems["sha256"],
            )
            for u in units:
                classify(row, u.key, u.path, u.config_hash, ctx)
        rows.append(row)
    return rows


def scoring_rows(ctx: Context, cells: list) -> list[Row]:
    """One row per (cell, layer): plan.json's units; a cell the plan leaves unscored, none and
    the plan's reason; a cell not planned yet, its upper bound."""
    from orchestrator.stages.scoring import ScorerSpawner

    plan = read_scoring_plan(ctx)
    planned = planned_units(plan["scores"] or [])
    rows = []
    for c in cells:
        cell, gpus = c.cell, int(ScorerSpawner(c.cell.model, ctx.cfg).need()["GPU"])
        name = f"{cell.model.name}/{cell.dataset.name}: "
        unscored = [w[len(name) :] for w in plan["unscored"] if w.startswith(name)]
        for layer in sorted(set(cell.layers.values())):
            row = Row("scoring", cell.model.name, cell.dataset.name, layer, gpus=gpus)
            units = planned.get((cell.model.name, layer, cell.dataset.name))
            if units is None and unscored:
                row.notes += [f"not scored: {w}" for w in unscored]
            elif units is None:
                row.pending, row.estimated = c.max_scoring_units_per_layer, True
                row.notes.append("not planned yet: pending is an upper bound")
            for key, rel, unit_hash in units or []:
                classify(row, key, ctx.run_dir / rel, unit_hash, ctx)
            rows.append(row)
    return rows


def read_scoring_plan(ctx: Context) -> dict[str, Any]:
    """plan.json (workers.runfiles) or, when it is absent, a link or not a plan, an empty one
    (a note says which): every cell is then counted from the estimate."""
    from workers.runfiles import PLAN_FILE, read_plan

    empty: dict[str, Any] = {"scores": None, "unscored": []}
    if (ctx.run_dir / PLAN_FILE).is_symlink():
        ctx.notes.append(f"{PLAN_FILE} is a link, not read: scoring counted from the estimate")
        return empty
    try:
        return read_plan(ctx.run_dir) or empty
    except ValueError as err:
        ctx.notes.append(f"{clean(err)}: scoring counted from the estimate")
        return empty


def planned_units(entries: list[dict[str, str]]) -> dict[tuple, list[tuple[str, str, str]]]:
    """{(model, layer, dataset): [(unit, path, hash)]} of plan.json's score entries whose path
    is scores/<model>/layer=<L>/<dataset>/<k>.arrow (anything else never becomes a path)."""
    from workers.io import PATH_NAME

    out: dict[tuple, list[tuple[str, str, str]]] = {}
    for e in entries:
        parts = e["path"].split("/")
        if (
            len(parts) != 5
            or parts[0] != "scores"
            or not parts[2].startswith("layer=")
            or not parts[2][6:].isdigit()
            or not all(PATH_NAME.fullmatch(p) for p in parts[1:])
        ):
            continue
        out.setdefault((parts[1], int(parts[2][6:]), parts[3]), []).append(
            (e["unit"], e["path"], e["config_hash"])
        )
    return out


def add_estimates(ctx: Context, cells: list, rows: list[Row]) -> None:
    """The dry run's tokens and GPU-hours of each row, at its cell's share of the plan."""
    from orchestrator.estimate import budgeted_part, generation_part
    from workers.rates import read_rates

    rates, gpu = read_rates(), ctx.cfg.cluster.gpu_type
    by_cell = {(c.cell.model.name, c.cell.dataset.name): c for c in cells}
    for row in rows:
        c = by_cell[(row.model, row.dataset)]
        tokens = c.max_completion_tokens
        if row.stage == "generation":
            part = generation_part(rates, c.cell.model, tokens, gpu, "generation", "generation")
        else:
            spec = next(s for s, i in c.cell.layers.items() if i == row.layer)
            part = budgeted_part(rates, ctx.cfg, c.cell.model, spec, tokens)
        row.estimate_tokens, row.estimate_gpu_hours = part.tokens, part.hours


def stage_totals(ctx: Context, rows: list[Row]) -> dict[str, dict[str, Any]]:
    """Per stage: the rows' sums, throughput and ETA (see the module docstring)."""
    from orchestrator.config import actor_cap

    caps = {"generation": ctx.cfg.cluster.generators, "scoring": ctx.cfg.cluster.scorers}
    out = {}
    for stage in ("generation", "scoring"):
        mine = [r for r in rows if r.stage == stage]
        t: dict[str, Any] = {
            k: sum(getattr(r, k) for r in mine)
            for k in ("done", "failed", "pending", "running", "tokens", "seconds", "gpu_hours")
        }
        t["seconds"], t["gpu_hours"] = round(t["seconds"], 3), round(t["gpu_hours"], 6)
        t["estimated"] = any(r.estimated for r in mine)
        t["estimate_tokens"] = sum(r.estimate_tokens for r in mine)
        hours = [r.estimate_gpu_hours for r in mine]
        t["estimate_gpu_hours"] = None if None in hours else round(sum(hours), 6)  # type: ignore[arg-type]
        t["tokens_per_s"] = round(t["tokens"] / t["seconds"], 1) if t["seconds"] > 0 else None
        left = t["pending"] + t["running"]
        t["eta_s"], t["eta_basis"] = eta(ctx, mine, left, actor_cap(caps[stage]))
        out[stage] = t
    return out


def eta(ctx: Context, rows: list[Row], left: int, actors: int | None) -> tuple[Any, str]:
    """(seconds to finish the units left, how that was worked out); (None, why) if unknown."""
    if left == 0:
        return 0.0, "nothing left"
    done = sum(r.done for r in rows)
    seconds = sum(r.seconds for r in rows)
    if not done or seconds <= 0:
        return None, "no unit finished yet"
    per_unit = seconds / done
    recent = [s for r in rows for s in r.finished_at if ctx.live and s >= ctx.started]
    if recent:
        # the stage began about one unit's time before its first unit of this session landed
        began = max(ctx.started, min(recent) - per_unit)
        pace = len(recent) / max(time.time() - began, 1e-9)
        return round(left / pace, 1), "the live driver's pace on this stage"
    n = actors or 1
    return round(left * per_unit / n, 1), f"{per_unit:.1f} s per unit (sidecars) over {n} actor(s)"


def status_json(run_dir: Path, *, checksum: bool = False) -> dict[str, Any]:
    """The run's status as a plain tree (the shape `--json` prints; see README, "Watching a
    run"). StatusError when `run_dir` is not a run."""
    from orchestrator.plan import estimate
    from orchestrator.summary import open_failures

    run_dir = Path(run_dir)
    # 1. The run's config and driver; the failures still open.
    cfg = load_config(run_dir)
    ctx = Context(run_dir, cfg, checksum, read_lease(run_dir), open_failures(run_dir))
    # 2. Every unit of the plan, counted per cell; the estimate beside it.
    cells = estimate(cfg)
    rows = generation_rows(ctx, cells) + scoring_rows(ctx, cells)
    add_estimates(ctx, cells, rows)
    for row in rows:
        row.gpu_hours = row.seconds * row.gpus / 3600
    # 3. The stages' totals, and the failures of planned units not complete now.
    failures = [
        {
            "stage": clean(e.get("stage")),
            "unit": clean(key),
            "attempts": e.get("attempts") if isinstance(e.get("attempts"), int) else None,
            "time": clean(e.get("time")),
            "error": first_line(e.get("error")),
        }
        for key, e in ((k, ctx.failures[k]) for k in ctx.missing)
    ]
    return {
        "version": JSON_VERSION,
        "run": clean(run_dir.name),
        "run_dir": clean(run_dir),
        "time": time.strftime(STAMP),
        "driver": ctx.lease,
        "stages": stage_totals(ctx, rows),
        "cells": [row_json(r) for r in rows],
        "failures": failures,
        "notes": [clean(n) for n in ctx.notes],
    }


def first_line(text: Any) -> str:
    lines = str(text or "").strip().splitlines()
    return clean(lines[0]) if lines else ""


def row_json(row: Row) -> dict[str, Any]:
    data = asdict(row)
    del data["finished_at"]
    data["seconds"], data["gpu_hours"] = round(row.seconds, 3), round(row.gpu_hours, 6)
    data["model"], data["dataset"] = clean(row.model), clean(row.dataset)
    data["notes"] = [clean(n) for n in row.notes]
    return data


# ------------------------------------------------------------------------------ the command


def render(status: dict[str, Any]) -> str:
    """The status as text for a terminal (every string in it already cleaned)."""
    lines = [f"run {status['run']} ({status['run_dir']}) at {status['time']}"]
    lease = status["driver"]
    if lease is None:
        lines.append("driver: none (no lease): units not done are pending")
    else:
        age = lease["heartbeat_age_s"]
        state = "live" if lease["live"] else "gone (lease expired)"
        lines.append(
            f"driver: {state}, host {lease['host']}, pid {lease['pid']}, started"
            f" {lease['started']}, last heartbeat {'?' if age is None else f'{age:.0f}'} s ago"
            + ("; units not done are running (queued or in flight)" if lease["live"] else "")
        )
    head = f"{'stage':<11}{'model':<17}{'dataset':<15}{'layer':>5}"
    lines += [
        "",
        f"{head} {'done':>6} {'failed':>6} {'pending':>8} {'running':>7}"
        f" {'tokens':>12} {'GPU-h':>8} {'est. tokens':>12} {'est. GPU-h':>10}",
    ]
    for c in status["cells"]:
        layer = "-" if c["layer"] is None else str(c["layer"])
        pending = f"{'<=' if c['estimated'] else ''}{c['pending']:,}"
        lines.append(
            f"{c['stage']:<11}{c['model']:<17}{c['dataset']:<15}{layer:>5}"
            f" {c['done']:>6,} {c['failed']:>6,} {pending:>8} {c['running']:>7,}"
            f" {c['tokens']:>12,} {c['gpu_hours']:>8.3f} {c['estimate_tokens']:>12,}"
            f" {hours(c['estimate_gpu_hours']):>10}"
        )
        lines += [f"{'':<11}note: {n}" for n in c["notes"][:3]]
        if len(c["notes"]) > 3:
            lines.append(f"{'':<11}note: ... and {len(c['notes']) - 3} more")
    lines.append("")
    lines += [describe_stage(name, t) for name, t in status["stages"].items()]
    lines += [f"note: {n}" for n in status["notes"]]
    failures = status["failures"]
    lines.append(f"failures: {len(failures)} open" + (":" if failures else ""))
    for f in failures:
        lines.append(
            f"  {f['stage']} {f['unit']} ({f['attempts']} attempts, {f['time']}): {f['error']}"
        )
    return "\n".join(lines)


def hours(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.3f}"


def describe_stage(name: str, t: dict[str, Any]) -> str:
    total = t["done"] + t["failed"] + t["pending"] + t["running"]
    rate = "-" if t["tokens_per_s"] is None else f"{t['tokens_per_s']:,.1f}"
    eta_s = t["eta_s"]
    when = "unknown" if eta_s is None else duration(eta_s)
    return (
        f"{name}: {t['done']:,} of {'<=' if t['estimated'] else ''}{total:,} units done,"
        f" {t['failed']:,} failed, {t['pending']:,} pending, {t['running']:,} running;"
        f" {t['tokens']:,} tokens in {t['seconds']:,.1f} actor-s ({rate} tokens/s per actor);"
        f" {t['gpu_hours']:.3f} GPU-h of an estimated {hours(t['estimate_gpu_hours'])};"
        f" ETA {when} ({t['eta_basis']})"
    )


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def local_run(run_dir: str, checksum: bool) -> Path:
    """`run_dir`, or for a run on object storage (s3://bucket/prefix/<run_id>) its local
    mirror, first brought to the store's state (workers/store.py: each committed pair fetched
    unless the mirror's copy has its sha256 and size, every object's sha256 checked with
    `checksum`; small files and the lease copied). The store itself is never written."""
    from workers.store import StoreError, is_store_uri, mirror_of, parse_uri, pull_run

    if not is_store_uri(run_dir):
        return Path(run_dir)
    try:
        if not parse_uri(run_dir)[2]:
            raise ValueError(f"{run_dir}: give the run, s3://bucket/prefix/<run_id>")
        mirror = mirror_of(run_dir)
        pull_run(mirror, checksum=checksum, repair=False, lease=True)
    except (ValueError, StoreError) as err:
        raise StatusError(str(err)) from None
    return mirror


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.status", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "run_dir", help="the run folder, e.g. runs/<run_id>, or s3://bucket/prefix/<run_id>"
    )
    parser.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=10.0,
        metavar="SECONDS",
        help="refresh every SECONDS (10 when not given) until interrupted",
    )
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.add_argument(
        "--checksum", action="store_true", help="also check every file's sha256 (reads them)"
    )
    args = parser.parse_args(argv)
    if args.watch is not None and not (math.isfinite(args.watch) and args.watch > 0):
        print("error: --watch takes a positive number of seconds", file=sys.stderr)
        return 2
    try:
        while True:
            try:
                status = status_json(local_run(args.run_dir, args.checksum), checksum=args.checksum)
            except StatusError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            text = json.dumps(status, indent=1) if args.json else render(status)
            if args.watch is not None and sys.stdout.isatty():
                print("\x1b[H\x1b[2J", end="")  # clear the screen: our own escape, not the data's
            print(text, flush=True)
            if args.watch is None:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
