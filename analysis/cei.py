"""Counterfactual Expert Impact tables: layer sensitivity on hard tokens and dormant experts
(docs/method.md, "Counterfactual Expert Impact").

Contract: CEI rows (workers.schemas.CEI_SCHEMA) in, Polars frames, a figure and a markdown
section out.
- `with_difficulty(frame, cfg)`: each token "hard", "easy" or "mid" from the standard pass,
  within its (model, layer, dataset): by `cfg.hard_by` ("entropy": of the standard next-token
  distribution, or "prob": u(S)), the `cfg.hard_fraction` most uncertain tokens are hard (the
  highest entropy / lowest u(S)), the `cfg.easy_fraction` least uncertain easy.
- `layer_sensitivity(frame, cfg)`: per (model, layer, dataset) the impact of a token,
  D = mean over e in S of |CEI_out(e)| (how far taking one routed expert out moves log u),
  averaged over hard and over easy tokens, and R_l = mean_hard D - mean_easy D (nats): the
  sensitivity to hard tokens beyond what the layer moves on any token; `ratio` =
  mean_hard / mean_easy.
- `expert_table(frame, cfg)`: per (model, layer, dataset, expert), on hard tokens only:
  `sel_freq` (share of hard tokens whose S holds e), `mean_cei_out` (mean CEI_out(e) where
  selected), `mean_cei_in` (mean CEI_in(e) where e was a pool expert outside S), `mean_gain_in`
  (mean max(CEI_in(e), 0) there) and `dormancy` = (1 - sel_freq) * mean_gain_in: high when
  forcing e in helps and the router rarely picks it.
Every mean has `<mean>_lo/_hi`: percentile bootstrap intervals resampling trajectories (or
problems, `cfg.cluster`), `cfg.bootstrap` replicates, seeded per group (analysis.intervals'
resampling); all experts of one (model, layer, dataset) share their replicates.

CLI: `python -m analysis.cei CEI.arrow [...] --out DIR` writes layers.csv, experts.csv,
cei.png and cei.md.
"""

from __future__ import annotations

import argparse
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from analysis.intervals import resample_weights
from analysis.metrics import CLUSTERS

KEYS = ("model", "layer", "dataset")
HARD_BY = ("entropy", "prob")
LAYER_MEANS = ("mean_hard", "mean_easy", "sensitivity", "ratio")
EXPERT_MEANS = ("sel_freq", "mean_cei_out", "mean_cei_in", "mean_gain_in", "dormancy")


@dataclass
class CeiConfig:
    """Hard/easy split and intervals of the CEI tables (this project's reading of CoR)."""

    hard_by: str = "entropy"  # "entropy" of the standard distribution, or "prob": u(S)
    hard_fraction: float = 0.25  # the most uncertain share of tokens per (model, layer, dataset)
    easy_fraction: float = 0.25  # the least uncertain share
    cluster: str = "trajectory"  # bootstrap unit: trajectory or problem
    bootstrap: int = 1000  # replicates; 0 = no intervals
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hard_by not in HARD_BY:
            raise ValueError(f"hard_by must be one of {', '.join(HARD_BY)}, got {self.hard_by!r}")
        if not (0 < self.hard_fraction and 0 < self.easy_fraction) or (
            self.hard_fraction + self.easy_fraction > 1
        ):
            raise ValueError(
                "hard_fraction and easy_fraction must be > 0 and sum to at most 1, got"
                f" {self.hard_fraction} and {self.easy_fraction}"
            )
        if self.cluster not in CLUSTERS:
            raise ValueError(f"cluster must be one of {', '.join(CLUSTERS)}, got {self.cluster!r}")
        if self.bootstrap < 0 or not 0 < self.level < 1:
            raise ValueError("bootstrap must be >= 0 and level in (0, 1)")


def with_difficulty(frame: pl.DataFrame, cfg: CeiConfig) -> pl.DataFrame:
    """`frame` with `uncertainty` and `difficulty` ("hard" | "easy" | "mid") columns."""
    u = pl.col("std_entropy") if cfg.hard_by == "entropy" else -pl.col("std_prob")
    # rank among the group's tokens, ties broken by position in the frame: shares are exact
    rank = (u.rank("ordinal").over(KEYS) - 1) / pl.len().over(KEYS)
    return frame.with_columns(uncertainty=u.cast(pl.Float64)).with_columns(
        difficulty=pl.when(rank >= 1 - cfg.hard_fraction)
        .then(pl.lit("hard"))
        .when(rank < cfg.easy_fraction)
        .then(pl.lit("easy"))
        .otherwise(pl.lit("mid"))
    )


def _bootstrap(points, x: np.ndarray, fn, cfg: CeiConfig, name: str):
    """(lo, hi) arrays of fn over resampled cluster sums x (clusters, ...), or None."""
    if cfg.bootstrap == 0 or x.shape[0] == 0:
        return None
    rng = np.random.default_rng([cfg.seed, zlib.crc32(name.encode())])
    w = resample_weights(rng, x.shape[0], cfg.bootstrap).astype(np.float64)
    reps = fn((w @ x.reshape(x.shape[0], -1)).reshape(cfg.bootstrap, *x.shape[1:]))
    alpha = (1 - cfg.level) / 2
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):  # a mean with no tokens: nan
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanquantile(reps, alpha, axis=0), np.nanquantile(reps, 1 - alpha, axis=0)


def _ratio(num, den):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _layer_means(s: np.ndarray) -> np.ndarray:
    """(..., 4) sums [n_hard, sum_hard, n_easy, sum_easy] -> (..., 4) LAYER_MEANS."""
    hard, easy = _ratio(s[..., 1], s[..., 0]), _ratio(s[..., 3], s[..., 2])
    return np.stack([hard, easy, hard - easy, _ratio(hard, easy)], axis=-1)


def layer_sensitivity(frame: pl.DataFrame, cfg: CeiConfig) -> pl.DataFrame:
    """One row per (model, layer, dataset): token counts, LAYER_MEANS and their intervals."""
    frame = with_difficulty(frame, cfg)
    impact = pl.col("cei_out").list.eval(pl.element().abs()).list.mean()
    per = (
        frame.with_columns(d=impact, hard=pl.col("difficulty") == "hard")
        .with_columns(easy=pl.col("difficulty") == "easy")
        .group_by([*KEYS, *CLUSTERS[cfg.cluster]])
        .agg(
            pl.col("hard").sum().cast(pl.Float64).alias("n_hard"),
            pl.col("d").filter(pl.col("hard")).sum().alias("sum_hard"),
            pl.col("easy").sum().cast(pl.Float64).alias("n_easy"),
            pl.col("d").filter(pl.col("easy")).sum().alias("sum_easy"),
        )
        .sort([*KEYS, *CLUSTERS[cfg.cluster]])
    )
    stats = ["n_hard", "sum_hard", "n_easy", "sum_easy"]
    rows = []
    for key, group in per.group_by(KEYS, maintain_order=True):
        x = group.select(stats).fill_null(0.0).to_numpy()
        point = _layer_means(x.sum(0))
        row = dict(zip(KEYS, key, strict=True))
        row |= {"hard_tokens": int(x[:, 0].sum()), "easy_tokens": int(x[:, 2].sum())}
        row |= dict(zip(LAYER_MEANS, point.tolist(), strict=True))
        ci = _bootstrap(point, x, _layer_means, cfg, "\x00".join(map(str, key)))
        for i, m in enumerate(LAYER_MEANS):
            row[f"{m}_lo"], row[f"{m}_hi"] = (None, None) if ci is None else (ci[0][i], ci[1][i])
        rows.append(row)
    return pl.DataFrame(rows).sort(list(KEYS))


def _expert_means(s: np.ndarray) -> np.ndarray:
    """(..., E, 6) sums [n_hard, n_sel, sum_out, n_in, sum_in, sum_gain] -> (..., E, 5)."""
    sel = _ratio(s[..., 1], s[..., 0])
    gain = _ratio(s[..., 5], s[..., 3])
    cols = [sel, _ratio(s[..., 2], s[..., 1]), _ratio(s[..., 4], s[..., 3]), gain, (1 - sel) * gain]
    return np.stack(cols, axis=-1)


def _expert_sums(frame: pl.DataFrame, cfg: CeiConfig) -> pl.DataFrame:
    """Per (model, layer, dataset, cluster, expert) the sums of `_expert_means` on hard tokens."""
    ids = [*KEYS, *CLUSTERS[cfg.cluster]]
    hard = with_difficulty(frame, cfg).filter(pl.col("difficulty") == "hard")
    n_hard = hard.group_by(ids).agg(pl.len().cast(pl.Float64).alias("n_hard"))
    out = (
        hard.select([*ids, "std_route", "cei_out"])
        .explode(["std_route", "cei_out"])
        .group_by([*ids, pl.col("std_route").alias("expert")])
        .agg(pl.len().cast(pl.Float64).alias("n_sel"), pl.col("cei_out").sum().alias("sum_out"))
    )
    swap = (
        hard.select([*ids, "in_experts", "cei_in"])
        .explode(["in_experts", "cei_in"])
        .drop_nulls("in_experts")
        .group_by([*ids, pl.col("in_experts").alias("expert")])
        .agg(
            pl.len().cast(pl.Float64).alias("n_in"),
            pl.col("cei_in").sum().alias("sum_in"),
            pl.col("cei_in").clip(lower_bound=0).sum().alias("sum_gain"),
        )
    )
    stats = ["n_sel", "sum_out", "n_in", "sum_in", "sum_gain"]
    sums = out.join(swap, on=[*ids, "expert"], how="full", coalesce=True)
    return sums.with_columns(pl.col(stats).fill_null(0.0)), n_hard


def expert_table(frame: pl.DataFrame, cfg: CeiConfig) -> pl.DataFrame:
    """One row per (model, layer, dataset, expert) seen on hard tokens (selected or in the
    pool): counts, EXPERT_MEANS and their intervals, by descending dormancy."""
    ids = [*KEYS, *CLUSTERS[cfg.cluster]]
    sums, n_hard = _expert_sums(frame, cfg)
    stats = ["n_sel", "sum_out", "n_in", "sum_in", "sum_gain"]
    rows = []
    for key, group in n_hard.sort(ids).group_by(KEYS, maintain_order=True):
        clusters = group.select(ids[3:]).with_row_index("c")
        part = sums.filter(*(pl.col(k) == v for k, v in zip(KEYS, key, strict=True)))
        part = part.join(clusters, on=ids[3:])
        experts = np.sort(part["expert"].unique().to_numpy())
        x = np.zeros((clusters.height, len(experts), 6))
        x[:, :, 0] = group["n_hard"].to_numpy()[:, None]
        e_idx = np.searchsorted(experts, part["expert"].to_numpy())
        x[part["c"].to_numpy(), e_idx, 1:] = part.select(stats).to_numpy()
        point = _expert_means(x.sum(0))
        ci = _bootstrap(point, x, _expert_means, cfg, "\x00".join(map(str, key)))
        totals = x.sum(0)
        for j, e in enumerate(experts.tolist()):
            row = dict(zip(KEYS, key, strict=True)) | {"expert": int(e)}
            row |= {"hard_tokens": int(totals[j, 0]), "selected": int(totals[j, 1])}
            row["in_pool"] = int(totals[j, 3])
            for i, m in enumerate(EXPERT_MEANS):
                row[m] = float(point[j, i])
                row[f"{m}_lo"] = None if ci is None else float(ci[0][j, i])
                row[f"{m}_hi"] = None if ci is None else float(ci[1][j, i])
            rows.append(row)
    table = pl.DataFrame(rows).fill_nan(None)
    return table.sort([*KEYS, "dormancy"], descending=[False, False, False, True], nulls_last=True)


def plot_cei(layers: pl.DataFrame, experts: pl.DataFrame, path: Path, root=None) -> Path:
    """Left: R_l per layer with intervals, a line per (model, dataset). Right: each expert's
    selection frequency on hard tokens against its mean gain when forced in."""
    from analysis.figures import _figure, _save

    fig, axes = _figure(1, 2, width=4.2)
    left, right = axes[0]
    for key, g in layers.sort("layer").group_by(["model", "dataset"], maintain_order=True):
        x = [str(v) for v in g["layer"]]
        y = g["sensitivity"].to_numpy()
        err = None
        if g["sensitivity_lo"].null_count() == 0:
            err = np.vstack(
                [y - g["sensitivity_lo"].to_numpy(), g["sensitivity_hi"].to_numpy() - y]
            )
        left.errorbar(x, y, yerr=err, marker="o", capsize=3, label=" / ".join(map(str, key)))
    left.axhline(0, color="#999999", lw=0.8)
    left.set(xlabel="MoE layer", ylabel="R_l (nats): hard - easy", title="Layer sensitivity")
    left.legend(fontsize=7)
    for (layer,), g in experts.group_by(["layer"], maintain_order=True):
        g = g.drop_nulls(["sel_freq", "mean_gain_in"])
        right.scatter(
            g["sel_freq"].to_numpy(), g["mean_gain_in"].to_numpy(), s=14, label=f"L{layer}"
        )
    right.set(
        xlabel="selection frequency (hard tokens)",
        ylabel="mean max(CEI_in, 0) (nats)",
        title="Dormant experts: upper left",
    )
    right.legend(fontsize=7)
    return _save(fig, Path(path), root)


def _ci(row: dict, mean: str, spec: str = ".3f") -> str:
    value = row[mean]
    if value is None:
        return "n/a"
    lo, hi = row.get(f"{mean}_lo"), row.get(f"{mean}_hi")
    text = format(value, spec)
    return text if lo is None or hi is None else f"{text} [{lo:{spec}}, {hi:{spec}}]"


def cei_section(
    layers: pl.DataFrame, experts: pl.DataFrame, cfg: CeiConfig, top: int = 5
) -> list[str]:
    """Markdown lines: how to read, the layer table, the `top` most dormant experts per layer."""
    unit = "trajectories" if cfg.cluster == "trajectory" else "problems"
    by = "entropy of the standard next-token distribution" if cfg.hard_by == "entropy" else "u(S)"
    lines = [
        "## Counterfactual Expert Impact",
        "",
        f"Hard tokens: the {cfg.hard_fraction:.0%} most uncertain by {by}; easy: the"
        f" {cfg.easy_fraction:.0%} least uncertain (per model, layer and data set). D = mean"
        " |log u(S) - log u(S without e)| over e in S; R_l = mean D on hard tokens - on easy"
        f" tokens. Dormancy = (1 - selection frequency) x mean max(CEI_in, 0), on hard tokens."
        f" Brackets: {cfg.level:.0%} bootstrap intervals over {unit}.",
        "",
        "| model | layer | dataset | hard | easy | D hard | D easy | R_l |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in layers.iter_rows(named=True):
        lines.append(
            f"| {r['model']} | {r['layer']} | {r['dataset']} | {r['hard_tokens']} |"
            f" {r['easy_tokens']} | {_ci(r, 'mean_hard')} | {_ci(r, 'mean_easy')} |"
            f" {_ci(r, 'sensitivity')} |"
        )
    lines += [
        "",
        "| model | layer | dataset | expert | selected | sel. freq | CEI_out | CEI_in | dormancy |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for _, g in experts.group_by(list(KEYS), maintain_order=True):
        for r in g.head(top).iter_rows(named=True):
            lines.append(
                f"| {r['model']} | {r['layer']} | {r['dataset']} | {r['expert']} |"
                f" {r['selected']} | {_ci(r, 'sel_freq', '.2f')} | {_ci(r, 'mean_cei_out')} |"
                f" {_ci(r, 'mean_cei_in')} | {_ci(r, 'dormancy')} |"
            )
    return lines


CEI_GLOB = "cei/*/layer=*/*/*.arrow"


def cei_tables(paths: list[Path], analysis) -> tuple[pl.DataFrame, pl.DataFrame, CeiConfig] | None:
    """(layer table, expert table, their CeiConfig) of the complete files among `paths`, with
    intervals as `analysis` (an AnalysisConfig) sets them; None when none is complete."""
    from workers.io import is_complete

    files = [p for p in paths if is_complete(p)]
    if not files:
        return None
    cfg = CeiConfig(
        cluster=analysis.cluster,
        bootstrap=analysis.bootstrap,
        level=analysis.level,
        seed=analysis.seed,
    )
    frame = read_cei(files)
    return layer_sensitivity(frame, cfg), expert_table(frame, cfg), cfg


def cei_report(run_dir: Path, analysis) -> list[str]:
    """A run's CEI section (analysis.report): its complete cei files (CEI_GLOB) into
    tables/cei_layers and tables/cei_experts (.parquet, .csv), figures/cei.png and markdown
    lines; none without cei files. Intervals as `analysis` (an AnalysisConfig) sets them."""
    from analysis.tables import write_tables

    tables = cei_tables(sorted(run_dir.glob(CEI_GLOB)), analysis)
    if tables is None:
        return []
    layers, experts, cfg = tables
    write_tables({"cei_layers": layers, "cei_experts": experts}, run_dir / "tables", root=run_dir)
    plot_cei(layers, experts, run_dir / "figures" / "cei.png", root=run_dir)
    lines = cei_section(layers, experts, cfg)
    return [
        *lines,
        "",
        "![cei](figures/cei.png)",
        "",
        "Tables: `tables/cei_layers`, `tables/cei_experts`.",
        "",
    ]


def read_cei(paths: list[str | Path]) -> pl.DataFrame:
    """CEI rows of complete Arrow files (workers.io.read_arrow: sidecars verified), concatenated."""
    from workers.io import read_arrow
    from workers.schemas import CEI_SCHEMA

    tables = []
    for p in paths:
        table = read_arrow(p)
        if table.schema != CEI_SCHEMA:
            raise ValueError(f"{p} does not hold CEI rows (workers.schemas.CEI_SCHEMA)")
        tables.append(pl.from_arrow(table))
    return pl.concat(tables)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.cei", description=__doc__.split("\n")[0]
    )
    parser.add_argument("files", nargs="+", help="CEI Arrow files")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--hard-by", default=CeiConfig.hard_by, choices=HARD_BY)
    parser.add_argument("--hard-fraction", type=float, default=CeiConfig.hard_fraction)
    parser.add_argument("--easy-fraction", type=float, default=CeiConfig.easy_fraction)
    parser.add_argument("--cluster", default=CeiConfig.cluster, choices=tuple(CLUSTERS))
    parser.add_argument("--bootstrap", type=int, default=CeiConfig.bootstrap)
    parser.add_argument("--seed", type=int, default=CeiConfig.seed)
    args = parser.parse_args(argv)
    try:
        cfg = CeiConfig(
            hard_by=args.hard_by,
            hard_fraction=args.hard_fraction,
            easy_fraction=args.easy_fraction,
            cluster=args.cluster,
            bootstrap=args.bootstrap,
            seed=args.seed,
        )
        missing = [f for f in args.files if not Path(f).is_file()]
        if missing:
            raise ValueError(f"CEI file {missing[0]} does not exist")
        frame = read_cei(args.files)
    except (ValueError, OSError) as err:
        print(f"error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    from workers.atomic import atomic_file

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layers, experts = layer_sensitivity(frame, cfg), expert_table(frame, cfg)
    for name, table in (("layers.csv", layers), ("experts.csv", experts)):
        with atomic_file(out / name) as f:
            table.write_csv(f)
    plot_cei(layers, experts, out / "cei.png")
    with atomic_file(out / "cei.md") as f:
        f.write("\n".join(cei_section(layers, experts, cfg)).encode() + b"\n")
    print(f"{frame.height} rows -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
