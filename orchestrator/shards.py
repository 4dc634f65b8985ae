"""Shards: a cell's trajectories to score, split into files, and stale files pruned.

Contract: `write_shards` splits a (model, dataset) cell's generated trajectories (the verified
ones, or every sample with tokens) into trajectories/<model>/<dataset>/shards/<k>.arrow, in
generation order, leaving shards that are complete with the same hash untouched; `prune`
discards data files the plan no longer writes, only ones this project wrote (their sidecar
verifies, checksum included) and only inside the run folder.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pyarrow as pa

from orchestrator import plan
from orchestrator.config import RunConfig
from orchestrator.errors import PipelineError
from workers.io import CorruptFile, IncompleteFileError, discard, read_verified, verify, write_arrow
from workers.schemas import GEN_ROUTES


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
    if GEN_ROUTES in table.column_names:  # the report reads them from the generated files
        table = table.drop_columns([GEN_ROUTES])
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
                    table.slice(k * size, size),
                    path,
                    config_hash=want,
                    root=run_dir,
                    compression=cfg.cluster.compression,
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
