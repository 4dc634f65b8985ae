"""Benchmark of the fast counterfactual scorer against brute force and a standard forward pass.

    python -m tools.bench_score                       # tiny Qwen3-MoE on the CPU, with brute force
    python -m tools.bench_score --arch qwen3-30b-a3b --random-init --device cuda --dtype bfloat16 --layer all
    python -m tools.bench_score --arch olmoe-1b-7b --random-init --device cuda --tokens 2048 \
        --attention eager,flex,flex+compile --peak-tflops 989     # paths side by side
    python -m tools.bench_score --arch qwen3-30b-a3b --random-init --device cuda --tokens 4096 \
        --layer early,final --attention eager,flex --peak-tflops 989 --record   # rows for the estimate

Contract: on one random trajectory (--prompt-tokens + --tokens ids) it times
- one standard forward pass of the model over the sequence (median of 3 after a warm-up);
- the fast scorer (workers.scoring.scorer) at each requested layer;
- brute force (workers.scoring.brute), on a random subset of --brute-pairs (position, route) pairs drawn
  from the fast scorer's own routes, extrapolated linearly to all T x (J+1) pairs (printed as such),
and checks that brute force and the fast scorer agree (max abs log-prob difference). It prints the
speedup over brute force and the fast scorer's cost in standard-forward equivalents, also per
route, i.e. divided by (J+1): the target is <= 1.3 at the first MoE layer, where nearly every layer
runs once per route. --attention a,b,... times each attention path (ScoreConfig.attention, with
"+compile" for ScoreConfig.compile) on the same model in this one process and prints each one's
tokens/s over the first's and its largest log-prob difference from the first. Next to tokens/s:
the model FLOPs of one (t, R) pair (`decode_flops`), the achieved rate over the distinct pairs
decoded and, with --peak-tflops (TFLOP/s, a number > 0), its share of that peak; a closing table
gives, per layer and path, tokens/s, TFLOP/s, the share and the exactness verdict.

FLOP count of one (t, R) pair, scored at MoE layer L (what decoding route R at position t adds;
the standard pass and layer L's own experts, computed once per position, are left out):
    F(t) = 2 x W_head + sum over layers l > L of [2 x W_l + 2 x H x (d_k + d_v) x (keys_l(t) + 1)]
where W_head is the LM head's weight count, W_l the layer's matrix weights with its routed
experts counted at top_k / n_experts of their weights (the active experts; shared experts, router
and attention projections in full), H the query heads, d_k, d_v the query-key and value head
dims (MLA: qk_head_dim and v_head_dim), keys_l(t) = t earlier keys, or window - 1 in a
sliding-window layer; norms, activations and softmax are not counted. The rate is
F x distinct pairs / seconds, F the mean over the scored positions: e.g. ~7.6 GFLOP per pair,
~250 GFLOP per scored token at J=32, for Qwen3-30B-A3B's early layer at 4,096 tokens.
--record appends a row per attention path and named layer to workers/assets/rates.csv
(workers.rates: device name, date, share of the peak, and `exact` from --exact-check: each path's
float32 log u on 4 layers of the shape against eager attention's, within EXACT_TOL); the dry
run's estimate takes the fastest exact path. A path refused for a model is skipped, and said so.
Architectures: "tiny" (Qwen3-MoE, 4 layers, hidden 128, 16 experts top-4, vocab 1024) or one of
the real shapes typed in from the published config.json (OLMoE-1B-7B, Qwen3-30B-A3B, GPT-OSS-20B,
DeepSeek-V2-Lite), built with random weights directly on --device (no hub access, no meta
device); --layers N keeps the first N decoder layers (smoke runs). Real shapes default to
--no-brute and report tokens/s.
"""

from __future__ import annotations

import argparse
import math
import platform
import random
import re
import statistics
import sys
import time

import torch

from workers.scoring.score_config import DTYPES

ARCHS = ("tiny", "olmoe-1b-7b", "qwen3-30b-a3b", "gpt-oss-20b", "deepseek-v2-lite")
# A path is exact when its float32 log u is this close to eager attention's: the CPU exactness
# tests' bar, and tests/test_attention.py's bound for compiled kernels on CUDA at real shapes.
EXACT_TOL = {"cpu": 1e-4, "cuda": 1e-3}


def arch_config(arch: str, layers: int | None = None):
    """A transformers config of `arch` (values of the published config.json files)."""
    import transformers as tf

    if arch == "tiny":
        cfg = tf.Qwen3MoeConfig(
            vocab_size=1024,
            hidden_size=128,
            intermediate_size=256,
            moe_intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=16,
            num_experts_per_tok=4,
            norm_topk_prob=True,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    elif arch == "olmoe-1b-7b":  # allenai/OLMoE-1B-7B-0924
        cfg = tf.OlmoeConfig(
            vocab_size=50304,
            hidden_size=2048,
            intermediate_size=1024,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            num_experts=64,
            num_experts_per_tok=8,
            norm_topk_prob=False,
            clip_qkv=None,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
            pad_token_id=1,
            eos_token_id=50279,
        )
    elif arch == "qwen3-30b-a3b":  # Qwen/Qwen3-30B-A3B
        cfg = tf.Qwen3MoeConfig(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            use_sliding_window=False,
            tie_word_embeddings=False,
            bos_token_id=151643,
            eos_token_id=151645,
        )
    elif arch == "gpt-oss-20b":  # openai/gpt-oss-20b (experts dequantized to bf16)
        cfg = tf.GptOssConfig(
            vocab_size=201088,
            hidden_size=2880,
            intermediate_size=2880,
            num_hidden_layers=24,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
            num_local_experts=32,
            num_experts_per_tok=4,
            sliding_window=128,
            max_position_embeddings=131072,
            layer_types=["sliding_attention", "full_attention"] * 12,
            rms_norm_eps=1e-5,
            attention_bias=True,
            swiglu_limit=7.0,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 4096,
            },
            pad_token_id=199999,
            eos_token_id=200002,
        )
    elif arch == "deepseek-v2-lite":  # deepseek-ai/DeepSeek-V2-Lite
        cfg = tf.DeepseekV2Config(
            vocab_size=102400,
            hidden_size=2048,
            intermediate_size=10944,
            moe_intermediate_size=1408,
            num_hidden_layers=27,
            num_attention_heads=16,
            num_key_value_heads=16,
            kv_lora_rank=512,
            q_lora_rank=None,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
            n_routed_experts=64,
            n_shared_experts=2,
            num_experts_per_tok=6,
            first_k_dense_replace=1,
            routed_scaling_factor=1.0,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            norm_topk_prob=False,
            max_position_embeddings=163840,
            rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 40.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
                "original_max_position_embeddings": 4096,
            },
            tie_word_embeddings=False,
            bos_token_id=100000,
            eos_token_id=100001,
        )
    else:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    if layers is not None:
        cfg.num_hidden_layers = layers
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = cfg.layer_types[:layers]
    return cfg


def build_model(
    arch: str, device: str, dtype: torch.dtype, layers: int | None = None, seed: int = 0
):
    """Random weights, initialised directly on `device` in `dtype`; eager attention."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = arch_config(arch, layers)
    if arch == "tiny":
        cfg.initializer_range = 0.1
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="eager")
    if arch == "tiny":  # make routes matter, as the test models do (tests/moe_factories.py)
        with torch.no_grad():
            for module in model.modules():
                if type(module).__name__.endswith("Experts"):
                    module.down_proj.mul_(3.0)
            model.lm_head.weight.mul_(6.0)
    return model.eval()


def decode_flops(scorer, layer: int, positions: torch.Tensor) -> tuple[float, float]:
    """Model FLOPs of one (t, R) pair through the layers after `layer` and the LM head, mean
    over `positions`: (matmuls, attention over the prefix). A matmul weight of n entries costs 2n
    per token; routed experts count top_k / n_experts of their weights, shared experts, router
    and attention projections in full; the query at t scores and mixes its t visible keys
    (fewer in a sliding window) plus its own: 2 x heads x (d_k + d_v) FLOPs per key. Norms,
    activations and softmax are left out."""
    model, ad = scorer.model, scorer.adapter
    cfg = model.config

    def weights(module) -> float:
        return float(sum(p.numel() for p in module.parameters() if p.dim() >= 2))

    heads = cfg.num_attention_heads
    d_k = getattr(cfg, "qk_head_dim", None) or getattr(cfg, "head_dim", None)
    d_k = d_k or cfg.hidden_size // heads
    d_v = getattr(cfg, "v_head_dim", None) or d_k
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or []
    t = positions.double()
    matmul = 2 * weights(model.lm_head)
    attention = 0.0
    for i in range(layer + 1, len(ad.layers)):
        block = weights(ad.layers[i])
        if i in ad.moe_layers:
            experts = weights(ad.experts(i))
            block += experts * (ad.top_k / ad.n_experts - 1)
        matmul += 2 * block
        sliding = window and i < len(types) and types[i] == "sliding_attention"
        keys = t.clamp(max=window - 1) if sliding else t
        attention += 2 * heads * (d_k + d_v) * float((keys + 1).mean())
    return matmul, attention


def _variants(spec: str) -> list[tuple[str, bool]]:
    """ "eager,flex+compile" -> [("eager", False), ("flex", True)]."""
    from workers.scoring.attention import ATTENTIONS

    out = []
    for item in spec.split(","):
        name, _, extra = item.strip().partition("+")
        if name not in ATTENTIONS or extra not in ("", "compile"):
            raise ValueError(
                f"--attention: {item!r} is not one of {', '.join(ATTENTIONS)}, optionally +compile"
            )
        out.append((name, extra == "compile"))
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def record_rate(
    args,
    spec: str,
    dtype: str,
    tokens_per_s: float,
    device_name: str,
    path=None,
    label: str = "eager",
    exact: bool | None = None,
    peak_fraction: float | None = None,
) -> None:
    """One row of the dry run's rate table (workers.rates, or `path`) for this measurement:
    attention path `label`, its exactness check's verdict and share of the peak, the device
    and today's date (UTC)."""
    from workers.provenance import scoring_code_version
    from workers.rates import RATES_PATH, Rate, append_rate

    match = re.search(r"\b([A-Z]+\d{2,4}[A-Z]?)\b", device_name)
    gpu = args.gpu_name or (match.group(1) if match else device_name)
    row = Rate(
        stage="scoring",
        model=args.arch,
        layer=spec,
        tokens=args.tokens,
        gpu=gpu,
        dtype=dtype,
        alternatives=args.alternatives,
        tokens_per_s=round(tokens_per_s, 1),
        scorer=scoring_code_version(),
        source=f"tools.bench_score --random-init, torch {torch.__version__}",
        path=label,
        exact=exact,
        peak_fraction=None if peak_fraction is None else round(peak_fraction, 4),
        device=device_name,
        date=time.strftime("%Y-%m-%d", time.gmtime()),
    )
    append_rate(row, path or RATES_PATH)
    print(
        f"  recorded in {path or RATES_PATH}: {row.model} {spec} {row.tokens} tokens {gpu} {label}",
        flush=True,
    )


def parse_peak(value: str | None) -> float | None:
    """--peak-tflops as a number of TFLOP/s: finite and > 0 (ValueError otherwise)."""
    if value is None:
        return None
    try:
        peak = float(value)
    except ValueError:
        peak = math.nan
    if not 0 < peak < math.inf:
        raise ValueError(
            f"--peak-tflops must be the device's peak in TFLOP/s, a number > 0 (e.g. 989), got {value!r}"
        )
    return peak


def check_exact(args, variants: list[tuple[str, bool]], tokens: int = 96) -> dict[str, bool]:
    """{path label: exact} for `variants` on a float32 copy of `args.arch` (random weights,
    at most 4 layers, so it fits beside nothing else): each path's log u of every (t, R) pair
    of one random trajectory against eager attention's, within EXACT_TOL of the device type
    (the exactness tests' bounds). Printed; the model is freed before the benchmark's."""
    from workers.scoring.scorer import ScoreConfig, Scorer

    model = build_model(args.arch, args.device, torch.float32, 4 if args.arch != "tiny" else None)
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(3, model.config.vocab_size, (32 + tokens,), generator=gen).tolist()
    table = _trajectory(ids, 32)
    tol = EXACT_TOL["cuda" if args.device.startswith("cuda") else "cpu"]
    out, ref = {}, None
    for attention, compiled in dict.fromkeys([("eager", False), *variants]):
        label = attention + ("+compile" if compiled else "")
        config = ScoreConfig(
            alternatives=8,
            dtype="float32",
            device=args.device,
            attention=attention,
            compile=compiled,
        )
        try:
            logu = _log_u(Scorer(args.arch, config, model=model).score_table(table, "early"))
        except ValueError as err:  # a path refused for this model
            print(f"  exactness [{label}]: refused ({err})")
            out[label] = False
            continue
        ref = logu if ref is None else ref
        diff = (logu - ref).abs().max().item()
        out[label] = diff <= tol
        print(
            f"  exactness [{label}]: float32 max |log u - eager's| = {diff:.1e} (<= {tol:g}: {out[label]})"
        )
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def cached_check(args, variants: list[tuple[str, bool]], device_name: str) -> dict[str, bool]:
    """check_exact, through --exact-cache when given: verdicts of this arch, device and scoring
    code version found there are reused, the others checked and added."""
    import json

    from workers.atomic import atomic_write, read_nofollow
    from workers.provenance import scoring_code_version

    labels = list(dict.fromkeys(["eager", *(a + ("+compile" if c else "") for a, c in variants)]))
    key = f"{args.arch}|{device_name}|{scoring_code_version()}"
    cache = json.loads(read_nofollow(args.exact_cache) or b"{}") if args.exact_cache else {}
    known = cache.get(key, {})
    if not all(label in known for label in labels):
        known.update(check_exact(args, variants))
        if args.exact_cache:
            cache[key] = known
            atomic_write(args.exact_cache, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    else:
        print(
            f"  exactness: {', '.join(f'{k} {known[k]}' for k in labels)} (from {args.exact_cache})"
        )
    return {label: bool(known[label]) for label in labels}


def _trajectory(ids: list[int], prompt: int):
    import pyarrow as pa

    return pa.table(
        {
            "problem_id": ["bench-0"],
            "sample_idx": pa.array([0], pa.int32()),
            "input_ids": pa.array([ids], pa.list_(pa.int32())),
            "prompt_len": pa.array([prompt], pa.int32()),
        }
    )


def _log_u(scores) -> torch.Tensor:
    """(tokens, J+1) float64 log u, S first, from a scores table."""
    cols = scores.to_pydict()
    rows = [[a, *b] for a, b in zip(cols["std_prob"], cols["alt_probs"], strict=True)]
    return torch.tensor(rows).double().log()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tools.bench_score", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--arch", default="tiny", choices=ARCHS)
    p.add_argument("--model", default=None, help="a real checkpoint directory instead of --arch")
    p.add_argument(
        "--random-init", action="store_true", help="required for non-tiny --arch: random weights"
    )
    p.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers")
    p.add_argument("--tokens", type=int, default=256, help="completion tokens scored")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--alternatives", type=int, default=32)
    p.add_argument("--pool", type=int, default=32)
    p.add_argument(
        "--layer", default="early", help="early|middle|final, comma-separated, all, or an index"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="default: float32 for tiny, else bfloat16",
    )
    p.add_argument("--memory-budget-mb", type=int, default=None)
    p.add_argument(
        "--brute",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on for tiny only",
    )
    p.add_argument(
        "--brute-pairs", type=int, default=66, help="(position, route) pairs timed by brute force"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is steadiest on a busy CPU)"
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="append a row per attention path and early/middle/final layer to "
        "workers/assets/rates.csv (GPU runs; implies --exact-check)",
    )
    p.add_argument(
        "--rates",
        default=None,
        help="the table --record appends to (default: workers/assets/rates.csv)",
    )
    p.add_argument(
        "--exact-cache",
        default=None,
        help="a JSON file of exactness verdicts per (arch, device, path), reused by later runs",
    )
    p.add_argument(
        "--exact-check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="first check each path against eager attention in float32 on 4 layers of the "
        "shape (default: with --record)",
    )
    p.add_argument(
        "--gpu-name", default=None, help="GPU type recorded, e.g. H200 (default: detected)"
    )
    p.add_argument(
        "--attention",
        default="eager",
        help="attention path(s), comma-separated, each eager|flex[+compile]; the first is the base",
    )
    p.add_argument(
        "--peak-tflops", default=None, help="the device's peak in TFLOP/s (e.g. 989), for the share"
    )
    p.add_argument(
        "--forward",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time a standard forward pass (off for sequences whose eager attention would not fit)",
    )
    args = p.parse_args(argv)
    try:
        variants = _variants(args.attention)
        args.peak_tflops = parse_peak(args.peak_tflops)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.record and (args.model is not None or args.arch == "tiny" or args.device == "cpu"):
        print(
            "error: --record is for real shapes (--arch ... --random-init) on a GPU",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)

    import pyarrow as pa

    from workers.scoring.brute import brute_logprobs
    from workers.scoring.scorer import ScoreConfig, Scorer, load_model

    dtype_name = args.dtype or (
        "float32" if args.arch == "tiny" and args.model is None else "bfloat16"
    )
    budget = args.memory_budget_mb or (1024 if args.device == "cpu" else 16384)
    configs = [
        ScoreConfig(
            alternatives=args.alternatives,
            pool=args.pool,
            dtype=dtype_name,
            device=args.device,
            memory_budget_mb=budget,
            seed=args.seed,
            attention=attention,
            compile=compiled,
        )
        for attention, compiled in variants
    ]
    config = configs[0]
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine()
    )
    # 0. which paths are exact (a small float32 model, freed before the measured one is built)
    exact: dict[str, bool] = {}
    if (args.record if args.exact_check is None else args.exact_check) and args.model is None:
        exact = cached_check(args, variants, device_name)
    # 1. the model
    if args.model is not None:
        model, name = load_model(args.model, config), args.model
    elif args.arch != "tiny" and not args.random_init:
        print(
            "error: real shapes have no weights here; pass --random-init (or --model DIR)",
            file=sys.stderr,
        )
        return 2
    else:
        t_build, model = _timed(
            lambda: build_model(args.arch, args.device, config.torch_dtype, args.layers, args.seed),
            args.device,
        )
        name = f"{args.arch} (random init, built in {t_build:.1f}s)"
    scorers, kept = [], []
    for c, variant in zip(configs, variants, strict=True):
        try:
            scorers.append(Scorer(name, c, model=model))  # one model, shared
            kept.append(variant)
        except ValueError as err:  # this path is refused for this model
            print(f"[{variant[0]}{'+compile' if variant[1] else ''}] skipped: {err}", flush=True)
    if not scorers:
        print("error: every --attention path was refused for this model", file=sys.stderr)
        return 2
    variants, scorer = kept, scorers[0]
    brute = args.brute if args.brute is not None else (args.arch == "tiny" and args.model is None)

    # 2. one random trajectory
    gen = torch.Generator().manual_seed(args.seed)
    n_ids = args.prompt_tokens + args.tokens
    ids = torch.randint(3, scorer.vocab_size, (n_ids,), generator=gen).tolist()
    table = pa.table(
        {
            "problem_id": ["bench-0"],
            "sample_idx": pa.array([0], pa.int32()),
            "input_ids": pa.array([ids], pa.list_(pa.int32())),
            "prompt_len": pa.array([args.prompt_tokens], pa.int32()),
        }
    )
    n_pairs = args.tokens * (args.alternatives + 1)

    # 3. the standard forward pass
    t_fwd = None
    if args.forward:
        seq = torch.tensor(ids, device=args.device)[None]
        with torch.inference_mode():
            forward = lambda: model(input_ids=seq, use_cache=False).logits  # noqa: E731
            _timed(forward, args.device)
            t_fwd = statistics.median(_timed(forward, args.device)[0] for _ in range(3))

    print(
        f"model: {name}; {len(scorer.adapter.layers)} layers, MoE layers {scorer.moe_layers[0]}..{scorer.moe_layers[-1]}, "
        f"{scorer.adapter.n_experts} experts top-{scorer.adapter.top_k}"
    )
    print(
        f"device: {args.device} ({device_name}, {torch.get_num_threads()} threads), dtype {dtype_name}, torch {torch.__version__}"
    )
    print(
        f"sequence: {args.prompt_tokens} prompt + {args.tokens} scored tokens; J={args.alternatives}, pool={args.pool}; "
        f"{n_pairs} (t, R) pairs; memory budget {budget} MB"
    )
    if t_fwd is not None:
        print(f"standard forward pass: {t_fwd * 1e3:.1f} ms")
    positions = torch.arange(args.prompt_tokens - 1, n_ids - 1)

    # 4. per layer: each attention path, brute force on a subset, agreement
    specs = ["early", "middle", "final"] if args.layer == "all" else args.layer.split(",")
    summary = []
    for spec in specs:
        layer = scorer.resolve_layer(spec)
        matmul, attention = decode_flops(scorer, layer, positions)
        per_pair = matmul + attention
        print(
            f"layer {layer} ({spec}): model FLOPs per (t, R) pair {per_pair / 1e9:.4g} GFLOP "
            f"(matmuls {matmul / 1e9:.4g} + attention over the prefix {attention / 1e9:.4g})"
        )
        base_rate, base_logp = None, None
        for (attention_name, compiled), path in zip(variants, scorers, strict=True):
            label = attention_name + ("+compile" if compiled else "")
            path.score_table(table.slice(0, 1), layer)  # warm-up (and compilation)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            before = dict(path.stats)
            t_fast, scores = _timed(
                lambda p=path, layer=layer: p.score_table(table, layer), args.device
            )
            distinct = path.stats["distinct_pairs"] - before["distinct_pairs"]
            rate = args.tokens / t_fast
            achieved = per_pair * distinct / t_fast
            share = (
                f", {100 * achieved / (args.peak_tflops * 1e12):.1f}% of {args.peak_tflops:g} TFLOP/s"
                if args.peak_tflops
                else ""
            )
            cols = scores.to_pydict()
            logp = (
                torch.tensor(
                    [[a, *b] for a, b in zip(cols["std_prob"], cols["alt_probs"], strict=True)]
                )
                .double()
                .log()
            )
            print(
                f"  [{label}] fast scorer {t_fast:.3f} s = {rate:.1f} tokens/s, "
                f"{n_pairs / t_fast:.0f} (t, R) pairs/s; {distinct} of {n_pairs} pairs are distinct route "
                f"sets (decoded once each); {achieved / 1e12:.3f} TFLOP/s achieved{share}",
                flush=True,
            )
            if args.device.startswith("cuda"):
                peak = torch.cuda.max_memory_allocated() / 2**30
                print(f"    peak GPU memory {peak:.1f} GiB (weights included)")
            if t_fwd is not None:
                equiv = t_fast / t_fwd
                print(
                    f"    cost: {equiv:.1f} standard forward passes = {equiv / (args.alternatives + 1):.3f} "
                    f"x (J+1); {equiv / (distinct / args.tokens):.3f} forward passes per decoded route set"
                )
            fraction = achieved / (args.peak_tflops * 1e12) if args.peak_tflops else None
            summary.append((spec, label, rate, achieved, fraction, exact.get(label)))
            if args.record and spec in ("early", "middle", "final"):
                record_rate(
                    args, spec, dtype_name, rate, device_name, path=args.rates, label=label,
                    exact=exact.get(label), peak_fraction=fraction,
                )  # fmt: skip
            if base_rate is None:
                base_rate, base_logp = rate, logp
            else:
                print(
                    f"    {rate / base_rate:.2f}x the tokens/s of [{variants[0][0]}"
                    f"{'+compile' if variants[0][1] else ''}]; max |log p difference| from it "
                    f"{(logp - base_logp).abs().max().item():.2e}",
                    flush=True,
                )
            if brute:
                pairs = [(i, r) for i in range(args.tokens) for r in range(args.alternatives + 1)]
                pick = random.Random(args.seed).sample(pairs, min(args.brute_pairs, len(pairs)))
                pos = torch.tensor([cols["position"][i] for i, _ in pick])
                rts = torch.tensor(
                    [
                        cols["std_route"][i] if r == 0 else cols["alt_routes"][i][r - 1]
                        for i, r in pick
                    ]
                )
                fast_lp = torch.stack([logp[i, r] for i, r in pick])
                t_sub, brute_lp = _timed(
                    lambda layer=layer, pos=pos, rts=rts: brute_logprobs(
                        model, ids, layer, pos, rts
                    ),
                    args.device,
                )
                t_brute = t_sub / len(pick) * n_pairs
                diff = (brute_lp.double() - fast_lp).abs().max().item()
                print(
                    f"    brute force: {t_brute:.1f} s for all {n_pairs} pairs (extrapolated linearly from "
                    f"{len(pick)} random pairs in {t_sub:.2f} s); speedup {t_brute / t_fast:.0f}x; "
                    f"max |log p(brute) - log p(fast)| over those pairs = {diff:.2e}",
                    flush=True,
                )
    print_summary(summary, args.peak_tflops)
    return 0


def print_summary(rows: list[tuple], peak: float | None) -> None:
    """One line per (layer, path): tokens/s, model TFLOP/s, share of the peak, exactness."""
    print(f"\n{'layer':<8} {'path':<14} {'tokens/s':>10} {'TFLOP/s':>9} {'of peak':>8}  exact")
    for spec, label, rate, achieved, fraction, exact in rows:
        share = f"{fraction:.1%}" if fraction is not None else "-"
        verdict = {True: "yes", False: "no", None: "not checked"}[exact]
        print(f"{spec:<8} {label:<14} {rate:>10,.1f} {achieved / 1e12:>9.3f} {share:>8}  {verdict}")
    if peak:
        print(f"(of peak: model FLOP/s over --peak-tflops {peak:g} TFLOP/s)")


if __name__ == "__main__":
    sys.exit(main())
