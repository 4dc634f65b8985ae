"""The driver's peak memory when it shards one (model, dataset) cell, on synthetic files.

    python -m orchestrator.bench_shards --trajectories 100000 --tokens 32768 --dir /tmp/cell
    python -m orchestrator.bench_shards --dir /tmp/cell --reuse      # shard the same cell again

Contract: writes a cell of `--trajectories` trajectories of `--tokens` token ids each (prompt
included) as generated files of `--per-file` rows (vLLM's 64 problems x 8 samples: 512) in
workers.schemas.TRAJECTORIES_SCHEMA, each with its sidecar (workers.io.write_arrow, zstd), no
model involved; every third trajectory is unverified. Then runs orchestrator.shards.write_shards
on them in a child process (the sharding step alone, as the driver runs it, at the default
config: verified trajectories, `scoring.trajectories_per_shard=16`) and prints that child's peak
RSS (getrusage RUSAGE_CHILDREN), next to the peak of a child that only imports the same
modules. To compare another version of the sharding step on the same cell, copy this file
into that checkout and run it there with --reuse (write_shards has kept its signature).

The token ids of a trajectory repeat one random block of 1,024 ids, so zstd stores a 32k-token
trajectory in ~5 KB on disk instead of 128 KB (a 100k x 32k cell is ~0.6 GB on disk, not 13 GB):
what a reader holds in memory is the decompressed ids (4 bytes a token), which is what this
measures; the time to hash and read real, incompressible files is longer. `sample_logprobs` is
null (as the HF backend writes it) and the text is short, so a vLLM cell holds ~2x the ids again.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

BLOCK = 1024  # the ids repeat this many random ones (see the docstring)
RUN_ID = "bench"


def trajectories(first: int, rows: int, tokens: int, seed: int) -> pa.Table:
    """`rows` synthetic trajectories (ids first .. first + rows - 1) in TRAJECTORIES_SCHEMA."""
    from workers.schemas import TRAJECTORIES_SCHEMA

    rng = np.random.default_rng(seed)
    block = rng.integers(0, 151_936, BLOCK, dtype=np.int32)
    ids = np.tile(block, -(-rows * tokens // BLOCK))[: rows * tokens]
    offsets = pa.array(np.arange(rows + 1, dtype=np.int64) * tokens, pa.int64())
    index = np.arange(first, first + rows)
    cols = {
        "problem_id": pa.array([f"p{i // 8:07d}" for i in index]),
        "sample_idx": pa.array(index % 8, pa.int32()),
        "input_ids": pa.LargeListArray.from_arrays(offsets, pa.array(ids)).cast(
            TRAJECTORIES_SCHEMA.field("input_ids").type
        ),
        "prompt_len": pa.array(np.full(rows, 256, np.int32)),
        "model": pa.array(["tiny"] * rows),
        "dataset": pa.array(["demo"] * rows),
        "completion_text": pa.array([f"answer {i}" for i in index]),
        "extracted_answer": pa.array([str(i % 10) for i in index]),
        "gold_answer": pa.array(["0"] * rows),
        "verified": pa.array(index % 3 != 0),
        "verify_reason": pa.array(["match" if i % 3 else "mismatch" for i in index]),
        "finish_reason": pa.array(["length"] * rows),
        "seed": pa.array(index, pa.int64()),
        "sample_logprobs": pa.nulls(rows, pa.list_(pa.float32())),
    }
    return pa.table(cols, schema=TRAJECTORIES_SCHEMA)


def cell_setup(root: Path):
    """(run folder, the default config, the demo cell) of the bench's run."""
    from hydra import compose, initialize_config_dir

    from orchestrator import plan
    from orchestrator.config import CONF_DIR, register_configs, to_run_config

    register_configs()
    overrides = [f"runs_dir={root}", f"run_id={RUN_ID}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = to_run_config(compose("config", overrides=overrides))
    [cell] = plan.plan_cells(cfg)
    return root / RUN_ID, cfg, cell


def generated_units(run_dir: Path, cell) -> list:
    from orchestrator import plan

    folder = plan.generated_dir(run_dir, cell.model, cell.dataset)
    return [
        plan.Unit(stage="generation", key=p.stem, path=p, config_hash="bench", task=None)
        for p in sorted(folder.glob("*.arrow"))
    ]


def write_cell(root: Path, total: int, tokens: int, per_file: int) -> float:
    """The generated files of the cell; returns GB on disk."""
    from orchestrator import plan
    from workers.io import write_arrow

    run_dir, _, cell = cell_setup(root)
    folder = plan.generated_dir(run_dir, cell.model, cell.dataset)
    size = 0
    for k, first in enumerate(range(0, total, per_file)):
        table = trajectories(first, min(per_file, total - first), tokens, seed=k)
        path = folder / f"{k:05d}.arrow"
        write_arrow(table, path, config_hash="bench", root=run_dir)
        size += path.stat().st_size
    return size / 1e9


def shard_only(root: Path, imports_only: bool) -> None:
    """The child: import the driver's sharding step, then (unless `imports_only`) run it."""
    from orchestrator.shards import write_shards

    run_dir, cfg, cell = cell_setup(root)
    units = generated_units(run_dir, cell)
    if imports_only:
        return
    started = time.time()
    shards, kept, total = write_shards(run_dir, cell, cfg, units)
    print(
        f"sharded {kept:,} of {total:,} trajectories into {len(shards):,} shards"
        f" in {time.time() - started:.1f} s",
        file=sys.stderr,
    )


def child_peak_mb(root: Path, *flags: str) -> float:
    """Peak RSS of one child running `shard_only`: the largest child so far, so run the
    smaller one first."""
    cmd = [sys.executable, "-m", "orchestrator.bench_shards", "--dir", str(root), "--child", *flags]
    subprocess.run(cmd, check=True)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.bench_shards", description=__doc__
    )
    parser.add_argument("--trajectories", type=int, default=100_000)
    parser.add_argument("--tokens", type=int, default=32_768)
    parser.add_argument("--per-file", type=int, default=512)
    parser.add_argument("--dir", type=Path, required=True, help="where the cell is written")
    parser.add_argument("--reuse", action="store_true", help="shard the cell already in --dir")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--imports-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        shard_only(args.dir, args.imports_only)
        return 0
    if min(args.trajectories, args.tokens, args.per_file) < 1:
        print("error: --trajectories, --tokens and --per-file must be positive", file=sys.stderr)
        return 2
    if args.write:
        started = time.time()
        disk = write_cell(args.dir, args.trajectories, args.tokens, args.per_file)
        print(
            f"wrote {args.trajectories:,} trajectories x {args.tokens:,} tokens"
            f" ({args.trajectories * args.tokens * 4 / 1e9:.1f} GB of int32 ids, {disk:.3f} GB"
            f" on disk) in {time.time() - started:.0f} s"
        )
        return 0
    if not args.reuse:  # in a child: a child's peak RSS counts its parent's at the fork
        cmd = [
            sys.executable,
            "-m",
            "orchestrator.bench_shards",
            *(argv or sys.argv[1:]),
            "--write",
        ]
        subprocess.run(cmd, check=True)
    floor = child_peak_mb(args.dir, "--imports-only")
    peak = child_peak_mb(args.dir)
    print(
        f"peak RSS of the sharding step: {peak:,.0f} MB (a child that only imports: {floor:,.0f} MB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
