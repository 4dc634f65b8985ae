"""`python -m workers.scoring.score` end to end on a saved tiny model, and its error contract."""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from moe_factories import make_model, make_trajectories, save_model, single_thread

from workers.io import done_path, is_complete, read_arrow, read_sidecar
from workers.schemas import SCORES_SCHEMA, as_list_routes
from workers.scoring.score import main, parse_args
from workers.scoring.score_config import ScoreConfig


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(make_model("deepseek_v2"), tmp_path_factory.mktemp("models") / "tiny-ds")


def _write(table, path):
    """A bare Arrow IPC file, no sidecar (as a user would hand one in)."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def test_cli_end_to_end(model_dir, tmp_path):
    table = make_trajectories(lengths=(10, 7), prompt_lens=(4, 2))
    src, out = _write(table, tmp_path / "traj.arrow"), tmp_path / "scores" / "out.arrow"
    cmd = [
        sys.executable,
        "-m",
        "workers.scoring.score",
        "--model",
        str(model_dir),
        "--trajectories",
        str(src),
        "--layer",
        "final",
        "--out",
        str(out),
        "--alternatives",
        "3",
        "--pool",
        "4",
        "--seed",
        "7",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "tok" in proc.stderr  # the tqdm bar
    assert is_complete(out)
    scores = read_arrow(out)
    assert as_list_routes(scores).schema == SCORES_SCHEMA and scores.num_rows == 6 + 5
    assert set(scores["layer"].to_pylist()) == {2}
    assert all(len(r) == 3 for r in scores["alt_routes"].to_pylist())
    sidecar = read_sidecar(out)
    assert sidecar["rows"] == 11 and sidecar["layer"] == 2 and sidecar["score_config"]["seed"] == 7
    # the same command gives the same scores (seeded alternatives)
    assert main(cmd[3:]) == 0
    assert read_arrow(out).equals(scores)
    # the fused attention path gives the same scores up to rounding, and says so in the sidecar
    assert main([*cmd[3:], "--attention", "flex"]) == 0
    assert read_sidecar(out)["score_config"]["attention"] == "flex"
    flex = read_arrow(out)
    assert flex["alt_routes"].equals(scores["alt_routes"])
    for column in ("std_prob", "alt_probs"):
        got, want = flex[column].combine_chunks(), scores[column].combine_chunks()
        diff = np.abs(np.log(_flat(got)) - np.log(_flat(want))).max()
        assert diff < 1e-5, column


def _flat(column):
    return np.asarray(column.flatten() if hasattr(column, "flatten") else column, dtype=np.float64)


def test_cli_options_are_the_score_configs_fields():
    required = ["--model", "m", "--trajectories", "t", "--layer", "1", "--out", "o"]
    args = vars(parse_args(required))
    settings = [f.name for f in dataclasses.fields(ScoreConfig)]
    assert ScoreConfig(**{k: args.pop(k) for k in settings}) == ScoreConfig()  # its defaults
    assert sorted(args) == ["layer", "model", "out", "trajectories"]
    changed = parse_args([*required, "--memory-budget-mb", "7", "--compile", "--sampler", "x"])
    assert (changed.memory_budget_mb, changed.compile, changed.sampler) == (7, True, "x")


def _fails(capsys, args, message):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and message in err[-1], err
    return err


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "empty"),
        ("missing", "does not exist"),
        ("not_arrow", "not a readable Arrow IPC file"),
        ("no_column", "lack column(s) prompt_len"),
        ("prompt_len", "prompt_len 10 must be in [1, len(input_ids) - 1] = [1, 9]"),
        ("vocab", "token id 500 is outside the model's vocabulary [0, 96)"),
        ("dense_layer", "layer 0 has no routed experts"),
        ("pool", "pool of 1 experts is smaller than the route size k=2"),
        ("model", "cannot load"),
        ("sampler", "sampler must be one of"),
        ("dtype", "dtype must be one of float32, bfloat16, got 'fp8'"),
        ("positions", "positions must be all, a fraction in (0, 1] or a whole count >= 1"),
    ],
)
def test_cli_errors(model_dir, tmp_path, capsys, case, message):
    table = make_trajectories(lengths=(10,), prompt_lens=(4,))
    src = tmp_path / "traj.arrow"
    layer, extra, model = "1", [], str(model_dir)
    if case == "empty":
        _write(table.slice(0, 0), src)
    elif case == "not_arrow":
        src.write_text("not arrow")
    elif case == "no_column":
        _write(table.drop_columns(["prompt_len"]), src)
    elif case == "prompt_len":
        _write(table.set_column(3, "prompt_len", pa.array([10], pa.int32())), src)
    elif case == "vocab":
        ids = table["input_ids"][0].as_py()
        _write(
            table.set_column(2, "input_ids", pa.array([ids[:-1] + [500]], pa.list_(pa.int32()))),
            src,
        )
    else:
        _write(table, src)
    if case == "missing":
        src = tmp_path / "nowhere.arrow"
    layer = "0" if case == "dense_layer" else layer
    extra = {"pool": ["--pool", "1"], "sampler": ["--sampler", "best"], "dtype": ["--dtype", "fp8"]}
    extra = {**extra, "positions": ["--positions", "1.5"]}.get(case, [])
    model = str(tmp_path) if case == "model" else model
    out = tmp_path / "out.arrow"
    _fails(
        capsys,
        ["--model", model, "--trajectories", str(src), "--layer", layer, "--out", str(out), *extra],
        message,
    )
    assert not out.exists() and not done_path(out).exists()


def _model_copy(model_dir, tmp_path, case):
    """A copy of the saved model with config.json or the weights damaged as `case` says."""
    import json
    import shutil

    copy = shutil.copytree(model_dir, tmp_path / "model")
    config = copy / "config.json"
    if case == "config_not_json":
        config.write_text("{not json")
    elif case == "config_list":
        config.write_text("[1, 2]")
    elif case == "too_long":
        config.write_text(
            json.dumps({**json.loads(config.read_text()), "max_position_embeddings": 8})
        )
    elif case == "safetensors_header":
        [weights] = copy.glob("*.safetensors")
        data = bytearray(weights.read_bytes())
        data[8:40] = b"\xff" * 32  # the JSON header after its 8-byte length
        weights.write_bytes(bytes(data))
    return copy


@pytest.mark.parametrize(
    "case, message",
    [
        ("duplicate", "1 duplicate (problem_id, sample_idx) keys, e.g. ('p0-0', 0)"),
        ("out_is_input", "is the input file: it would overwrite it"),
        ("float_ids", "input_ids must be a list of integers, got list<item: double>"),
        ("string_ids", "input_ids must be a list of integers, got list<item: string>"),
        ("string_prompt_len", "prompt_len must be an integer column, got string"),
        ("too_long", "a sequence has 10 tokens, more than the model's position limit"),
        ("config_not_json", "cannot load a model config from"),
        ("config_list", "not a JSON object"),
        ("safetensors_header", "cannot load model weights from"),
    ],
)
def test_cli_refuses_input_it_used_to_accept_or_crash_on(
    model_dir, tmp_path, capsys, case, message
):
    table = make_trajectories(lengths=(10,), prompt_lens=(4,))
    src, out = tmp_path / "traj.arrow", tmp_path / "out.arrow"
    ids = table["input_ids"][0].as_py()
    if case == "duplicate":
        table = pa.concat_tables([table, table])
    elif case == "float_ids":
        table = table.set_column(2, "input_ids", pa.array([[float(x) for x in ids]]))
    elif case == "string_ids":
        table = table.set_column(2, "input_ids", pa.array([[str(x) for x in ids]]))
    elif case == "string_prompt_len":
        table = table.set_column(3, "prompt_len", pa.array(["4"]))
    _write(table, src)
    before = src.read_bytes()
    if case == "out_is_input":
        out = src
    model = model_dir
    if case in ("config_not_json", "config_list", "too_long", "safetensors_header"):
        model = _model_copy(model_dir, tmp_path, case)
    _fails(
        capsys,
        ["--model", str(model), "--trajectories", str(src), "--layer", "1", "--out", str(out)],
        message,
    )
    assert src.read_bytes() == before
    assert not done_path(out).exists() and (case == "out_is_input" or not out.exists())
