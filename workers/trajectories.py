"""The trajectories of a scoring-input shard: references to generated rows, and their rows.

Contract: a shard (trajectories/<model>/<dataset>/shards/<k>.arrow) holds one row per trajectory
to score in workers.schemas.SHARD_REFS_SCHEMA: (generated file, its sha256, row index), built by
the driver from the generated files' `verified` column alone (`reference_table`), so sharding
never holds a cell's tokens. `read_trajectories` gives a shard's rows in TRAJECTORIES_SCHEMA, in
the shard's order: each generated file it names is read whole (workers.io.read_verified: sidecar
and sha256 checked) and must still have the sha256 the shard recorded, so the rows scored are
exactly those the shard was written from. A file is named by a path below the cell's folder,
each part a safe name (workers.io.PATH_NAME) and no link on the way, so a shard cannot reach a
file outside its cell. A shard of TRAJECTORIES_SCHEMA rows (written so before shards became
references) is returned as it is.
"""

from __future__ import annotations

from itertools import groupby
from pathlib import Path, PurePosixPath

import pyarrow as pa

from workers.io import PATH_NAME, CorruptFile, read_arrow, read_verified, shown
from workers.schemas import SHARD_REFS_SCHEMA


def is_reference(schema: pa.Schema) -> bool:
    """True for a shard of references (SHARD_REFS_SCHEMA), False for one of rows."""
    return schema.names == SHARD_REFS_SCHEMA.names


def reference_table(files: list[str], sha256: list[str], rows: list[int]) -> pa.Table:
    """A shard of references: row `rows[i]` of the generated file `files[i]` (a path below
    the cell's folder) whose sha256 is `sha256[i]`. File names and checksums are dictionary-
    encoded: a few bytes a trajectory on disk."""
    return pa.table(
        {
            "file": pa.array(files, pa.string()).dictionary_encode(),
            "sha256": pa.array(sha256, pa.string()).dictionary_encode(),
            "row": pa.array(rows, pa.int64()),
        },
        schema=SHARD_REFS_SCHEMA,
    )


def read_trajectories(path: str | Path, *, require_complete: bool = True) -> pa.Table:
    """The trajectories of shard `path` (workers.io.read_arrow; its sidecar required with
    `require_complete`), references resolved. Raises IncompleteFileError / CorruptFile naming
    the shard or the generated file that is missing, changed or out of range."""
    path = Path(path)
    table = read_arrow(path, require_complete=require_complete)
    if not is_reference(table.schema):
        return table
    if table.schema != SHARD_REFS_SCHEMA:
        raise CorruptFile(path, "references of the wrong types")
    refs = table.to_pydict()  # a shard's worth of (file, sha256, row): small
    parts = []
    for (name, sha), group in groupby(
        zip(refs["file"], refs["sha256"], refs["row"], strict=True), key=lambda r: r[:2]
    ):
        rows = [r for _, _, r in group]
        generated = generated_rows(path, name, sha)
        if min(rows) < 0 or max(rows) >= generated.num_rows:
            raise CorruptFile(path, f"a row beyond the {generated.num_rows} of {shown(name)}")
        parts.append(generated.take(pa.array(rows, pa.int64())))
        del generated  # one generated file in memory at a time
    if not parts:
        raise CorruptFile(path, "a shard without trajectories")
    return pa.concat_tables(parts)


def generated_rows(shard: Path, name: str, sha256: str) -> pa.Table:
    """The generated file `name` of the shard's cell, verified, with the sha256 recorded."""
    parts = PurePosixPath(name).parts
    if not parts or not all(PATH_NAME.fullmatch(p) for p in parts):
        raise CorruptFile(shard, f"names a file outside its cell ({shown(name)})")
    cell = shard.parent.parent
    target = cell.joinpath(*parts)
    if target.resolve() != cell.resolve().joinpath(*parts):
        raise CorruptFile(shard, f"names a file reached through a link ({shown(name)})")
    table, sidecar = read_verified(target)
    if sidecar["sha256"] != sha256:
        raise CorruptFile(target, f"changed since {shard.name} was written from it")
    return table
