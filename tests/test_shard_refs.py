"""Shards of references (orchestrator/shards.py, workers/trajectories.py): the scorer reads the
rows the shards used to copy, in the same order; shards written as rows still resume; the
driver never holds a cell's tokens; a reference cannot reach a file it should not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hydra import compose, initialize_config_dir

from orchestrator import config as C
from orchestrator import plan
from orchestrator.shards import write_shards
from workers.io import CorruptFile, done_path, file_sha256, read_arrow, verify, write_arrow
from workers.schemas import TRAJECTORIES_SCHEMA
from workers.trajectories import is_reference, read_trajectories, reference_table

ROOT = Path(__file__).resolve().parent.parent
C.register_configs()


def make(*overrides: str) -> C.RunConfig:
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        return C.to_run_config(compose("config", overrides=list(overrides)))


def trajectories(first: int, rows: int, tokens: int = 5) -> pa.Table:
    """Rows of TRAJECTORIES_SCHEMA: every third unverified, every fifth without tokens."""
    index = np.arange(first, first + rows)
    ids = [[] if i % 5 == 4 else [int(i), *range(tokens - 1)] for i in index]
    cols = {f.name: pa.nulls(rows, f.type) for f in TRAJECTORIES_SCHEMA}
    cols |= {
        "problem_id": pa.array([f"p{i // 2}" for i in index]),
        "sample_idx": pa.array(index % 2, pa.int32()),
        "input_ids": pa.array(ids, pa.list_(pa.int32())),
        "prompt_len": pa.array(np.ones(rows, np.int32)),
        "verified": pa.array([None if i == 7 else bool(i % 3) for i in index], pa.bool_()),
    }
    return pa.table(cols, schema=TRAJECTORIES_SCHEMA)


def generated_cell(run_dir: Path, cfg: C.RunConfig, sizes: list[int]) -> tuple:
    """(cell, generation units) of files of `sizes` rows under the run's demo cell."""
    [cell] = plan.plan_cells(cfg)
    folder = plan.generated_dir(run_dir, cell.model, cell.dataset)
    units, first = [], 0
    for k, n in enumerate(sizes):
        path = folder / f"{k:05d}.arrow"
        write_arrow(trajectories(first, n), path, config_hash="g", root=run_dir)
        units.append(plan.Unit("generation", path.stem, path, "g", None, run_dir))
        first += n
    return cell, units


def rows_layout(units: list[plan.Unit], cfg: C.RunConfig) -> list[pa.Table]:
    """The shards as rows, as they were written before they were references."""
    table = pa.concat_tables([read_arrow(u.path) for u in units])
    if cfg.scoring.verified_only:
        table = table.filter(table.column("verified"))
    else:
        table = table.filter(pc.greater(pc.list_value_length(table["input_ids"]), 0))
    size = cfg.scoring.trajectories_per_shard
    return [table.slice(k, size) for k in range(0, table.num_rows, size)]


@pytest.mark.parametrize("verified_only", [True, False])
def test_the_scorer_reads_the_rows_that_shards_used_to_copy_in_the_same_order(
    tmp_path, verified_only
):
    cfg = make(f"scoring.verified_only={verified_only}", "scoring.trajectories_per_shard=4")
    cell, units = generated_cell(tmp_path, cfg, [6, 11, 1, 9])
    shards, kept, total = write_shards(tmp_path, cell, cfg, units)
    expected = rows_layout(units, cfg)
    assert total == 27 and kept == sum(t.num_rows for t in expected)
    assert len(shards) == len(expected) > 2
    for (path, sha), rows in zip(shards, expected, strict=True):
        assert is_reference(pa.ipc.open_file(str(path)).schema)
        assert verify(path)["sha256"] == sha
        assert read_trajectories(path).equals(rows)  # some span two generated files
    # Written once: a second call leaves every shard as it is.
    before = {p: (p.stat().st_ino, sha) for p, sha in shards}
    assert write_shards(tmp_path, cell, cfg, units)[0] == shards
    assert {p: (p.stat().st_ino, file_sha256(p)) for p, _ in shards} == before


def test_shards_written_as_rows_are_kept_and_read_so_their_scoring_units_stand(tmp_path):
    """A run whose shards hold rows resumes on them: same files, same sha256 (the scoring
    units' input hash), the same rows read."""
    cfg = make("scoring.trajectories_per_shard=4")
    cell, units = generated_cell(tmp_path, cfg, [8, 8])
    want = plan.shards_hash(cfg.scoring, [verify(u.path)["sha256"] for u in units])
    folder = plan.shard_dir(tmp_path, cell.model, cell.dataset)
    old = []
    for k, rows in enumerate(rows_layout(units, cfg)):
        path = folder / f"{k:05d}.arrow"
        old.append((path, write_arrow(rows, path, config_hash=want, root=tmp_path)["sha256"]))
    shards, _, _ = write_shards(tmp_path, cell, cfg, units)
    assert shards == old
    for (path, _), rows in zip(shards, rows_layout(units, cfg), strict=True):
        assert not is_reference(pa.ipc.open_file(str(path)).schema)
        assert read_trajectories(path).equals(rows)
    # A changed split (another shard size) is written as references; the old rows are pruned.
    cfg = make("scoring.trajectories_per_shard=3")
    shards, _, _ = write_shards(tmp_path, cell, cfg, units)
    assert all(is_reference(pa.ipc.open_file(str(p)).schema) for p, _ in shards)
    assert sorted(folder.glob("*.arrow")) == [p for p, _ in shards]


CHILD = """
import resource, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_shard_refs import make, plan
from orchestrator.shards import write_shards
run_dir = Path({run_dir!r})
cfg = make("scoring.trajectories_per_shard=16")
[cell] = plan.plan_cells(cfg)
units = [plan.Unit("generation", p.stem, p, "g", None, run_dir)
         for p in sorted(plan.generated_dir(run_dir, cell.model, cell.dataset).glob("*.arrow"))]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
write_shards(run_dir, cell, cfg, units)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_sharding_does_not_hold_the_cells_token_ids(tmp_path):
    """Two generated files of 256 trajectories x 100k tokens (200 MB of ids in memory, a few
    MB on disk: they repeat): the sharding step's memory grows by far less than one file."""
    cfg = make()
    [cell] = plan.plan_cells(cfg)
    folder = plan.generated_dir(tmp_path, cell.model, cell.dataset)
    rows, tokens = 256, 100_000
    block = np.arange(1000, dtype=np.int32)
    for k in range(2):
        table = trajectories(k * rows, rows, tokens=1)
        ids = pa.ListArray.from_arrays(
            pa.array(np.arange(rows + 1, dtype=np.int32) * tokens),
            pa.array(np.tile(block, rows * tokens // len(block))),
        )
        table = table.set_column(2, TRAJECTORIES_SCHEMA.field("input_ids"), ids)
        write_arrow(table, folder / f"{k:05d}.arrow", config_hash="g", root=tmp_path)
    code = CHILD.format(tests=str(ROOT / "tests"), run_dir=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    grown_mb = int(out.stdout.split()[-1])
    assert grown_mb < 40, f"sharding grew the driver by {grown_mb} MB"
    assert len(list(plan.shard_dir(tmp_path, cell.model, cell.dataset).glob("*.arrow"))) == 22


def shard_of(tmp_path: Path, files: list[str], rows: list[int], sha: str | None = None) -> Path:
    cfg = make()
    _, units = generated_cell(tmp_path, cfg, [4])
    sha = sha or verify(units[0].path)["sha256"]
    path = tmp_path / "trajectories/tiny/demo/shards/00000.arrow"
    write_arrow(reference_table(files, [sha] * len(rows), rows), path, config_hash="s")
    return path


@pytest.mark.parametrize(
    "files, rows, message",
    [
        (["../../../outside.arrow"], [0], "names a file outside its cell"),
        (["/etc/passwd"], [0], "names a file outside its cell"),
        (["generated/00000.arrow"], [4], "a row beyond the 4 of generated/00000.arrow"),
        (["generated/00000.arrow"], [-1], "a row beyond"),
        (["linked/00000.arrow"], [0], "reached through a link"),
    ],
)
def test_a_reference_cannot_reach_past_its_cells_files(tmp_path, files, rows, message):
    path = shard_of(tmp_path, files, rows)
    (tmp_path / "trajectories/tiny/demo/linked").symlink_to(
        tmp_path / "trajectories/tiny/demo/generated"
    )
    with pytest.raises(CorruptFile) as caught:
        read_trajectories(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_generated_file_changed_since_its_shard_was_written_is_refused(tmp_path):
    path = shard_of(tmp_path, ["generated/00000.arrow"] * 2, [0, 1], sha="0" * 64)
    with pytest.raises(CorruptFile, match="changed since 00000.arrow was written"):
        read_trajectories(path)
    # and one whose bytes no longer match its own sidecar
    path = shard_of(tmp_path, ["generated/00000.arrow"] * 2, [0, 1])
    generated = tmp_path / "trajectories/tiny/demo/generated/00000.arrow"
    data = bytearray(generated.read_bytes())
    data[-100] ^= 0xFF
    generated.write_bytes(bytes(data))
    assert done_path(generated).exists()
    with pytest.raises(CorruptFile, match="sha256 differs"):
        read_trajectories(path)
