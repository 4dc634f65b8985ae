"""The dry run's memory check and GPU-hour estimate: the arithmetic, the lookup, the refusal."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from orchestrator import config as C
from orchestrator import estimate as E
from orchestrator import plan
from workers.rates import Rate, append_rate, read_rates

C.register_configs()


def make(*overrides: str) -> C.RunConfig:
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        return C.to_run_config(compose("config", overrides=list(overrides)), overrides)


def test_every_model_and_scoring_dtype_has_a_size():
    from workers.generation import DTYPES as MODEL_DTYPES
    from workers.score_config import DTYPES as SCORING_DTYPES

    assert set(E.BYTES) == {*MODEL_DTYPES, *SCORING_DTYPES}


def rate(model, layer, tokens, per_s, gpu="H200", stage="scoring", alternatives=32):
    return Rate(stage, model, layer, tokens, gpu, "bfloat16", alternatives, per_s, "", "test")


def test_scorer_memory_is_weights_kv_micro_batch_and_runtime():
    cfg = make("model=qwen3-30b-a3b", "cluster=address")
    m = E.scorer_memory(cfg.model, cfg)
    assert m.weights == pytest.approx(30.53 * 2)  # bf16: the model's dtype
    length = 32768 + E.PROMPT_ALLOWANCE
    assert m.kv == pytest.approx(48 * 1024 * length * 2 / 1e9)
    assert m.micro_batch == pytest.approx(1024 * 2**20 / 1e9)
    assert m.total == pytest.approx(m.weights + m.kv + m.micro_batch + 2.0)
    E.check_memory(cfg)  # 67.6 GB on one 80 GB GPU


def test_a_plan_that_cannot_fit_is_refused_with_the_fix():
    cfg = make("sweep=paper", "cluster=address", "scoring.dtype=float32")
    with pytest.raises(C.ConfigError) as info:
        E.check_memory(cfg)
    assert str(info.value) == (
        "model qwen3-30b-a3b: a scorer needs 132.0 GB (weights 122.1 + K/V 6.8 at 34,816 tokens"
        " + micro-batch 1.1 + runtime 2.0) and has model.gpus=1 GPU(s) of"
        " cluster.gpu_memory_gb=80; use scoring.dtype=bfloat16 (or unset: the model's own)"
    )
    with pytest.raises(C.ConfigError, match="model gpt-oss-20b: a scorer needs"):
        E.check_memory(
            make(
                "sweep=paper",
                "cluster=address",
                "sweep.models=[gpt-oss-20b]",
                "scoring.dtype=float32",
            )
        )
    with pytest.raises(
        C.ConfigError, match=r"use more GPUs per scorer \(model.gpus\), lower model.max_tokens"
    ):
        E.check_memory(make("sweep=paper", "cluster=address", "cluster.gpu_memory_gb=40"))
    E.check_memory(make("sweep=paper", "cluster=address"))  # bf16: every model fits one GPU
    # float32 Qwen3-30B-A3B (132 GB) spreads over two 80 GB GPUs: 122.1 + 6.8 + 2 x 3.1 <= 160
    two = make("model=qwen3-30b-a3b", "cluster=address", "scoring.dtype=float32", "model.gpus=2")
    assert E.scorer_memory(two.model, two).total == pytest.approx(122.1 + 6.8 + 2 * 3.07, abs=0.1)
    E.check_memory(two)
    E.check_memory(make("sweep=paper", "scoring.dtype=float32"))  # no GPUs: nothing to check


def test_scoring_rate_interpolates_time_per_token_linearly_in_length():
    rates = [rate("m", "early", 1000, 1000.0), rate("m", "early", 3000, 250.0)]
    # 1 ms/token at 1,000, 4 ms at 3,000: 2.5 ms at 2,000, 5.5 ms at 4,000
    mid = E.scoring_rate(rates, "m", "early", 2000, "H200")
    assert mid.tokens_per_s == pytest.approx(400.0)
    assert "interpolated from 1,000 and 3,000 tokens" in mid.how
    far = E.scoring_rate(rates, "m", "early", 4000, "H200")
    assert far.tokens_per_s == pytest.approx(1 / 0.0055) and "extrapolated" in far.how
    short = E.scoring_rate(rates, "m", "early", 10, "H200")  # never faster than measured
    assert short.tokens_per_s == pytest.approx(1000.0)


def test_scoring_rate_falls_back_to_early_and_to_another_gpu_and_says_so():
    rates = [rate("m", "early", 1000, 500.0), rate("m", "final", 1000, 900.0, gpu="H100")]
    final = E.scoring_rate(rates, "m", "final", 5000, "H100")
    assert final.tokens_per_s == 900.0 and final.how.startswith("H100 final at 1,000 tokens")
    middle = E.scoring_rate(rates, "m", "middle", 5000, "A100")
    assert middle.tokens_per_s == 500.0
    assert (
        middle.how == "H200 early's rate (no middle row) at 1,000 tokens, the one length measured"
    )
    assert E.scoring_rate(rates, "other", "early", 5000, "H200") is None


def test_the_estimate_adds_up_per_stage_and_in_total():
    cfg = make(
        "sweep=paper",
        "sweep.models=[olmoe-1b-7b]",
        "sweep.datasets=[aime2024]",
        "sweep.layers=[early]",
        "cluster=address",
        "cluster.gpu_type=H200",
    )
    text = plan.describe_plan(cfg, "r", plan.Path("/tmp/r"))
    tokens = 30 * 8 * 3072  # problems x samples x max_tokens
    gen_h = tokens / 2352 / 3600
    s0, s1 = 1 / 1448, 1 / 512  # OLMoE early at 2,048 and 16,384 tokens
    score_h = tokens * (s0 + (s1 - s0) * (3072 - 2048) / (16384 - 2048)) / 3600
    assert f"generation {gen_h:,.1f} h + scoring {score_h:,.1f} h" in text
    assert f"= {gen_h + score_h:,.1f} GPU-hours" in text
    assert "H200 early, interpolated from 2,048 and 16,384 tokens" in text
    assert "generation rate: GPUStack performance lab" in text
    assert "olmoe-1b-7b      scorer   17.6 = weights 13.8" in text and "fits 1 x 80" in text


def test_the_rates_table_reads_and_bench_rows_append(tmp_path):
    rows = read_rates()
    assert {(r.model, r.layer, r.tokens) for r in rows if r.gpu == "H200"} >= {
        ("olmoe-1b-7b", "early", 16384),
        ("qwen3-30b-a3b", "early", 4096),
    }
    path = tmp_path / "rates.csv"
    append_rate(rate("x", "early", 64, 12.5), path)
    append_rate(rate("x", "final", 64, 20.0), path)
    assert [r.tokens_per_s for r in read_rates(path)] == [12.5, 20.0]
    path.write_text(path.read_text() + "scoring,x,early,64,H200,bfloat16,32,fast,,t\n")
    with pytest.raises(ValueError, match="rates.csv:4"):
        read_rates(path)


def test_the_dry_run_prints_the_need_then_refuses(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator",
            "sweep=paper",
            "dry_run=true",
            "cluster=address",
            "scoring.dtype=float32",
            f"runs_dir={tmp_path}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "qwen3-30b-a3b    scorer  132.0 = weights 122.1" in result.stdout
    assert "DOES NOT FIT 1 x 80" in result.stdout and "GPU-hours" in result.stdout
    assert result.stderr.strip().startswith("error: model qwen3-30b-a3b: a scorer needs 132.0 GB")
    assert len(result.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_bench_score_records_a_row_the_estimate_can_read(tmp_path):
    from argparse import Namespace

    from workers.bench_score import record_rate
    from workers.provenance import scoring_code_version

    path = tmp_path / "rates.csv"
    args = Namespace(arch="olmoe-1b-7b", tokens=4096, alternatives=32, gpu_name=None)
    record_rate(args, "early", "bfloat16", 987.66, "NVIDIA H100 80GB HBM3", path=path)
    (row,) = read_rates(path)
    assert (row.stage, row.model, row.layer, row.tokens, row.gpu) == (
        "scoring",
        "olmoe-1b-7b",
        "early",
        4096,
        "H100",
    )
    assert row.tokens_per_s == 987.7 and row.scorer == scoring_code_version()
    assert E.scoring_rate([row], "olmoe-1b-7b", "early", 4096, "H100").tokens_per_s == 987.7
