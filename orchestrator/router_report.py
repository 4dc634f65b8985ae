"""The router update's results: tables, figure, markdown section and W&B runs (driver only).

Contract: `analyse_model(run_dir, model, layer, ru, ...)` reads one model's complete unit
files (preferences, training log, evaluation trajectories, scores before and after), writes
`router_update/<model>/tables/{passk,passk_diff,mechanism}.csv` and `figures/passk.png`, logs
one W&B run per step (job_type router_preferences, router_train, router_eval, router_rescore;
group = the run id) and returns the model's markdown section. `write_markdown` joins the
sections into `runs/<id>/router_update.md`; `link_from_report` adds one line to report.md
pointing at it (report.md is regenerated every run, so the link is re-added each time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from orchestrator.config import ModelConfig, RouterUpdateConfig
from workers.atomic import atomic_file, atomic_write, read_nofollow
from workers.io import read_arrow, read_sidecar

LINK = "Router update (final MoE layer, pass@K before/after): [router_update.md](router_update.md)"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _markdown(frame: pl.DataFrame) -> list[str]:
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.rows()]
    return lines


def analyse_model(
    run_dir: Path,
    model: ModelConfig,
    layer: int,
    ru: RouterUpdateConfig,
    *,
    pref_path: Path,
    train_paths: dict[str, Path],
    eval_paths: dict[str, list[Path]],
    before: list[Path],
    after: dict[str, list[Path]],
    run_id: str,
    session: Any = None,
) -> str:
    from analysis.passk import plot_passk
    from analysis.router_check import mechanism_table, token_changes
    from workers.router.update import is_holdout

    root = run_dir / "router_update" / model.name
    table, diff = passk_tables(eval_paths, ru)
    figure = plot_passk(table, root / "figures" / "passk.png", root=run_dir)
    # The mechanism check.
    prefs = pl.from_arrow(read_arrow(pref_path).drop("x"))
    mech = pl.concat(
        [
            mechanism_table(
                token_changes(
                    before,
                    paths,
                    prefs,
                    lambda p: is_holdout(p, ru.holdout_share, ru.seed),
                    margin=ru.margin,
                ),
                draws=ru.bootstrap_draws,
                seed=ru.seed,
            ).select(pl.lit(variant).alias("variant"), pl.all())
            for variant, paths in after.items()
        ]
    )
    for name, frame in (("passk", table), ("passk_diff", diff), ("mechanism", mech)):
        with atomic_file(root / "tables" / f"{name}.csv", root=run_dir) as f:
            frame.write_csv(f)
    summaries = {v: (read_sidecar(p) or {}).get("summary", {}) for v, p in train_paths.items()}
    log_wandb(
        session,
        run_id,
        model,
        ru,
        prefs,
        train_paths["updated"],
        summaries["updated"],
        table,
        diff,
        mech,
        figure,
    )
    return model_section(run_dir, model, layer, ru, prefs, summaries, table, diff, mech, figure)


def passk_tables(
    eval_paths: dict[str, list[Path]], ru: RouterUpdateConfig
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """pass@K of every variant, and the paired differences (variant, baseline, ...): each
    trained variant against the original model, each control against the real update."""
    from analysis.passk import count_correct, paired_diff, passk_table

    frames = []
    for variant, paths in eval_paths.items():
        for path in paths:
            table = pl.from_arrow(read_arrow(path).select(["dataset", "problem_id", "verified"]))
            frames.append(table.with_columns(pl.lit(variant).alias("variant")))
    counts = count_correct(pl.concat(frames))
    table = passk_table(counts, draws=ru.bootstrap_draws, seed=ru.seed)
    pairs = [("original", v) for v in eval_paths if v != "original"]
    pairs += [("updated", v) for v in eval_paths if v not in ("original", "updated")]
    diff = pl.concat(
        [
            paired_diff(counts, base, v, draws=ru.bootstrap_draws, seed=ru.seed).select(
                pl.lit(v).alias("variant"), pl.lit(base).alias("baseline"), pl.all()
            )
            for base, v in pairs
        ]
    )
    return table, diff


def model_section(run_dir, model, layer, ru, prefs, summaries, table, diff, mech, figure) -> str:
    """The markdown section of one model."""
    root = run_dir / "router_update" / model.name
    rel = figure.relative_to(run_dir)
    training = pl.DataFrame([{"variant": v, **s} for v, s in summaries.items()], strict=False)
    controls = (
        f" Controls (same tokens, same anchors, same loss and settings; only the preference"
        f" targets differ): {', '.join(ru.controls)} at seeds {ru.seeds or [ru.seed]}; random ="
        " an alternative drawn uniformly from the token's draws, shuffled = the real targets"
        " permuted among the preference tokens."
        if ru.controls
        else ""
    )
    datasets = [*ru.eval_datasets, *ru.heldout_datasets]
    return "\n".join(
        [
            f"## {model.name}: router of layer {layer}",
            "",
            f"Checkpoint: `{(root / 'checkpoint').relative_to(run_dir)}` (its README.md lists"
            " the changed tensors).",
            f"Preference data: {prefs.filter(pl.col('kind') == 'prefer').height} fragile tokens"
            f" (pbar < {ru.fragile}, best alternative ahead by > {ru.margin}) and"
            f" {prefs.filter(pl.col('kind') == 'anchor').height} confident anchor tokens from"
            f" {', '.join(ru.train_datasets)}; {ru.holdout_share:.0%} of problems held out."
            + controls,
            "",
            "Training (router-only, on the training tokens, family's own top-k rule):",
            "",
            *_markdown(training.drop("control", strict=False)),
            "",
            f"### pass@K on {', '.join(datasets)}",
            "",
            f"{ru.eval_samples} samples per problem per variant; 95% percentile bootstrap over"
            f" problems ({ru.bootstrap_draws} draws)."
            + (
                f" Held-out task (not the update's target; checks that nothing else degrades):"
                f" {', '.join(ru.heldout_datasets)}."
                if ru.heldout_datasets
                else ""
            ),
            "",
            *_markdown(table),
            "",
            "variant - baseline, paired bootstrap over problems (an interval containing 0 is no"
            " evidence of a change); every trained variant against the original model, each"
            " control against the real update:",
            "",
            *_markdown(diff),
            "",
            f"![pass@K]({rel})",
            "",
            "### Mechanism check: did the routes change where the analysis flagged them?",
            "",
            "Training-data tokens scored again with each trained model at the same layer and"
            " with the same scoring settings, the alternatives those drawn for the original"
            " scores (the same routes before and after; S is the new router's own). Groups: flagged = tokens passing the preference rule"
            " (for training problems: the tokens trained on), and the bins by the original pbar."
            " route_changed = share whose standard route (expert set) changed; u_std = u(S) of"
            " the standard route in place (the new one after the update); alignment = mean"
            " Spearman of s(R) and u(R) over the routes; _lo/_hi: 95% bootstrap over problems,"
            " *_diff = after - before.",
            "",
            *_markdown(mech),
            "",
        ]
    )


def log_wandb(
    session, run_id, model, ru, prefs, train_path, train_summary, table, diff, mech, figure
):
    """One W&B run per step of the router update, grouped with the run."""
    if session is None:
        return
    name = f"{run_id}/{model.name}/router"
    cfg = {"run_id": run_id, "model": model.name, "router_update": vars(ru)}
    session.log_step(
        name=f"{name}/preferences",
        key=(model.name, "router", "preferences"),
        job_type="router_preferences",
        config=cfg,
        summary={
            "prefer_tokens": prefs.filter(pl.col("kind") == "prefer").height,
            "anchor_tokens": prefs.filter(pl.col("kind") == "anchor").height,
        },
    )
    session.log_step(
        name=f"{name}/train",
        key=(model.name, "router", "train"),
        job_type="router_train",
        config=cfg,
        summary=train_summary,
        tables={"train_log": pl.from_arrow(read_arrow(train_path))},
    )
    for variant in table["variant"].unique().sort().to_list():
        rows = table.filter(pl.col("variant") == variant)
        session.log_step(
            name=f"{name}/eval-{variant}",
            key=(model.name, "router", f"eval-{variant}"),
            job_type="router_eval",
            config={**cfg, "variant": variant},
            summary={
                f"{d}/pass@{k}": v for d, k, v in rows.select("dataset", "k", "pass_at_k").rows()
            },
            tables={"passk": rows, "passk_diff": diff},
            figures={"figures/passk": figure},  # "passk" is the table
        )
    session.log_step(
        name=f"{name}/rescore",
        key=(model.name, "router", "rescore"),
        job_type="router_rescore",
        config=cfg,
        summary={
            f"{s}/{g}/route_changed": v
            for s, g, v in mech.filter(pl.col("variant") == "updated")
            .select("split", "group", "route_changed")
            .rows()
        },
        tables={"mechanism": mech},
    )


def write_markdown(run_dir: Path, sections: list[str], ru: RouterUpdateConfig) -> Path:
    text = "\n".join(
        [
            "# Router update of the final MoE layer",
            "",
            "Only the router of one MoE layer trains (every expert and every other router"
            " frozen). Settings: "
            + ", ".join(
                f"{k}={getattr(ru, k)}"
                for k in (
                    "margin",
                    "beta",
                    "anchor_weight",
                    "steps",
                    "lr",
                    "max_anchor_tokens",
                    "seed",
                )
            )
            + ".",
            "",
            *sections,
        ]
    )
    path = run_dir / "router_update.md"
    atomic_write(path, text, root=run_dir)
    return path


def link_from_report(report: Path | None, run_dir: Path) -> Path:
    """Append the link to router_update.md to report.md (creating a stub if there is none)."""
    path = report or run_dir / "report.md"
    old = read_nofollow(path)  # a planted link is replaced, its target never copied in
    text = old.decode("utf-8", "replace") if old is not None else "# Report\n"
    if LINK not in text:
        text = text.rstrip("\n") + "\n\n" + LINK + "\n"
        atomic_write(path, text, root=run_dir)
    return path
