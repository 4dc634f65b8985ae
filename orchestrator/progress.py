"""Live progress of one stage on the driver: units done / failed / total, and tokens per second.

Contract: a `StageProgress` is told about every unit that finishes (`computed`, `failed`,
`retried`); it prints one line to stderr at most every `interval_s` seconds and once at
`close()`, and passes the same numbers to `sink` (e.g. `WandbSession.log_progress`) under
"<stage>/<metric>" keys. `close()` prints the stage summary that the tests and users read:

    [scoring] done: 36 units = 12 skipped (complete) + 24 computed + 0 failed; 1 retried; 41,280 tokens in 63.2 s
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


class StageProgress:
    def __init__(
        self,
        stage: str,
        total: int,
        *,
        skipped: int = 0,
        sink: Callable[[dict[str, Any]], None] | None = None,
        interval_s: float = 5.0,
        stream: TextIO | None = None,
    ):
        self.stage, self.total, self.skipped = stage, total, skipped
        self.computed = self.failed_units = self.retries = self.tokens = 0
        self.sink, self.interval_s = sink, interval_s
        self.stream = stream or sys.stderr
        self.started = self.last_print = time.monotonic()

    @property
    def finished(self) -> int:
        return self.skipped + self.computed + self.failed_units

    def add(self, total: int, *, skipped: int = 0) -> None:
        """More units planned for this stage while it runs, `skipped` of them complete."""
        self.total += total
        self.skipped += skipped

    def computed_one(self, tokens: int = 0) -> None:
        self.computed += 1
        self.tokens += tokens
        self.report()

    def failed_one(self) -> None:
        self.failed_units += 1
        self.report(force=True)

    def retried_one(self) -> None:
        self.retries += 1

    def metrics(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {
            f"{self.stage}/total": self.total,
            f"{self.stage}/done": self.skipped + self.computed,
            f"{self.stage}/skipped": self.skipped,
            f"{self.stage}/computed": self.computed,
            f"{self.stage}/failed": self.failed_units,
            f"{self.stage}/retries": self.retries,
            f"{self.stage}/tokens": self.tokens,
            f"{self.stage}/tokens_per_s": self.tokens / elapsed,
        }

    def report(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_print < self.interval_s and self.finished < self.total:
            return
        self.last_print = now
        m = self.metrics()
        print(
            f"[{self.stage}] {self.skipped + self.computed}/{self.total} done"
            f" ({self.skipped} skipped), {self.failed_units} failed, {self.retries} retried"
            f" | {m[f'{self.stage}/tokens_per_s']:,.0f} tok/s | {now - self.started:,.0f} s",
            file=self.stream,
            flush=True,
        )
        if self.sink is not None:
            self.sink(m)

    def close(self) -> dict[str, Any]:
        """Print the stage summary line; return the final metrics."""
        if self.sink is not None:
            self.sink(self.metrics())
        print(
            f"[{self.stage}] done: {self.total} units = {self.skipped} skipped (complete)"
            f" + {self.computed} computed + {self.failed_units} failed; {self.retries} retried;"
            f" {self.tokens:,} tokens in {time.monotonic() - self.started:,.1f} s",
            file=self.stream,
            flush=True,
        )
        return self.metrics()
