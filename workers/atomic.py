"""Every file the project writes is whole or absent, and written without following links.

Contract: `atomic_write(path, data)` and `with atomic_file(path, mode) as f: ...` write to a
fresh temporary `.<name>.<random>.tmp` in the target's folder, created exclusively
(O_CREAT | O_EXCL | O_NOFOLLOW: never a fixed name, never through a link someone planted there),
fsync it, rename it over `path` with os.replace (a link already at `path` is replaced itself,
never written through) and fsync the folder, so the new name survives a crash. On any error,
an exception in the caller's `with` block included, the temporary is removed and `path` keeps
its old content: a reader sees the old file or the new one, never part of one.

With `root` (the run folder), `path` must lie inside it, and every folder from `root` down to
the file is opened with O_NOFOLLOW relative to its parent's descriptor (and created when
missing): a folder replaced by a link, even during the write, is refused with an OSError naming
it, so nothing lands outside `root`. `root` itself may be a link (runs_dir on another disk).
Without `root` only the folder holding the file is trusted as it is.

Writers get a file object, never a path: Polars, matplotlib (with an explicit `format`), PyArrow
and safetensors (`save` to bytes) all write to streams, and a path handed to a library would be
reopened by name, which is what a planted link exploits. Writes to the run folder on shared
storage (NFS) pay one fsync per file and one per folder; nothing writes often enough to notice.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_TEMP = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC


@contextmanager
def atomic_file(
    path: str | Path, mode: str = "wb", *, root: str | Path | None = None
) -> Iterator[IO[Any]]:
    """A file object on a fresh temporary beside `path`, renamed over `path` when the block
    ends without an exception (see the module docstring). `mode`: "wb" (readable too, so a
    writer can re-read what it wrote) or "w" (UTF-8 text)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file mode must be 'wb' or 'w', not {mode!r}")
    path = Path(path)
    with _folder(path, root, create=True) as folder:
        fd, tmp = _create_temp(folder, path.name)
        try:
            with (
                os.fdopen(fd, "w+b") if mode == "wb" else os.fdopen(fd, "w", encoding="utf-8")
            ) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=folder)
            raise
        _fsync_folder(folder)


def atomic_write(path: str | Path, data: bytes | str, *, root: str | Path | None = None) -> Path:
    """Replace `path` with `data` (str is written as UTF-8) atomically; returns `path`."""
    with atomic_file(path, "wb", root=root) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def atomic_append(path: str | Path, data: bytes | str, *, root: str | Path | None = None) -> Path:
    """`path` rewritten whole as its old content plus `data`, for small logs with one writer
    (failures.jsonl). A link at `path` counts as no old content: it is replaced, not read."""
    path = Path(path)
    with _folder(path, root, create=True) as folder:
        old = _read_regular(path.name, folder) or b""
    return atomic_write(
        path, old + (data.encode("utf-8") if isinstance(data, str) else data), root=root
    )


def read_nofollow(path: str | Path) -> bytes | None:
    """The content of `path`, or None when it is missing, a link (whose target is not ours to
    read into a run folder) or not a regular file (a planted FIFO would block the reader)."""
    return _read_regular(str(path), None)


def ensure_folder(folder: str | Path, *, root: str | Path | None = None) -> Path:
    """`folder`, created when missing, checked as a write into it would be (for writers that
    build a folder of files, e.g. a checkpoint, before renaming it into place)."""
    with _folder(Path(folder) / "_", root, create=True):
        return Path(folder)


def remove(path: str | Path, *, root: str | Path | None = None) -> None:
    """Delete `path` if it exists (a link is deleted itself), through the same checked folders
    as a write: a planted folder link never makes it delete a file outside `root`."""
    path = Path(path)
    with _folder(path, root, create=False) as folder:
        if folder is not None:
            with suppress(FileNotFoundError):
                os.unlink(path.name, dir_fd=folder)


# ------------------------------------------------------------------------------------ helpers


@contextmanager
def _folder(path: Path, root: str | Path | None, *, create: bool) -> Iterator[Any]:
    """A descriptor of `path`'s folder (None when it is missing and `create` is false)."""
    parent = Path(os.path.abspath(path.parent))
    parts: tuple[str, ...] = ()
    if root is not None:
        base = Path(os.path.abspath(root))
        if not parent.is_relative_to(base):
            raise ValueError(f"{path} is outside {root}: refusing to write it")
        parts, parent = parent.relative_to(base).parts, base
    if create:
        parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(parent, _FOLDER)
    except FileNotFoundError:
        if create:
            raise
        yield None
        return
    try:
        for i, part in enumerate(parts):
            if create:
                with suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
            try:
                child = os.open(part, _FOLDER | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if create:
                    raise
                os.close(fd)
                fd = None
                break
            except OSError as err:
                if err.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                where = parent.joinpath(*parts[: i + 1])
                raise OSError(
                    errno.ELOOP,
                    f"{where} is a symbolic link or not a folder; refusing to write through it",
                    str(where),
                ) from None
            os.close(fd)
            fd = child
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


def _read_regular(name: str, folder: int | None) -> bytes | None:
    """The bytes of regular file `name` (relative to `folder`), never through a link."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=folder)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
            return None
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read() if stat.S_ISREG(os.fstat(fd).st_mode) else None


def _create_temp(folder: int, name: str) -> tuple[int, str]:
    """An exclusively created, empty temporary in `folder`: (descriptor, name). Its mode is
    0o666 less the umask, as the final file's would be with a plain open()."""
    stem = name[:200]  # leaves room for the suffix under the 255-byte name limit
    while True:
        tmp = f".{stem}.{secrets.token_hex(8)}.tmp"
        try:
            return os.open(tmp, _TEMP, 0o666, dir_fd=folder), tmp
        except FileExistsError:
            continue  # a name taken by chance or planted: draw another


def _fsync_folder(folder: int) -> None:
    """Make the rename durable; some file systems cannot fsync a folder (EINVAL), which is
    no worse than before the rename."""
    try:
        os.fsync(folder)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.EBADF):
            raise
