"""Figures of a run's tables (PNG, matplotlib's object API: no pyplot, no global backend state).

Contract: `plot_all(tables, out_dir, labels)` -> {"headline", "gain_hist", "alignment",
"win_rate"}: paths of PNGs drawn from `analysis.tables.summarise`'s frames, over all datasets
of each (model, layer) (`tables.pooled_rows`). `labels` maps (model, layer index) to a name
such as "final (L23)"; layers without one are shown as "L<index>". Error bars are the tables'
bootstrap intervals (`<mean>_lo`, `<mean>_hi`), drawn where present.
- headline: mean u(S) and mean max_j u(R_j) per bin, token counts over the bars, a panel per
  (model, layer);
- gain_hist: distribution of the per-token gain max_j u(R_j) - u(S) per bin (exact bucket
  counts, not a sample) as the share of the bin's tokens per bucket, log scale; a bucket
  without tokens is drawn empty and the x range covers the buckets that hold tokens;
- alignment: mean Spearman rho(s, u) per bin and layer, a panel per model;
- win_rate: win rate at the margin by scored layer (only layers that were scored: the x axis
  is categorical), a line per model, a panel per bin.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from analysis.metrics import BINS
from analysis.tables import pooled_rows
from workers.atomic import atomic_file

BIN_COLORS = {
    "confident": "#2a9d8f",
    "ambiguous": "#d4a017",
    "fragile": "#e76f51",
    "all": "#555555",
}
FONT = 9  # legends and tick labels: readable at the saved size (110 dpi)


def _figure(rows: int, cols: int, width: float = 3.6, height: float = 3.0, top: float = 0.9):
    from matplotlib.figure import Figure

    # Constrained layout costs ~1 s per figure here (it draws twice); fixed margins do not.
    w, h = max(width * cols, 5.5), height * rows + top
    fig = Figure(figsize=(w, h))
    axes = fig.subplots(rows, cols, squeeze=False)
    # Margins in inches, so that titles, legends and labels fit whatever the grid.
    fig.subplots_adjust(
        left=0.85 / w, right=1 - 0.2 / w, bottom=0.65 / h, top=1 - top / h, wspace=0.3, hspace=0.6
    )
    return fig, axes


def layer_label(labels: dict[tuple[str, int], str], model: str, layer: int) -> str:
    return labels.get((model, layer), f"L{layer}")


def _panels(pooled: pl.DataFrame) -> tuple[list[str], dict[str, list[int]]]:
    models = sorted(pooled["model"].unique().to_list())
    layers = {
        m: sorted(pooled.filter(pl.col("model") == m)["layer"].unique().to_list()) for m in models
    }
    return models, layers


def _model_layer_grid(pooled: pl.DataFrame, top: float = 0.9):
    """A figure with a row per model and a panel per layer; returns (fig, axes, panels) where
    panels lists (ax, model, layer, column) and a row's unused panels are hidden."""
    models, layers = _panels(pooled)
    cols = max(len(v) for v in layers.values())
    fig, axes = _figure(len(models), cols, top=top)
    panels = []
    for r, model in enumerate(models):
        for c in range(cols):
            if c < len(layers[model]):
                panels.append((axes[r][c], model, layers[model][c], c))
            else:
                axes[r][c].set_visible(False)
    return fig, axes, panels


def _rows(pooled: pl.DataFrame, model: str, layer: int) -> dict[str, dict]:
    frame = pooled.filter((pl.col("model") == model) & (pl.col("layer") == layer))
    return {row["bin"]: row for row in frame.iter_rows(named=True)}


def _errors(rows: list[dict | None], mean: str) -> list[list[float]] | None:
    """matplotlib's yerr ([below], [above]) from the interval columns; 0 where missing."""
    lo_key, hi_key = f"{mean}_lo", f"{mean}_hi"
    below, above, any_ci = [], [], False
    for row in rows:
        v = (row or {}).get(mean)
        lo, hi = (row or {}).get(lo_key), (row or {}).get(hi_key)
        if v is None or lo is None or hi is None:
            below.append(0.0)
            above.append(0.0)
            continue
        any_ci = True
        below.append(max(v - lo, 0.0))
        above.append(max(hi - v, 0.0))
    return [below, above] if any_ci else None


def _save(fig, path: Path, root: Path | None) -> Path:
    """`path` written through workers.atomic (`root`: the run folder)."""
    with atomic_file(path, root=root) as f:
        fig.savefig(f, format=path.suffix.lstrip("."), dpi=110)
    return path


def _legend_top(fig, handles, labels, ncols: int) -> None:
    fig.legend(
        handles, labels, loc="upper right", bbox_to_anchor=(0.995, 0.995), ncols=ncols,
        fontsize=FONT, frameon=False,
    )  # fmt: skip


def plot_headline(by_bin: pl.DataFrame, path: Path, labels: dict, root: Path | None = None) -> Path:
    pooled = pooled_rows(by_bin)
    fig, axes, panels = _model_layer_grid(pooled)
    for ax, model, layer, c in panels:
        rows = _rows(pooled, model, layer)
        xs = list(range(len(BINS)))
        per_bin = [rows.get(b) for b in BINS]
        for mean, shift, label, color in (
            ("mean_u_std", -0.2, "u(S), standard route", "#264653"),
            ("mean_max_alt", 0.2, "max u(R), best alternative", "#e76f51"),
        ):
            values = [(r or {}).get(mean) or 0.0 for r in per_bin]
            ax.bar(
                [x + shift for x in xs], values, 0.4, label=label, color=color,
                yerr=_errors(per_bin, mean), capsize=2, error_kw={"linewidth": 0.8},
            )  # fmt: skip
        for x, row in zip(xs, per_bin, strict=True):
            n = (row or {}).get("tokens") or 0
            ax.annotate(
                f"n={n:,}", (x, 1.0), xytext=(0, 7), textcoords="offset points",
                ha="center", fontsize=FONT - 1,
            )  # fmt: skip
        ax.set_xticks(xs, [b.capitalize() for b in BINS], fontsize=FONT)
        ax.tick_params(axis="y", labelsize=FONT)
        ax.set_ylim(0, 1.15)
        ax.set_title(f"{model} · {layer_label(labels, model, layer)}", fontsize=FONT + 1)
        if c == 0:
            ax.set_ylabel("mean p(next token)", fontsize=FONT)
    handles, names = axes[0][0].get_legend_handles_labels()
    _legend_top(fig, handles, names, ncols=1)
    fig.suptitle(
        "Standard route vs best of J alternatives, per pbar bin\n(95% bootstrap intervals)",
        fontsize=FONT + 2, x=0.02, ha="left", y=0.99, va="top",
    )  # fmt: skip
    return _save(fig, path, root)


def bucket_edges(gain_hist: pl.DataFrame):
    """(every bucket's edges in pp, x min, x max): the x range covers the buckets that hold
    tokens, one bucket of margin each side, within [-100, 100]."""
    import numpy as np

    width = float((gain_hist["hi_pp"] - gain_hist["lo_pp"]).first() or 2.0)
    buckets = round(200.0 / width)
    edges = -100.0 + width * np.arange(buckets + 1)
    used = gain_hist["gain_bucket"]
    if used.is_empty():
        return edges, -100.0, 100.0
    return edges, max(-100.0, edges[used.min()] - width), min(100.0, edges[used.max() + 1] + width)


def bucket_shares(h: pl.DataFrame, buckets: int):
    """Share of the tokens per bucket, NaN where a bucket is empty: stairs leaves NaN steps
    undrawn, where a step over only the filled buckets would stretch one across a gap."""
    import numpy as np

    share = np.full(buckets, np.nan)
    share[h["gain_bucket"].to_numpy()] = h["tokens"].to_numpy() / h["tokens"].sum()
    return share


def plot_gain_hist(
    gain_hist: pl.DataFrame, path: Path, labels: dict, root: Path | None = None
) -> Path:
    from matplotlib.ticker import FixedLocator, NullLocator

    pooled = gain_hist.group_by("model", "layer", "bin", "gain_bucket").agg(pl.col("tokens").sum())
    edges, lo_edge, hi_edge = bucket_edges(gain_hist)
    fig, axes, panels = _model_layer_grid(pooled)
    for ax, model, layer, c in panels:
        for b in BINS:
            h = pooled.filter(
                (pl.col("model") == model) & (pl.col("layer") == layer) & (pl.col("bin") == b)
            )
            total = h["tokens"].sum()
            if not total:
                continue
            share = bucket_shares(h, len(edges) - 1)
            ax.stairs(share, edges, label=f"{b} (n={total:,})", color=BIN_COLORS[b], linewidth=1.2)
        ax.set_yscale("log")
        # Headroom for the legend above a share of 1, without ticks for shares above 1.
        bottom = ax.get_ylim()[0]
        ax.set_ylim(bottom, 30.0)
        ax.yaxis.set_major_locator(FixedLocator([10.0**k for k in range(-8, 1)]))
        ax.yaxis.set_minor_locator(NullLocator())  # minor log ticks cost seconds per figure
        ax.set_xlim(lo_edge, hi_edge)
        ax.tick_params(labelsize=FONT)
        ax.set_title(f"{model} · {layer_label(labels, model, layer)}", fontsize=FONT + 1)
        ax.set_xlabel(
            f"gain = max u(R) − u(S), pp (buckets of {edges[1] - edges[0]:g} pp)", fontsize=FONT
        )
        if c == 0:
            ax.set_ylabel("share of the bin's tokens", fontsize=FONT)
        ax.legend(fontsize=FONT - 1, loc="upper right")
    fig.suptitle(
        "Per-token gain of the best alternative route", fontsize=FONT + 2, x=0.02, ha="left"
    )
    return _save(fig, path, root)


def plot_alignment(
    by_bin: pl.DataFrame, path: Path, labels: dict, root: Path | None = None
) -> Path:
    pooled = pooled_rows(by_bin)
    models, layers = _panels(pooled)
    fig, axes = _figure(1, len(models), width=5.0, top=1.0)
    for c, model in enumerate(models):
        ax = axes[0][c]
        width = 0.8 / len(layers[model])
        for i, layer in enumerate(layers[model]):
            rows = _rows(pooled, model, layer)
            per_bin = [rows.get(b) for b in BINS]
            values = [(r or {}).get("alignment") for r in per_bin]
            xs = [x - 0.4 + width * (i + 0.5) for x in range(len(BINS))]
            ax.bar(
                xs, [v if v is not None else 0 for v in values], width,
                label=layer_label(labels, model, layer), yerr=_errors(per_bin, "alignment"),
                capsize=2, error_kw={"linewidth": 0.8},
            )  # fmt: skip
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(BINS)), [b.capitalize() for b in BINS], fontsize=FONT)
        ax.tick_params(axis="y", labelsize=FONT)
        ax.set_ylim(-1, 1)
        ax.set_title(model, fontsize=FONT + 1)
        if c == 0:
            ax.set_ylabel("mean Spearman ρ(s(R), u(R))", fontsize=FONT)
        ax.legend(fontsize=FONT - 1, loc="lower left")
    fig.suptitle(
        "Router alignment: does the router's score\nrank routes by their utility?",
        fontsize=FONT + 2, x=0.02, ha="left", y=0.99, va="top",
    )  # fmt: skip
    return _save(fig, path, root)


def plot_win_rate(by_bin: pl.DataFrame, path: Path, labels: dict, root: Path | None = None) -> Path:
    pooled = pooled_rows(by_bin)
    models, layers = _panels(pooled)
    scored = sorted({layer for v in layers.values() for layer in v})
    pos = {layer: i for i, layer in enumerate(scored)}
    # Tick labels name a layer by its position (early/middle/final) where every model agrees.
    ticks = []
    for layer in scored:
        names = {layer_label(labels, m, layer) for m in models if layer in layers[m]}
        ticks.append(names.pop() if len(names) == 1 else f"L{layer}")
    panels = (*BINS, "all")
    fig, axes = _figure(1, len(panels), width=3.3, top=0.9)
    for c, b in enumerate(panels):
        ax = axes[0][c]
        for i, model in enumerate(models):
            rows = pooled.filter((pl.col("model") == model) & (pl.col("bin") == b)).sort("layer")
            per_layer = list(rows.iter_rows(named=True))
            shift = 0.08 * (i - (len(models) - 1) / 2)  # models side by side, bars apart
            ax.errorbar(
                [pos[r["layer"]] + shift for r in per_layer],
                [r["win_rate"] if r["win_rate"] is not None else float("nan") for r in per_layer],
                yerr=_errors(per_layer, "win_rate"), marker="o", capsize=3, label=model,
            )  # fmt: skip
        ax.set_xticks(range(len(scored)), ticks, fontsize=FONT - 1)
        ax.set_xlim(-0.5, len(scored) - 0.5)
        ax.tick_params(axis="y", labelsize=FONT)
        ax.set_ylim(0, 1.02)
        ax.set_title(b.capitalize(), fontsize=FONT + 1, color=BIN_COLORS[b])
        ax.set_xlabel("scored layer", fontsize=FONT)
        if c == 0:
            ax.set_ylabel("win rate (beats S by > margin)", fontsize=FONT)
    handles, names = axes[0][0].get_legend_handles_labels()
    _legend_top(fig, handles, names, ncols=min(len(names), 4))
    fig.suptitle(
        "Win rate of the best alternative by layer (95% bootstrap intervals)",
        fontsize=FONT + 2, x=0.02, ha="left", y=0.99, va="top",
    )  # fmt: skip
    return _save(fig, path, root)


def plot_all(
    tables: dict[str, pl.DataFrame],
    out_dir: str | Path,
    labels: dict[tuple[str, int], str] | None = None,
    *,
    root: str | Path | None = None,
) -> dict[str, Path]:
    """Every figure of the report, as PNGs under out_dir (inside the run folder `root`)."""
    out_dir = Path(out_dir)
    labels = labels or {}
    root = Path(root) if root is not None else None
    return {
        "headline": plot_headline(tables["by_bin"], out_dir / "headline.png", labels, root),
        "gain_hist": plot_gain_hist(tables["gain_hist"], out_dir / "gain_hist.png", labels, root),
        "alignment": plot_alignment(tables["by_bin"], out_dir / "alignment.png", labels, root),
        "win_rate": plot_win_rate(tables["by_bin"], out_dir / "win_rate.png", labels, root),
    }
