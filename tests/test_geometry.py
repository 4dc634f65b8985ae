"""The gain of alternative routes against the cosine and norm ratio of their MoE output."""

from __future__ import annotations

import pyarrow as pa
import pytest
from test_metrics import score_table, write_run

from analysis.geometry import geometry_tables, main

# u(S) = 0.5; three draws: one repeat of S (cos = ratio = 1, left out), one aligned and larger
# (+0.25), one turned away and smaller (-0.25); per token the same, 4 tokens.
ROW = ([0.5, 0.5, 0.75, 0.25], [-1.0, -2.0, -3.0, -4.0])
COS, RATIO = [1.0, 0.9, -0.5], [1.0, 2.0, 0.5]


def geometry_run(tmp_path, with_columns=True):
    table = score_table([ROW] * 4, model="tiny", layer=0, dataset="demo")
    if with_columns:
        for name, values in (("alt_moe_cos", COS), ("alt_moe_norm_ratio", RATIO)):
            table = table.append_column(name, pa.array([values] * 4, pa.list_(pa.float32())))
    run = tmp_path / "run"
    write_run(run, {("tiny", 0, "demo", "shard-00000"): table})
    return run


def test_tables_bucket_draws_by_direction_and_size(tmp_path):
    files = sorted((geometry_run(tmp_path) / "scores").rglob("*.arrow"))
    tables = geometry_tables(files, buckets=2)
    corr = tables["geometry_corr"].row(0, named=True)
    assert corr["draws"] == 8  # the repeats of S are left out
    assert corr["rho_du_cos"] == pytest.approx(1.0) and corr["rho_du_norm_ratio"] == pytest.approx(
        1.0
    )
    geo = {(r["axis"], r["bucket"]): r for r in tables["geometry"].iter_rows(named=True)}
    assert geo["cos", 0]["mean"] == -0.5 and geo["cos", 0]["du_pp"] == pytest.approx(-25.0)
    assert geo["cos", 1]["improves"] == 1.0 and geo["norm_ratio", 1]["du_pp"] == pytest.approx(25.0)
    assert geo["norm_ratio", 0]["draws"] == 4 and geo["norm_ratio", 0]["improves"] == 0.0


def test_cli_writes_tables_and_refuses_files_without_the_columns(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(geometry_run(tmp_path)), "--out", str(out)]) == 0
    assert (out / "geometry.csv").exists() and (out / "geometry_corr.parquet").exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    assert main([str(geometry_run(plain, with_columns=False)), "--out", str(plain / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "moe_geometry" in err and err.count("\n") == 1
    assert not (plain / "o").exists()
