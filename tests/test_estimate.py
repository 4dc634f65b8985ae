"""The dry run's memory check and GPU-hour estimate: the arithmetic, the lookup, the refusal."""

from __future__ import annotations

import re

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
    from workers.scoring.score_config import DTYPES as SCORING_DTYPES

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
    rates = [
        rate("olmoe-1b-7b", "early", 1000, 500.0),
        rate("olmoe-1b-7b", "final", 1000, 900.0, gpu="H100"),
    ]
    final = E.scoring_rate(rates, "olmoe-1b-7b", "final", 1000, "H100")
    assert (
        final.tokens_per_s == 900.0 and final.how == "H100 final at 1,000 tokens; eager attention"
    )
    assert final.gpu == "H100" and final.kind == "measured"
    middle = E.scoring_rate(rates, "olmoe-1b-7b", "middle", 1000, "A100")
    assert (middle.tokens_per_s, middle.gpu) == (500.0, "H200")
    assert (
        middle.how
        == "H200 early's rate (no middle row, errs high) at 1,000 tokens; eager attention"
    )
    assert E.scoring_rate(rates, "other", "early", 5000, "H200") is None


def attention_work(attn_width: int, layers: int, after: int, J: int = 32) -> int:
    """The rule by hand: attn_width x ((J+1) x layers after the scored one + all layers)."""
    return attn_width * ((J + 1) * after + layers)


def test_a_single_measured_length_is_extrapolated_by_the_models_attention_cost():
    qwen = [
        rate("qwen3-30b-a3b", "early", 1024, 459.0),
        rate("qwen3-30b-a3b", "early", 4096, 285.0),
    ]
    oss = rate("gpt-oss-20b", "early", 1024, 555.0)
    # k: Qwen3's measured slope over its attention work (32 heads x (128 + 128), 47 layers
    # after layer 0, 48 in all); GPT-OSS: 64 heads x (64 + 64), 23 after layer 0, 24 in all
    k = (1 / 285 - 1 / 459) / (4096 - 1024) / attention_work(8192, 48, 47)
    expected = 1 / (1 / 555 + k * attention_work(8192, 24, 23) * (32768 - 1024))
    got = E.scoring_rate([*qwen, oss], "gpt-oss-20b", "early", 32768, "H200")
    assert got.tokens_per_s == pytest.approx(expected)
    assert 110 < got.tokens_per_s < 125  # nearly 5x slower than at 1,024 tokens, not 555/s
    assert (got.gpu, got.kind) == ("H200", "extrapolated")
    assert "extrapolated from 1,024 tokens by attention cost" in got.how
    assert "fitted on qwen3-30b-a3b" in got.how
    # at the measured length: the measurement; nothing measured at two lengths: no estimate
    assert E.scoring_rate([*qwen, oss], "gpt-oss-20b", "early", 1024, "H200").tokens_per_s == 555
    assert E.scoring_rate([oss], "gpt-oss-20b", "early", 32768, "H200") is None
    # a model without attn_width (the mini test models) is not extrapolated either
    mini = rate("mini-olmoe", "early", 1024, 555.0)
    assert E.scoring_rate([*qwen, mini], "mini-olmoe", "early", 4096, "H200") is None
    # k is per GPU: H200's slope says nothing of an H100
    h100 = rate("gpt-oss-20b", "early", 1024, 555.0, gpu="H100")
    assert E.scoring_rate([*qwen, h100], "gpt-oss-20b", "early", 32768, "H100") is None


@pytest.mark.parametrize(
    ("fit_on", "predict", "short", "long"),
    [("olmoe-1b-7b", "qwen3-30b-a3b", 1024, 4096), ("qwen3-30b-a3b", "olmoe-1b-7b", 2048, 16384)],
)
def test_the_attention_cost_rule_predicts_the_measured_lengths_it_was_not_fitted_on(
    fit_on, predict, short, long
):
    """The table's two models measured at several lengths: k fitted on one carries the other
    from its shorter measurement to its longer one within 20%."""
    table = [r for r in read_rates() if r.stage == "scoring" and r.layer == "early"]
    table = [r for r in table if r.gpu == "H200" and r.model in (fit_on, predict)]
    measured = next(r.tokens_per_s for r in table if (r.model, r.tokens) == (predict, long))
    kept = [r for r in table if r.model == fit_on or r.tokens == short]
    got = E.scoring_rate(kept, predict, "early", long, "H200")
    assert f"extrapolated from {short:,} tokens by attention cost" in got.how
    assert got.tokens_per_s == pytest.approx(measured, rel=0.2)


def test_attn_width_of_each_model_is_its_published_shape():
    """heads x (d_k + d_v) of the config.json values bench_score measures the rates on."""
    from tools.bench_score import arch_config

    for name in ("olmoe-1b-7b", "qwen3-30b-a3b", "gpt-oss-20b", "deepseek-v2-lite", "tiny"):
        hf = arch_config(name)
        d_k = getattr(hf, "qk_head_dim", None) or getattr(hf, "head_dim", None)
        d_k = d_k or hf.hidden_size // hf.num_attention_heads  # as bench_score.decode_flops
        d_v = getattr(hf, "v_head_dim", None) or d_k
        assert C.load_option("model", name).attn_width == hf.num_attention_heads * (d_k + d_v)


def printed_hours(text: str) -> tuple[dict[str, list[float]], dict[str, float], float]:
    """The main GPU-hours section as printed: each line's hours by its term (generation,
    scoring), each term of the `total:` line, and the total."""
    parts: dict[str, list[float]] = {}
    for line in text.splitlines():
        m = re.match(r"  \S+ +(generation|scoring) .*? ([\d,]+\.\d) h  ", line)
        if m:
            parts.setdefault(m[1], []).append(float(m[2].replace(",", "")))
    total = next(line for line in text.splitlines() if line.startswith("  total: "))
    terms = {k: float(v.replace(",", "")) for k, v in re.findall(r"(\w+) ([\d,]+\.\d) h", total)}
    whole = float(re.search(r"= ([\d,]+\.\d) GPU-hours", total)[1].replace(",", ""))
    return parts, terms, whole


def test_the_printed_parts_add_up_to_the_printed_totals():
    cfg = make("sweep=paper", "cluster=address", "cluster.gpu_type=H200")
    parts, terms, whole = printed_hours(plan.describe_plan(cfg, "r", plan.Path("/tmp/r")))
    assert len(parts["generation"]) == 4 and len(parts["scoring"]) == 12
    for term, hours in parts.items():
        assert round(sum(hours), 1) == terms[term]
    assert round(sum(terms.values()), 1) == whole
    # 0.04 + 0.14 + 0.04 h print as 0.0 + 0.1 + 0.0 and add up to 0.1, not 0.22 rounded
    small = [E.Part("g", "m", "s", 1, h) for h in (0.04, 0.14, 0.04)]
    assert E.describe_total(E.group_tenths(small), []) == "g 0.1 h = 0.1 GPU-hours"


def test_every_line_names_its_gpu_and_says_what_it_is():
    cfg = make("sweep=paper", "cluster=address", "cluster.gpu_type=H200")
    text = plan.describe_plan(cfg, "r", plan.Path("/tmp/r"))
    assert "GPU-hours, upper bounds" not in text and "GPU-hours, estimates" in text
    assert "Tokens are upper bounds" in text and E.LENGTH_RULE in text
    lines = [x for x in text.splitlines() if " h  " in x and "tokens at" in x]
    assert len(lines) == 16
    assert all(" x 1 H100 GPU (" in x or " x 1 H200 GPU (" in x for x in lines)
    gen = [x for x in lines if " generation " in x]
    assert all(" x 1 H100 GPU (H100, any model's (*) row)" in x for x in gen)
    assert "rates measured: generation on H100; scoring on H200 (the table has no" in text
    # GPT-OSS-20B and DeepSeek-V2-Lite, measured at 1,024 tokens only, scale to their lengths
    for name, measured in (("gpt-oss-20b     ", "555"), ("deepseek-v2-lite", "971")):
        line = next(x for x in lines if x.startswith(f"  {name} scoring early"))
        assert "extrapolated from 1,024 tokens by attention cost" in line
        assert f"at    {measured}/s" not in line


def test_a_model_without_a_rate_is_unknown_and_the_total_says_so():
    text = plan.describe_plan(make("dry_run=true"), "r", plan.Path("/tmp/r"))
    line = next(x for x in text.splitlines() if x.startswith("  tiny             scoring early"))
    assert "unknown" in line and "no scoring rate of this model in the table" in line
    assert (
        "  total: generation 0.0 h + scoring 0.0 h = 0.0 GPU-hours + 3 unknown part(s):"
        " tiny scoring early, tiny scoring middle, tiny scoring final"
    ) in text


def test_the_router_update_has_an_estimate_per_step_and_the_run_a_total():
    from orchestrator.router_stage import describe_router_plan

    text = describe_router_plan(make("router_update=paper", "dry_run=true"))
    lines = text.splitlines()
    oss = [x for x in lines if x.startswith("  gpt-oss-20b")]
    assert [x[19:41].strip() for x in oss] == [
        "math500 generation",
        "math500 scoring final",
        "preferences",
        "training",
        "eval generation",
        "rescoring final",
    ]
    eval_tokens = 2 * 90 * 16 * 32768  # variants x problems x eval_samples x max_tokens
    assert f"{eval_tokens / 2352 / 3600:9,.1f} h  {eval_tokens:>13,} tokens at  2,352/s" in oss[4]
    assert "small    full-batch Adam on layer 23's router, 500 steps: not counted" in oss[3]
    train_tokens = 500 * 2 * 32768  # math500 x generation.samples_per_problem x max_tokens
    assert f"{train_tokens:>13,} tokens at" in oss[5] and " H200 GPU (" in oss[5]
    hours = [float(x.split(" h  ")[0].split()[-1].replace(",", "")) for x in lines if " h  " in x]
    total = next(x for x in lines if x.startswith("  total: "))
    printed = float(total.split(" = ")[1].split()[0].replace(",", ""))
    assert round(sum(hours), 1) == printed and total.endswith("(training: small, not counted)")
    assert lines[-1] == (
        f"run total: main stages 0.0 h + router update {printed:,.1f} h = {printed:,.1f} GPU-hours"
        " + 3 unknown part(s): tiny scoring early, tiny scoring middle, tiny scoring final"
    )
    # with the paper sweep, the training data are its own MATH-500 units at the final layer
    both = describe_router_plan(make("sweep=paper", "router_update=paper", "dry_run=true"))
    assert both.count("0.0 h    131,072,000 tokens: the main stages' own math500 units") == 4
    main = printed_hours(plan.describe_plan(make("sweep=paper"), "r", plan.Path("/tmp/r")))[2]
    assert f"run total: main stages {main:,.1f} h + router update" in both


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
    # 0.087 + 0.160 h print as 0.1 + 0.2, and the total is their sum, 0.3 (not 0.247 rounded)
    assert f"generation {gen_h:,.1f} h + scoring {score_h:,.1f} h = 0.3 GPU-hours" in text
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

    from tools.bench_score import record_rate
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


def test_the_dry_run_prints_the_disk_footprint_of_each_file_kind():
    cfg = make("sweep=paper", "cluster=address", "cluster.gpu_type=H200")
    text = plan.describe_plan(cfg, "r", plan.Path("/tmp/r"))
    assert text.index("GPU-hours") < text.index("disk, upper bounds")
    rows = re.findall(
        r"  (\S+) +trajectories +([\d,.]+) GB, shards <= +([\d,.]+) MB, scores +([\d,.]+) GB"
        r" \(([\d,]+) rows x (\d+) bytes\)",
        text,
    )
    assert [r[0] for r in rows] == [m.name for m in C.sweep_models(cfg)]
    qwen = next(r for r in rows if r[0] == "qwen3-30b-a3b")
    row = E.score_row_bytes(C.sweep_models(cfg)[0], 32)
    assert int(qwen[5]) == row
    scored = int(qwen[4].replace(",", ""))
    assert float(qwen[3].replace(",", "")) == round(scored * row / 1e9, 1)
    total = float(re.search(r"  total <= ([\d,.]+) GB", text)[1].replace(",", ""))
    parts = sum(
        float(r[1].replace(",", "")) + float(r[2]) / 1e3 + float(r[3].replace(",", ""))
        for r in rows
    )
    # a shard is a reference per trajectory (16 bytes), not a copy of its tokens
    completions = sum(c.completions for c in plan.estimate(cfg) if c.cell.model.name == qwen[0])
    assert float(qwen[2]) == round(completions * 16 / 1e6, 1) > 0
    assert abs(total - parts) < 0.1 * len(rows)
    # a position budget scores a quarter of the tokens: a quarter of the score bytes
    budget = plan.describe_plan(make("sweep=paper", "scoring.positions=0.25"), "r", plan.Path("/r"))
    quarter = re.search(r"qwen3-30b-a3b +trajectories.*scores +([\d,.]+) GB", budget)[1]
    assert float(quarter.replace(",", "")) == pytest.approx(
        float(qwen[3].replace(",", "")) / 4, 0.01
    )


@pytest.mark.parametrize(("experts", "top_k"), [(128, 8), (64, 6), (300, 4)])
def test_score_row_bytes_match_the_scorers_layout(experts, top_k):
    """The dry run's bytes per score row are the in-memory width of rows in the scorer's own
    layout (every column, ids in the model's id type), up to the problem id's allowance."""
    from analysis.bench import make_scores

    model = C.ModelConfig(name="m", num_experts=experts, top_k=top_k)
    rows = 2000
    measured = make_scores(rows, alternatives=32, top_k=top_k, experts=experts).nbytes / rows
    estimate = E.score_row_bytes(model, 32)
    assert 0 <= estimate - measured <= E.PROBLEM_ID_BYTES + 1
    # a position budget adds the trajectory length; the geometry two float lists of J
    assert E.score_row_bytes(model, 32, budget=True) == estimate + 4
    assert E.score_row_bytes(model, 32, geometry=True) == estimate + 2 * (4 + 32 * 4)
