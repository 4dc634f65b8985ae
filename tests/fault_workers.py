"""Worker classes that misbehave on purpose, for the real-Ray tests: the stages take them as
`workers=` (orchestrator.actors.Workers) in place of the production classes.

Each wraps the real worker method and decides from the unit's arguments (their text holds the
output path, e.g. ".../scores/tiny/layer=2/demo/00001.arrow"), so the tests do not depend on
how a method spells its parameters. Ray's workers cannot import the tests folder: this module
is shipped to them by value.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import ray

from orchestrator.actors import GeneratorWorker, ScorerWorker, Workers

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def unit_text(args: tuple, kwargs: dict) -> str:
    return " ".join(map(str, (*args, *kwargs.values())))


def failing_scorer(fragment: str) -> Workers:
    """Every scoring unit whose arguments mention `fragment` raises."""

    class FailingScorer(ScorerWorker):
        def score(self, *args, **kwargs):
            text = unit_text(args, kwargs)
            if fragment in text:
                raise RuntimeError(f"injected failure for {fragment}")
            return super().score(*args, **kwargs)

    return Workers(scorer=FailingScorer)


def self_killing_scorer(marker: Path) -> Workers:
    """The first scorer to reach its second unit SIGKILLs its own process, once per `marker`
    (created exclusively, so two scorers cannot both die)."""

    class SelfKillingScorer(ScorerWorker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.units = 0

        def score(self, *args, **kwargs):
            self.units += 1
            if self.units == 2:
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                    os.kill(os.getpid(), signal.SIGKILL)
            return super().score(*args, **kwargs)

    return Workers(scorer=SelfKillingScorer)


CELL = re.compile(r"/(?:trajectories|scores)/([^/\s']+)/(?:layer=\d+/)?([^/\s']+)/")


def timed(log: Path, hold: str | None = None, timeout_s: float = 120.0) -> Workers:
    """Workers that append {stage, model, dataset, start, end} per unit to `log` (JSON lines).
    With `hold`, generation units of data set `hold` wait (at most `timeout_s`) until some
    scoring unit has started: a scheduler that overlaps the stages lets one start meanwhile."""

    def record(stage: str, args: tuple, kwargs: dict, start: float) -> None:
        model, dataset = CELL.search(unit_text(args, kwargs)).groups()
        line = {"stage": stage, "model": model, "dataset": dataset, "start": start}
        with open(log, "a") as f:
            f.write(json.dumps({**line, "end": time.time()}) + "\n")

    def scoring_started() -> bool:
        return log.with_suffix(".scoring").exists()

    class TimedGenerator(GeneratorWorker):
        def generate(self, *args, **kwargs):
            start = time.time()
            if hold is not None and f"/{hold}/generated/" in unit_text(args, kwargs):
                while not scoring_started() and time.time() - start < timeout_s:
                    time.sleep(0.05)
            out = super().generate(*args, **kwargs)
            record("generation", args, kwargs, start)
            return out

    class TimedScorer(ScorerWorker):
        def score(self, *args, **kwargs):
            start = time.time()
            log.with_suffix(".scoring").touch()
            out = super().score(*args, **kwargs)
            record("scoring", args, kwargs, start)
            return out

    return Workers(generator=TimedGenerator, scorer=TimedScorer)
