"""Runs on object storage: every process works on a local mirror, the store holds the truth.

Contract: `runs_dir` may be `s3://bucket/prefix` or `gs://bucket/prefix` (STORE_SCHEMES;
pyarrow.fs drives both). Each run then lives at `<prefix>/<run_id>/` in the bucket, and every
process (the driver, each worker on any node) reads and writes a local mirror of it,
`mirror_of(runs_dir) / run_id` = `<cache>/<scheme>/<bucket>/<prefix>/<run_id>`, where `<cache>`
is $RUN_STORE_CACHE or `<system temp dir>/moe-run-store`: the same rule on every node, so a
path the driver hands a worker names the same file in the worker's own mirror, and every other
module keeps working on local paths. `locate(path)` maps a mirror path back to its object.

Object stores have no atomic rename, so a data file is committed, not renamed (`push_data`,
called by workers.io.write_arrow once the local data file is complete; the local sidecar is
written after the commit, as a copy of the committed one):
1. the file's bytes go to a fresh object `<stem>.<attempt>.arrow` (12 random hex digits): an
   upload cut short leaves an object nothing names;
2. the sidecar `<stem>.done.json` (the local one plus `"object": "<stem>.<attempt>.arrow"`) is
   the commit, written last: the sidecar it replaces is deleted first (its attempt object is
   untouched, so until the new sidecar lands the unit reads as not done, never as the wrong
   bytes), then the new one is put only if absent (S3 conditional write, `If-None-Match: *`,
   through boto3; where that is not available, a plain put: one driver per run is then what
   keeps writers apart);
3. superseded attempt objects of the same stem are deleted.
A reader trusts an object only through a sidecar naming it, and only when its sha256 is the
sidecar's (`pull_run`, `fetch_pair`). `discard_data` deletes a unit's sidecar, then objects.

The driver brings its mirror to the store's state before it plans (`pull_run`): every
committed pair is downloaded and checked (a corrupt or missing object: its sidecar is deleted,
the local pair removed, the unit redone), local pairs the store does not hold are removed, and
the run's small files (config, plan, failures, tables, report) are fetched. Those small files
are written locally and uploaded by `push_run_files` when the driver ends. A worker that must
read a data file checks its mirror's sidecar against the committed one and fetches the pair
when they differ (`sync_pair`, from workers.io.verify: written on another node, or rewritten). Credentials come from the standard environment of each library
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL(_S3), AWS_REGION; Google's
application default credentials); nothing here writes them anywhere.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import secrets
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from workers.atomic import atomic_file, atomic_write, read_nofollow, remove

STORE_SCHEMES = ("s3", "gs")
CACHE_ENV = "RUN_STORE_CACHE"
SIDECAR = ".done.json"
LOCK_NAME = ".driver.lock"
ATTEMPT_HEX = 12
THREADS = 8  # parallel transfers of a pull or push: object stores reward concurrency
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]{0,127}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]")


class StoreError(RuntimeError):
    """The store cannot be reached or refused a request; str() is one line."""


def is_store_uri(text: str) -> bool:
    """Whether `runs_dir` names an object store rather than a folder (it has a scheme)."""
    return "://" in text


def parse_uri(uri: str) -> tuple[str, str, tuple[str, ...]]:
    """(scheme, bucket, prefix parts) of `s3://bucket/a/b` or `gs://...`; ValueError for any
    other scheme, credentials in the URI, or a part that cannot be a path component."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme not in STORE_SCHEMES:
        raise ValueError(
            f"runs_dir={uri!r}: an object store is given as s3://bucket/prefix or"
            " gs://bucket/prefix; anything else is a local folder without a scheme"
        )
    bucket, _, prefix = rest.partition("/")
    if "@" in bucket or ":" in bucket:
        raise ValueError(
            f"runs_dir: {scheme}:// takes no credentials or port in the URI; give them through"
            " the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)"
        )
    if not _BUCKET.fullmatch(bucket):
        raise ValueError(f"runs_dir={uri!r}: {bucket!r} is not a bucket name")
    parts = tuple(p for p in prefix.split("/") if p)
    bad = [p for p in parts if not _PART.fullmatch(p)]
    if bad:
        raise ValueError(
            f"runs_dir={uri!r}: prefix part {bad[0]!r} must be 1-128 letters, digits, '.', '_',"
            " '=', '-', starting with a letter or digit"
        )
    return scheme, bucket, parts


def cache_root() -> Path:
    """Where mirrors live on this node: $RUN_STORE_CACHE, else under the system temp dir."""
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "moe-run-store")


def mirror_of(uri: str) -> Path:
    """The local folder standing for `runs_dir=uri` (the same on every node)."""
    scheme, bucket, parts = parse_uri(uri)
    return cache_root().absolute().joinpath(scheme, bucket, *parts)


def locate(path: str | Path) -> tuple[Store, str] | None:
    """(store, key) of a path inside a mirror, None for any other path (a local run)."""
    try:
        rel = Path(os.path.abspath(path)).relative_to(cache_root().absolute())
    except ValueError:
        return None
    parts = rel.parts
    if len(parts) < 3 or parts[0] not in STORE_SCHEMES:
        return None
    return open_store(parts[0], parts[1]), "/".join(parts[2:])


@functools.cache
def open_store(scheme: str, bucket: str) -> Store:
    return Store(scheme, bucket)


class Store:
    """One bucket through pyarrow.fs; keys are relative to the bucket. Every failure is a
    StoreError naming the object."""

    def __init__(self, scheme: str, bucket: str):
        self.scheme, self.bucket = scheme, bucket
        self._fs: Any = None
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def fs(self) -> Any:
        if self._fs is None:
            from pyarrow import fs

            try:
                self._fs = fs.FileSystem.from_uri(f"{self.scheme}://{self.bucket}")[0]
            except (OSError, ValueError) as err:
                raise self.error(err, "") from None
        return self._fs

    def uri(self, key: str) -> str:
        return f"{self.scheme}://{self.bucket}/{key}"

    def error(self, err: BaseException, key: str) -> StoreError:
        lines = str(err).strip().splitlines()
        return StoreError(f"{self.uri(key)}: {lines[0] if lines else type(err).__name__}")

    def _path(self, key: str) -> str:
        return f"{self.bucket}/{key}"

    def list(self, key: str) -> dict[str, int]:
        """{key relative to `key`/: size} of every object below `key` (none: {})."""
        from pyarrow import fs

        try:
            infos = self.fs.get_file_info(fs.FileSelector(self._path(key), recursive=True))
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise self.error(err, key) from None
        start = len(self._path(key)) + 1
        return {i.path[start:]: i.size for i in infos if i.type == fs.FileType.File}

    def read(self, key: str) -> bytes | None:
        """The object's bytes, None when there is none."""
        try:
            with self.fs.open_input_stream(self._path(key)) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as err:
            raise self.error(err, key) from None

    def write(self, key: str, data: bytes) -> None:
        try:
            with self.fs.open_output_stream(self._path(key)) as f:
                f.write(data)
        except OSError as err:
            raise self.error(err, key) from None

    def upload(self, local: Path, key: str) -> None:
        try:
            with open(local, "rb") as src, self.fs.open_output_stream(self._path(key)) as dst:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    dst.write(chunk)
        except OSError as err:
            raise self.error(err, key) from None

    def download(self, key: str, local: Path, root: Path) -> str:
        """Copy the object to `local` (atomically, inside `root`); returns its sha256."""
        digest = hashlib.sha256()
        try:
            with self.fs.open_input_stream(self._path(key)) as src:
                with atomic_file(local, "wb", root=root) as dst:
                    for chunk in iter(lambda: src.read(1 << 22), b""):
                        digest.update(chunk)
                        dst.write(chunk)
        except FileNotFoundError:
            raise StoreError(f"{self.uri(key)}: missing") from None
        except OSError as err:
            raise self.error(err, key) from None
        return digest.hexdigest()

    def delete(self, key: str) -> None:
        try:
            self.fs.delete_file(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as err:
            raise self.error(err, key) from None

    def write_new(self, key: str, data: bytes) -> bool:
        """Put `data` at `key` only if no object is there; False when one is. Atomic on S3
        (a conditional write through boto3); elsewhere a check, then a put."""
        client = self.s3_client()
        if client is None:
            if self.read(key) is not None:
                return False
            self.write(key, data)
            return True
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                return False
            raise self.error(err, key) from None
        except BotoCoreError as err:
            raise self.error(err, key) from None
        return True

    def s3_client(self) -> Any:
        """A boto3 S3 client (endpoint, region and credentials from the environment), or None
        off S3 or without boto3. Made once (boto3's default session is not thread-safe)."""
        if self.scheme != "s3":
            return None
        with self._lock:
            if self._client is None:
                try:
                    import boto3
                except ImportError:
                    return None
                self._client = boto3.session.Session().client("s3")
            return self._client

    @property
    def conditional(self) -> bool:
        """Whether write_new is atomic here."""
        return self.s3_client() is not None


# ------------------------------------------------------------------------------ data files


def _split(key: str) -> tuple[str, str]:
    """(folder key with a trailing '/', or '') and the stem of a data file's key."""
    folder, _, name = key.rpartition("/")
    return (folder + "/" if folder else ""), name.rsplit(".", 1)[0]


def _attempt_pattern(stem: str) -> re.Pattern[str]:
    return re.compile(re.escape(stem) + rf"\.[0-9a-f]{{{ATTEMPT_HEX}}}\.arrow")


def push_data(path: Path, sidecar: dict[str, Any]) -> None:
    """Commit data file `path` with `sidecar` to its store (module docstring), then write the
    committed sidecar beside `path`; nothing for a path outside a mirror. StoreError when a
    step fails or another writer committed the same unit meanwhile (its attempt object is then
    deleted, and no local sidecar written)."""
    located = locate(path)
    if located is None:
        return
    store, key = located
    folder, stem = _split(key)
    attempt = f"{stem}.{secrets.token_hex(ATTEMPT_HEX // 2)}.arrow"
    store.upload(path, folder + attempt)
    side_key = folder + stem + SIDECAR
    store.delete(side_key)
    body = json.dumps({**sidecar, "object": attempt}, indent=1).encode()
    if not store.write_new(side_key, body):
        store.delete(folder + attempt)
        raise StoreError(f"{store.uri(side_key)}: committed by another writer meanwhile")
    # The mirror's sidecar is the committed one, byte for byte: readers compare (sync_pair).
    atomic_write(path.with_name(stem + SIDECAR), body, root=_bucket_mirror(store))
    pattern = _attempt_pattern(stem)
    for name in store.list(folder.rstrip("/")):
        if "/" not in name and name != attempt and pattern.fullmatch(name):
            store.delete(folder + name)


def _bucket_mirror(store: Store) -> Path:
    return cache_root().absolute() / store.scheme / store.bucket


def discard_data(path: Path) -> None:
    """Delete the committed unit of `path` from its store: sidecar first, then its objects."""
    located = locate(path)
    if located is None:
        return
    store, key = located
    folder, stem = _split(key)
    store.delete(folder + stem + SIDECAR)
    pattern = _attempt_pattern(stem)
    for name in store.list(folder.rstrip("/")):
        if "/" not in name and pattern.fullmatch(name):
            store.delete(folder + name)


def fetch_pair(
    path: Path, root: Path, *, checksum: bool = True, sizes: dict[str, int] | None = None
) -> str | None:
    """Bring the committed pair of data file `path` from the store into the mirror `root`.
    Returns None when it is there and verified, else why not ("not committed", "corrupt ...").
    The local sidecar is removed first and written last, so a failure leaves no pair.
    Without `checksum`, a local pair with the sidecar's sha256 and the object's size (from
    `sizes`, {key: size} of a listing) is kept as it is."""
    located = locate(path)
    if located is None:
        return "not in a mirror"
    store, key = located
    folder, stem = _split(key)
    raw = store.read(folder + stem + SIDECAR)
    if raw is None:
        return "not committed"
    side_path = path.with_name(stem + SIDECAR)
    try:
        sidecar = json.loads(raw)
        obj, sha = sidecar["object"], sidecar["sha256"]
    except (ValueError, KeyError, TypeError):
        return "its sidecar is not one this project writes"
    if not isinstance(obj, str) or not _attempt_pattern(stem).fullmatch(obj):
        return "its sidecar names no attempt object of this file"
    if not checksum and _same_local(side_path, path, sha, (sizes or {}).get(folder + obj)):
        return None
    remove(side_path, root=root)
    try:
        got = store.download(folder + obj, path, root)
    except StoreError as err:
        remove(path, root=root)
        return str(err)
    if got != sha:
        remove(path, root=root)
        return f"{store.uri(folder + obj)}: sha256 differs from its sidecar's"
    atomic_write(side_path, raw, root=root)
    return None


def sync_pair(path: Path, sidecar: Path) -> None:
    """Before a worker reads data file `path` from a mirror: when the mirror's sidecar is not
    the store's committed one (another node wrote the unit, or rewrote it since this node last
    fetched it), fetch the committed pair; when the store has none, drop the mirror's pair.
    One small read per file (the driver's planning too); nothing for a local run."""
    located = locate(path)
    if located is None:
        return
    full = Path(os.path.abspath(path))
    store, key = located
    folder, stem = _split(key)
    committed = store.read(folder + stem + SIDECAR)
    if committed is not None and committed == read_nofollow(sidecar):
        return
    root = _bucket_mirror(store)
    if committed is None:
        remove(sidecar, root=root)
        return
    fetch_pair(full, root)


def _same_local(side: Path, path: Path, sha: str, size: int | None) -> bool:
    """Without checksums: the local pair has the sidecar's sha256 and the object's size."""
    try:
        local = json.loads(side.read_bytes())
        return local.get("sha256") == sha and path.stat().st_size == size
    except (OSError, ValueError, AttributeError):
        return False


# --------------------------------------------------------------------------- whole runs


def pull_run(
    run_dir: Path, *, checksum: bool = True, repair: bool = True, lease: bool = False
) -> list[str]:
    """Make the mirror `run_dir` hold what the store holds (module docstring); returns one
    line per unit found corrupt (redone by the driver). `repair`: delete a corrupt unit's
    sidecar and objects on the store too (the driver, under the run's lease; not a reader).
    `lease`: also copy the driver's lease object (orchestrator.status reads it)."""
    located = locate(run_dir)
    if located is None:
        return []
    store, key = located
    objects = store.list(key)
    run_dir.mkdir(parents=True, exist_ok=True)
    sidecars = [k for k in objects if k.endswith(SIDECAR)]
    small = [k for k in objects if _is_small(k) and k not in sidecars]
    sizes = {f"{key}/{rel}": size for rel, size in objects.items()}
    if lease and LOCK_NAME not in objects:
        remove(run_dir / LOCK_NAME, root=run_dir)
    small += [LOCK_NAME] if lease and LOCK_NAME in objects else []

    def one_pair(rel: str) -> str | None:
        data = run_dir / (rel[: -len(SIDECAR)] + ".arrow")
        why = fetch_pair(data, run_dir, checksum=checksum, sizes=sizes)
        if why is not None and repair:
            discard_data(data)
        if why is None:
            return None
        return f"{why if '://' in why else store.uri(key + '/' + rel) + ': ' + why}; redone"

    def one_small(rel: str) -> None:
        store.download(f"{key}/{rel}", run_dir / rel, run_dir)

    with ThreadPoolExecutor(THREADS) as pool:
        problems = [p for p in pool.map(one_pair, sidecars) if p]
        list(pool.map(one_small, small))
    committed = {run_dir / k for k in sidecars}
    for side in run_dir.rglob("*" + SIDECAR):
        if side not in committed:  # a local pair the store never committed: not done
            remove(side, root=run_dir)
            remove(side.with_name(side.name[: -len(SIDECAR)] + ".arrow"), root=run_dir)
    return problems


def _is_small(rel: str) -> bool:
    """A run file that is not part of a data pair, the lease or a temporary."""
    name = rel.rsplit("/", 1)[-1]
    if name.startswith(".") or name.endswith(SIDECAR):
        return False
    return not re.fullmatch(rf".+\.[0-9a-f]{{{ATTEMPT_HEX}}}\.arrow", name)


def push_run_files(run_dir: Path) -> int:
    """Upload the run's small files (every file of the mirror that is not a data pair, a
    hidden file or a temporary) to the store; returns how many."""
    located = locate(run_dir)
    if located is None or not run_dir.is_dir():
        return 0
    store, key = located
    files = []
    for path in run_dir.rglob("*"):
        rel = path.relative_to(run_dir).as_posix()
        if (
            path.is_symlink()
            or not path.is_file()
            or any(p.startswith(".") for p in rel.split("/"))
        ):
            continue
        if rel.endswith(SIDECAR) or (rel.endswith(".arrow") and _has_sidecar(path)):
            continue
        files.append(rel)
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(lambda rel: store.upload(run_dir / rel, f"{key}/{rel}"), files))
    return len(files)


def _has_sidecar(path: Path) -> bool:
    return path.with_name(path.name[: -len(".arrow")] + SIDECAR).exists()
