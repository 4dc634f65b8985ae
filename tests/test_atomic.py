"""workers.atomic on real files: a write is whole or absent, its temporary is fresh and
exclusive, and no link planted at a temporary, final or folder name is ever written through."""

from __future__ import annotations

import os
import stat

import matplotlib
import polars as pl
import pyarrow as pa
import pytest

from analysis.tables import write_tables
from workers import atomic, io
from workers.atomic import atomic_append, atomic_file, atomic_write, read_nofollow, remove

matplotlib.use("Agg")


@pytest.fixture
def outside(tmp_path):
    """A folder outside the run folder with a file nobody may change, and the run folder."""
    (tmp_path / "outside").mkdir()
    victim = tmp_path / "outside" / "victim"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    return run, victim


def temps(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_write_replaces_a_link_at_the_final_name_and_leaves_its_target(outside):
    run, victim = outside
    (run / "plan.json").symlink_to(victim)
    (run / "report.md").symlink_to(run.parent / "outside" / "not-there")  # dangling
    atomic_write(run / "plan.json", '{"scores": null}', root=run)
    atomic_write(run / "report.md", b"# Report\n", root=run)
    assert victim.read_text() == "precious\n"
    assert not (run.parent / "outside" / "not-there").exists()
    for name, text in (("plan.json", '{"scores": null}'), ("report.md", "# Report\n")):
        assert not (run / name).is_symlink() and (run / name).read_text() == text
    assert temps(run) == []


def test_the_temporary_is_fresh_and_never_a_planted_name(outside, monkeypatch):
    run, victim = outside
    # The first two names drawn are taken (a link to the victim, a plain file): both are
    # skipped, not opened, and the third is used.
    draws = iter(["0" * 16, "1" * 16, "2" * 16])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(draws))
    (run / f".config.yaml.{'0' * 16}.tmp").symlink_to(victim)
    (run / f".config.yaml.{'1' * 16}.tmp").write_text("someone else's\n")
    atomic_write(run / "config.yaml", "a: 1\n", root=run)
    assert victim.read_text() == "precious\n"
    assert (run / f".config.yaml.{'1' * 16}.tmp").read_text() == "someone else's\n"
    assert (run / "config.yaml").read_text() == "a: 1\n"
    assert sorted(temps(run)) == [f".config.yaml.{'0' * 16}.tmp", f".config.yaml.{'1' * 16}.tmp"]


def test_two_writes_of_one_name_use_two_temporaries(tmp_path):
    with atomic_file(tmp_path / "x", "w") as a, atomic_file(tmp_path / "x", "w") as b:
        a.write("a")
        b.write("b")
        assert len(temps(tmp_path)) == 2
    assert (tmp_path / "x").read_text() == "a" and temps(tmp_path) == []


def test_an_exception_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "by_bin.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic_file(path, "w") as f:
            f.write("half of the new ")
            f.flush()
            assert (tmp_path / "by_bin.csv").read_text() == "old\n"  # readers see only the old
            raise RuntimeError("mid-write")
    assert path.read_text() == "old\n" and temps(tmp_path) == []


def test_a_failing_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "x.arrow"
    io.write_arrow(pa.table({"a": [1, 2]}), path, config_hash="h")
    before = path.read_bytes()
    with pytest.raises(TypeError):
        atomic_write(path, 7)  # not bytes: the write itself fails
    with pytest.raises(pa.ArrowInvalid):  # a table that does not match its schema
        with atomic_file(path) as f, pa.ipc.new_file(f, pa.schema([("a", pa.int64())])) as w:
            w.write_table(pa.table({"b": ["x"]}))
    assert path.read_bytes() == before and io.is_complete(path)
    assert temps(tmp_path) == []


def test_a_written_file_has_the_mode_a_plain_open_gives(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "x", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o644  # not mkstemp's 0o600


def test_a_folder_link_inside_the_run_folder_is_refused(outside):
    run, victim = outside
    (run / "tables").symlink_to(victim.parent, target_is_directory=True)
    (run / "scores").symlink_to(victim.parent, target_is_directory=True)
    with pytest.raises(OSError, match="symbolic link") as err:
        write_tables({"victim": pl.DataFrame({"a": [1]})}, run / "tables", root=run)
    assert err.value.filename == str(run / "tables")
    with pytest.raises(OSError, match="symbolic link"):
        io.write_arrow(
            pa.table({"a": [1]}), run / "scores/m/layer=1/d/0.arrow", config_hash="h", root=run
        )
    with pytest.raises(OSError, match="symbolic link"):
        remove(run / "tables" / "victim", root=run)
    with pytest.raises(ValueError, match="outside"):
        atomic_write(victim, "x", root=run)
    assert sorted(p.name for p in victim.parent.iterdir()) == ["victim"]
    assert victim.read_text() == "precious\n"


def test_missing_folders_under_the_root_are_created(tmp_path):
    root = tmp_path / "run"  # the root itself may be missing, or a link (runs_dir elsewhere)
    atomic_write(root / "a" / "b" / "c.json", "{}", root=root)
    assert (root / "a" / "b" / "c.json").read_text() == "{}"
    linked = tmp_path / "linked-run"
    linked.symlink_to(root, target_is_directory=True)
    atomic_write(linked / "a" / "d.json", "[]", root=linked)
    assert (root / "a" / "d.json").read_text() == "[]"


def test_append_replaces_a_link_without_reading_its_target(outside):
    run, victim = outside
    (run / "failures.jsonl").symlink_to(victim)
    atomic_append(run / "failures.jsonl", '{"unit": 1}\n', root=run)
    atomic_append(run / "failures.jsonl", '{"unit": 2}\n', root=run)
    assert (run / "failures.jsonl").read_text() == '{"unit": 1}\n{"unit": 2}\n'
    assert victim.read_text() == "precious\n"
    (run / "report.md").symlink_to(victim)
    assert read_nofollow(run / "report.md") is None and read_nofollow(run / "none") is None
    os.mkfifo(run / "rates.csv")  # would block a plain read for ever
    assert read_nofollow(run / "rates.csv") is None
    atomic_append(run / "rates.csv", "a,b\n", root=run)
    assert (run / "rates.csv").read_text() == "a,b\n"


def test_write_arrow_through_planted_links_at_data_and_sidecar(outside):
    run, victim = outside
    path = run / "problems" / "demo.arrow"
    path.parent.mkdir()
    path.symlink_to(victim)
    io.done_path(path).symlink_to(victim)
    io.write_arrow(pa.table({"a": [1, 2, 3]}), path, config_hash="h", root=run)
    assert victim.read_text() == "precious\n"
    assert not path.is_symlink() and not io.done_path(path).is_symlink()
    assert io.is_complete(path, "h") and io.read_arrow(path).num_rows == 3


def test_a_checkpoint_replaces_a_planted_folder_link_and_an_older_checkpoint(outside):
    import torch
    from safetensors.torch import load_file, save_file

    from workers.router.update import write_checkpoint

    run, victim = outside
    src = run.parent / "model"
    src.mkdir()
    save_file({"gate": torch.zeros(2, 3), "other": torch.ones(4)}, src / "model.safetensors")
    (src / "config.json").write_text("{}")
    (victim.parent / "model.safetensors").write_text("precious\n")
    root = run / "router_update" / "tiny"
    root.mkdir(parents=True)
    (root / "checkpoint").symlink_to(victim.parent, target_is_directory=True)
    for readme in ("# first\n", "# second\n"):  # the second replaces a real older checkpoint
        dst = write_checkpoint(src, root / "checkpoint", {"gate": torch.ones(2, 3)}, readme)
        assert not dst.is_symlink() and (dst / "README.md").read_text() == readme
        assert torch.equal(load_file(dst / "model.safetensors")["gate"], torch.ones(2, 3))
        assert (dst / "config.json").read_text() == "{}"
        assert stat.S_IMODE(dst.stat().st_mode) == stat.S_IMODE(root.stat().st_mode)
        assert [p.name for p in root.iterdir()] == ["checkpoint"]  # no temporary, no old copy
    assert sorted(p.name for p in victim.parent.iterdir()) == ["model.safetensors", "victim"]
    assert (victim.parent / "model.safetensors").read_text() == "precious\n"
    assert victim.read_text() == "precious\n"


def test_the_router_pages_replace_links_without_reading_their_targets(outside):
    from orchestrator.config import RouterUpdateConfig
    from orchestrator.router_report import LINK, link_from_report, write_markdown

    run, victim = outside
    (run / "router_update.md").symlink_to(victim)
    (run / "report.md").symlink_to(victim)
    write_markdown(run, ["## tiny"], RouterUpdateConfig())
    link_from_report(None, run)
    assert victim.read_text() == "precious\n"
    assert "## tiny" in (run / "router_update.md").read_text()
    assert (run / "report.md").read_text() == f"# Report\n\n{LINK}\n"  # not the victim's text
    assert not (run / "report.md").is_symlink() and temps(run) == []
