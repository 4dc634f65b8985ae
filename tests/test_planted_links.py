"""A run folder on shared storage where someone planted links: at every name a run writes, at
the fixed temporary names older code used, some pointing at files outside, some dangling. The
run (driver, actors, report) and the token inspector must replace each link with a regular
file and change nothing outside the run folder."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import polars as pl
import pytest
from pipeline_runs import copy_run, run_inprocess, tables

from analysis.inspect import main as inspect_main
from workers.io import is_complete

pytestmark = pytest.mark.usefixtures("local_ray")
# Fixed temporaries of earlier versions (the lock's carried its random token).
OLD_TEMPS = (
    ".config.yaml.tmp",
    ".plan.json.tmp",
    ".report.md.tmp",
    ".report.md.link.tmp",
    ".router_update.md.tmp",
)


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_links_planted_at_every_name_of_a_run_are_replaced_never_followed(reference, tmp_path):
    # 1. The names: every file of an ordinary run, its inspector page, and the old temporaries.
    # The run below scores the final layer only (a third of the time); the links planted at
    # the other layers' score files must simply stay as they are.
    layer = max(int(p.name.removeprefix("layer=")) for p in (reference / "scores/tiny").iterdir())
    page = f"inspect/tiny/L{layer}-top1-fragile.html"
    names_of_run = sorted(files(reference)) + [page]
    assert {"config.yaml", "plan.json", "report.md", "tables/by_bin.parquet"} <= set(names_of_run)
    assert any(n.startswith("figures/") for n in names_of_run)
    other_layers = [n for n in names_of_run if n.startswith("scores/") and f"={layer}/" not in n]
    written = [n for n in names_of_run if n not in other_layers]
    names = [
        *names_of_run,
        *OLD_TEMPS,
        f"inspect/.{Path(page).name}.tmp",
        ".driver.lock",
        "failures.jsonl",
    ]

    # 2. Plant them in a fresh run folder: every fifth link dangles, the rest point at files
    # outside (an hour old, as files worth protecting are).
    outside, runs = tmp_path / "outside", tmp_path / "runs"
    outside.mkdir()
    run_dir = runs / "planted"
    hour_ago = time.time() - 3600
    for i, name in enumerate(names):
        target = outside / f"victim-{i}"
        if i % 5 == 0:
            target = outside / f"missing-{i}"
        else:
            target.write_text(f"precious {i}\n")
            os.utime(target, (hour_ago, hour_ago))
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).symlink_to(target)
    before = files(outside)

    # 3. The run and the page, as on a clean folder.
    assert run_inprocess(runs, "planted", "scoring.layers=[final]") == 0
    assert (
        inspect_main([str(run_dir), "--model", "tiny", "--layer", "final", "--top-fragile", "1"])
        == 0
    )

    # 4. Nothing outside changed or appeared; every name written is a regular file now.
    assert files(outside) == before
    assert sorted(p.name for p in outside.iterdir()) == sorted(before)
    for name in written:
        assert not (run_dir / name).is_symlink() and (run_dir / name).is_file(), name
    assert other_layers and all((run_dir / n).is_symlink() for n in other_layers)
    assert not (run_dir / ".driver.lock").exists()  # released: the lease of this run is gone
    # The results are those of the clean run, complete and readable.
    data = [n for n in written if n.endswith(".arrow")]
    assert any(n.startswith("scores/") for n in data)
    for name in data:  # problems, trajectories and scores: the same bytes, and complete
        assert (run_dir / name).read_bytes() == (reference / name).read_bytes(), name
        assert is_complete(run_dir / name), name
    by_bin = tables(reference)["by_bin"].filter(pl.col("layer") == layer)
    assert tables(run_dir)["by_bin"].equals(by_bin)
    leftovers = [p for p in run_dir.rglob("*.tmp") if not p.is_symlink()]
    assert leftovers == []


def test_a_folder_link_inside_the_run_folder_fails_the_unit_and_writes_nothing_outside(
    tmp_path, capsys
):
    # The actors' writes check the folders under the run folder as the driver's do: the
    # generation units, whose folder is a link to elsewhere, fail rather than write there.
    outside, runs = tmp_path / "outside", tmp_path / "runs"
    (outside / "tiny" / "demo" / "generated").mkdir(parents=True)
    (runs / "linked").mkdir(parents=True)
    (runs / "linked" / "trajectories").symlink_to(outside, target_is_directory=True)
    assert run_inprocess(runs, "linked", "dataset.options.n=2", "scoring.retries=0") == 1
    [failure] = [
        json.loads(line) for line in (runs / "linked/failures.jsonl").read_text().splitlines()
    ]
    assert failure["stage"] == "generation" and "symbolic link" in failure["error"]
    assert str(runs / "linked" / "trajectories") in failure["error"]
    assert [p.relative_to(outside).as_posix() for p in outside.rglob("*")] == [
        "tiny",
        "tiny/demo",
        "tiny/demo/generated",
    ]
    # On the driver, before Ray: one error line naming the link, exit 2.
    (runs / "early").mkdir()
    (runs / "early" / "problems").symlink_to(outside, target_is_directory=True)
    capsys.readouterr()
    assert run_inprocess(runs, "early") == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: cannot write {runs / 'early/problems/demo.arrow'}: ")
    assert line.endswith(
        f"{runs / 'early/problems'} is a symbolic link or not a folder; refusing to write through it"
    )
    assert sorted(p.name for p in outside.iterdir()) == ["tiny"]


def test_a_link_planted_at_the_tables_folder_ends_the_run_with_one_error_line(
    reference, tmp_path, capsys
):
    """Every unit is complete; the report's folder is a link to elsewhere: its write is refused
    in one line (exit 2), not a traceback, and nothing is written outside."""
    import shutil

    outside, runs = tmp_path / "outside", tmp_path / "runs"
    outside.mkdir()
    run_dir = copy_run(reference, runs, "tabled")
    shutil.rmtree(run_dir / "tables")
    (run_dir / "tables").symlink_to(outside, target_is_directory=True)
    capsys.readouterr()
    assert run_inprocess(runs, "tabled") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(run_dir / "tables") in errors[0], errors
    assert list(outside.iterdir()) == []
