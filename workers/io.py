"""Arrow IPC files that are either complete or absent.

Contract (docs/design.md, "Completeness"): a data file `<dir>/<name>.arrow` is complete only when
its sidecar `<dir>/<name>.done.json` exists and agrees with it (row count, sha256, config hash).
Both are written under a temporary name and renamed, the data file first, so a crash at any
point leaves either the old complete pair, or a data file without a sidecar, which readers
treat as missing. Nothing partial is ever read.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa

SIDECAR_SUFFIX = ".done.json"


class IncompleteFileError(RuntimeError):
    """A data file is missing its completion sidecar or does not match it."""


def done_path(path: str | Path) -> Path:
    """The completion sidecar of a data file: `x.arrow` -> `x.done.json`."""
    path = Path(path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(stem + SIDECAR_SUFFIX)


def config_hash(obj: Any) -> str:
    """A short, stable hash of a JSON-serialisable config (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_arrow(
    table: pa.Table,
    path: str | Path,
    *,
    config_hash: str,
    started: float | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `table` to `path` atomically, then its sidecar; return the sidecar's contents.

    `started` (a `time.time()` value) lets the sidecar record how long the unit took.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # An old sidecar must never vouch for a file that is being replaced.
    done_path(path).unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink:
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        sha = file_sha256(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sidecar = {
        "rows": table.num_rows,
        "sha256": sha,
        "config_hash": config_hash,
        "seconds": round(time.time() - started, 3) if started is not None else None,
        "host": socket.gethostname(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    _write_bytes_atomic(done_path(path), json.dumps(sidecar, indent=1).encode())
    return sidecar


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    """The sidecar of a data file, or None if it is missing or unreadable."""
    try:
        return json.loads(done_path(path).read_text())
    except (OSError, ValueError):
        return None


def is_complete(path: str | Path, config_hash: str | None = None, *, checksum: bool = True) -> bool:
    """True if `path` has a sidecar that matches it (and `config_hash`, when given).

    With `checksum` the file's sha256 is recomputed, so truncated or corrupted files are caught.
    """
    path = Path(path)
    sidecar = read_sidecar(path)
    if sidecar is None or not path.exists():
        return False
    if config_hash is not None and sidecar.get("config_hash") != config_hash:
        return False
    if checksum and file_sha256(path) != sidecar.get("sha256"):
        return False
    return True


def read_arrow(path: str | Path, *, require_complete: bool = True) -> pa.Table:
    """Read an Arrow IPC file; by default refuse one without a matching sidecar."""
    path = Path(path)
    if require_complete and not is_complete(path):
        raise IncompleteFileError(f"{path} is not complete (no matching {done_path(path).name})")
    with pa.OSFile(str(path), "rb") as source:
        return pa.ipc.open_file(source).read_all()


def discard(path: str | Path) -> None:
    """Remove a data file and its sidecar (sidecar first), e.g. before redoing a unit."""
    done_path(path).unlink(missing_ok=True)
    Path(path).unlink(missing_ok=True)
