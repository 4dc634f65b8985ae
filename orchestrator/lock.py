"""One driver per run: a lease file in the run folder, renewed by a heartbeat.

Contract: `RunLock(run_dir).acquire()` creates `runs/<id>/.driver.lock` (JSON: host, pid,
start time, last heartbeat, a random token) or raises `RunLockedError` naming the driver that
holds it; a daemon thread then rewrites the heartbeat every `heartbeat_s`; `release()`
removes the file if it is still ours. Only primitives that are atomic on local disks and on
NFS are used: the lease is written whole to a temporary of its own, then hard-linked to its
name (the link fails if the name exists: create-exclusive) to take it; rename replaces or
breaks it. So two drivers on two nodes sharing `runs_dir` cannot both hold it, and the lease
is never seen empty or half-written: a full disk or a read-only folder fails `acquire` with
`LeaseWriteError` and leaves nothing behind.

A driver that crashed does not hold its run forever. Its lease has expired when
- it was on this host and its pid is gone (known at once), or
- its heartbeat is older than `ttl_s` (a driver on another node, or a hung one). The
  heartbeat is the holder's wall clock, so `ttl_s` also absorbs clock skew between nodes;
- its heartbeat is impossible: not a finite number, or more than `ttl_s` in the future, or
  the file is not a JSON object (no lease this module writes looks like that).
An expired lease is renamed away (one breaker wins the rename) and taken.

On object storage (workers/store.py) `StoreLock` is the same lease as one object,
`<run>/.driver.lock` in the bucket: taken with a put-if-absent (S3's conditional write),
renewed by the heartbeat, broken when expired as above (deleted once a second read finds it
unchanged, then taken with a put-if-absent: of two drivers taking it, one wins). Where the store has no conditional write (gs://, or
S3 without boto3) the lease is a check then a put: it names a running driver but cannot stop
two drivers that start at the same moment; run one driver per run id there.

If the heartbeat finds that its lease was taken over (it stopped heartbeating for longer
than `ttl_s`, e.g. a suspended process), it warns and interrupts the driver's main thread:
two drivers must never write the same run.
"""

from __future__ import annotations

import _thread
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from workers.atomic import atomic_write

LOCK_NAME = ".driver.lock"
TTL_S = 120.0  # a lease without a heartbeat for this long is dead (covers clock skew too)
HEARTBEAT_S = 15.0


class RunLockedError(RuntimeError):
    """Another live driver holds the run; the message names it."""


class LeaseWriteError(RuntimeError):
    """The lease could not be written (a read-only folder, a full disk); nothing is left."""


class RunLock:
    """The lease of one run folder (see the module docstring)."""

    def __init__(self, run_dir: Path, *, ttl_s: float = TTL_S, heartbeat_s: float = HEARTBEAT_S):
        self.path = Path(run_dir) / LOCK_NAME
        self.where = str(self.path)  # the lease as messages name it
        self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
        self.token = uuid.uuid4().hex
        self.info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "token": self.token,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lease or raise RunLockedError (held) or LeaseWriteError; start the heartbeat."""
        made = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            taken = self._take()
        except OSError as err:
            for folder in made:  # the folders made here, innermost first, if still empty
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise LeaseWriteError(
                f"cannot write the run's lease {self.path}: {err.strerror or err}"
            ) from None
        if not taken:
            raise RunLockedError(f"could not take {self.path}: other drivers keep taking it")
        self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
        self._thread.start()

    def _take(self) -> bool:
        """Link a fully written lease to its name; break an expired one (3 tries)."""
        tmp = self.path.with_name(f".{LOCK_NAME}.{self.token}.tmp")
        try:
            self._write(tmp)
            for _ in range(3):  # a lost race with another breaker is retried
                try:
                    os.link(tmp, self.path)
                    return True
                except FileExistsError:
                    holder = self._read()
                    if holder is not None and not self.expired(holder):
                        raise RunLockedError(self.describe(holder)) from None
                    self._break(holder)
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _write(self, tmp: Path) -> None:
        """The lease with a fresh heartbeat into `tmp`, created exclusively, flushed to disk."""
        data = json.dumps({**self.info, "heartbeat": time.time()}).encode()
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            holder = self._read()
            if holder is not None and holder.get("token") == self.token:
                self.path.unlink(missing_ok=True)
            try:  # a run that failed before writing anything leaves no empty folder
                self.path.parent.rmdir()
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def expired(self, holder: dict[str, Any]) -> bool:
        """True if the driver that wrote `holder` is gone (see the module docstring)."""
        if holder.get("host") == socket.gethostname() and not pid_alive(holder.get("pid")):
            return True
        heartbeat = holder.get("heartbeat")
        if isinstance(heartbeat, bool) or not isinstance(heartbeat, (int, float)):
            return True
        if not math.isfinite(heartbeat):  # NaN or infinity: no clock wrote that
            return True
        return abs(time.time() - heartbeat) > self.ttl_s  # too old, or too far ahead

    def describe(self, holder: dict[str, Any]) -> str:
        age = time.time() - holder["heartbeat"]
        return (
            f"run {self.path.parent.name} is in use by another driver: host"
            f" {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"
            f" (last heartbeat {age:.0f} s ago; the lease {self.where} is freed when that driver"
            f" exits, or {self.ttl_s:.0f} s after its last heartbeat)"
        )

    def _read(self) -> dict[str, Any] | None:
        """The lease's contents; None when it is gone or is not a JSON object: leases are
        linked into place whole, so an empty or garbled one was never a live driver's."""
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _break(self, seen: dict[str, Any] | None) -> None:
        """Move an expired lease out of the way; if the file renamed is not the one judged
        expired (another driver took it meanwhile), put it back."""
        grave = self.path.with_name(f"{LOCK_NAME}.{uuid.uuid4().hex}.expired")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(grave.read_text())
        except (OSError, ValueError):
            moved = None
        if isinstance(moved, dict) and (seen is None or moved.get("token") != seen.get("token")):
            try:
                os.link(grave, self.path)  # fails if a third driver has taken it since
            except FileExistsError:
                pass
        grave.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = self._read()
            if holder is None or holder.get("token") != self.token:
                print(
                    f"error: lost the lease {self.where} to another driver; stopping",
                    file=sys.stderr,
                )
                _thread.interrupt_main()
                return
            try:  # a full disk: the old heartbeat stays; retried next beat
                self._renew()
            except (OSError, RuntimeError) as err:
                print(f"warning: cannot renew the lease {self.where}: {err}", file=sys.stderr)

    def _renew(self) -> None:
        atomic_write(self.path, json.dumps({**self.info, "heartbeat": time.time()}))


def pid_alive(pid: Any) -> bool:
    """Whether a process with this pid runs on this host (a zombie, killed but not yet reaped
    by its parent, does not: its lease and its Ray are leftovers)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc here: that it exists is all there is to know
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


class StoreLock(RunLock):
    """The lease of a run on object storage: one object beside the run's files (see the
    module docstring). `run_dir` is the run's local mirror (workers/store.py)."""

    def __init__(self, run_dir: Path, **kwargs: Any):
        from workers.store import locate

        super().__init__(run_dir, **kwargs)
        located = locate(self.path)
        if located is None:
            raise ValueError(f"{run_dir} is not the mirror of a run on object storage")
        self.store, self.key = located
        self.where = self.store.uri(self.key)

    def acquire(self) -> None:
        from workers.store import StoreError

        if not self.store.conditional:
            print(
                f"warning: {self.store.scheme}:// has no conditional write here: the lease"
                f" {self.where} cannot stop two drivers starting at once; run one per run id",
                file=sys.stderr,
            )
        try:
            taken = self._take()
        except StoreError as err:
            raise LeaseWriteError(f"cannot write the run's lease: {err}") from None
        if not taken:
            raise RunLockedError(f"could not take {self.where}: other drivers keep taking it")
        self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
        self._thread.start()

    def _take(self) -> bool:
        for _ in range(3):  # a lost race with another breaker is retried
            if self.store.write_new(self.key, self._body()):
                return True
            holder = self._read()
            if holder is not None and not self.expired(holder):
                raise RunLockedError(self.describe(holder))
            if holder is None or self._read() == holder:  # still the expired one: break it
                self.store.delete(self.key)
        return False

    def _body(self) -> bytes:
        return json.dumps({**self.info, "heartbeat": time.time()}).encode()

    def _read(self) -> dict[str, Any] | None:
        from workers.store import StoreError

        try:
            raw = self.store.read(self.key)
            holder = json.loads(raw) if raw is not None else None
        except (StoreError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _renew(self) -> None:
        self.store.write(self.key, self._body())

    def release(self) -> None:
        from workers.store import StoreError

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            holder = self._read()
            if holder is not None and holder.get("token") == self.token:
                try:
                    self.store.delete(self.key)
                except StoreError as err:
                    print(f"warning: lease not removed: {err}", file=sys.stderr)
