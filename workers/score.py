"""Command line: score one trajectories file at one MoE layer.

    python -m workers.score --model DIR --trajectories IN.arrow --layer middle --out OUT.arrow \\
        [--alternatives 32] [--pool 32] [--temperature 1.0] [--sampler gumbel] [--seed 0] \\
        [--dtype float32|bfloat16] [--device cpu|cuda] [--memory-budget-mb 1024] \\
        [--attention eager|flex] [--compile]

Contract: IN is an Arrow IPC file with at least problem_id, sample_idx, input_ids, prompt_len
(a completion sidecar is not required); OUT is written with workers.io.write_arrow (SCORES_SCHEMA,
then its `.done.json` sidecar). --layer is an index or early/middle/final. A tqdm bar of scored
tokens goes to stderr. Bad input (options, file, columns, prompt_len, token ids, layer, model
directory) prints one line `error: ...` on stderr and exits with status 2, writing nothing.
Option defaults are ScoreConfig's.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import pyarrow as pa

from workers.attention import ATTENTIONS
from workers.io import IncompleteFileError, config_hash, read_arrow
from workers.scorer import DTYPES, ScoreConfig, Scorer, score_file

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ScoreConfig)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m workers.score",
        description="Counterfactual route scores of one trajectories file at one MoE layer.",
    )
    p.add_argument("--model", required=True, help="model directory (safetensors)")
    p.add_argument("--trajectories", required=True, help="input Arrow IPC file")
    p.add_argument("--layer", required=True, help="MoE layer index or early|middle|final")
    p.add_argument("--out", required=True, help="output Arrow IPC file")
    p.add_argument("--alternatives", type=int, default=_DEFAULTS["alternatives"])
    p.add_argument("--pool", type=int, default=_DEFAULTS["pool"])
    p.add_argument("--temperature", type=float, default=_DEFAULTS["temperature"])
    p.add_argument("--sampler", default=_DEFAULTS["sampler"])
    p.add_argument("--seed", type=int, default=_DEFAULTS["seed"])
    p.add_argument("--dtype", default=_DEFAULTS["dtype"], choices=tuple(DTYPES))
    p.add_argument("--device", default=_DEFAULTS["device"])
    p.add_argument("--memory-budget-mb", type=int, default=_DEFAULTS["memory_budget_mb"])
    p.add_argument(
        "--attention",
        default=_DEFAULTS["attention"],
        choices=ATTENTIONS,
        help="eager: the reference (fastest on CPU); flex: fused FlexAttention (GPUs)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=_DEFAULTS["compile"],
        help="torch.compile fixed-shape decode steps (CUDA graphs on a GPU)",
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Score args.trajectories into args.out; return the output's sidecar."""
    from tqdm import tqdm

    # 1. options
    config = ScoreConfig(
        alternatives=args.alternatives,
        pool=args.pool,
        temperature=args.temperature,
        sampler=args.sampler,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        memory_budget_mb=args.memory_budget_mb,
        attention=args.attention,
        compile=args.compile,
    )
    # 2. the input, checked before the (slow) model load
    in_path = Path(args.trajectories)
    if not in_path.is_file():
        raise FileNotFoundError(f"trajectories file {in_path} does not exist")
    try:
        table = read_arrow(in_path, require_complete=False)
    except pa.ArrowInvalid as err:
        raise ValueError(f"{in_path} is not a readable Arrow IPC file: {err}") from err
    # 3. the model, then the layer and every row
    scorer = Scorer(args.model, config)
    layer = scorer.resolve_layer(args.layer)
    rows = scorer.validate(table)
    total = sum(len(r["input_ids"]) - r["prompt_len"] for r in rows)
    # 4. score and write
    key = config_hash(
        {
            "score": dataclasses.asdict(config),
            "model": str(Path(args.model).resolve()),
            "layer": layer,
        }
    )
    with tqdm(total=total, unit="tok", desc=f"layer {layer}", file=sys.stderr) as bar:
        return score_file(scorer, in_path, layer, args.out, config_hash=key, progress=bar.update)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        sidecar = run(args)
    except (ValueError, FileNotFoundError, IncompleteFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {sidecar['rows']} scored tokens to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
