"""Generator routes (generation.record_routes): the `gen_routes` column, the agreement of the
scorer's standard route S with the generator's route G, and the demo run that measures it.

- route_agreement on hand-built files: S = G as sets (any order), partial overlaps, the layer
  each score file is compared at, scored tokens only.
- The demo on a local Ray with HF generators recording routes: every completion token has a
  route at every MoE layer, and the report's agreement table (real measurement).
- vLLM's CPU build cannot return routes: the config says so before Ray starts.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from pipeline_runs import run_inprocess

from analysis.gen_routes import compare_layer, generator_tokens, route_agreement
from workers.generation import Completion
from workers.generation.generate import routes_column
from workers.schemas import GEN_ROUTES, gen_route_layers, gen_routes_field


def write_ipc(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    return path


def completion(pid: str, tokens: int, routes) -> Completion:
    return Completion(pid, 0, [5, 6, 7], list(range(tokens)), "", "stop", routes=routes)


def test_route_agreement_compares_sets_at_the_scored_layer_and_position(tmp_path):
    field = gen_routes_field(n_experts=16, top_k=2, layers=[1, 3])
    # trajectory a: prompt_len 3, 4 completion tokens (positions 2..5); slot 0 = layer 1
    a = np.array([[[0, 1], [1, 0]], [[2, 3], [3, 2]], [[4, 5], [5, 4]], [[6, 7], [7, 6]]], np.uint8)
    rows = [completion("a", 4, a), completion("b", 0, None)]  # b: unprompted, no tokens
    column = routes_column(rows, field)
    assert column.to_pylist()[1] == [] and column.type == field.type
    traj = pa.table(
        {
            "problem_id": ["a", "b"],
            "sample_idx": pa.array([0, 0], pa.int32()),
            "prompt_len": pa.array([3, 3], pa.int32()),
        }
    ).append_column(field, column)
    gen = write_ipc(tmp_path / "trajectories/m/d/generated/00000.arrow", traj)
    assert gen_route_layers(pa.ipc.open_file(str(gen)).schema.field(GEN_ROUTES)) == [1, 3]

    def scores(layer: int, positions: list[int], std: list[list[int]]) -> Path:
        n = len(positions)
        table = pa.table(
            {
                "problem_id": ["a"] * n,
                "sample_idx": pa.array([0] * n, pa.int32()),
                "position": pa.array(positions, pa.int32()),
                "std_route": pa.array(std, pa.list_(pa.uint8(), 2)),
                "layer": pa.array([layer] * n, pa.int32()),
            }
        )
        return write_ipc(tmp_path / f"scores/m/layer={layer}/d/00000.arrow", table)

    # layer 3 (slot 1): same set reversed, overlap 1 of 2, same set, none
    s3 = scores(3, [2, 3, 4, 5], [[0, 1], [3, 9], [5, 4], [8, 9]])
    # layer 1 (slot 0), two positions scored (a position budget)
    s1 = scores(1, [2, 4], [[1, 0], [4, 5]])
    table = route_agreement([s1, s3], [gen])
    assert table.to_dicts() == [
        dict(model="m", layer=1, tokens=2, same_set=2, share=1.0, mean_overlap=1.0),
        dict(model="m", layer=3, tokens=4, same_set=2, share=0.5, mean_overlap=0.625),
    ]
    # files without routes: nothing to compare
    plain = write_ipc(
        tmp_path / "plain/trajectories/m/d/generated/00000.arrow", traj.drop(GEN_ROUTES)
    )
    assert route_agreement([s1, s3], [plain]) is None


def test_record_routes_with_vllm_on_cpu_is_a_config_error():
    from test_config import make

    from orchestrator import config as C

    cfg = make("generation=vllm", "generation.record_routes=true", "dry_run=true")
    with pytest.raises(C.ConfigError, match="vLLM's CPU build cannot return routed experts"):
        C.validate(cfg)
    C.validate(make("generation=vllm", "generation.record_routes=true", "cluster=address"))
    C.validate(make("generation.record_routes=true"))  # HF records on CPU


def test_the_dry_run_counts_the_generator_routes_in_the_trajectories_only():
    from test_config import make

    from orchestrator import plan

    def qwen(*overrides: str) -> tuple[float, float]:
        text = plan.describe_plan(make("sweep=paper", *overrides), "r", plan.Path("/r"))
        found = re.search(r"qwen3-30b-a3b +trajectories +([\d,.]+) GB, shards <= +([\d,.]+)", text)
        return tuple(float(x.replace(",", "")) for x in found.groups())

    plain, routes = qwen(), qwen("generation.record_routes=true")
    assert plain[1] == routes[1]  # shards are references: they never hold the routes
    # 48 MoE layers x k = 8 one-byte ids per token against 12 bytes a token without them
    assert routes[0] > 20 * plain[0]


@pytest.fixture(scope="module")
def routes_demo(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("gen-routes")
    assert run_inprocess(runs, "g", "generation.record_routes=true", "scoring.layers=[0,3]") == 0
    return runs / "g"


def test_demo_records_generator_routes_and_reports_their_agreement(routes_demo):
    generated = sorted(routes_demo.glob("trajectories/*/*/generated/*.arrow"))
    schema = pa.ipc.open_file(str(generated[0])).schema
    assert gen_route_layers(schema.field(GEN_ROUTES)) == [0, 1, 2, 3]  # every MoE layer
    traj = pl.concat(pl.read_ipc(p) for p in generated)
    tokens = (traj["input_ids"].list.len() - traj["prompt_len"]).to_list()
    assert traj[GEN_ROUTES].list.len().to_list() == tokens and sum(tokens) > 100
    ids = np.concatenate([np.asarray(r).reshape(-1) for r in traj[GEN_ROUTES].to_list() if r])
    assert ids.min() >= 0 and ids.max() < 16 and len(ids) == sum(tokens) * 4 * 4

    table = pl.read_parquet(routes_demo / "tables/route_agreement.parquet")
    assert table["layer"].to_list() == [0, 3] and table["model"].unique().to_list() == ["tiny"]
    assert table["tokens"].min() > 100
    assert ((table["share"] >= 0) & (table["share"] <= 1)).all()
    # Same weights, both float32; the generator's batched, left-padded, KV-cached steps and
    # the scorer's single full pass differ only by rounding, which can flip a near-tie in the
    # router logits: measured 15,096 of 15,096 tokens agree on the full demo. A position off
    # by one gives 0 (the check below), a wrong layer about chance (k/E = 1/4 overlap).
    assert table["share"].min() >= 0.99 and table["mean_overlap"].min() >= 0.99
    shard = pa.ipc.open_file(str(next(routes_demo.glob("trajectories/*/*/shards/*.arrow"))))
    assert GEN_ROUTES not in shard.schema.names  # the scorer does not need them
    report = (routes_demo / "report.md").read_text()
    assert "## Generator routes" in report

    # The join is aligned: shifting the generator's positions by one breaks the agreement.
    gen = generator_tokens(generated).with_columns(pl.col("position") + 1)
    scores = pl.concat(
        pl.read_ipc(p, columns=["problem_id", "sample_idx", "position", "std_route", "layer"])
        for p in sorted(routes_demo.glob("scores/*/layer=0/*/*.arrow"))
    ).with_columns(model=pl.lit("tiny"), std_route=pl.col("std_route").cast(pl.List(pl.Int32)))
    shifted = compare_layer(scores, gen, 0, 4)
    assert (shifted["overlap"] == 4).mean() < 0.5
