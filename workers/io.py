"""Arrow IPC files that are either complete or absent.

Contract (docs/design.md, "Completeness"): a data file `<dir>/<name>.arrow` is complete only when
its sidecar `<dir>/<name>.done.json` exists and agrees with it (row count, sha256, config hash).
Both are written through workers.atomic (a fresh temporary, renamed over the name), the data
file first, so a crash at any point leaves either the old complete pair, or a data file without
a sidecar, which readers treat as missing. Nothing partial is ever read.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from workers.atomic import atomic_file, atomic_write, remove

SIDECAR_SUFFIX = ".done.json"
# Every name that becomes one path component (run id, model and dataset names): it starts
# with a letter or digit, so "", ".", ".." and hidden names are out, and it has no separator,
# whitespace or newline, so it can never leave the folder it is joined to.
PATH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,127}")
SIDECAR_KEYS = ("rows", "sha256", "config_hash")  # what write_arrow always records


def check_path_name(value: object, what: str) -> str:
    """`value` if it is safe as one path component (PATH_NAME), else ValueError naming `what`."""
    if not isinstance(value, str) or not PATH_NAME.fullmatch(value):
        raise ValueError(
            f"{what}={value!r} cannot be a file name: use 1-128 letters, digits, '.', '_', "
            "'=', '-', starting with a letter or digit"
        )
    return value


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
    with open(path, "rb") as f:
        return _stream_sha256(f)


def _stream_sha256(f: Any) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def write_arrow(
    table: pa.Table,
    path: str | Path,
    *,
    config_hash: str,
    started: float | None = None,
    extra: dict[str, Any] | None = None,
    root: str | Path | None = None,
) -> dict[str, Any]:
    """Write `table` to `path` atomically, then its sidecar; return the sidecar's contents.

    `started` (a `time.time()` value) lets the sidecar record how long the unit took. Both
    files go through workers.atomic (`root`: the run folder, whose subfolders must not be links).
    """
    path = Path(path)
    # An old sidecar must never vouch for a file that is being replaced.
    remove(done_path(path), root=root)
    with atomic_file(path, "wb", root=root) as f:
        with pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)
        f.flush()
        f.seek(0)
        sha = _stream_sha256(f)  # the bytes written, read back
    sidecar = {
        "rows": table.num_rows,
        "sha256": sha,
        "config_hash": config_hash,
        "seconds": round(time.time() - started, 3) if started is not None else None,
        "host": socket.gethostname(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    atomic_write(done_path(path), json.dumps(sidecar, indent=1), root=root)
    return sidecar


def read_sidecar(path: str | Path) -> dict[str, Any] | None:
    """The sidecar of a data file, or None if it is missing, unreadable or not one of ours
    (valid JSON that is not an object with SIDECAR_KEYS counts as no sidecar: the unit is
    redone, the file is never trusted)."""
    try:
        sidecar = json.loads(done_path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(sidecar, dict) or any(k not in sidecar for k in SIDECAR_KEYS):
        return None
    return sidecar


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
