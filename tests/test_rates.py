"""The rates table: bench_score records a row per attention path that reads back, refuses a bad
peak, checks exactness for real; the estimate takes the fastest exact path."""

from __future__ import annotations

from argparse import Namespace

import pytest

from orchestrator import estimate as E
from tools import bench_score
from workers.rates import COLUMNS, LEGACY_COLUMNS, Rate, read_rates

LEGACY = ",".join(LEGACY_COLUMNS) + "\nscoring,m,early,1024,H200,bfloat16,32,100,,old\n"


def test_recorded_rows_append_to_the_table_and_parse_back(tmp_path):
    path = tmp_path / "rates.csv"
    path.write_text(LEGACY)  # a table of the first ten columns: rewritten with all of them
    args = Namespace(arch="qwen3-30b-a3b", tokens=4096, alternatives=32, gpu_name=None)
    device = "NVIDIA H100 80GB HBM3"
    bench_score.record_rate(args, "early", "bfloat16", 612.34, device, path=path)
    bench_score.record_rate(
        args, "final", "bfloat16", 2000.0, device, path=path, label="flex+compile",
        exact=False, peak_fraction=0.41234,
    )  # fmt: skip
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    old, eager, compiled = read_rates(path)
    assert (old.model, old.path, old.exact, old.tokens_per_s) == ("m", "eager", None, 100.0)
    assert old.counts_as_exact
    assert (eager.model, eager.layer, eager.tokens, eager.gpu, eager.device) == (
        "qwen3-30b-a3b", "early", 4096, "H100", device,
    )  # fmt: skip
    assert (eager.path, eager.exact, eager.peak_fraction, eager.tokens_per_s) == (
        "eager", None, None, 612.3,
    )  # fmt: skip
    assert len(eager.date) == 10 and eager.date[:2] == "20"
    assert (compiled.path, compiled.exact, compiled.peak_fraction) == (
        "flex+compile",
        False,
        0.4123,
    )
    assert not compiled.counts_as_exact
    # a malformed exactness or share names its line
    path.write_text(path.read_text().replace(",no,", ",maybe,"))
    with pytest.raises(ValueError, match=r"rates.csv:4: exact must be yes, no or empty"):
        read_rates(path)


@pytest.mark.parametrize("peak", ["0", "-5", "nan", "inf", "fast"])
def test_a_bad_peak_is_one_error_line(capsys, peak):
    assert bench_score.main(["--peak-tflops", peak, "--tokens", "4"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [
        f"error: --peak-tflops must be the device's peak in TFLOP/s, a number > 0 (e.g. 989),"
        f" got {peak!r}"
    ]


def test_the_exactness_check_scores_each_path_against_eager():
    from moe_factories import single_thread

    args = Namespace(arch="tiny", device="cpu", seed=0)
    with single_thread():
        assert bench_score.check_exact(args, [("flex", False)], tokens=12) == {
            "eager": True,
            "flex": True,
        }


def rate(tokens, per_s, path="eager", exact=None, gpu="H200"):
    return Rate("scoring", "m", "early", tokens, gpu, "bfloat16", 32, per_s, "", "t", path, exact)


def test_the_estimate_takes_the_fastest_exact_path():
    eager, flex = rate(1024, 100.0), rate(1024, 250.0, "flex", True)
    unchecked = rate(1024, 400.0, "flex+compile")  # not checked: not exact
    wrong = rate(1024, 900.0, "flex+compile", False)
    got = E.scoring_rate([eager, flex, unchecked, wrong], "m", "early", 1024, "H200")
    assert (got.tokens_per_s, got.path) == (250.0, "flex")
    assert got.how.endswith("; flex attention, the fastest exact of eager, flex")
    # rates of the cluster's GPU come first, whatever another GPU's path does
    h100 = rate(1024, 999.0, "flex", True, gpu="H100")
    got = E.scoring_rate([eager, h100], "m", "early", 1024, "H200")
    assert (got.tokens_per_s, got.path, got.gpu) == (100.0, "eager", "H200")
    # a path is carried to another length only by its own rows: one flex length cannot be
    assert E.scoring_rate([eager, flex], "m", "early", 4096, "H200") is None
    longer = [eager, rate(4096, 50.0), flex, rate(4096, 200.0, "flex", True)]
    assert E.scoring_rate(longer, "m", "early", 2048, "H200").path == "flex"


def test_the_shipped_table_assumes_flex_where_it_was_measured_exact():
    rows = read_rates()
    at_4k = E.scoring_rate(rows, "qwen3-30b-a3b", "early", 4096, "H200")
    assert (at_4k.path, at_4k.tokens_per_s) == ("flex", 553.0)
    assert "flex attention" in at_4k.how
    # flex measured at one length, and no flex slope to carry it: eager's rate at 32k
    assert E.scoring_rate(rows, "qwen3-30b-a3b", "early", 32768, "H200").path == "eager"
