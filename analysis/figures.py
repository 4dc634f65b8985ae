"""Figures of a run's tables (PNG, matplotlib's object API: no pyplot, no global backend state).

Contract: `plot_all(tables, out_dir)` -> {"headline", "gain_hist", "alignment", "win_rate"}:
paths of PNGs drawn from `analysis.tables.summarise`'s frames, pooled over datasets (the
dataset = "all" rows), one panel per (model, layer) or per model:
- headline: mean u(S) and mean max_j u(R_j) per bin, token counts over the bars;
- gain_hist: distribution of the per-token gain max_j u(R_j) - u(S) per bin (from exact bucket
  counts, not a sample), as the share of the bin's tokens per bucket, log scale;
- alignment: mean Spearman rho(s, u) per bin and layer, per model;
- win_rate: share of tokens where an alternative beats S, by layer, a line per model, per bin.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from analysis.metrics import BINS

BIN_COLORS = {
    "confident": "#2a9d8f",
    "ambiguous": "#d4a017",
    "fragile": "#e76f51",
    "all": "#555555",
}


def _figure(rows: int, cols: int, width: float = 3.4, height: float = 2.8):
    from matplotlib.figure import Figure

    # Constrained layout costs ~1 s per figure here (it draws twice); fixed margins do not.

    w, h = max(width * cols, 4.0), height * rows + 0.6
    fig = Figure(figsize=(w, h))
    axes = fig.subplots(rows, cols, squeeze=False)
    # Margins in inches, so that labels fit whatever the grid.
    fig.subplots_adjust(
        left=0.8 / w, right=1 - 0.15 / w, bottom=0.6 / h, top=1 - 0.6 / h, wspace=0.3, hspace=0.5
    )
    return fig, axes


def _panels(pooled: pl.DataFrame) -> tuple[list[str], dict[str, list[int]]]:
    models = sorted(pooled["model"].unique().to_list())
    layers = {
        m: sorted(pooled.filter(pl.col("model") == m)["layer"].unique().to_list()) for m in models
    }
    return models, layers


def _model_layer_grid(pooled: pl.DataFrame):
    """A figure with a row per model and a panel per layer; returns (fig, axes, panels) where
    panels lists (ax, model, layer, column) and a row's unused panels are hidden."""
    models, layers = _panels(pooled)
    cols = max(len(v) for v in layers.values())
    fig, axes = _figure(len(models), cols)
    panels = []
    for r, model in enumerate(models):
        for c in range(cols):
            if c < len(layers[model]):
                panels.append((axes[r][c], model, layers[model][c], c))
            else:
                axes[r][c].set_visible(False)
    return fig, axes, panels


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_headline(by_bin: pl.DataFrame, path: Path) -> Path:
    pooled = by_bin.filter(pl.col("dataset") == "all")
    fig, axes, panels = _model_layer_grid(pooled)
    for ax, model, layer, c in panels:
        rows = {
            row["bin"]: row
            for row in pooled.filter(
                (pl.col("model") == model) & (pl.col("layer") == layer)
            ).iter_rows(named=True)
        }
        xs = range(len(BINS))
        std = [rows.get(b, {}).get("mean_u_std") for b in BINS]
        best = [rows.get(b, {}).get("mean_max_alt") for b in BINS]
        ax.bar(
            [x - 0.2 for x in xs],
            [v or 0 for v in std],
            0.4,
            label="u(S), standard route",
            color="#264653",
        )
        ax.bar(
            [x + 0.2 for x in xs],
            [v or 0 for v in best],
            0.4,
            label="max u(R), best alternative",
            color="#e76f51",
        )
        for x, b in zip(xs, BINS, strict=True):
            n = rows.get(b, {}).get("tokens") or 0
            top = max(std[x] or 0, best[x] or 0)
            ax.annotate(
                f"n={n:,}",
                (x, top),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                fontsize=7,
            )
        ax.set_xticks(list(xs), [b.capitalize() for b in BINS], fontsize=8)
        ax.set_ylim(0, 1.12)
        ax.set_title(f"{model} · layer {layer}", fontsize=9)
        if c == 0:
            ax.set_ylabel("mean p(next token)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncols=2, fontsize=7, frameon=False)
    fig.suptitle(
        "Standard route vs best of J alternatives, per pbar bin", fontsize=10, x=0.02, ha="left"
    )
    return _save(fig, path)


def plot_gain_hist(gain_hist: pl.DataFrame, path: Path) -> Path:
    from matplotlib.ticker import NullLocator

    pooled = gain_hist.group_by("model", "layer", "bin", "gain_bucket", "lo", "hi").agg(
        pl.col("tokens").sum()
    )
    fig, axes, panels = _model_layer_grid(pooled)
    for ax, model, layer, c in panels:
        for b in BINS:
            h = pooled.filter(
                (pl.col("model") == model) & (pl.col("layer") == layer) & (pl.col("bin") == b)
            ).sort("gain_bucket")
            total = h["tokens"].sum()
            if not total:
                continue
            edges = [*(100 * h["lo"]).to_list(), 100 * h["hi"][-1]]
            ax.stairs(
                (h["tokens"] / total).to_list(),
                edges,
                label=f"{b} (n={total:,})",
                color=BIN_COLORS[b],
            )
        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(NullLocator())  # minor log ticks cost seconds per figure
        ax.set_xlim(-100, 100)
        ax.set_title(f"{model} · layer {layer}", fontsize=9)
        ax.set_xlabel("gain = max u(R) − u(S), points", fontsize=8)
        if c == 0:
            ax.set_ylabel("share of the bin's tokens")
        ax.legend(fontsize=6)
    fig.suptitle("Per-token gain of the best alternative route", fontsize=10)
    return _save(fig, path)


def plot_alignment(by_bin: pl.DataFrame, path: Path) -> Path:
    pooled = by_bin.filter(pl.col("dataset") == "all")
    models, layers = _panels(pooled)
    fig, axes = _figure(1, len(models), width=4.2)
    for c, model in enumerate(models):
        ax = axes[0][c]
        width = 0.8 / len(layers[model])
        for i, layer in enumerate(layers[model]):
            rows = {
                row["bin"]: row
                for row in pooled.filter(
                    (pl.col("model") == model) & (pl.col("layer") == layer)
                ).iter_rows(named=True)
            }
            values = [rows.get(b, {}).get("alignment") for b in BINS]
            xs = [x - 0.4 + width * (i + 0.5) for x in range(len(BINS))]
            ax.bar(xs, [v if v is not None else 0 for v in values], width, label=f"layer {layer}")
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(BINS)), [b.capitalize() for b in BINS], fontsize=8)
        ax.set_ylim(-1, 1)
        ax.set_title(model, fontsize=9)
        if c == 0:
            ax.set_ylabel("mean Spearman ρ(s(R), u(R))")
        ax.legend(fontsize=7)
    fig.suptitle("Router alignment: does the router's score rank routes by utility?", fontsize=10)
    return _save(fig, path)


def plot_win_rate(by_bin: pl.DataFrame, path: Path) -> Path:
    pooled = by_bin.filter(pl.col("dataset") == "all")
    models, layers = _panels(pooled)
    panels = (*BINS, "all")
    fig, axes = _figure(1, len(panels), width=3.2)
    for c, b in enumerate(panels):
        ax = axes[0][c]
        for model in models:
            rows = pooled.filter((pl.col("model") == model) & (pl.col("bin") == b)).sort("layer")
            ax.plot(rows["layer"].to_list(), rows["win_rate"].to_list(), marker="o", label=model)
        ax.set_ylim(0, 1.02)
        ax.set_title(b.capitalize(), fontsize=9, color=BIN_COLORS[b])
        ax.set_xlabel("layer", fontsize=8)
        if c == 0:
            ax.set_ylabel("win rate (some alternative > S)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Win rate of the best alternative by layer", fontsize=10)
    return _save(fig, path)


def plot_all(tables: dict[str, pl.DataFrame], out_dir: str | Path) -> dict[str, Path]:
    """Every figure of the report, as PNGs under out_dir."""
    out_dir = Path(out_dir)
    return {
        "headline": plot_headline(tables["by_bin"], out_dir / "headline.png"),
        "gain_hist": plot_gain_hist(tables["gain_hist"], out_dir / "gain_hist.png"),
        "alignment": plot_alignment(tables["by_bin"], out_dir / "alignment.png"),
        "win_rate": plot_win_rate(tables["by_bin"], out_dir / "win_rate.png"),
    }
