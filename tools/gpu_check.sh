#!/usr/bin/env bash
# The scorer's GPU check in one script, about 12 minutes on one H100 or H200:
#
#     bash tools/gpu_check.sh          # rows and logs under $OUT (else ./gpu-check)
#
# 1. tools.bench_score on the real shapes (random init, bf16, J=32, early and final layer,
#    each attention path of $PATHS), recording a row per layer and path: Qwen3-30B-A3B at
#    4,096, 16,384 and 32,768 tokens, OLMoE-1B-7B at 2,048 and 16,384, GPT-OSS-20B and
#    DeepSeek-V2-Lite at 4,096; most informative first.
# 2. The GPU tests of tests/test_attention.py and tests/test_scorer.py.
#
# Needs torch, transformers, pyarrow and pytest only (no Ray, Polars, Hydra, W&B or vLLM).
# Every step runs under `timeout` with its own share of the time; one cut short keeps the
# rows it recorded (bench_score appends each as it is measured). Rows: $OUT/rates.csv, in
# workers/rates.py's columns, to be appended to workers/assets/rates.csv; exactness verdicts
# (float32, 4 layers of each shape, against eager attention) are checked once per model and
# kept in $OUT/exact.json; everything printed goes to $OUT/gpu_check.log.
set -u
cd "$(dirname "$0")/.." || exit 2
out=${OUT:-gpu-check}
mkdir -p "$out"
log=$out/gpu_check.log
peak=${PEAK_TFLOPS:-989}   # dense bf16 matmul peak of an H100 or H200 SXM, TFLOP/s
paths=${PATHS:-eager,flex,flex+compile}
py=${PYTHON:-python3}   # on the lent GPU machines, python3 is the one with torch
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
failed=0

step() {  # step SECONDS NAME COMMAND...: run COMMAND for at most SECONDS, logged
  local limit=$1 name=$2 start=$SECONDS rc
  shift 2
  echo "=== $name (at most ${limit}s, $(date -u +%T) UTC)" | tee -a "$log"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$log"
  if [ "$rc" -ne 0 ]; then failed=$((failed + 1)); fi
}

bench() {  # bench SECONDS ARCH TOKENS [more bench_score options]
  local limit=$1 arch=$2 tokens=$3
  shift 3
  step "$limit" "$arch at $tokens tokens" "$py" -m tools.bench_score --arch "$arch" \
    --random-init --device cuda --dtype bfloat16 --tokens "$tokens" --alternatives 32 \
    --layer early,final --attention "$paths" --peak-tflops "$peak" --no-forward --record \
    --rates "$out/rates.csv" --exact-cache "$out/exact.json" "$@"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
"$py" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>&1 | tee -a "$log"

# ~690 s in all. Qwen3's 61 GB of bf16 weights leave an H100 room for a smaller micro-batch.
bench 150 qwen3-30b-a3b 4096 --memory-budget-mb 8192
step 120 "GPU tests" "$py" -m pytest --noconftest -m gpu -q -p no:cacheprovider \
  tests/test_attention.py tests/test_scorer.py
bench 70 olmoe-1b-7b 2048
bench 70 olmoe-1b-7b 16384
bench 80 qwen3-30b-a3b 16384 --memory-budget-mb 4096
bench 80 qwen3-30b-a3b 32768 --memory-budget-mb 4096
bench 60 gpt-oss-20b 4096
bench 60 deepseek-v2-lite 4096
echo "=== done: $failed step(s) failed or cut short; rows in $out/rates.csv" | tee -a "$log"
