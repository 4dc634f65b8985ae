"""A sidecar vouches for its file only once checked against it: every tampering with a data
file or its sidecar makes the unit incomplete, so it is redone, and readers name it in one line;
nothing is deleted on the strength of a field that was not checked.

Each tampering is applied to each kind of file of a small real run (tests/pipeline_runs.py's
reference run, copied per case): problems, generated trajectories, shards, scores.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest
from hydra import compose, initialize_config_dir
from pipeline_runs import (
    SMALL,
    assert_same_tables,
    copy_run,
    digests,
    run_inprocess,
    stage_counts,
    tables,
)

from analysis.inputs import select_generated_files, select_score_files
from orchestrator import config as C
from orchestrator import plan
from orchestrator.problems import prepare_problems
from orchestrator.shards import prune, write_shards
from orchestrator.stages.generation import generation_units
from workers.io import (
    CorruptFile,
    IncompleteFileError,
    StaleFile,
    done_path,
    file_sha256,
    is_complete,
    read_arrow,
    verify,
    write_arrow,
)

pytestmark = pytest.mark.usefixtures("local_ray")

KINDS = {
    "problems": "problems/demo.arrow",
    "generated": "trajectories/tiny/demo/generated/00001.arrow",
    "shards": "trajectories/tiny/demo/shards/00001.arrow",
    "scores": "scores/tiny/layer=2/demo/00001.arrow",
}


# ----------------------------------------------------------------------------- tamperings


def _sidecar(path: Path) -> dict:
    return json.loads(done_path(path).read_text())


def _edit(**changes) -> Callable[[Path, Path], None]:
    def tamper(path: Path, donor: Path) -> None:
        data = _sidecar(path)
        for key, value in changes.items():
            data[key] = value(data) if callable(value) else value
        done_path(path).write_text(json.dumps(data))

    return tamper


def _drop(key: str) -> Callable[[Path, Path], None]:
    def tamper(path: Path, donor: Path) -> None:
        data = _sidecar(path)
        del data[key]
        done_path(path).write_text(json.dumps(data))

    return tamper


def _write_sidecar(text: Callable[[dict], str]) -> Callable[[Path, Path], None]:
    def tamper(path: Path, donor: Path) -> None:
        done_path(path).write_text(text(_sidecar(path)))

    return tamper


def _truncate(path: Path, donor: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path, donor: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _rewrite(path: Path, donor: Path) -> None:
    """The same schema and row count, other rows: a valid Arrow file the sidecar did not see."""
    table = read_arrow(path)
    other = table.take(pa.array(range(table.num_rows - 1, -1, -1)))
    if other.equals(table):  # one row, or a palindrome: take the donor's first row instead
        other = read_arrow(donor).slice(0, table.num_rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(other)


def _copy_donor(path: Path, donor: Path) -> None:
    shutil.copyfile(donor, path)
    shutil.copyfile(done_path(donor), done_path(path))


def _copy_donor_sidecar(path: Path, donor: Path) -> None:
    shutil.copyfile(done_path(donor), done_path(path))


def _link_donor_sidecar(path: Path, donor: Path) -> None:
    done_path(path).unlink()
    done_path(path).symlink_to(done_path(donor))


def _link_donor_data(path: Path, donor: Path) -> None:
    path.unlink()
    path.symlink_to(donor)


TAMPERINGS = {
    "rows+1": _edit(rows=lambda d: d["rows"] + 1),
    "rows-1": _edit(rows=lambda d: d["rows"] - 1),
    "rows=0": _edit(rows=0),
    "sha256 edited": _edit(sha256="0" * 64),
    "config_hash edited": _edit(config_hash="0123456789abcdef"),
    "truncated": _truncate,
    "one byte flipped": _flip,
    "rewritten with another valid table": _rewrite,
    "sidecar not JSON": _write_sidecar(lambda d: json.dumps(d)[:-3]),
    "sidecar a JSON list": _write_sidecar(lambda d: json.dumps([d])),
    "sidecar JSON null": _write_sidecar(lambda d: "null"),
    "sidecar without rows": _drop("rows"),
    "sidecar without sha256": _drop("sha256"),
    "sidecar without config_hash": _drop("config_hash"),
    "rows a string": _edit(rows=lambda d: str(d["rows"])),
    "rows a float": _edit(rows=lambda d: float(d["rows"])),
    "rows true": _edit(rows=True),
    "sha256 a number": _edit(sha256=12345),
    "sha256 not hex": _edit(sha256=lambda d: d["sha256"].upper()),
    "config_hash null": _edit(config_hash=None),
    "backend a list": _edit(backend=["hf"]),
    "provenance a string": _edit(provenance="x"),
    "sidecar names another file": _edit(file="09999.arrow"),
    "sidecar copied from another file": _copy_donor_sidecar,
    "sidecar a link to another file's": _link_donor_sidecar,
    "data file a link to another file": _link_donor_data,
    "data file and sidecar copied from another unit": _copy_donor,
}
# Only the checksum catches these: verify_checksums=false trusts them (documented).
CHECKSUM_ONLY = {"sha256 edited", "rewritten with another valid table", "one byte flipped"}
# The sidecar still verifies against its file, for settings other than the unit's.
STALE = {"config_hash edited"}


def donor_for(run_dir: Path, tmp_path: Path, rel: str) -> Path:
    """A complete file of the same kind outside the run folder: another unit's, so rows,
    content and settings hash differ (the problems of a second data set for problems)."""
    donors = {
        "problems": "trajectories/tiny/demo/generated/00000.arrow",
        "generated": "trajectories/tiny/demo/generated/00000.arrow",
        "shards": "trajectories/tiny/demo/shards/00002.arrow",
        "scores": "scores/tiny/layer=2/demo/00002.arrow",
    }
    kind = next(k for k, v in KINDS.items() if v == rel)
    src = run_dir / donors[kind]
    dst = tmp_path / f"donor-{kind}" / "09999.arrow"
    write_arrow(read_arrow(src), dst, config_hash=_sidecar(src)["config_hash"])
    return dst


def tree(run_dir: Path) -> dict[str, tuple[int, str]]:
    """{relative path: (inode, sha256)} of every data file and sidecar: what was kept as is."""
    return {
        p.relative_to(run_dir).as_posix(): (p.stat().st_ino, file_sha256(p))
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.suffix in (".arrow", ".json") and p.name != "plan.json"
    }


def typed(run_dir: Path) -> C.RunConfig:
    overrides = [*SMALL, f"runs_dir={run_dir.parent}", f"run_id={run_dir.name}"]
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        return C.to_run_config(compose("config", overrides=overrides))


# ----------------------------------------------------------------------------- every case


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_tampered_file_is_incomplete_named_in_one_line_and_never_deleted(
    reference, tmp_path, kind, tampering
):
    run_dir = copy_run(reference, tmp_path / "runs", "t")
    rel = KINDS[kind]
    path = run_dir / rel
    want = _sidecar(path)["config_hash"]  # the unit's planned settings hash
    donor = donor_for(run_dir, tmp_path, rel)
    donor_before = (file_sha256(donor), file_sha256(done_path(donor)))
    TAMPERINGS[tampering](path, donor)

    # The driver: incomplete, so redone (with verify_checksums=false too, unless only the
    # checksum can tell); the reason is one line naming the file.
    with pytest.raises(IncompleteFileError) as caught:
        verify(path, want)
    assert isinstance(caught.value, StaleFile if tampering in STALE else CorruptFile)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path))
    assert not is_complete(path, want)
    if tampering not in CHECKSUM_ONLY:
        assert not is_complete(path, want, checksum=False)
    elif tampering != "one byte flipped":  # the flipped byte may or may not hit a header
        assert is_complete(path, want, checksum=False)  # what verify_checksums=false trusts

    # The readers (report, inspector): left out, named in one entry.
    if kind == "generated":
        files, corrupt = select_generated_files(run_dir)
        if tampering in STALE:  # no plan for generated files: the content verified
            assert path in files
        else:
            assert path not in files and len([c for c in corrupt if rel in c]) == 1
    if kind == "scores":
        inputs = select_score_files(run_dir)
        unit = score_unit(rel)
        named = [x for x in inputs.stale + inputs.corrupt + inputs.missing if x.startswith(unit)]
        assert path not in inputs.files and len(named) == 1
        assert (named[0] in inputs.stale) == (tampering in STALE)

    # Stale-file cleanup with a plan that no longer wants this folder: it deletes the good
    # files (their sidecars verify), never one whose sidecar does not.
    good = {p for p in path.parent.glob("*.arrow") if p != path}
    prune(run_dir, [path.parent], [])
    assert all(not p.exists() and not done_path(p).exists() for p in good)
    if tampering in STALE:
        assert not path.exists()  # verified, of other settings: really stale
    else:
        assert path.is_symlink() or path.exists()
    assert (file_sha256(donor), file_sha256(done_path(donor))) == donor_before


@pytest.mark.parametrize("tampering", list(TAMPERINGS))
@pytest.mark.parametrize("kind", ["problems", "shards"])
def test_the_driver_redoes_tampered_problems_and_shards(reference, tmp_path, kind, tampering):
    """The driver's own units (no actor): the file is rewritten as the untouched run has it,
    and no other file of the run changes."""
    run_dir = copy_run(reference, tmp_path / "runs", "t")
    path = run_dir / KINDS[kind]
    donor = donor_for(run_dir, tmp_path, KINDS[kind])
    before = tree(run_dir)
    TAMPERINGS[tampering](path, donor)
    cfg = typed(run_dir)
    problems = prepare_problems(cfg, run_dir)
    [cell] = plan.plan_cells(cfg)
    if kind == "shards":
        gen = generation_units(
            run_dir,
            cell.model,
            cell.dataset,
            cfg.generation,
            num_problems=problems["demo"][0],
            problems_sha256=problems["demo"][1],
        )
        write_shards(run_dir, cell, cfg, gen)
    assert not path.is_symlink() and not done_path(path).is_symlink()
    assert file_sha256(path) == file_sha256(reference / KINDS[kind])
    assert is_complete(path, _sidecar(reference / KINDS[kind])["config_hash"])
    after = tree(run_dir)
    assert sorted(after) == sorted(before)
    changed = {k for k in before if before[k] != after[k]}
    assert changed <= {KINDS[kind], KINDS[kind].replace(".arrow", ".done.json")}


# ----------------------------------------------------------------------------- whole runs


RUNS = {
    # (problems, generated 00000, shard 00000, score files, verify_checksums)
    "checksummed": (
        "rows+1",
        "truncated",
        "rewritten with another valid table",
        ["sha256 edited", "sidecar a JSON list", "data file a link to another file",
         "sidecar without rows", "config_hash edited"],
        True,
    ),
    "verify_checksums=false": (
        "sidecar not JSON",
        "rows-1",
        "sidecar a link to another file's",
        ["rows a string", "sidecar names another file", "truncated",
         "data file and sidecar copied from another unit"],
        False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(RUNS))
def test_a_run_redoes_exactly_the_tampered_units_and_deletes_nothing_good(
    reference, tmp_path, capsys, name
):
    problems_t, gen_t, shard_t, score_ts, checksums = RUNS[name]
    run_dir = copy_run(reference, tmp_path / "runs", "r")
    donors = {kind: donor_for(run_dir, tmp_path, rel) for kind, rel in KINDS.items()}
    scores = sorted((run_dir / "scores").rglob("*.arrow"))
    targets = [
        ("problems", KINDS["problems"], problems_t),
        ("generated", "trajectories/tiny/demo/generated/00000.arrow", gen_t),
        ("shards", "trajectories/tiny/demo/shards/00000.arrow", shard_t),
        *[
            ("scores", p.relative_to(run_dir).as_posix(), t)
            for p, t in zip(scores, score_ts, strict=False)
        ],
    ]
    for kind, rel, tampering in targets:
        TAMPERINGS[tampering](run_dir / rel, donors[kind])

    assert run_inprocess(tmp_path / "runs", "r", f"verify_checksums={str(checksums).lower()}") == 0
    err = capsys.readouterr().err
    counts = stage_counts(err)
    assert counts["generation"]["computed"] == 1
    assert counts["scoring"]["computed"] == len(score_ts)
    assert "removed" not in err  # no stale file: nothing was deleted
    assert digests(run_dir, "trajectories") == digests(reference, "trajectories")
    assert digests(run_dir) == digests(reference)
    assert sorted(tree(run_dir)) == sorted(tree(reference))  # nothing lost, nothing left over
    for rel in tree(reference):
        if rel.endswith(".arrow"):
            assert file_sha256(run_dir / rel) == file_sha256(reference / rel), rel
            assert not (run_dir / rel).is_symlink()
    assert_same_tables(run_dir, reference)


def test_an_edited_row_count_of_the_problems_deletes_nothing_and_changes_no_table(
    reference, tmp_path, capsys
):
    run_dir = copy_run(reference, tmp_path, "rows")
    path = run_dir / KINDS["problems"]
    _edit(rows=4)(path, path)  # the sha256 still matches the file
    before = tree(run_dir)
    assert run_inprocess(tmp_path, "rows") == 0
    err = capsys.readouterr().err
    counts = stage_counts(err)
    assert counts["generation"]["computed"] == counts["scoring"]["computed"] == 0
    assert "removed" not in err
    after = tree(run_dir)
    kept = {k for k in before if not k.startswith("problems/")}
    assert kept <= set(after)
    assert {k: after[k] for k in kept} == {k: before[k] for k in kept}  # same inode and bytes
    assert file_sha256(path) == file_sha256(reference / KINDS["problems"])
    assert_same_tables(run_dir, reference)


# ----------------------------------------------------------------------------- readers


REPORT_GROUPS = {
    "a": list(TAMPERINGS)[:8],
    "b": list(TAMPERINGS)[8:16],
    "c": list(TAMPERINGS)[16:24],
    "d": list(TAMPERINGS)[24:],
}


def score_unit(rel: str) -> str:
    """scores/tiny/layer=2/demo/00001.arrow -> tiny/layer=2/demo/00001 (the plan's unit key)."""
    return rel.removeprefix("scores/").removesuffix(".arrow")


@pytest.mark.parametrize("group", list(REPORT_GROUPS))
def test_the_report_names_each_tampered_file_in_one_line_and_leaves_it_out(
    reference, tmp_path, capsys, group
):
    from analysis.report import main

    run_dir = copy_run(reference, tmp_path / "runs", "rep")
    donor_scores = donor_for(run_dir, tmp_path, KINDS["scores"])
    donor_gen = donor_for(run_dir, tmp_path, KINDS["generated"])
    scores = sorted(
        p.relative_to(run_dir).as_posix() for p in (run_dir / "scores").rglob("*.arrow")
    )
    # More generated files (copies of one, complete) so each tampering gets one of its own.
    gen_dir = run_dir / "trajectories/tiny/demo/generated"
    for k in range(2, 10):
        write_arrow(
            read_arrow(gen_dir / "00001.arrow"), gen_dir / f"{k:05d}.arrow", config_hash="x"
        )
    generated = sorted(p.relative_to(run_dir).as_posix() for p in gen_dir.glob("*.arrow"))
    chosen = REPORT_GROUPS[group]
    tampered_scores = dict(zip(scores[1:], chosen, strict=False))  # the first stays good
    tampered_gen = dict(zip(generated[2:], chosen, strict=False))  # the first two stay good
    for rel, t in tampered_scores.items():
        TAMPERINGS[t](run_dir / rel, donor_scores)
    for rel, t in tampered_gen.items():
        TAMPERINGS[t](run_dir / rel, donor_gen)

    assert main([str(run_dir), "--bootstrap", "0"]) == 0
    err = capsys.readouterr().err
    text = (run_dir / "report.md").read_text()
    for rel in tampered_scores:
        unit = re.escape(score_unit(rel)) + "(?![0-9])"
        [line] = [line for line in err.splitlines() if re.search(unit, line)]
        assert len(re.findall(unit, line)) == 1 and line.startswith("warning:"), unit
        assert re.search(unit, text)
    for rel, t in tampered_gen.items():
        if t in STALE:  # no plan for generated files: the content verified, so it is used
            continue
        [line] = [line for line in err.splitlines() if rel in line]
        assert line.count(rel) == 1 and line.startswith("warning:"), (rel, t)
        assert rel in text
    # Left out: the tables count only the files that verify.
    good_scores = [rel for rel in scores if rel not in tampered_scores]
    good_gen = [rel for rel in generated if tampered_gen.get(rel, "config_hash edited") in STALE]
    out = tables(run_dir)
    assert out["counts"]["tokens"].sum() == sum(
        read_arrow(reference / r).num_rows for r in good_scores
    )
    one = read_arrow(reference / generated[1]).num_rows  # each copy has 00001's rows
    expected = read_arrow(reference / generated[0]).num_rows + one * (len(good_gen) - 1)
    assert out["generation"]["samples"].sum() == expected


@pytest.mark.parametrize("tampering", ["truncated", "rewritten with another valid table", "rows+1"])
def test_the_inspector_names_a_tampered_trajectory_file_instead_of_failing(
    reference, tmp_path, capsys, tampering
):
    from analysis.inspect import main

    run_dir = copy_run(reference, tmp_path / "runs", "ins")
    rel = "trajectories/tiny/demo/generated/00000.arrow"
    score = "scores/tiny/layer=0/demo/00002.arrow"
    TAMPERINGS[tampering](run_dir / rel, donor_for(run_dir, tmp_path, KINDS["generated"]))
    TAMPERINGS[tampering](run_dir / score, donor_for(run_dir, tmp_path, KINDS["scores"]))
    code = main([str(run_dir), "--model", "tiny", "--layer", "0", "--top-fragile", "2"])
    err = capsys.readouterr().err
    for name in (rel, score_unit(score)):
        named = [line for line in err.splitlines() if name in line]
        assert len(named) == 1 and named[0].startswith("warning:"), name
    if code != 0:  # the fragile trajectories were all in the tampered file
        assert code == 2 and err.strip().splitlines()[-1].startswith("error:")
    else:
        assert list((run_dir / "inspect").rglob("*.html"))


@pytest.mark.parametrize(
    "body",
    ['{"scores": [1, 2]}', '{"scores": [{"unit": "u", "path": 3, "config_hash": "h"}]}',
     '{"scores": {}}', '{"scores": [], "unscored": "x"}', '{"scores": [null]}'],
)  # fmt: skip
def test_a_malformed_plan_is_one_error_line_of_the_report(reference, tmp_path, capsys, body):
    from analysis.report import main

    run_dir = copy_run(reference, tmp_path, "plan")
    (run_dir / "plan.json").write_text(body)
    assert main([str(run_dir), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "plan.json" in err[0]
