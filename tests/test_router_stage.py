"""The router update stage: config, the paper's dry run, and a real run on the bundled model that
resumes (a rerun computes nothing; a lost checkpoint is retrained to the same bytes)."""

import shutil

import polars as pl
import pytest
import torch
from hydra import compose, initialize_config_dir
from pipeline_runs import run_inprocess, stage_counts
from safetensors.torch import load_file

from orchestrator import config as C
from workers.generation.demo_task import bundled_model_path
from workers.io import file_sha256, read_sidecar

C.register_configs()
ROUTER_STAGES = ("router_preferences", "router_train", "router_eval", "router_rescore")
SMALL_UPDATE = (
    "router_update=demo",
    "router_update.problems_limit=4",
    "scoring.layers=[final]",
    "router_update.eval_samples=2",
    "router_update.eval_problems_per_shard=3",
    "router_update.steps=20",
    "router_update.bootstrap_draws=200",
)


def make(*overrides: str) -> C.RunConfig:
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        return C.to_run_config(compose("config", overrides=list(overrides)))


@pytest.mark.parametrize("option", ["none", "demo", "paper"])
def test_every_router_update_option_composes_and_validates(option):
    cfg = make(f"router_update={option}", "dry_run=true")
    assert isinstance(cfg.router_update, C.RouterUpdateConfig)
    assert cfg.router_update.enabled == (option != "none")
    C.validate(cfg)


def test_the_default_is_off():
    assert not make().router_update.enabled


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("router_update.eval_datasets=[demo_train]", "both trains and evaluates"),
        ("router_update.lr=0", "router_update.lr"),
        ("router_update.fragile=0.95", "router_update.fragile"),
        ("router_update.train_datasets=[]", "must be set"),
        ("router_update.train_datasets=[nope]", "unknown dataset 'nope'"),
        ("router_update.heldout_datasets=[demo_train]", "both trains and evaluates"),
        ("router_update.controls=[best]", "router_update.controls"),
        ("router_update.seeds=[1,1]", "router_update.seeds"),
    ],
)
def test_bad_router_update_values_are_config_errors(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.validate(make("router_update=demo", override))


def test_the_paper_dry_run_plans_both_models_on_the_held_out_sets():
    from orchestrator.router_stage import describe_router_plan

    text = describe_router_plan(make("router_update=paper", "dry_run=true"))
    for name in (
        "qwen3-30b-a3b",
        "gpt-oss-20b",
        "math500",
        "aime2024",
        "aime2025",
        "hmmt_feb_2025",
    ):
        assert name in text
    assert "qwen3-30b-a3b       47  mlp.gate.weight" in text
    assert "gpt-oss-20b         23  mlp.router.weight + router.bias" in text
    assert "90 problems) x 16 samples x 2 variants" in text


@pytest.mark.usefixtures("local_ray")
def test_demo_update_runs_end_to_end_and_resumes(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert run_inprocess(runs, "ru", *SMALL_UPDATE) == 0
    counts = stage_counts(capsys.readouterr().err)
    assert all(counts[s]["computed"] >= 1 and counts[s]["failed"] == 0 for s in ROUTER_STAGES)
    run_dir = runs / "ru"
    root = run_dir / "router_update" / "tiny"
    # The checkpoint: exactly the final router differs from the bundled model.
    original = load_file(bundled_model_path() / "model.safetensors")
    updated = load_file(root / "checkpoint" / "model.safetensors")
    assert set(original) == set(updated)
    changed = [k for k in original if not torch.equal(original[k], updated[k])]
    assert changed == ["model.layers.3.mlp.gate.weight"]
    assert "model.layers.3.mlp.gate.weight" in (root / "checkpoint" / "README.md").read_text()
    # pass@K for K = 1, 2 of both variants, the paired difference, the mechanism table.
    passk = pl.read_csv(root / "tables" / "passk.csv")
    assert sorted(set(passk["k"])) == [1, 2]
    assert {"original", "updated"} <= set(passk["variant"])
    assert (passk["lo"] <= passk["pass_at_k"]).all() and (passk["pass_at_k"] <= passk["hi"]).all()
    # Each control at its seed: its own checkpoint (only the final router differs), trained on
    # the real update's token count, evaluated on the evaluation and the held-out task.
    for name in ("random-seed0", "shuffled-seed0"):
        ckpt = root / "controls" / name / "checkpoint"
        control = load_file(ckpt / "model.safetensors")
        assert [k for k in original if not torch.equal(original[k], control[k])] == changed
        summary = read_sidecar(root / "controls" / name / "train_log.arrow")["summary"]
        real = read_sidecar(root / "train_log.arrow")["summary"]
        assert summary["control"] == name.split("-")[0]
        assert (summary["prefer_tokens"], summary["anchor_tokens"]) == (
            real["prefer_tokens"],
            real["anchor_tokens"],
        )
        assert sorted(p.name for p in (root / "eval" / name).iterdir()) == ["demo", "demo_hard"]
    assert set(passk["variant"]) >= {"random-seed0", "shuffled-seed0"}
    assert set(passk["dataset"]) == {"demo", "demo_hard", "all"}
    diff = pl.read_csv(root / "tables" / "passk_diff.csv")
    pairs = set(diff.select("baseline", "variant").unique().rows())
    assert pairs == {
        ("original", "updated"),
        ("original", "random-seed0"),
        ("original", "shuffled-seed0"),
        ("updated", "random-seed0"),
        ("updated", "shuffled-seed0"),
    }
    assert diff.height == len(pairs) * 3 * 2  # (demo, demo_hard, all) x K
    mech = pl.read_csv(root / "tables" / "mechanism.csv")
    assert {"train", "held-out"} >= set(mech["split"]) and "confident" in set(mech["group"])
    assert set(mech["variant"]) == {"updated", "random-seed0", "shuffled-seed0"}
    assert (mech["route_changed_lo"] <= mech["route_changed"]).all()
    # Rescoring scored the original draws again: the same alternatives before and after.
    before = pl.concat(pl.read_ipc(p) for p in sorted((run_dir / "scores").rglob("*.arrow")))
    for rescored in (root / "rescore", root / "controls" / "random-seed0" / "rescore"):
        after = pl.concat(pl.read_ipc(p) for p in sorted(rescored.rglob("*.arrow")))
        keys = ["dataset", "problem_id", "sample_idx", "position"]
        both = after.join(before.filter(pl.col("layer") == 3), on=keys, suffix="_before")
        assert both.height == after.height > 0
        assert (both["alt_routes"] == both["alt_routes_before"]).all()
    assert (root / "figures" / "passk.png").stat().st_size > 0
    assert "router_update.md" in (run_dir / "report.md").read_text()
    assert "pass@K" in (run_dir / "router_update.md").read_text()
    assert "shuffled-seed0" in (run_dir / "router_update.md").read_text()

    # A rerun finds every unit complete.
    assert run_inprocess(runs, "ru", *SMALL_UPDATE) == 0
    counts = stage_counts(capsys.readouterr().err)
    assert all(counts[s]["computed"] == 0 for s in ROUTER_STAGES), counts

    # A lost checkpoint is retrained, to the same bytes (seeded), so nothing downstream reruns.
    sha = file_sha256(root / "checkpoint" / "model.safetensors")
    shutil.rmtree(root / "checkpoint")
    assert run_inprocess(runs, "ru", *SMALL_UPDATE) == 0
    counts = stage_counts(capsys.readouterr().err)
    assert counts["router_train"]["computed"] == 1
    assert counts["router_eval"]["computed"] == 0 and counts["router_rescore"]["computed"] == 0
    assert file_sha256(root / "checkpoint" / "model.safetensors") == sha
