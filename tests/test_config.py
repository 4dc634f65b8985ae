"""The typed config: every option composes, unknown keys and bad values are one clear error."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from analysis.metrics import AnalysisConfig
from orchestrator import config as C

ROOT = Path(__file__).resolve().parent.parent
GROUPS = ("model", "dataset", "generation", "scoring", "analysis", "cluster", "wandb", "sweep")

C.register_configs()


@pytest.fixture(scope="module", autouse=True)
def mini_models(tmp_path_factory):
    """The checkpoints conf/model/mini-*.yaml point at (their shapes are validated), and the
    repository root as working directory (conf/dataset/mini-*.yaml name files relative to it)."""
    from make_mini_models import write_mini_models

    root = tmp_path_factory.mktemp("mini-models")
    write_mini_models(root)
    old_env, old_cwd = os.environ.get("MOE_MINI_MODELS"), os.getcwd()
    os.environ["MOE_MINI_MODELS"] = str(root)
    os.chdir(ROOT)
    yield root
    os.chdir(old_cwd)
    if old_env is None:
        del os.environ["MOE_MINI_MODELS"]
    else:
        os.environ["MOE_MINI_MODELS"] = old_env


def make(*overrides: str) -> C.RunConfig:
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        return C.to_run_config(compose("config", overrides=list(overrides)), overrides)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (C.CONF_DIR / group).glob("*.yaml"))


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_into_the_typed_config(group, option):
    cfg = make(f"{group}={option}", "dry_run=true")
    assert isinstance(cfg, C.RunConfig)
    assert isinstance(getattr(cfg, group), type(getattr(C.RunConfig(), group)))
    C.validate(cfg)


def test_the_default_is_the_demo_on_the_bundled_model():
    cfg = make()
    assert (cfg.model.name, cfg.dataset.name, cfg.generation.backend) == ("tiny", "demo", "hf")
    assert cfg.cluster.address is None and cfg.wandb.mode == "offline"
    assert cfg.scoring.layers == ["early", "middle", "final"]
    C.validate(cfg)


def test_analysis_group_sets_the_report_and_rejects_bad_values():
    cfg = make("analysis.win_margin=0.001", "analysis.cluster=problem", "analysis.bootstrap=50")
    assert cfg.analysis == AnalysisConfig(win_margin=0.001, cluster="problem", bootstrap=50)
    assert make().analysis == AnalysisConfig()  # the YAML adds nothing to the schema defaults
    with pytest.raises(C.ConfigError, match="cluster must be one of trajectory, problem"):
        make("analysis.cluster=token")


def test_every_model_and_dataset_validates_in_every_pair():
    for model in options("model"):
        for dataset in options("dataset"):
            C.validate(make(f"model={model}", f"dataset={dataset}"))


@pytest.mark.parametrize("override", ["scoring.nope=1", "model.layers=3", "nope=1"])
def test_unknown_keys_are_rejected(override):
    key = override.split("=")[0].split(".")[-1]
    with pytest.raises(Exception, match=f"Key '{key}' is not in struct|Could not override"):
        make(override)


def test_scoring_keys_are_the_scorers_settings_then_the_runs_own():
    from workers.scoring.score_config import ScoreConfig

    scorer = {f.name: f.default for f in dataclasses.fields(ScoreConfig)}
    ours = dataclasses.asdict(C.ScoringConfig())
    run_keys = ["layers", "verified_only", "trajectories_per_shard", "retries", "cei", "cei_gating"]
    assert list(ours) == [*(k for k in scorer if k != "device"), *run_keys]  # device: the actor's
    del scorer["device"], scorer["dtype"]  # dtype: None = the model's own (next test)
    assert {k: ours[k] for k in scorer} == scorer
    assert ours["dtype"] is None


@pytest.mark.parametrize(
    "override,message",
    [
        ("scoring.alternatives=0", "scoring.alternatives must be an integer >= 1, got 0"),
        ("scoring.temperature=0", "scoring.temperature must be a number > 0, got 0.0"),
        ("scoring.sampler=gumble", "scoring.sampler must be one of gumbel, uniform_pool,"),
        ("scoring.seed=-1", None),  # any integer is a seed
        ("scoring.dtype=float16", "scoring.dtype must be one of float32, bfloat16, got 'float16'"),
        ("scoring.memory_budget_mb=0", "scoring.memory_budget_mb must be an integer >= 1"),
        ("scoring.attention=sdpa", "scoring.attention must be one of eager, flex, got 'sdpa'"),
        ("scoring.trajectories_per_shard=0", "scoring.trajectories_per_shard must be >= 1"),
        ("scoring.retries=-1", "and scoring.retries >= 0, got 16, -1"),
        ("scoring.cei_gating=half", "scoring.cei_gating must be family or keep, got 'half'"),
    ],
)
def test_every_scoring_key_is_checked_before_ray(override, message):
    cfg = make(override)
    if message is None:
        C.validate(cfg)
        return
    with pytest.raises(C.ConfigError) as info:
        C.validate(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_scoring_dtype_defaults_to_the_models_own():
    hub = make("model=qwen3-30b-a3b")
    assert C.score_args(hub.scoring, hub.model)["dtype"] == "bfloat16"
    tiny = make()
    assert C.score_args(tiny.scoring, tiny.model)["dtype"] == "float32"
    forced = make("model=qwen3-30b-a3b", "scoring.dtype=float32")
    assert C.score_args(forced.scoring, forced.model)["dtype"] == "float32"
    with pytest.raises(C.ConfigError, match="scoring.dtype must be one of"):
        C.validate(make("scoring.dtype=float64"))


def test_command_line_overrides_reach_every_sweep_entry():
    cfg = make("sweep=paper", "dry_run=true", "model.max_tokens=10", "dataset.limit=3")
    assert [m.max_tokens for m in cfg.models] == [10, 10, 10, 10]
    assert [d.limit for d in cfg.datasets] == [3] * 5
    assert [m.top_k for m in cfg.models] == [8, 4, 6, 8]  # the rest is each entry's YAML
    C.validate(cfg)
    with pytest.raises(C.ConfigError, match="dataset math500: data file /nonexistent.csv"):
        C.validate(make("sweep=paper", "dry_run=true", "dataset.path=/nonexistent.csv"))


def test_per_entry_overrides_change_only_their_entry():
    gpqa = ROOT / "tests" / "fixtures" / "gpqa_diamond.csv"
    cfg = make(
        "sweep=paper",
        "dry_run=true",
        "model.max_tokens=10",
        f"+sweep.overrides.gpqa_diamond.path={gpqa}",
        "+sweep.overrides.olmoe-1b-7b.max_tokens=7",
    )
    assert [d.path for d in cfg.datasets] == [None] * 4 + [str(gpqa)]
    assert [m.max_tokens for m in cfg.models] == [10, 10, 10, 7]  # the entry's own wins
    C.validate(cfg)
    assert C.config_tree(cfg)["datasets"][4]["path"] == str(gpqa)  # recorded in config.yaml


@pytest.mark.parametrize(
    "override,message",
    [
        ("+sweep.overrides.olmoe-1b-7b.top_k=0", "model olmoe-1b-7b: top_k=0 not in [1, 64]"),
        ("+sweep.overrides.olmoe-1b-7b.top_k=x", "model olmoe-1b-7b: Value 'x'"),
        (
            "+sweep.overrides.olmoe-1b-7b.nope=1",
            "model olmoe-1b-7b: Key 'nope' not in 'ModelConfig'",
        ),
        ("+sweep.overrides.gpqa.path=/x.csv", "sweep.overrides names gpqa, not in this run"),
        ("+scoring.alternative=8", "unknown key scoring.alternative; valid: alternatives,"),
        ("+model.tmp=1", "unknown key model.tmp"),
        ("scoring.sampler=gumble", "scoring.sampler must be one of gumbel, uniform_pool"),
        ("model.dtype=bf16", "model qwen3-30b-a3b: dtype='bf16'; valid:"),
        ("cluster.gpu_memory_gb=0", "cluster.gpu_memory_gb must be > 0"),
        ("cluster.compression=gzip", "cluster.compression='gzip': use one of zstd, lz4, none"),
    ],
)
def test_a_bad_value_in_any_entry_is_a_config_error(override, message):
    with pytest.raises(C.ConfigError) as info:
        C.validate(make("sweep=paper", "dry_run=true", override))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_model_cards_sampling_values():
    got = {
        m: (make(f"model={m}").model.temperature, make(f"model={m}").model.top_p)
        for m in options("model")
    }
    assert got["qwen3-30b-a3b"] == (0.6, 0.95)
    assert got["gpt-oss-20b"] == (1.0, 1.0)
    assert got["deepseek-v2-lite"] == (0.3, 0.95)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["scoring.layers=[early,bogus]"], "layer 'bogus' is not an index or one of early"),
        (["model=deepseek-v2-lite", "scoring.layers=[0]"], "layer 0 has no routed experts"),
        (["scoring.layers=[7]"], "layer 7 is out of range; valid MoE layers: 0-3"),
        (["scoring.pool=2"], "scoring.pool=2 is smaller than model tiny's top_k=4"),
        (["dataset.path=/nonexistent/x.jsonl"], "data file /nonexistent/x.jsonl not found"),
        (["model.engine.max_model_len=512"], "exceeds the model's max_position_embeddings=256"),
        (["model.engine.max_model_len=64"], "leaves no room for a prompt before max_tokens=96"),
        (["model.min_p=2"], "min_p in [0, 1]"),
        (["model.generation_backend=tgi"], "generation_backend='tgi'"),
        (["sweep.models=[tiny,nope]"], "unknown model 'nope'"),
        (["scoring.layers=[]"], "scoring.layers is empty"),
        (["run_id=../x"], "run_id='../x'"),
        (["scoring.attention=sdpa"], "scoring.attention must be one of eager, flex, got 'sdpa'"),
    ],
)
def test_bad_values_raise_one_line_config_errors(overrides, message):
    with pytest.raises(C.ConfigError) as info:
        C.validate(make(*overrides))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_vllm_without_vllm_installed_is_a_config_error():
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(C.ConfigError, match="generation=vllm needs vLLM, not installed here"):
        C.validate(make("generation=vllm"))
    C.validate(make("generation=vllm", "cluster=address"))  # a cluster's nodes may have it


def test_model_shape_is_checked_against_config_json():
    tiny = make().model
    real = json.loads((Path(C.model_path(tiny)) / "config.json").read_text())
    C.check_model_shape(tiny, real)
    with pytest.raises(
        C.ConfigError, match="num_experts: conf/model/tiny.yaml says 16, config.json says 8"
    ):
        C.check_model_shape(tiny, {**real, "num_experts": 8})
    with pytest.raises(C.ConfigError, match="top_k"):
        C.check_model_shape(dataclasses.replace(tiny, top_k=2), real)


def test_moe_shape_follows_each_familys_layer_rule():
    qwen = {
        "model_type": "qwen3_moe",
        "num_hidden_layers": 6,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [5],
    }
    assert C.moe_shape(qwen)["moe_layers"] == [1, 3]
    deepseek = {
        "model_type": "deepseek_v2",
        "num_hidden_layers": 27,
        "n_routed_experts": 64,
        "num_experts_per_tok": 6,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
    }
    assert C.moe_shape(deepseek) == {
        "num_layers": 27,
        "moe_layers": list(range(1, 27)),
        "num_experts": 64,
        "top_k": 6,
    }
    gpt = {
        "model_type": "gpt_oss",
        "num_hidden_layers": 24,
        "num_local_experts": 32,
        "num_experts_per_tok": 4,
    }
    assert C.moe_shape(gpt)["num_experts"] == 32
    olmoe = {
        "model_type": "olmoe",
        "num_hidden_layers": 16,
        "num_experts": 64,
        "num_experts_per_tok": 8,
    }
    assert C.moe_shape(olmoe)["moe_layers"] == list(range(16))
    with pytest.raises(C.ConfigError, match="model_type 'llama' is not supported"):
        C.moe_shape({"model_type": "llama", "num_hidden_layers": 2})


def test_the_yaml_shapes_match_the_moe_shape_rules_of_their_families():
    """What conf/model/*.yaml says, restated as the config.json of its model would say it."""
    configs = {
        "qwen3-30b-a3b": {
            "model_type": "qwen3_moe",
            "num_hidden_layers": 48,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
        "gpt-oss-20b": {
            "model_type": "gpt_oss",
            "num_hidden_layers": 24,
            "num_local_experts": 32,
            "num_experts_per_tok": 4,
        },
        "deepseek-v2-lite": {
            "model_type": "deepseek_v2",
            "num_hidden_layers": 27,
            "n_routed_experts": 64,
            "num_experts_per_tok": 6,
            "first_k_dense_replace": 1,
            "moe_layer_freq": 1,
        },
        "olmoe-1b-7b": {
            "model_type": "olmoe",
            "num_hidden_layers": 16,
            "num_experts": 64,
            "num_experts_per_tok": 8,
        },
    }
    for name, hf_config in configs.items():
        C.check_model_shape(make(f"model={name}").model, hf_config)


def test_layer_names_resolve_to_first_middle_last_moe_layer():
    model = C.ModelConfig(
        name="m",
        hf_id="x",
        family="olmoe",
        num_layers=6,
        moe_layers=[1, 2, 3, 4],
        num_experts=8,
        top_k=2,
    )
    specs = ("early", "middle", "final", "2")
    assert [C.resolve_layer(model, s) for s in specs] == [1, 3, 4, 2]


def test_secrets_are_scrubbed():
    tree = {
        "wandb": {"api_key": "abc", "project": "p"},
        "x": [{"token": "t"}],
        "model": {"max_tokens": 5},
    }
    assert C.scrub_secrets(tree) == {
        "wandb": {"api_key": "***", "project": "p"},
        "x": [{"token": "***"}],
        "model": {"max_tokens": 5},
    }


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "scoring.layers=[early,bogus]",
            "error: model tiny: layer 'bogus' is not an index or one of early/middle/final;"
            " valid MoE layers: 0-3 (or early/middle/final)",
        ),
        (
            "scoring.sampler=gumble",
            "error: scoring.sampler must be one of gumbel, uniform_pool, uniform_all,"
            " got 'gumble' (model tiny)",
        ),
    ],
)
def test_cli_bad_config_is_one_error_line_and_leaves_nothing(tmp_path, override, message):
    result = cli(override, f"runs_dir={tmp_path}/runs", "run_id=x", cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == [message]
    assert not (tmp_path / "runs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no outputs/, .hydra/, logs


@pytest.mark.parametrize(
    "override,message",
    [
        ("model=nope", "error: In 'config': Could not find 'model/nope' Available options in"),
        ("scoring.alternative=8", "error: unknown key scoring.alternative"),
        ("+scoring.alternative=8", "error: unknown key scoring.alternative; valid: alternatives"),
        ("scoring.alternatives=x", "error: Error merging override scoring.alternatives=x"),
    ],
)
def test_cli_hydra_errors_are_one_error_line_and_exit_2(tmp_path, override, message):
    result = cli(override, f"runs_dir={tmp_path}/runs", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(message)
    assert not (tmp_path / "runs").exists()


def test_cli_sweep_overrides_fail_before_anything_starts(tmp_path):
    result = cli(
        "sweep=paper",
        "dry_run=true",
        "model.max_tokens=10",
        "dataset.path=/nonexistent.csv",
        f"runs_dir={tmp_path}/runs",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: dataset math500: data file /nonexistent.csv not found (dataset.path)"
    )
    assert not (tmp_path / "runs").exists()


def test_cli_missing_data_file_fails_before_anything_is_written(tmp_path):
    result = cli(
        "model=olmoe-1b-7b",
        "dataset=aime2024",
        "dataset.path=/nope/aime.jsonl",
        f"runs_dir={tmp_path}/runs",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: dataset aime2024: data file")
    assert not (tmp_path / "runs").exists()


def test_flex_on_gpus_is_refused_before_ray_for_families_with_windows_or_sinks():
    flex_gpu = ("scoring.attention=flex", "cluster.use_gpus=true", "cluster.address=auto")
    with pytest.raises(C.ConfigError, match="model gpt-oss-20b: scoring.attention=flex on GPUs"):
        C.validate(make("model=gpt-oss-20b", *flex_gpu))
    C.validate(make("model=qwen3-30b-a3b", *flex_gpu))
    C.validate(make("model=gpt-oss-20b", "scoring.attention=flex"))  # CPU: the exact reference


def test_router_update_hyperparameters_are_declared_once_by_the_worker():
    """router_update.<key> for each UpdateConfig field is that field (default, help), and the
    worker's config built from a composed run holds the run's values."""
    from workers.router.update_config import UpdateConfig

    ours = {f.name: f for f in dataclasses.fields(C.RouterUpdateConfig)}
    for f in dataclasses.fields(UpdateConfig):
        assert ours[f.name].default == f.default and ours[f.name].metadata["help"]
    cfg = make("router_update=demo", "router_update.margin=0.2").router_update
    update = UpdateConfig(
        **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(UpdateConfig)}
    )
    assert update.margin == 0.2 and issubclass(C.RouterUpdateConfig, UpdateConfig)


def test_a_models_shape_is_read_by_the_families_module(tmp_path):
    from workers import families

    (tmp_path / "config.json").write_text(
        '{"model_type": "olmoe", "num_hidden_layers": 2,'
        ' "num_experts": 4, "num_experts_per_tok": 2,'
        ' "max_position_embeddings": 512}'
    )
    hf_config = families.read_config_json(tmp_path)
    assert families.moe_shape(hf_config)["moe_layers"] == [0, 1]
    assert families.context_length(hf_config) == 512
    assert families.context_length({"max_position_embeddings": True}) is None
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ValueError, match="is not a JSON object"):
        families.read_config_json(tmp_path)
    with pytest.raises(ValueError, match="none of"):
        families.moe_shape({"model_type": "olmoe", "num_hidden_layers": 2})


def test_every_key_is_listed_once_with_its_type_default_and_help():
    """`python -m orchestrator.config` lists the whole schema, the keys that workers declare
    (scoring's scorer settings, the router update's hyperparameters) with their help."""
    import subprocess
    import sys

    from omegaconf import OmegaConf

    from orchestrator.config.describe import describe
    from workers.router.update_config import UpdateConfig
    from workers.scoring.score_config import ScoreConfig

    def flat(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    lines = describe()
    tree = OmegaConf.to_container(OmegaConf.structured(C.RunConfig))
    assert [line.split(":")[0] for line in lines] == list(flat(tree))
    assert all(line.split("  # ", 1)[1].strip() for line in lines)
    helps = {line.split(":")[0]: line.split("  # ", 1)[1] for line in lines}
    for f in dataclasses.fields(UpdateConfig):
        assert helps[f"router_update.{f.name}"] == f.metadata["help"]
    assert (
        helps["scoring.alternatives"]
        == ScoreConfig.__dataclass_fields__["alternatives"].metadata["help"]
    )
    assert helps["cluster.unit_timeout_s"].startswith("A unit running longer is failed")
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.config", "scoring."],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert out and all(line.startswith("scoring.") for line in out)
    assert "scoring.alternatives: int = 32  # J: alternative routes drawn per token" in out
