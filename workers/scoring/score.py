"""Command line: score one trajectories file at one MoE layer.

    python -m workers.scoring.score --model DIR --trajectories IN.arrow --layer middle --out OUT.arrow \\
        [--alternatives 32] [--pool 32] [--temperature 1.0] [--sampler gumbel] [--seed 0] \\
        [--dtype float32|bfloat16] [--device cpu|cuda] [--memory-budget-mb 1024] \\
        [--attention eager|flex] [--compile] [--positions all|0.25|64] [--moe-geometry]

Contract: IN is an Arrow IPC file with at least problem_id, sample_idx, input_ids, prompt_len
(a completion sidecar is not required; input_ids integer lists, one row per (problem_id,
sample_idx), no longer than the model's max_position_embeddings); OUT, never IN itself, is
written with workers.io.write_arrow (SCORES_SCHEMA, then its `.done.json` sidecar). --layer is
an index or early/middle/final. A tqdm bar of scored tokens goes to stderr. Bad input (options,
file, columns and their types, duplicate keys, prompt_len, token ids, sequence length, layer,
model directory, config.json or weights) prints one line `error: ...` on stderr and exits with
status 2, writing nothing.
The scoring options are workers.scoring.score_config.ScoreConfig's fields, with its defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
from safetensors import SafetensorError

from workers.io import IncompleteFileError, config_hash, done_path
from workers.scoring.scorer import ScoreConfig, Scorer, score_file, select_positions
from workers.trajectories import read_trajectories


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m workers.scoring.score",
        description="Counterfactual route scores of one trajectories file at one MoE layer.",
    )
    p.add_argument("--model", required=True, help="model directory (safetensors)")
    p.add_argument("--trajectories", required=True, help="input Arrow IPC file")
    p.add_argument("--layer", required=True, help="MoE layer index or early|middle|final")
    p.add_argument("--out", required=True, help="output Arrow IPC file")
    # One option per ScoreConfig field (--memory-budget-mb for memory_budget_mb), with its
    # default and help; its values are checked when the config is built, as one `error:` line.
    hints = typing.get_type_hints(ScoreConfig)
    for f in dataclasses.fields(ScoreConfig):
        flag, kind, help_ = "--" + f.name.replace("_", "-"), hints[f.name], f.metadata["help"]
        if kind is bool:
            p.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_
            )
        else:
            p.add_argument(
                flag, type=kind, default=f.default, help=f"{help_} (default: {f.default})"
            )
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Score args.trajectories into args.out; return the output's sidecar."""
    from tqdm import tqdm

    # 1. options
    config = ScoreConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ScoreConfig)})
    # 2. the input, checked before the (slow) model load
    in_path = Path(args.trajectories)
    if not in_path.is_file():
        raise FileNotFoundError(f"trajectories file {in_path} does not exist")
    if Path(args.out).resolve() in (in_path.resolve(), done_path(in_path).resolve()):
        raise ValueError(f"--out {args.out} is the input file: it would overwrite it")
    try:
        table = read_trajectories(in_path, require_complete=False)
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{in_path} is not a readable Arrow IPC file: {err}") from err
    check_columns(table)
    max_len = max_positions(Path(args.model))
    # 3. the model, then the layer and every row
    try:
        scorer = Scorer(args.model, config)
    except SafetensorError as err:
        raise ValueError(f"cannot load model weights from {args.model}: {err}") from err
    layer = scorer.resolve_layer(args.layer)
    rows = scorer.validate(table)
    longest = max(len(r["input_ids"]) for r in rows)
    if max_len is not None and longest > max_len:
        raise ValueError(
            f"a sequence has {longest} tokens, more than the model's position limit"
            f" max_position_embeddings={max_len}"
        )
    total = sum(  # the positions scored (every completion token unless --positions)
        len(
            select_positions(
                config.positions,
                config.seed,
                r["problem_id"],
                r["sample_idx"],
                r["prompt_len"] - 1,
                len(r["input_ids"]) - r["prompt_len"],
            )
        )
        for r in rows
    )
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


def check_columns(table: pa.Table) -> None:
    """ValueError unless the key columns have integer types and (problem_id, sample_idx) is
    unique: a float or string token id, or two rows scored under one key, is never accepted."""
    types = {f.name: f.type for f in table.schema}
    ids = types.get("input_ids")
    if ids is not None and not (
        (pa.types.is_list(ids) or pa.types.is_large_list(ids))
        and pa.types.is_integer(ids.value_type)
    ):
        raise ValueError(f"input_ids must be a list of integers, got {ids}")
    for name in ("prompt_len", "sample_idx"):
        if name in types and not pa.types.is_integer(types[name]):
            raise ValueError(f"{name} must be an integer column, got {types[name]}")
    if "problem_id" in types and "sample_idx" in types and table.num_rows:
        keys = table.group_by(["problem_id", "sample_idx"]).aggregate([([], "count_all")])
        dup = keys.filter(pa.compute.greater(keys["count_all"], 1))
        if dup.num_rows:
            first = dup.slice(0, 1).to_pylist()[0]
            raise ValueError(
                f"{dup.num_rows} duplicate (problem_id, sample_idx) keys, e.g."
                f" ({first['problem_id']!r}, {first['sample_idx']}): each trajectory once"
            )


def max_positions(model_dir: Path) -> int | None:
    """The model's position limit from its config.json (None when it sets none); ValueError
    when config.json is missing, not JSON, or not an object."""
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    try:
        hf_config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a model config from {path}: {err}") from err
    if not isinstance(hf_config, dict):
        raise ValueError(f"cannot load a model config from {path}: not a JSON object")
    limit = hf_config.get("max_position_embeddings")
    return limit if isinstance(limit, int) else None


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
