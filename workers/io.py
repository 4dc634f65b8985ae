"""Arrow IPC files that are either complete or absent.

Contract (docs/design.md, "Completeness"): a data file `<dir>/<name>.arrow` is complete only when
its sidecar `<dir>/<name>.done.json` exists and agrees with it (file name, row count, sha256,
config hash). Both are written through workers.atomic (a fresh temporary, renamed over the
name), the data file first, so a crash at any point leaves either the old complete pair, or a
data file without a sidecar, which readers treat as missing. Every reader goes through `verify`
(section "verified reading"), so nothing partial, tampered or mislabelled is ever read or acted
on.
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

from workers import store
from workers.atomic import atomic_file, atomic_write, remove

SIDECAR_SUFFIX = ".done.json"
# Every name that becomes one path component (run id, model and dataset names): it starts
# with a letter or digit, so "", ".", ".." and hidden names are out, and it has no separator,
# whitespace or newline, so it can never leave the folder it is joined to.
PATH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,127}")
SIDECAR_KEYS = ("rows", "sha256", "config_hash")  # what write_arrow always records
# Arrow IPC buffer compression of every data file (`cluster.compression`): zstd makes score
# files ~3x smaller (float32 u and s barely compress, ids and repeated names do) for a few
# percent of a scan's time; readers (pyarrow, Polars' scan_ipc) decompress whatever is used.
COMPRESSIONS = ("zstd", "lz4", "none")
COMPRESSION = "zstd"


def check_path_name(value: object, what: str) -> str:
    """`value` if it is safe as one path component (PATH_NAME), else ValueError naming `what`."""
    if not isinstance(value, str) or not PATH_NAME.fullmatch(value):
        raise ValueError(
            f"{what}={value!r} cannot be a file name: use 1-128 letters, digits, '.', '_', "
            "'=', '-', starting with a letter or digit"
        )
    return value


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
    compression: str = COMPRESSION,
) -> dict[str, Any]:
    """Write `table` to `path` atomically, then its sidecar; return the sidecar's contents.

    `started` (a `time.time()` value) lets the sidecar record how long the unit took. Both
    files go through workers.atomic (`root`: the run folder, whose subfolders must not be links).
    `compression` (COMPRESSIONS) compresses each buffer of the file; values are unchanged.
    A path inside the mirror of a run on object storage is committed to the store before its
    sidecar is written here (workers/store.py push_data); if that fails the data file is
    removed and the error raised.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression={compression!r}: use one of {', '.join(COMPRESSIONS)}")
    options = pa.ipc.IpcWriteOptions(compression=None if compression == "none" else compression)
    path = Path(path)
    # The IPC file format holds one dictionary per column: chunks built apart share it here.
    table = table.unify_dictionaries()
    # An old sidecar must never vouch for a file that is being replaced.
    remove(done_path(path), root=root)
    with atomic_file(path, "wb", root=root) as f:
        with pa.ipc.new_file(f, table.schema, options=options) as writer:
            writer.write_table(table)
        f.flush()
        f.seek(0)
        sha = _stream_sha256(f)  # the bytes written, read back
    sidecar = {
        "file": path.name,
        "rows": table.num_rows,
        "sha256": sha,
        "config_hash": config_hash,
        "seconds": round(time.time() - started, 3) if started is not None else None,
        "host": socket.gethostname(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    if store.locate(path) is None:
        atomic_write(done_path(path), json.dumps(sidecar, indent=1), root=root)
        return sidecar
    try:  # object storage: committed there, then the committed sidecar is written here
        store.push_data(path, sidecar)
    except BaseException:  # the mirror never holds a unit its store does not
        path.unlink(missing_ok=True)
        raise
    return sidecar


def discard(path: str | Path) -> None:
    """Remove a data file and its sidecar (sidecar first), e.g. before redoing a unit; on
    object storage its committed unit there too."""
    done_path(path).unlink(missing_ok=True)
    Path(path).unlink(missing_ok=True)
    store.discard_data(Path(path))


# ------------------------------------------------------------------------------- verified reading
#
# The one reader of data files (driver, report, inspector): a sidecar is parsed strictly and
# every field anything acts on is checked against the file it describes before the file, or the
# field, is used. Whatever does not verify is incomplete: the driver redoes its unit, readers
# name it in one line and leave it out.

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Optional fields of the sidecar and the types they must have when present; readers act on
# them (the report shows `backend`, the router stage compares `checkpoint_fingerprint`).
SIDECAR_TYPES: dict[str, tuple[type, ...]] = {
    "file": (str,),
    "seconds": (int, float, type(None)),
    "host": (str,),
    "finished_at": (str,),
    "backend": (str,),
    "provenance": (dict,),
    "summary": (dict,),
    "checkpoint_fingerprint": (dict,),
}


class IncompleteFileError(RuntimeError):
    """A data file that is not complete: missing, or without its sidecar. str() is one line:
    the file (`path`), then what is wrong with it (`reason`)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(path, reason)  # args rebuild it when pickled (e.g. out of an actor)
        self.path, self.reason = Path(path), reason

    def __str__(self) -> str:
        return f"{shown(self.path)}: {self.reason}"


class StaleFile(IncompleteFileError):
    """A verified sidecar of other settings (its config hash is not the one asked for)."""


class CorruptFile(IncompleteFileError):
    """A sidecar that is malformed or does not match its data file (rows, sha256, name), or a
    data file that is no readable Arrow file. str() is one line naming the file."""


def shown(path: str | Path) -> str:
    """A path as one printable line (a planted name may hold newlines or escapes)."""
    text = str(path)
    return text if text.isprintable() else ascii(text)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_sidecar(path: str | Path) -> dict[str, Any]:
    """The sidecar of data file `path`, parsed strictly: a regular file (not a link to another
    file's sidecar) holding a JSON object with `rows` (int >= 0), `sha256` (64 hex digits),
    `config_hash` (a non-empty string), the optional fields of SIDECAR_TYPES typed as listed
    and `file`, when present, naming `path` itself. Raises IncompleteFileError when there is
    none, CorruptFile for anything else."""
    side = done_path(path)
    try:
        if not side.is_symlink() and not side.exists():
            raise IncompleteFileError(path, f"not complete (no {side.name})")
        if side.is_symlink() or not side.is_file():
            raise CorruptFile(path, "sidecar is not a regular file")
        data = json.loads(side.read_bytes())
    except OSError as err:
        raise CorruptFile(path, f"sidecar is unreadable ({err.strerror or err})") from None
    except ValueError:
        raise CorruptFile(path, "sidecar is not JSON") from None
    if not isinstance(data, dict):
        raise CorruptFile(path, "sidecar is not a JSON object")
    missing = [k for k in SIDECAR_KEYS if k not in data]
    if missing:
        raise CorruptFile(path, f"sidecar has no {', '.join(missing)}")
    if not _is_int(data["rows"]) or data["rows"] < 0:
        raise CorruptFile(path, "sidecar rows is not a count")
    if not isinstance(data["sha256"], str) or not SHA256_HEX.fullmatch(data["sha256"]):
        raise CorruptFile(path, "sidecar sha256 is not 64 hex digits")
    if not isinstance(data["config_hash"], str) or not data["config_hash"]:
        raise CorruptFile(path, "sidecar config_hash is not a string")
    for key, types in SIDECAR_TYPES.items():
        if key in data and (not isinstance(data[key], types) or isinstance(data[key], bool)):
            raise CorruptFile(path, f"sidecar {key} has the wrong type")
    if "file" in data and data["file"] != Path(path).name:
        raise CorruptFile(path, "sidecar describes another file")
    return data


def arrow_rows(path: str | Path) -> int:
    """Rows of an Arrow IPC file, from its footer and batch headers (memory-mapped: the data
    is not read). CorruptFile when it is no readable Arrow file (e.g. truncated)."""
    try:
        with pa.memory_map(str(path), "r") as source:
            return pa.ipc.open_file(source).count_rows()
    except (pa.ArrowException, OSError, ValueError) as err:
        raise CorruptFile(path, f"not a readable Arrow file ({last_line(err)})") from None


def last_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[-1] if lines else type(err).__name__


def verify(
    path: str | Path, config_hash: str | None = None, *, checksum: bool = True
) -> dict[str, Any]:
    """The sidecar of `path` once it is checked against the file; raises otherwise.

    Checks, cheapest first: the sidecar (parse_sidecar), the data file is a regular file, its
    row count is the sidecar's `rows`, the sidecar's `config_hash` is `config_hash` (when
    given: StaleFile otherwise), and, with `checksum`, the file's sha256 is the sidecar's
    (`verify_checksums=false` passes checksum=False: it trusts sha256, nothing else).
    """
    path = Path(path)
    store.sync_pair(path, done_path(path))  # on object storage: the committed pair
    sidecar = parse_sidecar(path)
    if path.is_symlink() or not path.is_file():
        if not path.exists() and not path.is_symlink():
            raise IncompleteFileError(path, "missing")
        raise CorruptFile(path, "not a regular file")
    rows = arrow_rows(path)
    if rows != sidecar["rows"]:
        raise CorruptFile(path, f"{rows} rows, its sidecar says {sidecar['rows']}")
    if config_hash is not None and sidecar["config_hash"] != config_hash:
        raise StaleFile(path, "written by other settings")
    if checksum and file_sha256(path) != sidecar["sha256"]:
        raise CorruptFile(path, "sha256 differs from its sidecar's")
    return sidecar


def read_sidecar(path: str | Path, config_hash: str | None = None) -> dict[str, Any] | None:
    """The sidecar of `path` when it verifies without a checksum (verify), else None."""
    try:
        return verify(path, config_hash, checksum=False)
    except IncompleteFileError:
        return None


def is_complete(path: str | Path, config_hash: str | None = None, *, checksum: bool = True) -> bool:
    """True if `path` verifies (verify) against its sidecar and `config_hash`, when given."""
    try:
        verify(path, config_hash, checksum=checksum)
    except IncompleteFileError:
        return False
    return True


def read_verified(
    path: str | Path, config_hash: str | None = None
) -> tuple[pa.Table, dict[str, Any]]:
    """(table, sidecar) of a complete file: its bytes are read once, and the table is parsed
    from the very bytes whose sha256 matched. Raises IncompleteFileError / CorruptFile."""
    path = Path(path)
    sidecar = verify(path, config_hash, checksum=False)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sidecar["sha256"]:
        raise CorruptFile(path, "sha256 differs from its sidecar's")
    try:
        table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
    except pa.ArrowException as err:
        raise CorruptFile(path, f"not a readable Arrow file ({last_line(err)})") from None
    if table.num_rows != sidecar["rows"]:
        raise CorruptFile(path, f"{table.num_rows} rows, its sidecar says {sidecar['rows']}")
    return table, sidecar


def read_arrow(path: str | Path, *, require_complete: bool = True) -> pa.Table:
    """Read an Arrow IPC file; by default only a complete one (read_verified)."""
    if require_complete:
        return read_verified(path)[0]
    with pa.OSFile(str(path), "rb") as source:
        return pa.ipc.open_file(source).read_all()
