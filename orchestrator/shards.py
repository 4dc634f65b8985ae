"""Shards: a cell's trajectories to score, split into files of references, and stale files pruned.

Contract: `write_shards` splits a (model, dataset) cell's generated trajectories (the verified
ones, or every sample with tokens) into trajectories/<model>/<dataset>/shards/<k>.arrow, in
generation order, leaving shards that are complete with the same hash untouched. A shard holds
references, not rows (workers.trajectories: generated file, its sha256, row index), built from
the one column that decides which rows are kept, so the driver's memory grows with the number
of trajectories (a few bytes each), not their tokens; the scorer reads the rows. `prune`
discards data files the plan no longer writes, only ones this project wrote (their sidecar
verifies, checksum included) and only inside the run folder.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from orchestrator import plan
from orchestrator.config import RunConfig
from orchestrator.errors import PipelineError
from workers.io import CorruptFile, IncompleteFileError, discard, last_line, verify, write_arrow
from workers.trajectories import reference_table


def write_shards(
    run_dir: Path, cell: plan.Cell, cfg: RunConfig, generated: list[plan.Unit]
) -> tuple[list[tuple[Path, str]], int, int]:
    """Split a cell's trajectories to score (the verified ones, or with verified_only=false
    every sample that has tokens) into shards of `trajectories_per_shard` references.

    Rows keep generation order (problem, then sample), so the split depends only on the
    files and the config; shards already complete with the same hash are left untouched,
    also those written as rows before shards were references (the scorer reads both).
    Returns ([(path, sha256)], trajectories kept, trajectories generated).
    """
    kept = [kept_rows(u, cfg.scoring.verified_only) for u in generated]
    total = sum(n for _, n, _ in kept)
    names = [u.path.relative_to(u.path.parent.parent).as_posix() for u in generated]
    files = np.repeat(np.arange(len(generated)), [len(rows) for rows, _, _ in kept])
    rows = np.concatenate([rows for rows, _, _ in kept] or [np.zeros(0, np.int64)])
    size = cfg.scoring.trajectories_per_shard
    want = plan.shards_hash(cfg.scoring, [sha for _, _, sha in kept])
    out_dir = plan.shard_dir(run_dir, cell.model, cell.dataset)
    shards = []
    for k in range(math.ceil(len(rows) / size)):
        path = out_dir / f"{k:05d}.arrow"
        try:
            sidecar = verify(path, want, checksum=cfg.verify_checksums)
        except IncompleteFileError:
            mine = files[k * size : (k + 1) * size].tolist()
            refs = reference_table(
                [names[f] for f in mine],
                [kept[f][2] for f in mine],
                rows[k * size : (k + 1) * size].tolist(),
            )
            try:
                sidecar = write_arrow(
                    refs, path, config_hash=want, root=run_dir, compression=cfg.cluster.compression
                )
            except OSError as err:  # a full disk, or a folder replaced by a link
                raise PipelineError(f"cannot write {path}: {err.strerror or err}") from None
        shards.append((path, sidecar["sha256"]))
    prune(run_dir, [out_dir], [p for p, _ in shards])
    return shards, len(rows), total


def kept_rows(unit: plan.Unit, verified_only: bool) -> tuple[np.ndarray, int, str]:
    """(indices of the rows to score, rows, sha256) of a generated file, from the one column
    that decides, memory-mapped: `verified` (a bit a row), or without verified_only the
    lengths of `input_ids` (one record batch's ids at a time)."""
    try:  # checksummed whatever verify_checksums says: the shards vouch for these bytes
        sidecar = verify(unit.path, unit.config_hash)
        column = "verified" if verified_only else "input_ids"
        with pa.memory_map(str(unit.path), "r") as source:
            index = pa.ipc.open_file(source).schema.get_field_index(column)
            if index < 0:
                raise CorruptFile(unit.path, f"no {column} column")
            options = pa.ipc.IpcReadOptions(included_fields=[index])
            reader = pa.ipc.open_file(source, options=options)
            keep, first = [], 0
            for i in range(reader.num_record_batches):
                values = reader.get_batch(i).column(0)
                if not verified_only:  # a row that could not be prompted has no tokens
                    values = pc.greater(pc.list_value_length(values), 0)
                keep.append(np.flatnonzero(values.fill_null(False).to_numpy(False)) + first)
                first += len(values)
    except pa.ArrowException as err:
        raise PipelineError(f"{unit.path}: not a readable Arrow file ({last_line(err)})") from None
    except IncompleteFileError as err:  # only when verify_checksums=false let it through
        raise PipelineError(f"{err}; rerun with verify_checksums=true to redo it") from None
    return np.concatenate([np.zeros(0, np.int64), *keep]), first, sidecar["sha256"]


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
