"""Runs scored with different route samplers are compared on the same tokens, per bin."""

from __future__ import annotations

import polars as pl
import pytest
from test_metrics import ROWS, score_table, write_run

from analysis.metrics import AnalysisConfig, collect_stats
from analysis.samplers import compare_samplers, main
from analysis.tables import summarise

CONFIG = "run_id: {run}\nscoring: {{sampler: {sampler}}}\n"
NAMES = list(ROWS)


def make_run(root, run, sampler, rows, *, u_std=None):
    """A run of the hand rows with `sampler` in its config; u_std replaces every row's u(S)."""
    rows = [([u_std, *u[1:]] if u_std is not None else u, s) for u, s in rows]
    write_run(root / run, {("tiny", 0, "demo", "shard-00000"): score_table(rows, model="tiny", layer=0, dataset="demo")})  # fmt: skip
    (root / run / "config.yaml").write_text(CONFIG.format(run=run, sampler=sampler))
    return root / run


def test_table_puts_each_samplers_own_numbers_side_by_side(tmp_path):
    a = make_run(tmp_path, "a", "uniform_all", [ROWS[n] for n in NAMES])
    # the same tokens and u(S), other alternatives: the last ones swapped for one that ties S
    other = [([u[0]] * len(u), s) for u, s in (ROWS[n] for n in NAMES)]
    b = make_run(tmp_path, "b", "gumbel", other)
    cfg = AnalysisConfig(bootstrap=20, binning="std")
    table = compare_samplers([a, b], cfg)
    # u(S) bins: each bin holds the same tokens under both samplers
    counts = table.group_by("bin").agg(pl.col("tokens").n_unique().alias("n"), pl.len())
    assert counts["n"].to_list() == [1] * counts.height and set(counts["len"]) == {2}
    assert set(table["binning"]) == {"std"}
    # gumbel is listed first in each bin whatever the order the runs were given in
    first = table.filter(pl.col("bin") == "all")
    assert first["sampler"].to_list() == ["gumbel", "uniform_all"]
    assert first["run"].to_list() == ["b", "a"]
    # each sampler's row is its run's own report row
    files = sorted((a / "scores").rglob("*.arrow"))
    own = summarise(collect_stats(files, cfg), cfg)["binnings"]
    own = own.filter((pl.col("binning") == "std") & (pl.col("bin") == "all"))
    got = first.filter(pl.col("sampler") == "uniform_all")
    for col in ("tokens", "gain_pp", "gain_pp_lo", "win_rate", "mean_rank_hi"):
        assert got[col].item() == own[col].item()
    # every alternative ties S in run b: no gain, no win
    assert first.filter(pl.col("sampler") == "gumbel")["gain_pp"].item() == 0.0
    assert first.filter(pl.col("sampler") == "gumbel")["win_rate"].item() == 0.0
    assert set(table["bin"]) <= {"confident", "ambiguous", "fragile", "all"}


def test_cli_writes_table_and_markdown(tmp_path, capsys):
    a = make_run(tmp_path, "a", "gumbel", [ROWS[n] for n in NAMES])
    b = make_run(tmp_path, "b", "uniform_pool", [ROWS[n] for n in NAMES])
    out = tmp_path / "cmp"
    assert main([str(a), str(b), "--out", str(out), "--bootstrap", "10"]) == 0
    assert (
        pl.read_parquet(out / "samplers.parquet").height == pl.read_csv(out / "samplers.csv").height
    )
    text = (out / "samplers.md").read_text()
    assert "## Route samplers compared" in text and "| all | uniform_pool |" in text
    assert "Bins: `std`" in text  # u(S) bins by default: the same tokens under each sampler


@pytest.mark.parametrize(
    "second, message",
    [
        (dict(sampler="gumbel"), "both scored with gumbel"),
        (dict(sampler="uniform_pool", u_std=0.42), "did not score the same tokens"),
        (dict(sampler="uniform_pool", rows=2), "did not score the same tokens"),
        (dict(sampler="nope"), "names no known scoring.sampler"),
    ],
)
def test_runs_that_cannot_be_compared_are_one_error_line_and_exit_2(
    tmp_path, capsys, second, message
):
    a = make_run(tmp_path, "a", "gumbel", [ROWS[n] for n in NAMES])
    rows = [ROWS[n] for n in NAMES[: second.pop("rows", len(NAMES))]]
    b = make_run(tmp_path, "b", rows=rows, **second)
    out = tmp_path / "cmp"
    assert main([str(a), str(b), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


# `python -m orchestrator compare=samplers` on the bundled model, kept small: 4 problems x 2
# samples, J = 8, one layer.
COMPARE = [
    "compare=samplers",
    "dataset.options.n=4",
    "scoring.alternatives=8",
    "scoring.layers=[early]",
    "analysis.bootstrap=50",
    "wandb=disabled",
]


def compare_command(runs_dir, *extra, monkeypatch):
    """`python -m orchestrator COMPARE... runs_dir=...`, run in this process (on the test's
    Ray, which every job reuses)."""
    import runpy
    import sys
    import warnings

    monkeypatch.setattr(sys, "argv", ["orchestrator", *COMPARE, f"runs_dir={runs_dir}", *extra])
    with warnings.catch_warnings():  # another test may have imported orchestrator.__main__
        warnings.simplefilter("ignore", RuntimeWarning)
        runpy.run_module("orchestrator", run_name="__main__")


@pytest.mark.slow  # three small runs, then resumed: 81 s on the shared 2-core machine (load ~13)
def test_one_command_compares_the_three_samplers_and_a_rerun_resumes(
    local_ray, tmp_path, monkeypatch, capsys
):
    from pipeline_runs import DONE

    runs = tmp_path / "runs"
    compare_command(runs, monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    # the first run generates; the other two take its trajectories and only score
    done = [(m[1], int(m[4])) for m in DONE.finditer(err)]
    assert [n for stage, n in done if stage == "generation"] == [1, 0, 0]
    assert [n for stage, n in done if stage == "scoring"] == [1, 1, 1]
    assert err.count("[compare] 1 generated files taken from tiny-") == 2
    [out] = runs.glob("samplers-tiny-*")
    assert "samplers compared (" in err and str(out / "samplers.md") in err
    table = pl.read_parquet(out / "samplers.parquet")
    assert set(table["binning"]) == {"std"}
    # one row per bin and sampler, every run its own folder, intervals around each mean
    every = table.filter(pl.col("bin") == "all")
    assert every["sampler"].to_list() == ["gumbel", "uniform_pool", "uniform_all"]
    assert sorted(every["run"]) == sorted(p.name for p in runs.glob("tiny-*"))
    assert every["tokens"].n_unique() == 1
    for mean in ("gain_pp", "win_rate", "mean_rank"):
        assert (every[f"{mean}_lo"] <= every[mean]).all() and (
            every[mean] <= every[f"{mean}_hi"]
        ).all()
    text = (out / "samplers.md").read_text()
    assert all(f"| all | {s} |" in text for s in ("gumbel", "uniform_pool", "uniform_all"))
    # the same command again: all three runs are complete, the comparison is rebuilt
    (out / "samplers.md").unlink()
    compare_command(runs, monkeypatch=monkeypatch)
    again = [m.groups() for m in DONE.finditer(capsys.readouterr().err)]
    assert len(again) == 6 and all(int(m[3]) == 0 and m[2] == m[1] for m in again)
    assert (out / "samplers.md").read_text() == text
    assert pl.read_parquet(out / "samplers.parquet").equals(table)
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == sorted(
        [out.name, *every["run"]]
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["scoring.sampler=uniform_all"], "compare=samplers scores with every sampler"),
        (["run_id=mine"], "each with its derived id; drop run_id=mine"),
        (["-m", "dataset.options.n=2,4"], "runs its own sweep over scoring.sampler"),
        (["-m", "compare=none,samplers"], "compare is one option per command, not a sweep"),
    ],
)
def test_compare_with_a_sampler_run_id_or_sweep_of_ones_own_is_refused(tmp_path, extra, message):
    import subprocess
    import sys

    runs = tmp_path / "runs"
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", "compare=samplers", f"runs_dir={runs}", *extra],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert sorted(tmp_path.iterdir()) == []


def test_compare_option_is_a_multirun_over_the_samplers_in_no_hash():
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from orchestrator import config as C
    from orchestrator.plan import derive_run_id

    def typed(*overrides):
        with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
            dcfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        with open_dict(dcfg):
            hydra = dcfg.pop("hydra")
        return C.to_run_config(dcfg, overrides), hydra

    cfg, hydra = typed("compare=samplers")
    assert str(hydra.mode) == "RunMode.MULTIRUN"
    assert hydra.sweeper.params == {"scoring.sampler": "gumbel,uniform_pool,uniform_all"}
    assert cfg.compare.name == "samplers" and cfg.compare.binning == "std"
    # each job's run id is the id of the same command without compare
    plain, _ = typed()
    assert derive_run_id(cfg, C.config_tree(cfg)) == derive_run_id(plain, C.config_tree(plain))
    bad, _ = typed("compare=samplers", "compare.binning=nope")
    with pytest.raises(C.ConfigError, match="compare.binning='nope'; valid: pbar, split, std"):
        C.validate(bad)


def test_a_comparisons_resume_command_is_its_own_command():
    """A run of the comparison that fails prints the command that resumes all three: the
    sweep's sampler and the run id left out (both are refused beside compare=samplers)."""
    from orchestrator.__main__ import resume_command

    job = ["scoring.sampler=uniform_pool", "compare=samplers", "dataset.options.n=4"]
    assert resume_command(job, "tiny-0123abcd") == (
        "python -m orchestrator compare=samplers dataset.options.n=4"
    )
    assert resume_command(job[:1], "tiny-0123abcd") == (
        "python -m orchestrator scoring.sampler=uniform_pool run_id=tiny-0123abcd"
    )
