"""Measured throughput of the two GPU stages, one versioned table: workers/assets/rates.csv.

Contract: each row is one measurement, `stage` (scoring | generation), `model` (a conf/model
name, "*" for any), `layer` (early | middle | final; empty for generation), `tokens` (the
trajectory length it was measured at; empty when it does not apply), `gpu` (e.g. H200),
`dtype`, `alternatives` (J), `tokens_per_s` (per replica: one scorer, or one generator of
model.tensor_parallel_size GPUs), `scorer` (the scoring code version of
workers.provenance, when known), `source` (how it was measured or where it was published);
then, for scoring rows, `path` (the attention path: eager | flex | flex+compile), `exact`
(yes: the path's log-probs matched float32 eager attention, tools.bench_score's exactness
check; no: they did not; empty: not checked, which counts as exact for eager, the reference
every other path is tested against), `peak_fraction` (model FLOP/s over the device's peak,
when given), `device` (the device's full name) and `date` (YYYY-MM-DD). A table with only the
first ten columns reads with those empty.
`read_rates` returns the rows; `append_rate` adds one (tools.bench_score --record). The
orchestrator's dry run reads it to estimate GPU-hours, with the fastest exact path of each
model (`Rate.counts_as_exact`). Plain csv: no pandas for a few dozen rows.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from workers.atomic import atomic_write, read_nofollow

RATES_PATH = Path(__file__).resolve().parent / "assets" / "rates.csv"


@dataclass(frozen=True)
class Rate:
    stage: str
    model: str
    layer: str
    tokens: int | None
    gpu: str
    dtype: str
    alternatives: int | None
    tokens_per_s: float
    scorer: str
    source: str
    path: str = "eager"
    exact: bool | None = None  # None: not checked
    peak_fraction: float | None = None
    device: str = ""
    date: str = ""

    @property
    def counts_as_exact(self) -> bool:
        """Checked exact, or unchecked eager (the reference path)."""
        return self.exact if self.exact is not None else self.path == "eager"


COLUMNS = tuple(f.name for f in fields(Rate))
LEGACY_COLUMNS = COLUMNS[:10]  # before path, exact, peak_fraction, device, date
EXACT = {"yes": True, "no": False, "": None}


def read_rates(path: str | Path = RATES_PATH) -> list[Rate]:
    """Every row of the table; ValueError naming the line if one is malformed."""
    with open(path, newline="", encoding="utf-8") as f:
        return parse_rates(f, path)


def parse_rates(f, path: str | Path) -> list[Rate]:
    """The rows of the open csv `f` (read_rates); `path` names it in errors."""
    out = []
    reader = csv.DictReader(f)
    if tuple(reader.fieldnames or ()) not in (COLUMNS, LEGACY_COLUMNS):
        raise ValueError(f"{path}: columns must be {','.join(COLUMNS)}")
    for line, row in enumerate(reader, start=2):
        try:
            flag = row.get("exact") or ""  # None: a short row
            if flag not in EXACT:
                raise ValueError(f"exact must be yes, no or empty, got {flag!r}")
            fraction = row.get("peak_fraction") or None
            out.append(
                Rate(
                    stage=row["stage"],
                    model=row["model"],
                    layer=row["layer"],
                    tokens=int(row["tokens"]) if row["tokens"] else None,
                    gpu=row["gpu"],
                    dtype=row["dtype"],
                    alternatives=int(row["alternatives"]) if row["alternatives"] else None,
                    tokens_per_s=float(row["tokens_per_s"]),
                    scorer=row["scorer"],
                    source=row["source"],
                    path=row.get("path") or ("eager" if row["stage"] == "scoring" else ""),
                    exact=EXACT[flag],
                    peak_fraction=float(fraction) if fraction else None,
                    device=row.get("device") or "",
                    date=row.get("date") or "",
                )
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}:{line}: {err}") from None
        if not out[-1].tokens_per_s > 0:  # also NaN
            raise ValueError(f"{path}:{line}: tokens_per_s must be > 0")
        if fraction is not None and not 0 < out[-1].peak_fraction < math.inf:
            raise ValueError(f"{path}:{line}: peak_fraction must be > 0")
    return out


def append_rate(rate: Rate, path: str | Path = RATES_PATH) -> None:
    """Add one row at the end (the header is written when the file is new), through
    workers.atomic: the table is rewritten whole, never half."""
    old = read_nofollow(path) or b""  # a link counts as no table: it is replaced, not read
    row = io.StringIO()
    writer = csv.DictWriter(row, fieldnames=COLUMNS, lineterminator="\n")
    if old and not old.startswith(",".join(COLUMNS).encode() + b"\n"):
        # a table of the first ten columns: rewritten whole with the new ones, left empty
        rows = parse_rates(io.StringIO(old.decode("utf-8"), newline=""), path)
        old = b""
        writer.writeheader()
        for r in rows:
            writer.writerow(_csv_row(r))
    elif not old:
        writer.writeheader()
    writer.writerow(_csv_row(rate))
    atomic_write(path, old + row.getvalue().encode("utf-8"))


def _csv_row(rate: Rate) -> dict:
    values = asdict(rate)
    values["exact"] = {v: k for k, v in EXACT.items()}[rate.exact]
    return {k: "" if v is None else v for k, v in values.items()}
