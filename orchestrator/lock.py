"""One driver per run: a lease file in the run folder, renewed by a heartbeat.

Contract: `RunLock(run_dir).acquire()` creates `runs/<id>/.driver.lock` (JSON: host, pid,
start time, last heartbeat, a random token) or raises `RunLockedError` naming the driver that
holds it; a daemon thread then rewrites the heartbeat every `heartbeat_s`; `release()`
removes the file if it is still ours. Only primitives that are atomic on local disks and on
NFS are used: create-exclusive (`O_CREAT | O_EXCL`) to take the lease, rename to replace or
break it, so two drivers on two nodes sharing `runs_dir` cannot both hold it.

A driver that crashed does not hold its run forever. Its lease has expired when
- it was on this host and its pid is gone (known at once), or
- its heartbeat is older than `ttl_s` (a driver on another node, or a hung one). The
  heartbeat is the holder's wall clock, so `ttl_s` also absorbs clock skew between nodes.
An expired lease is renamed away (one breaker wins the rename) and taken.

If the heartbeat finds that its lease was taken over (it stopped heartbeating for longer
than `ttl_s`, e.g. a suspended process), it warns and interrupts the driver's main thread:
two drivers must never write the same run.
"""

from __future__ import annotations

import _thread
import json
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


class RunLock:
    """The lease of one run folder (see the module docstring)."""

    def __init__(self, run_dir: Path, *, ttl_s: float = TTL_S, heartbeat_s: float = HEARTBEAT_S):
        self.path = Path(run_dir) / LOCK_NAME
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
        """Take the lease or raise RunLockedError; start the heartbeat."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lost race with another breaker is retried
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is not None and not self.expired(holder):
                    raise RunLockedError(self.describe(holder)) from None
                self._break(holder)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({**self.info, "heartbeat": time.time()}))
            self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
            self._thread.start()
            return
        raise RunLockedError(f"could not take {self.path}: other drivers keep taking it")

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
        return not isinstance(heartbeat, (int, float)) or time.time() - heartbeat > self.ttl_s

    def describe(self, holder: dict[str, Any]) -> str:
        age = time.time() - holder["heartbeat"]
        return (
            f"run {self.path.parent.name} is in use by another driver: host"
            f" {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"
            f" (last heartbeat {age:.0f} s ago; the lease {self.path} is freed when that driver"
            f" exits, or {self.ttl_s:.0f} s after its last heartbeat)"
        )

    def _read(self) -> dict[str, Any] | None:
        """The lease's contents; None when it is gone, or unreadable for longer than a
        heartbeat (a creator that died between create and write)."""
        try:
            holder = json.loads(self.path.read_text())
            if isinstance(holder, dict):
                return holder
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pass
        try:
            young = time.time() - self.path.stat().st_mtime < self.heartbeat_s
        except FileNotFoundError:
            return None
        # Just created and not yet written: treat as held by an unknown, live driver.
        return (
            {"host": "?", "pid": "?", "started": "?", "heartbeat": time.time()} if young else None
        )

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
        if seen is not None and isinstance(moved, dict) and moved.get("token") != seen.get("token"):
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
                    f"error: lost the lease {self.path} to another driver; stopping",
                    file=sys.stderr,
                )
                _thread.interrupt_main()
                return
            atomic_write(self.path, json.dumps({**self.info, "heartbeat": time.time()}))


def pid_alive(pid: Any) -> bool:
    """Whether a process with this pid exists on this host."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
