"""The work-unit plan: grid, unit counts, paths, and hashes that change only with their inputs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from orchestrator import config as C
from orchestrator import plan
from orchestrator.stages.generation import generation_units
from orchestrator.stages.scoring import scoring_units
from orchestrator.tasks import ScoringTask
from workers.io import config_hash

C.register_configs()


def compose_both(*overrides: str):
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        dcfg = compose("config", overrides=list(overrides))
    return C.to_run_config(dcfg), OmegaConf.to_container(dcfg, resolve=True)


def make(*overrides: str) -> C.RunConfig:
    return compose_both(*overrides)[0]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_paper_sweep_is_four_models_by_three_layers_by_five_datasets():
    cfg = make("sweep=paper")
    cells = plan.plan_cells(cfg)
    assert len(cells) == 20
    assert {c.model.name for c in cells} == {
        "qwen3-30b-a3b",
        "gpt-oss-20b",
        "deepseek-v2-lite",
        "olmoe-1b-7b",
    }
    assert {c.dataset.name for c in cells} == {
        "math500",
        "aime2024",
        "aime2025",
        "hmmt_feb_2025",
        "gpqa_diamond",
    }
    layers = {c.model.name: c.layers for c in cells}
    assert layers["qwen3-30b-a3b"] == {"early": 0, "middle": 24, "final": 47}
    assert layers["deepseek-v2-lite"] == {"early": 1, "middle": 14, "final": 26}  # layer 0 is dense
    assert layers["olmoe-1b-7b"] == {"early": 0, "middle": 8, "final": 15}
    assert cfg.generation.backend == "vllm"


def test_dry_run_prints_the_plan_without_ray_or_a_model(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "orchestrator",
            "sweep=paper",
            "dry_run=true",
            f"runs_dir={tmp_path}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "grid: 4 models x 3 layers x 5 datasets = 60 (model, layer, dataset) cells" in out
    for name in ("qwen3-30b-a3b", "gpt-oss-20b", "deepseek-v2-lite", "olmoe-1b-7b", "gpqa_diamond"):
        assert name in out
    assert "qwen3-30b-a3b    math500             500" in out
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line
    }
    # The scorer's settings are checked without torch (workers.scoring.score_config); no model
    # library, no Ray, no W&B.
    assert not imported & {"torch", "ray", "transformers", "wandb", "vllm"}
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_multirun_dry_run_plans_each_job(tmp_path):
    result = cli(
        "-m", "model=tiny,olmoe-1b-7b", "dry_run=true", f"runs_dir={tmp_path}/runs", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("grid: 1 models x 3 layers x 1 datasets") == 2
    assert "models: tiny" in result.stdout and "models: olmoe-1b-7b" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # hydra's folders stay in runs/


def test_run_id_is_derived_from_what_decides_results():
    cfg, resolved = compose_both()
    run_id = plan.derive_run_id(cfg, resolved)
    assert run_id.startswith("tiny-") and len(run_id) == len("tiny-") + 8
    assert plan.derive_run_id(*compose_both("cluster.scorers=5", "wandb=disabled")) == run_id
    assert plan.derive_run_id(*compose_both("scoring.seed=1")) != run_id
    assert plan.derive_run_id(*compose_both("sweep=paper")).startswith("paper-")
    assert plan.derive_run_id(*compose_both("run_id=mine")) == "mine"


@pytest.mark.parametrize(
    "overrides, run_id", [((), "tiny-b2168886"), (("sweep=paper",), "paper-0e9e1a3a")]
)
def test_derived_run_ids_stay_those_of_runs_already_made(overrides, run_id, tmp_path):
    """A run started without run_id= resumes by its derived id: a new setting that keeps the old
    behaviour at its default (or only feeds the dry run's estimate) must not move it."""
    done = cli(*overrides, "dry_run=true", f"runs_dir={tmp_path}/runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"run {run_id} -> ")


def gen_units(cfg: C.RunConfig, n: int = 40) -> list[plan.Unit]:
    return generation_units(
        Path("/r"), cfg.model, cfg.dataset, cfg.generation, num_problems=n, problems_sha256="abc"
    )


def test_generation_units_cover_every_problem_once():
    units = gen_units(make("generation.problems_per_shard=16"))
    assert [u.task.rows for u in units] == [(0, 16), (16, 32), (32, 40)]
    assert [str(u.path) for u in units] == [
        f"/r/trajectories/tiny/demo/generated/{k:05d}.arrow" for k in range(3)
    ]
    assert len({u.config_hash for u in units}) == 3


def test_units_hash_the_json_they_always_hashed_so_finished_runs_resume():
    """Units carry typed tasks, but their hashes are still config_hash of the same JSON, so a
    run begun by an earlier version skips its complete units. The JSON is spelled out here."""
    cfg = make("generation.problems_per_shard=16")
    m, g, d = cfg.model, cfg.generation, cfg.dataset
    common = {
        "model": plan.model_identity(m),
        "dtype": m.dtype,
        "backend": m.generation_backend or g.backend,
        "sampling": {
            "n": g.samples_per_problem,
            "temperature": m.temperature,
            "top_p": m.top_p,
            "top_k": m.sample_top_k,
            "min_p": m.min_p,
            "max_tokens": m.max_tokens,
            "seed": g.seed,
        },
        "prompt": {
            "template": m.template,
            "use_chat_template": m.use_chat_template,
            "instruction": d.instruction,
            "verifier": d.verifier,
        },
        "problems": "abc",
    }
    rows = ([0, 16], [16, 32], [32, 40])
    assert [u.config_hash for u in gen_units(cfg)] == [
        config_hash({**common, "rows": r}) for r in rows
    ]
    [cell] = plan.plan_cells(cfg)
    hashed = dict(C.score_args(cfg.scoring, m))
    for how in ("memory_budget_mb", "attention", "compile"):
        del hashed[how]
    assert hashed.pop("positions") == "all"  # the default budget is left out of the hash
    assert hashed.pop("moe_geometry") is False  # and so are the MoE output columns, off
    units = scoring_units(Path("/r"), cell, cfg.scoring, [(Path("/r/in/00004.arrow"), "s4")])
    assert [(str(u.path), u.config_hash) for u in units] == [
        (
            f"/r/scores/tiny/layer={L}/demo/00004.arrow",
            config_hash(
                {"model": plan.model_identity(m), "layer": L, "score": hashed, "input": "s4"}
            ),
        )
        for L in (0, 2, 3)
    ]


def test_generation_hashes_are_pinned_to_those_of_files_already_written():
    """Computed once by the planner of the version before typed tasks, on these fixed inputs:
    generation now hashes the SamplingParams its worker gets, and must hash it as before."""
    model = C.ModelConfig(
        name="m", hf_id="example/moe", revision="r1", dtype="float32",
        template="Q: {prompt}\nA:", use_chat_template=False, temperature=0.7, top_p=0.9,
        sample_top_k=5, min_p=0.05, max_tokens=64,
    )  # fmt: skip
    dataset = C.DatasetConfig(name="d", verifier="exact", instruction="Answer briefly.")
    generation = C.GenerationConfig(
        backend="hf", samples_per_problem=3, seed=11, problems_per_shard=4
    )
    units = generation_units(
        Path("/r"), model, dataset, generation, num_problems=6, problems_sha256="abc"
    )
    assert [(str(u.path), u.config_hash, u.task.rows) for u in units] == [
        ("/r/trajectories/m/d/generated/00000.arrow", "1122ae8cbb2f5aa0", (0, 4)),
        ("/r/trajectories/m/d/generated/00001.arrow", "e65034a388c43b21", (4, 6)),
    ]


def test_a_malformed_task_fails_where_it_is_built_naming_the_field():
    with pytest.raises(TypeError, match="ScoringTask.layer must be int, got str '3'"):
        ScoringTask(in_path=Path("/r/x.arrow"), layer="3")
    with pytest.raises(TypeError, match="ScoringTask.in_path must be Path, got str"):
        ScoringTask(in_path="/r/x.arrow", layer=3)
    good = gen_units(make())[0].task
    with pytest.raises(TypeError, match="GenerationTask.sampling must be SamplingParams, got dict"):
        dataclasses.replace(good, sampling=dataclasses.asdict(good.sampling))
    with pytest.raises(TypeError, match=r"rows must be a \(start, stop\) tuple of int"):
        dataclasses.replace(good, rows=[0, 16])
    with pytest.raises(ValueError, match="0 <= start < stop"):
        dataclasses.replace(good, rows=(16, 16))


def test_generation_hash_changes_with_sampling_not_with_batching_or_cluster():
    base = [u.config_hash for u in gen_units(make())]
    assert [
        u.config_hash for u in gen_units(make("generation.batch_size=3", "cluster.generators=4"))
    ] == base
    for override in (
        "generation.seed=1",
        "model.max_tokens=50",
        "generation.samples_per_problem=3",
    ):
        assert [u.config_hash for u in gen_units(make(override))] != base, override
    cfg = make()
    other = generation_units(
        Path("/r"), cfg.model, cfg.dataset, cfg.generation, num_problems=40, problems_sha256="xyz"
    )
    assert [u.config_hash for u in other] != base  # different problems file content


def score_units(cfg: C.RunConfig) -> dict[str, str]:
    [cell] = plan.plan_cells(cfg)
    shards = [(Path("/r/in/00000.arrow"), "s0"), (Path("/r/in/00001.arrow"), "s1")]
    return {u.key: u.config_hash for u in scoring_units(Path("/r"), cell, cfg.scoring, shards)}


def test_scoring_units_per_layer_and_shard_with_hashes_of_only_what_matters():
    base = score_units(make())
    assert sorted(base) == [f"tiny/layer={L}/demo/{k:05d}" for L in (0, 2, 3) for k in (0, 1)]
    assert (
        score_units(make("scoring.memory_budget_mb=7", "cluster.scorers=1", "scoring.retries=0"))
        == base
        == score_units(make("scoring.attention=flex", "scoring.compile=true"))
    )
    assert score_units(make("scoring.alternatives=8")) != base
    # Adding a layer adds units and keeps the others' hashes.
    more = score_units(make("scoring.layers=[early,middle,final,1]"))
    assert {k: more[k] for k in base} == base and len(more) == 8


def test_a_scoring_units_hash_covers_exactly_these_scorer_settings():
    # Pinned: hashing one more setting (or one fewer) would redo every finished unit of every
    # run on resume. A new setting that changes the scores must be hashed; one that changes
    # only speed belongs in workers.scoring.score_config.SPEED_SETTINGS.
    cfg = make()
    [cell] = plan.plan_cells(cfg)
    [unit, *_] = scoring_units(Path("/r"), cell, cfg.scoring, [(Path("/r/a.arrow"), "s0")])
    score = {
        **{"alternatives": 32, "pool": 32, "temperature": 1.0, "sampler": "gumbel", "seed": 0},
        "dtype": "float32",
    }
    identity = plan.model_identity(cfg.model)
    want = config_hash({"model": identity, "layer": 0, "score": score, "input": "s0"})
    assert unit.config_hash == want
    # The hashes finished runs were written with, on fixed inputs (a hub model: no local files
    # in its identity); the speed-only settings of the first config are not in them.
    model = C.ModelConfig(
        name="m", hf_id="example/moe", revision="r1", family="qwen3_moe", num_layers=4,
        moe_layers=[0, 1, 2, 3], num_experts=16, top_k=4, dtype="bfloat16",
    )  # fmt: skip
    cell = plan.Cell(model, C.DatasetConfig(name="d"), {"early": 1, "final": 3})
    scoring = C.ScoringConfig(
        alternatives=8, pool=16, temperature=0.5, sampler="uniform_pool", seed=3,
        memory_budget_mb=64, attention="flex", compile=True,
    )  # fmt: skip
    shards = [(Path("/r/in/00002.arrow"), "s2")]
    units = scoring_units(Path("/r"), cell, scoring, shards)
    assert [u.config_hash for u in units] == ["33a532e30ffb9e93", "0d8e64a46a7e680f"]
    units = scoring_units(Path("/r"), cell, C.ScoringConfig(dtype="float32"), shards)
    assert [u.config_hash for u in units] == ["09290a703c0c8dc2", "48f2bd740b1d608e"]


def test_the_paths_follow_the_run_layout():
    cfg = make()
    [cell] = plan.plan_cells(cfg)
    [unit] = scoring_units(
        Path("/r"),
        dataclasses.replace(cell, layers={"final": 3}),
        cfg.scoring,
        [(Path("/r/x/00007.arrow"), "s")],
    )
    assert str(unit.path) == "/r/scores/tiny/layer=3/demo/00007.arrow"
    assert unit.task == ScoringTask(in_path=Path("/r/x/00007.arrow"), layer=3)
    assert (
        str(plan.shard_dir(Path("/r"), cfg.model, cfg.dataset))
        == "/r/trajectories/tiny/demo/shards"
    )
    assert str(plan.problems_path(Path("/r"), cfg.dataset)) == "/r/problems/demo.arrow"


def test_estimate_upper_bounds():
    [est] = plan.estimate(
        make("generation.samples_per_problem=2", "scoring.trajectories_per_shard=10")
    )
    assert (est.problems, est.completions, est.generation_units) == (64, 128, 4)
    assert est.max_completion_tokens == 128 * 96 and est.max_scoring_units_per_layer == 13


def test_retrained_weights_of_the_same_size_change_every_unit_hash(tmp_path):
    import shutil

    model_dir = tmp_path / "tiny"
    shutil.copytree(C.model_path(make().model), model_dir)
    before = score_units(make(f"model.path={model_dir}"))
    before_gen = [u.config_hash for u in gen_units(make(f"model.path={model_dir}"))]
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the same size, other weights
    weights.write_bytes(bytes(data))
    after = score_units(make(f"model.path={model_dir}"))
    assert sorted(after) == sorted(before) and not set(after.values()) & set(before.values())
    assert not set(before_gen) & {u.config_hash for u in gen_units(make(f"model.path={model_dir}"))}


def test_problems_carry_the_configured_data_set_name_not_the_loaders(tmp_path):
    """Two data sets of one loader (the router update's demo_train beside demo) must not merge
    into one `dataset` in the tables: the problems file names the configured data set."""
    from orchestrator.problems import prepare_datasets
    from workers.io import read_arrow

    small = {"n": 3, "difficulty": 1}
    datasets = [
        C.DatasetConfig(name="demo", loader="demo", verifier="exact", options=small),
        C.DatasetConfig(
            name="demo_train", loader="demo", verifier="exact", options={**small, "split": "train"}
        ),
    ]
    prepare_datasets(tmp_path, datasets)
    for d in datasets:
        table = read_arrow(plan.problems_path(tmp_path, d))
        assert set(table.column("dataset").to_pylist()) == {d.name}
