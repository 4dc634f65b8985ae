"""The cei stage on a real local Ray: off by default, after scoring when asked, resumable."""

from __future__ import annotations

import polars as pl
import pyarrow as pa
import pytest
from pipeline_runs import copy_run, run_inprocess, stage_counts

from workers.io import read_arrow
from workers.schemas import CEI_SCHEMA

pytestmark = pytest.mark.usefixtures("local_ray")


def test_cei_stage_writes_one_file_per_scored_shard_and_resumes(reference, tmp_path, capsys):
    assert not (reference / "cei").exists()  # off by default
    run_dir = copy_run(reference, tmp_path, "cei")
    assert run_inprocess(tmp_path, "cei", "scoring.cei=true") == 0
    counts = stage_counts(capsys.readouterr().err)
    assert counts["scoring"]["skipped"] == counts["scoring"]["total"] > 0  # its hashes unmoved
    scores = sorted(
        p.relative_to(run_dir / "scores") for p in (run_dir / "scores").rglob("*.arrow")
    )
    cei = sorted(p.relative_to(run_dir / "cei") for p in (run_dir / "cei").rglob("*.arrow"))
    assert cei == scores and counts["cei"]["computed"] == len(cei)
    for rel in cei:
        rows, std = read_arrow(run_dir / "cei" / rel), read_arrow(run_dir / "scores" / rel)
        assert rows.schema == CEI_SCHEMA
        assert rows["position"].equals(std["position"])
        diff = pa.compute.subtract(rows["std_prob"], std["std_prob"])
        assert max(abs(x) for x in diff.to_pylist()) < 1e-5  # u(S): the scorer's, same machinery
        assert all(len(r) == 12 for r in rows["in_experts"].to_pylist())  # 16 experts, top-4
    # the report gains the CEI section and tables; the default run's has none
    assert "## Counterfactual Expert Impact" in (run_dir / "report.md").read_text()
    assert "Counterfactual Expert Impact" not in (reference / "report.md").read_text()
    layers = pl.read_csv(run_dir / "tables" / "cei_layers.csv")
    assert layers["hard_tokens"].min() > 0 and layers["sensitivity"].is_not_null().all()
    assert (run_dir / "figures" / "cei.png").is_file()
    # a rerun skips every complete unit
    assert run_inprocess(tmp_path, "cei", "scoring.cei=true") == 0
    again = stage_counts(capsys.readouterr().err)["cei"]
    assert again["skipped"] == again["total"] == len(cei)
