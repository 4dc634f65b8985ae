"""Provenance: what made a run is in config.yaml and every sidecar; a resume by other code
says so in one line, and one by another scorer is refused unless allowed."""

from __future__ import annotations

import pytest
import yaml
from pipeline_runs import run_inprocess, sidecars

from orchestrator import config as C
from orchestrator.provenance import check_resume
from workers.provenance import git_commit, library_versions, scoring_code_version


def test_config_yaml_and_sidecars_record_versions_commit_and_revision(reference):
    record = yaml.safe_load((reference / "config.yaml").read_text())["provenance"]
    assert record["git_commit"] == git_commit()
    assert record["scoring_code"] == scoring_code_version()
    assert set(record["versions"]) == {"torch", "transformers", "vllm", "ray"}
    assert record["versions"]["torch"] == library_versions()["torch"]
    assert record["models"] == {"tiny": {"hf_id": "bundled", "revision": None}}
    written = {**sidecars(reference, "trajectories"), **sidecars(reference, "scores")}
    by_actors = {k: v for k, v in written.items() if "/shards/" not in k}  # shards: the driver's
    assert any("/generated/" in k for k in by_actors) and any("layer=" in k for k in by_actors)
    for sidecar in by_actors.values():
        p = sidecar["provenance"]
        assert p["git_commit"] == record["git_commit"]
        assert p["versions"] == record["versions"] and p["scoring_code"] == record["scoring_code"]
        assert p["model_revision"] is None  # the bundled model is a local directory


def record(**changes):
    base = {
        "git_commit": "abc",
        "scoring_code": "s1",
        "versions": {"torch": "2.4.0", "transformers": "5.0.0", "vllm": None, "ray": "2.40.0"},
        "models": {},
    }
    return {**base, **changes}


def write_old(run_dir, old):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"provenance": old}))


def test_a_resume_by_other_code_or_libraries_is_one_warning_line(tmp_path):
    write_old(tmp_path / "r", record())
    assert check_resume(tmp_path / "r", record(), False) is None
    assert check_resume(tmp_path / "new", record(), False) is None
    now = record(git_commit="def", versions={**record()["versions"], "torch": "2.5.0"})
    assert check_resume(tmp_path / "r", now, False) == (
        "resuming r with other code or libraries than it started with:"
        " git_commit abc -> def, torch 2.4.0 -> 2.5.0"
    )


def test_a_resume_by_another_scorer_is_refused_unless_allowed(tmp_path):
    write_old(tmp_path / "r", record())
    with pytest.raises(C.ConfigError, match="scored by scoring code s1, this is s2"):
        check_resume(tmp_path / "r", record(scoring_code="s2"), False)
    warning = check_resume(tmp_path / "r", record(scoring_code="s2"), True)
    assert warning.endswith("scoring_code s1 -> s2")


def test_the_cli_refuses_before_anything_starts(tmp_path, capsys):
    runs = tmp_path / "runs"
    write_old(runs / "old", record(scoring_code="0123456789ab"))
    before = sorted(p.name for p in (runs / "old").iterdir())
    assert run_inprocess(runs, "old") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: run old was scored by scoring code 0123")
    assert sorted(p.name for p in (runs / "old").iterdir()) == before  # nothing written
