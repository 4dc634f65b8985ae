"""Measured throughput of the two GPU stages, one versioned table: workers/assets/rates.csv.

Contract: each row is one measurement, `stage` (scoring | generation), `model` (a conf/model
name, "*" for any), `layer` (early | middle | final; empty for generation), `tokens` (the
trajectory length it was measured at; empty when it does not apply), `gpu` (e.g. H200),
`dtype`, `alternatives` (J), `tokens_per_s` (per replica: one scorer, or one generator of
model.tensor_parallel_size GPUs), `scorer` (the scoring code version of
workers.provenance, when known), `source` (how it was measured or where it was published).
`read_rates` returns the rows; `append_rate` adds one (workers.bench_score --record). The
orchestrator's dry run reads it to estimate GPU-hours. Plain csv: no pandas for ten rows.
"""

from __future__ import annotations

import csv
import io
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


COLUMNS = tuple(f.name for f in fields(Rate))


def read_rates(path: str | Path = RATES_PATH) -> list[Rate]:
    """Every row of the table; ValueError naming the line if one is malformed."""
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path}: columns must be {','.join(COLUMNS)}")
        for line, row in enumerate(reader, start=2):
            try:
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
                    )
                )
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}:{line}: {err}") from None
            if out[-1].tokens_per_s <= 0:
                raise ValueError(f"{path}:{line}: tokens_per_s must be > 0")
    return out


def append_rate(rate: Rate, path: str | Path = RATES_PATH) -> None:
    """Add one row at the end (the header is written when the file is new), through
    workers.atomic: the table is rewritten whole, never half."""
    old = read_nofollow(path) or b""  # a link counts as no table: it is replaced, not read
    row = io.StringIO()
    writer = csv.DictWriter(row, fieldnames=COLUMNS, lineterminator="\n")
    if not old:
        writer.writeheader()
    writer.writerow({k: "" if v is None else v for k, v in asdict(rate).items()})
    atomic_write(path, old + row.getvalue().encode("utf-8"))
