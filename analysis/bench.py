"""Benchmark of the aggregation: synthetic score shards in, rows / seconds / peak memory out.

    python -m analysis.bench [--rows 10000000] [--shards 20] [--alternatives 32] [--top-k 8]

Writes `--rows` synthetic token rows (the scorer's layout, J alternatives of k experts each;
500-token trajectories) as several complete shards under a temporary directory, then runs
`analysis.metrics.collect_stats` and `analysis.tables.summarise` (the tables with their
bootstrap intervals) over them in a fresh process and reports their wall times and the RSS
high-water mark (VmHWM:
Polars allocates natively, so tracemalloc would not see it), next to the
size of the data in memory (Arrow nbytes, of the whole table and of the columns the
aggregation reads). Generating and writing the data (vectorised numpy, ~15 s per million
rows with k = 8, mostly disk) is not timed.

The synthetic distribution is shaped like the real one: most tokens confident (every route
near 1), some ambiguous, some fragile (routes spread widely), with router scores correlated
with utility on confident tokens and not on fragile ones. The routes are drawn as the scorer
draws them (`make_routes`: S the top k of synthetic router logits, alternatives Gumbel-top-k
over the pool of the P = 32 largest), with a logit scale that reproduces the demo's tiny
model; a draw equal to S has S's u and s. At Qwen3-30B-A3B's shape (128 experts, k = 8) a
draw shares ~3.6 of S's experts but almost never is S, and its ids, in the order picked, sit
at other byte positions than S's: zstd finds no repeats to exploit, so a route id still takes
~7 bits on disk. The logits are synthetic: a large model's router may be more peaked (more
overlap, more draws of S) or less.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

READ_COLUMNS = (
    "model",
    "layer",
    "dataset",
    "std_prob",
    "alt_probs",
    "std_route_logprob",
    "alt_route_logprobs",
    "std_route",  # read for the repeated-route columns (distinct routes, draws equal to S)
    "alt_routes",
)


def _list_array(values: np.ndarray, width: int) -> pa.ListArray:
    """A list<values> array of equal-length lists from a flat buffer (no Python loop)."""
    offsets = np.arange(0, len(values) + 1, width, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


# Router logits of the synthetic tokens: N(0, ROUTER_SCALE^2) per expert. 1.2 reproduces the
# demo's tiny model (16 experts, k = 4, every expert in the pool) as scored with the default
# sampler: a draw shares 2.2 of S's 4 experts on average and 3-4% of draws are S itself.
ROUTER_SCALE = 1.2
ROUTE_CHUNK = 32_768  # tokens drawn at once: the Gumbel keys are J x P floats per token


def make_routes(
    n: int,
    *,
    alternatives: int,
    top_k: int,
    experts: int,
    pool: int = 32,
    temperature: float = 1.0,
    scale: float = ROUTER_SCALE,
    seed: int = 0,
) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """Expert ids drawn the way the scorer draws them (workers/scoring/routes.py, sampler
    "gumbel"), from synthetic router logits z ~ N(0, scale^2): S is the k largest z in
    descending order, each alternative the k largest z_e / temperature + Gumbel noise over the
    pool of the P largest z, in the order picked. So, as in real score files, alternatives
    overlap S and draw from P of the experts, and some draws are S itself. Returns the two
    route columns in the scorer's layout and a (n, J) mask of the draws equal to S as a set."""
    from workers.schemas import expert_id_type

    rng = np.random.default_rng(seed + 1_000_003)
    ids = expert_id_type(experts).to_pandas_dtype()
    p = min(pool, experts)
    std = np.empty((n, top_k), ids)
    alt = np.empty((n, alternatives, top_k), ids)
    for a in range(0, n, ROUTE_CHUNK):
        m = min(ROUTE_CHUNK, n - a)
        z = rng.standard_normal((m, experts), dtype=np.float32) * np.float32(scale)
        order = np.argsort(-z, axis=1)[:, :p]  # the pool, descending z
        std[a : a + m] = order[:, :top_k]
        # The k largest z_e / tau + Gumbel are the k smallest Exp(1) / exp(z_e / tau) (the
        # exponential race: the same distribution, in the same order), without two logs.
        weights = np.exp(np.take_along_axis(z, order, 1) / np.float32(temperature))
        race = rng.standard_exponential((m, alternatives, p), dtype=np.float32)
        picked = np.argsort(race / weights[:, None, :], axis=2)[:, :, :top_k]  # order picked
        pools = np.broadcast_to(order[:, None, :], (m, alternatives, p))
        alt[a : a + m] = np.take_along_axis(pools, picked, 2)
    repeat = (np.sort(alt, axis=2) == np.sort(std, axis=1)[:, None, :]).all(axis=2)
    # The scorer's layout (workers.schemas.scores_schema): fixed-size lists of small ids.
    std_route = pa.FixedSizeListArray.from_arrays(pa.array(std.ravel()), top_k)
    alt_routes = pa.FixedSizeListArray.from_arrays(
        pa.FixedSizeListArray.from_arrays(pa.array(alt.ravel()), top_k), alternatives
    )
    return std_route, alt_routes, repeat


def make_scores(
    rows: int,
    *,
    alternatives: int = 32,
    top_k: int = 8,
    experts: int = 128,
    seed: int = 0,
    model: str = "synthetic-moe",
    layer: int = 12,
    dataset: str = "synthetic",
) -> pa.Table:
    """`rows` synthetic token rows in the scorer's layout (workers.schemas.scores_schema;
    vectorised, ~1 s per million rows)."""
    from workers.schemas import scores_schema

    rng = np.random.default_rng(seed)
    n, j = rows, alternatives
    # Token kind: 75 % confident, 12 % ambiguous, 13 % fragile (paper-like proportions).
    kind = rng.choice(3, size=n, p=[0.75, 0.12, 0.13])
    centre = np.where(
        kind == 0, rng.beta(60, 1, n), np.where(kind == 1, rng.beta(7, 3, n), rng.beta(1.2, 3, n))
    )
    spread = np.array([0.01, 0.12, 0.25], dtype=np.float32)[kind]
    noise = rng.standard_normal((n, j + 1), dtype=np.float32)
    u = np.clip(centre[:, None].astype(np.float32) + spread[:, None] * noise, 0.0, 1.0)
    # Router score: S is the top-k route, so alternatives score below it; how much below
    # follows their utility on confident tokens, less on ambiguous ones, not on fragile ones.
    s_std = -rng.exponential(1.0, n).astype(np.float32) - top_k * 0.5
    signal = np.array([2.0, 0.7, 0.0], dtype=np.float32)[kind][:, None]
    s_alt = (
        s_std[:, None]
        - 0.5
        - rng.exponential(1.0, (n, j)).astype(np.float32)
        + signal * (u[:, 1:] - u[:, :1]) / spread[:, None]
    )
    # Gumbel-top-k draws repeat routes: a draw of S itself has exactly S's u and s (ties that
    # must not count as wins).
    std_route, alt_routes, repeat = make_routes(
        n, alternatives=j, top_k=top_k, experts=experts, seed=seed
    )
    u[:, 1:] = np.where(repeat, u[:, :1], u[:, 1:])
    s_alt = np.where(repeat, s_std[:, None], s_alt).astype(np.float32)
    # Trajectories of 500 tokens, ids unique per seed so that shards never share one (the
    # bootstrap resamples trajectories).
    traj = pa.array(seed * 1_000_000 + np.arange(n, dtype=np.int64) // 500).cast(pa.string())
    cols = {
        "problem_id": pc.binary_join_element_wise("p", traj, ""),
        "sample_idx": pa.array(np.zeros(n, dtype=np.int32)),
        "position": pa.array((np.arange(n) % 500).astype(np.int32)),
        "target_id": pa.array(rng.integers(0, 50000, n, dtype=np.int32)),
        "std_route": std_route,
        "std_prob": pa.array(u[:, 0]),
        "alt_routes": alt_routes,
        "alt_probs": _list_array(u[:, 1:].ravel(), j),
        "std_route_logprob": pa.array(s_std),
        "alt_route_logprobs": _list_array(s_alt.ravel(), j),
        "model": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), [model]),
        "layer": pa.array(np.full(n, layer, dtype=np.int32)),
        "dataset": pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), [dataset]),
        # next-token distributions: KL grows with |u(R) - u(S)|; a repeat of S has KL 0
        "std_argmax": pa.array(rng.integers(0, 50000, n, dtype=np.int32)),
        "alt_kl": _list_array(np.abs(u[:, 1:] - u[:, :1]).ravel(), j),
        "alt_argmax_changed": pa.ListArray.from_arrays(
            pa.array(np.arange(n + 1, dtype=np.int32) * j),
            pa.array((np.abs(u[:, 1:] - u[:, :1]) > 0.2).ravel()),
        ),
        "verified": pa.array(np.ones(n, dtype=bool)),
    }
    return pa.Table.from_pydict(cols).cast(scores_schema(experts, top_k, j))


def write_shards(
    root: Path, rows: int, shards: int, *, alternatives: int, top_k: int
) -> tuple[int, int, float]:
    """Write `rows` rows as `shards` complete shards (two layers, so groups are real); return
    (nbytes of all columns, nbytes of the columns the aggregation reads, seconds spent in
    write_arrow: encoding, compression, the disk and the sidecar's hash)."""
    from workers.io import write_arrow

    total = read = 0
    write_s = 0.0
    per = -(-rows // shards)
    for i in range(shards):
        n = min(per, rows - i * per)
        if n <= 0:
            break
        layer = (0, 12, 23)[i % 3]
        table = make_scores(n, alternatives=alternatives, top_k=top_k, seed=i, layer=layer)
        total += table.nbytes
        read += table.select(list(READ_COLUMNS)).nbytes
        path = root / "scores" / "synthetic-moe" / f"layer={layer}" / "synthetic" / f"{i:05d}.arrow"
        # Record batches of 64k rows, like a scorer that appends per trajectory group; the
        # streaming engine's memory follows the batch size, not the shard size.
        table = pa.Table.from_batches(table.to_batches(max_chunksize=65_536))
        t0 = time.perf_counter()
        write_arrow(table, path, config_hash="bench")
        write_s += time.perf_counter() - t0
        del table
    return total, read, write_s


def write_sample_run(
    run_dir: str | Path,
    *,
    models: tuple[str, ...] = ("synthetic-a", "synthetic-b"),
    layers: tuple[int, ...] = (0, 12, 23),
    datasets: tuple[str, ...] = ("math", "aime"),
    rows: int = 20_000,
    shards: int = 2,
    alternatives: int = 32,
    top_k: int = 8,
) -> list[Path]:
    """A small synthetic run directory (scores only) for demos and tests of the report."""
    from workers.io import write_arrow

    paths = []
    for m, model in enumerate(models):
        for layer in layers:
            for d, dataset in enumerate(datasets):
                for i in range(shards):
                    seed = ((m * 1009 + layer) * 1009 + d) * 1009 + i
                    table = make_scores(
                        rows // shards,
                        alternatives=alternatives,
                        top_k=top_k,
                        seed=seed,
                        model=model,
                        layer=layer,
                        dataset=dataset,
                    )
                    path = (
                        Path(run_dir)
                        / "scores"
                        / model
                        / f"layer={layer}"
                        / dataset
                        / f"shard-{i:05d}.arrow"
                    )
                    write_arrow(table, path, config_hash="synthetic")
                    paths.append(path)
    return paths


def _peak_rss_kib() -> int:
    """This process's RSS high-water mark in KiB. VmHWM belongs to the address space, which
    exec replaces; ru_maxrss would also count the parent's peak from before the exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: best effort


def _aggregate_child(run_dir: str) -> None:
    """Child process body: aggregate, then the tables with their bootstrap intervals; print
    timings and RSS (before and peak) as JSON."""
    from analysis.metrics import AnalysisConfig, collect_stats, find_shards
    from analysis.tables import summarise

    paths = find_shards(run_dir)
    import analysis.kernel  # noqa: F401  (libraries loaded before the baseline is read)

    cfg = AnalysisConfig()
    baseline = _peak_rss_kib()
    t0 = time.perf_counter()
    stats = collect_stats(paths, cfg)
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    tables = summarise(stats, cfg)
    tables_s = time.perf_counter() - t1
    result = {
        "seconds": seconds,
        "tables_seconds": tables_s,
        "bootstrap": cfg.bootstrap,
        "rows": int(stats["tokens"].sum()),
        "groups": stats.height,
        "stats_mb": stats.estimated_size() / 2**20,
        "by_bin_rows": tables["by_bin"].height,
        "baseline_rss_mb": baseline / 1024,
        "peak_rss_mb": _peak_rss_kib() / 1024,
    }
    print(json.dumps(result))


def measure(run_dir: Path) -> dict:
    """Run the aggregation in a fresh process, so that its RSS high-water mark is the
    aggregation's (plus the interpreter and libraries, reported as the baseline)."""
    code = f"from analysis.bench import _aggregate_child; _aggregate_child({str(run_dir)!r})"
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--alternatives", type=int, default=32, help="J")
    parser.add_argument("--top-k", type=int, default=8, help="experts per route")
    parser.add_argument(
        "--keep", type=Path, default=None, help="write the shards here and keep them"
    )
    args = parser.parse_args(argv)

    root = args.keep or Path(tempfile.mkdtemp(prefix="moe-bench-"))
    try:
        t0 = time.perf_counter()
        total, read, write_s = write_shards(
            root, args.rows, args.shards, alternatives=args.alternatives, top_k=args.top_k
        )
        gen_s = time.perf_counter() - t0
        result = measure(root)
        disk = sum(p.stat().st_size for p in root.rglob("*.arrow"))
        print(
            f"rows                 {result['rows']:,} in {args.shards} shards, J={args.alternatives}, k={args.top_k}"
        )
        print(f"generate+write       {gen_s:.1f} s (not counted)")
        print(
            f"write                {write_s:.1f} s ({result['rows'] / write_s / 1e6:.2f} M rows/s,"
            f" {disk / write_s / 2**20:,.0f} MB/s on disk)"
        )
        print(
            f"aggregate            {result['seconds']:.1f} s ({result['rows'] / result['seconds'] / 1e6:.2f} M rows/s)"
        )
        print(
            f"tables + intervals   {result['tables_seconds']:.1f} s ({result['bootstrap']:,} bootstrap "
            f"replicates over {result['groups']:,} (trajectory, bin, gain bucket) sums, "
            f"{result['stats_mb']:,.0f} MB)"
        )
        print(
            f"peak RSS             {result['peak_rss_mb']:,.0f} MB"
            f" (interpreter + libraries before the scan: {result['baseline_rss_mb']:,.0f} MB)"
        )
        print(
            f"data in memory       {total / 2**20:,.0f} MB all columns, {read / 2**20:,.0f} MB columns read"
        )
        print(
            f"data on disk         {disk / 2**20:,.0f} MB ({disk / result['rows']:,.0f} bytes per row)"
        )
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(
            f"machine              {os.cpu_count()} CPUs, load average {load} (shared CPU inflates time)"
        )
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
