"""pass@K before and after the router update, with bootstrap intervals over problems.

Contract: `count_correct(trajectories)` reduces a frame of sampled completions (columns
variant, dataset, problem_id, verified) to one row per (variant, dataset, problem): n samples,
c correct. `pass_at_k(n, c, k)` is the unbiased estimator 1 - C(n-c, K) / C(n, K), computed as
the product prod_{i=n-c+1..n} (1 - K / i), which never forms a binomial coefficient (those
overflow float64 beyond n ~ 1000) and is exact in the corner cases (c = 0 -> 0; n - c < K -> 1).
`passk_table(counts, ...)` gives per (variant, dataset, K) the mean over problems and a 95%
percentile bootstrap interval that resamples problems (the samples of one problem are not
independent); `paired_diff(counts, before, after, ...)` gives after - before with the same
resampled problems for both, so the interval reflects the per-problem pairing. Datasets are
also pooled as "all", and as the paper's pools (POOLS: AIME 2024 and 2025 as one group) where
all of a pool's datasets are present; a pooled group resamples each dataset's problems within
that dataset. `plot_passk` draws the curves with their bands. Seeded: each group's generator is
seeded from (seed, the group's name), so a group's interval does not depend on which other
variants or datasets the table holds.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import polars as pl

from workers.atomic import atomic_file

COUNT_COLUMNS = ("variant", "dataset", "problem_id", "n", "c")
ALL = "all"
# The paper reports AIME 2024 and AIME 2025 as one benchmark: pooled group name -> datasets.
POOLS = {"aime2024+2025": ("aime2024", "aime2025")}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@K of one problem with n samples of which c are correct (1 <= K <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= K <= n, got n={n}, c={c}, K={k}")
    if n - c < k:
        return 1.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(1.0 - np.prod(1.0 - k / i))


def k_values(n: int) -> list[int]:
    """K = 1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return [*ks, n]


def count_correct(trajectories: pl.DataFrame) -> pl.DataFrame:
    """One row per (variant, dataset, problem_id): n samples and c verified."""
    return (
        trajectories.group_by("variant", "dataset", "problem_id")
        .agg(pl.len().alias("n"), pl.col("verified").cast(pl.Int64).sum().alias("c"))
        .sort("variant", "dataset", "problem_id")
    )


def _per_problem(counts: pl.DataFrame, ks: list[int]) -> np.ndarray:
    """pass@K per problem (rows, in `counts` order) x K (columns)."""
    return np.array(
        [[pass_at_k(n, c, k) for k in ks] for n, c in counts.select("n", "c").iter_rows()]
    ).reshape(counts.height, len(ks))


def _groups(
    counts: pl.DataFrame, pools: dict[str, tuple[str, ...]]
) -> list[tuple[str, pl.DataFrame]]:
    """Each dataset on its own, then each pool whose datasets are all present, then all of
    them pooled (when there are several)."""
    names = counts["dataset"].unique(maintain_order=True).sort().to_list()
    out = [(d, counts.filter(pl.col("dataset") == d)) for d in names]
    for pool, members in pools.items():
        if set(members) <= set(names):
            out.append((pool, counts.filter(pl.col("dataset").is_in(list(members)))))
    return [*out, (ALL, counts)] if len(names) > 1 else out


def group_rng(seed: int, *names: str) -> np.random.Generator:
    """The generator of one group: (seed, a stable hash of its name), whatever else is there."""
    return np.random.default_rng([seed, zlib.crc32("\x00".join(names).encode())])


def _resample(datasets: np.ndarray, rng: np.random.Generator, draws: int) -> np.ndarray:
    """Indices of `draws` bootstrap resamples of the problems (rows), each dataset resampled
    within itself so that every resample keeps the datasets' sizes: (draws, rows)."""
    parts = []
    for d in np.unique(datasets):
        idx = np.flatnonzero(datasets == d)
        parts.append(idx[rng.integers(0, idx.size, size=(draws, idx.size))])
    return np.concatenate(parts, axis=1)


def _common_n(counts: pl.DataFrame) -> int:
    ns = counts["n"].unique().to_list()
    if len(ns) != 1:
        raise ValueError(f"every problem needs the same number of samples n, got {sorted(ns)}")
    return int(ns[0])


def passk_table(
    counts: pl.DataFrame,
    *,
    draws: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    pools: dict[str, tuple[str, ...]] = POOLS,
) -> pl.DataFrame:
    """variant, dataset, k, problems, pass_at_k, lo, hi (percentile bootstrap over problems)."""
    rows = []
    for variant in counts["variant"].unique(maintain_order=True).sort().to_list():
        for dataset, frame in _groups(counts.filter(pl.col("variant") == variant), pools):
            frame = frame.sort("dataset", "problem_id")
            ks = k_values(_common_n(frame))
            values = _per_problem(frame, ks)
            rng = group_rng(seed, variant, dataset)
            boot = values[_resample(frame["dataset"].to_numpy(), rng, draws)].mean(axis=1)
            lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=0)
            for j, k in enumerate(ks):
                rows.append((variant, dataset, k, frame.height, values[:, j].mean(), lo[j], hi[j]))
    return pl.DataFrame(
        rows,
        schema=["variant", "dataset", "k", "problems", "pass_at_k", "lo", "hi"],
        orient="row",
    )


def paired_diff(
    counts: pl.DataFrame,
    before: str,
    after: str,
    *,
    draws: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    pools: dict[str, tuple[str, ...]] = POOLS,
) -> pl.DataFrame:
    """dataset, k, problems, before, after, diff, lo, hi: after - before, paired bootstrap.

    Only problems sampled under both variants count; both must have the same n.
    """
    a = counts.filter(pl.col("variant") == before).drop("variant")
    b = counts.filter(pl.col("variant") == after).drop("variant")
    both = a.join(b, on=["dataset", "problem_id"], suffix="_after").sort("dataset", "problem_id")
    if both.height == 0:
        raise ValueError(f"no problem was sampled under both {before!r} and {after!r}")
    rows = []
    for dataset, frame in _groups(both, pools):
        n = _common_n(frame)
        if _common_n(frame.select(pl.col("n_after").alias("n"))) != n:
            raise ValueError(f"{before!r} and {after!r} must draw the same n samples per problem")
        ks = k_values(n)
        v0 = _per_problem(frame.select("n", "c"), ks)
        v1 = _per_problem(
            frame.select(pl.col("n_after").alias("n"), pl.col("c_after").alias("c")), ks
        )
        rng = group_rng(seed, before, after, dataset)
        idx = _resample(frame["dataset"].to_numpy(), rng, draws)
        boot = (v1[idx] - v0[idx]).mean(axis=1)
        lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=0)
        for j, k in enumerate(ks):
            m0, m1 = v0[:, j].mean(), v1[:, j].mean()
            rows.append((dataset, k, frame.height, m0, m1, m1 - m0, lo[j], hi[j]))
    return pl.DataFrame(
        rows,
        schema=["dataset", "k", "problems", "before", "after", "diff", "lo", "hi"],
        orient="row",
    )


def plot_passk(table: pl.DataFrame, path: str | Path, *, root: str | Path | None = None) -> Path:
    """pass@K against K (log2 axis) per dataset panel, one curve per variant, 95% bands;
    written through workers.atomic (`root`: the run folder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = table["dataset"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, len(datasets), figsize=(3.6 * len(datasets), 3.0), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        part = table.filter(pl.col("dataset") == dataset)
        for variant in part["variant"].unique(maintain_order=True).to_list():
            rows = part.filter(pl.col("variant") == variant).sort("k")
            ax.plot(rows["k"], rows["pass_at_k"], marker="o", ms=3, label=variant)
            ax.fill_between(rows["k"], rows["lo"], rows["hi"], alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_title(dataset)
        ax.set_xlabel("K")
        ax.set_ylabel("pass@K")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path, root=root) as f:
        fig.savefig(f, format=path.suffix.lstrip("."), dpi=120)
    plt.close(fig)
    return path
