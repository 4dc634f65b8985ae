"""W&B offline runs: read back from their files, and continued by a restarted driver.

wandb cannot resume a run offline: every `wandb.init(id=X, mode="offline")` writes a new folder
`<run_dir>/wandb/offline-run-<time>-X/` with its own transaction log `run-X.wandb`, and
`wandb sync` uploads several logs of one id one after the other without resuming, so the later
ones overwrite the history and summary of the earlier ones. So a session that opens run
X offline first copies the newest earlier log of X into its new run (`carry_over`: the history
rows in order with their timestamps, the summary keys that are not history keys, tables and
images re-created from the earlier folder's files), and once its run is closed the earlier
folders go (`remove_runs`): one folder per id, holding every session's data.

Contract: `read_records(path)` -> the wandb.proto Records of a .wandb file (a crashed writer's
unfinished last record is left out); `run_logs(wandb_dir, run_key)` -> the logs of one id,
oldest first; `history(records)` / `summary(records)` -> the rows / the final summary as plain
values (media as their `{"_type": ..., "path": ...}` dicts); `carry_over(wandb, run, log)`
logs one earlier log into `run` (`wait_s=`: a log this process closed just now, read once its
exit record is on disk); `remove_runs(logs)` deletes their folders.

The .wandb file is LevelDB log framing: a 7-byte file header (":W&B", magic 0xBEE1 as uint16,
version byte), then 32 KiB blocks of records, each with a 7-byte header crc32(type byte + data)
(uint32 LE), length (uint16 LE), type (uint8: FULL=1, FIRST=2, MIDDLE=3, LAST=4); fewer than
7 bytes left in a block are zero padding. Each record is a serialised
wandb.proto.wandb_internal_pb2.Record. (wandb 0.31 writes it from its Go core and ships no
Python reader.)
"""

from __future__ import annotations

import json
import shutil
import struct
import time
import zlib
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
# Keys wandb fills in itself: a replayed row gets new ones (but keeps its _timestamp).
INTERNAL = ("_step", "_runtime", "_wandb")


def read_records(path: str | Path) -> list[Any]:
    """Every complete Record of a .wandb file; ValueError on a bad header or checksum."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if len(data) < HEADER or struct.unpack("<4sHB", data[:HEADER]) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B transaction log")
    records, parts, pos = [], [], HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if (crc, length, kind) == (0, 0, 0):  # zero padding up to the block end
            pos += left
            continue
        if pos + HEADER + length > len(data):  # the writer stopped mid-record
            break
        chunk = data[pos + HEADER : pos + HEADER + length]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pos += HEADER + length
        if kind in (FIRST, FULL):
            parts = [chunk]
        else:
            parts.append(chunk)
        if kind in (FIRST, MIDDLE):
            continue
        record = pb.Record()
        record.ParseFromString(b"".join(parts))
        records.append(record)
    return records


def run_logs(wandb_dir: str | Path, run_key: str) -> list[Path]:
    """The offline logs of W&B run `run_key` under `wandb_dir`, oldest (last written) first."""
    logs = Path(wandb_dir).glob(f"offline-run-*/run-{run_key}.wandb")
    return sorted(logs, key=lambda p: (p.stat().st_mtime, p.parent.name))


def _set(out: dict[str, Any], item: Any) -> None:
    path = [item.key] if item.key else list(item.nested_key)
    node = out
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = json.loads(item.value_json)


def history(records: list[Any]) -> list[dict[str, Any]]:
    """The history rows, in order, without wandb's own step and runtime keys."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            for item in r.history.item:
                _set(row, item)
            rows.append({k: v for k, v in row.items() if k not in INTERNAL})
    return rows


def summary(records: list[Any]) -> dict[str, Any]:
    """The run's final summary (updates and removals applied), without wandb's own keys."""
    out: dict[str, Any] = {}
    for r in records:
        if r.WhichOneof("record_type") != "summary":
            continue
        for item in r.summary.update:
            _set(out, item)
        for item in r.summary.remove:
            path = [item.key] if item.key else list(item.nested_key)
            node = out
            for part in path[:-1]:
                node = node.get(part, {})
            node.pop(path[-1], None)
    return {k: v for k, v in out.items() if k not in (*INTERNAL, "_timestamp")}


def _media_file(files: Path, value: dict[str, Any]) -> Path:
    """The file a logged media value points at, which must lie inside the run's files/."""
    path = (files / str(value.get("path"))).resolve()
    if not path.is_relative_to(files.resolve()):
        raise ValueError(f"a W&B media path outside its run folder: {value.get('path')!r}")
    return path


def _revive(wandb: Any, files: Path, value: Any) -> Any:
    """A logged value as wandb takes it: tables and images re-created from their files."""
    kind = value.get("_type") if isinstance(value, dict) else None
    if kind == "image-file":
        return wandb.Image(str(_media_file(files, value)))
    if kind == "table-file":
        table = json.loads(_media_file(files, value).read_text())
        return wandb.Table(columns=table["columns"], data=table["data"])
    if kind is not None:  # a media type this project never logs
        raise ValueError(f"cannot carry over a W&B value of type {kind!r}")
    return value


def finished_records(log: Path, wait_s: float) -> list[Any]:
    """The records of a log this process is still closing: wandb-core writes a log's last
    block when it closes the file, which can be after `run.finish()` returns. Polls until the
    exit record is there (everything before it is then on disk), TimeoutError after wait_s."""
    deadline = time.monotonic() + wait_s
    while True:
        records = read_records(log)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"{log.parent.name} was not closed within {wait_s:g} s")
        time.sleep(0.1)


def carry_over(wandb: Any, run: Any, log: Path, *, wait_s: float | None = None) -> None:
    """Log the run recorded in `log` into the open `run`. `wait_s`: the log is this process's
    own, closed just now; wait at most that long for its end to be on disk."""
    records = read_records(log) if wait_s is None else finished_records(log, wait_s)
    files = log.parent / "files"
    rows = history(records)
    for row in rows:
        run.log({k: _revive(wandb, files, v) for k, v in row.items()})
    logged = {k for row in rows for k in row}
    final = summary(records)
    run.summary.update({k: _revive(wandb, files, v) for k, v in final.items() if k not in logged})


def remove_runs(logs: list[Path]) -> None:
    """Delete the offline run folders of these logs (a missing one is no error)."""
    for log in logs:
        shutil.rmtree(log.parent, ignore_errors=True)
