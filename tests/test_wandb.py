"""W&B: offline runs read back from their .wandb files (orchestrator.wandb_offline's reader),
one run per id across driver restarts, and misconfiguration that never raises."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from analysis.bench import write_sample_run
from analysis.report import build_report
from orchestrator.wandb_offline import read_records as read_wandb_records
from orchestrator.wandb_run import WandbConfig, WandbSession, scrub_secrets


def path_of(runs: dict, name: str) -> Path:
    """The files/ folder of a run read back by name."""
    return runs[name][2].parent / "files"


def summary_of(records) -> dict:
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out


def history_of(records) -> list[dict]:
    return [
        {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in r.history.item
        }
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Keep W&B quiet and inside tmp_path; CI exports WANDB_MODE, which must not decide here."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-default"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    return tmp_path


def test_offline_run_read_back(wandb_env, monkeypatch):
    tmp_path = wandb_env
    monkeypatch.setenv("MOE_TEST_CANARY", "canary-env-value-6f1e")  # must never be logged
    run_dir = tmp_path / "runs" / "r1"
    write_sample_run(run_dir, models=("tiny",), layers=(2,), datasets=("demo",), rows=400, shards=1)
    report = build_report(run_dir)
    config = {
        "scoring": {"alternatives": 32, "pool": 32},
        "wandb": {"mode": "offline", "api_key": "sk-live-secret-1"},
        "nested": [{"hf_token": "hf-secret-2"}, {"ok": 1}],
    }
    cfg = WandbConfig(mode="offline", tags=("test",), progress_interval_s=3600)
    session = WandbSession(cfg, run_id="r1", run_dir=run_dir, config=config)
    assert session.active
    session.log_progress({"scoring/done": 1})  # logged
    session.log_progress({"scoring/done": 2})  # within the interval: replaced by the next
    session.log_progress({"scoring/done": 3})  # pending until finish
    session.log_results(report)
    tokens = pl.DataFrame({"position": [3, 4], "token": [" 12", " ;"], "pbar": [0.21, 0.97]})
    session.log_tokens({"tiny/L2": tokens})
    session.finish(exit_code=0)
    session.finish(exit_code=0)  # idempotent

    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    runs = {}
    for path in files:
        records = read_wandb_records(path)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        runs[run.display_name] = (run, records, path)
    assert set(runs) == {"r1-driver", "r1/tiny/L2/demo"}

    driver, records, _ = runs["r1-driver"]
    assert (
        driver.run_group == "r1" and driver.job_type == "driver" and driver.project == "moe-routing"
    )
    assert list(driver.tags) == ["test"]
    logged_config = {item.key: json.loads(item.value_json) for item in driver.config.update}
    assert logged_config["wandb"] == {"mode": "offline", "api_key": "***"}
    assert logged_config["nested"] == [{"hf_token": "***"}, {"ok": 1}]
    progress = [h["scoring/done"] for h in history_of(records) if "scoring/done" in h]
    assert progress == [1, 3]
    driver_summary = summary_of(records)
    assert driver_summary["tables/by_bin/_type"] == "table-file"
    assert driver_summary["figures/headline/_type"] == "image-file"
    assert "tiny/L2/fragile/gain_pp" in driver_summary
    assert "tiny/L2/confident/win_rate_strict" in driver_summary
    (entry,) = [h for h in history_of(records) if "inspect/tiny/L2/_type" in h]
    inspect_table = json.loads(
        (path_of(runs, "r1-driver") / entry["inspect/tiny/L2/path"]).read_text()
    )
    assert inspect_table["columns"] == ["position", "token", "pbar"]
    assert inspect_table["data"] == [[3, " 12", 0.21], [4, " ;", 0.97]]

    job, records, path = runs["r1/tiny/L2/demo"]
    assert job.run_group == "r1" and job.job_type == "score"
    job_config = {item.key: json.loads(item.value_json) for item in job.config.update}
    assert job_config["layer"] == 2 and job_config["scoring"] == {"alternatives": 32, "pool": 32}
    summary = summary_of(records)
    row = {
        r["bin"]: r for r in report.tables["by_bin"].filter(dataset="demo").iter_rows(named=True)
    }
    assert summary["fragile/gain_pp"] == pytest.approx(row["fragile"]["gain_pp"])
    assert summary["confident/win_rate"] == pytest.approx(row["confident"]["win_rate"])
    assert summary["ambiguous/alignment"] == pytest.approx(row["ambiguous"]["alignment"])
    assert summary["all/tokens"] == 400
    # The table: a history entry pointing at a table file written next to the log.
    (entry,) = [h for h in history_of(records) if "by_bin/_type" in h]
    assert entry["by_bin/_type"] == "table-file" and entry["by_bin/nrows"] == 4
    table = json.loads((path.parent / "files" / entry["by_bin/path"]).read_text())
    assert "gain_pp" in table["columns"] and len(table["data"]) == 4
    assert summary["figures/headline/_type"] == "image-file"

    # Nothing secret and no environment variable anywhere in what W&B wrote.
    for f in (run_dir / "wandb").rglob("*"):
        if f.is_file():
            blob = f.read_bytes()
            for secret in (b"sk-live-secret-1", b"hf-secret-2", b"canary-env-value-6f1e"):
                assert secret not in blob, (f, secret)


def test_disabled_mode_does_nothing(wandb_env):
    session = WandbSession(
        WandbConfig(mode="disabled"), run_id="r", run_dir=wandb_env / "run", config={}
    )
    assert not session.active
    session.log_progress({"a": 1})
    session.log_results(object())  # not even a report: never touched
    session.finish(1)
    assert not (wandb_env / "run").exists()


def test_invalid_mode(wandb_env, caplog):
    with pytest.raises(ValueError, match="wandb.mode must be one of offline, online, disabled"):
        WandbConfig(mode="bogus")
    cfg = WandbConfig()
    cfg.mode = "bogus"  # e.g. set after validation: the session warns, never raises
    with caplog.at_level(logging.WARNING):
        session = WandbSession(cfg, run_id="r", run_dir=wandb_env / "run", config={})
    assert not session.active
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "bogus" in caplog.records[0].getMessage()
    session.log_progress({"a": 1})
    session.finish(0)


def test_wandb_not_importable(wandb_env, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with caplog.at_level(logging.WARNING):
        session = WandbSession(WandbConfig(), run_id="r", run_dir=wandb_env / "run", config={})
    assert not session.active
    (record,) = caplog.records
    assert "W&B import failed" in record.getMessage() and "\n" not in record.getMessage()
    session.log_progress({"a": 1})
    session.finish(0)


def test_online_without_a_server_warns_and_returns(wandb_env, monkeypatch, caplog):
    key = "k" * 40
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: refused
    cfg = WandbConfig(mode="online", entity="no-such-entity", init_timeout_s=2)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        session = WandbSession(cfg, run_id="r", run_dir=wandb_env / "run", config={"a": 1})
        session.log_progress({"a": 1})
        session.finish(1)
    assert time.monotonic() - started < 45
    assert not session.active
    messages = [r.getMessage() for r in caplog.records if r.name == "orchestrator.wandb_run"]
    assert len(messages) == 1 and "W&B init of r-driver failed" in messages[0]
    assert key not in caplog.text


def test_scrub_secrets():
    config = {
        "API_KEY": "x",
        "db": {"password": "p", "user": "u"},
        "tokens": [1],
        "model": {"max_tokens": 5, "hf-token": "h"},
        "auth_token": "t",
        "none": {"secret": None},
    }
    assert scrub_secrets(config) == {
        "API_KEY": "***",
        "db": {"password": "***", "user": "u"},
        "tokens": [1],
        "model": {"max_tokens": 5, "hf-token": "***"},
        "auth_token": "***",
        "none": {"secret": None},
    }


def runs_by_id(run_dir: Path) -> dict[str, list]:
    """{W&B run id: [the run record of each session that wrote it]} from the offline files."""
    out: dict[str, list] = {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for r in read_wandb_records(path):
            if r.WhichOneof("record_type") == "run":
                out.setdefault(r.run.run_id, []).append((r.run, read_wandb_records(path)))
    return out


def test_restarted_drivers_continue_each_run_in_one_offline_folder(wandb_env):
    from orchestrator.wandb_run import wandb_id

    run_dir = wandb_env / "runs" / "r1"
    write_sample_run(run_dir, models=("tiny",), layers=(2,), datasets=("demo",), rows=400, shards=1)
    report = build_report(run_dir)
    config = {"scoring": {"alternatives": 32}, "provenance": {"git_commit": "c0ffee"}}
    cfg = WandbConfig(mode="offline", progress_interval_s=0)
    # 1st driver: the job is logged as its last unit is written, then with the report (its
    # run again, right after the first one closed), then the driver fails
    first = WandbSession(cfg, run_id="r1", run_dir=run_dir, config=config)
    first.log_progress({"scoring/done": 1})
    first.log_job("tiny", 2, "demo", {"units": 3, "tokens_this_session": 120})
    first.log_results(report)
    first.finish(exit_code=1)
    between = time.time()
    # 2nd driver, same run: nothing left to score, the report is logged again to the same runs
    second = WandbSession(cfg, run_id="r1", run_dir=run_dir, config=config)
    second.log_progress({"scoring/done": 2})
    second.log_results(report)
    second.finish(exit_code=0)
    # 3rd driver: only progress; the tables, figures and summaries come along from the 2nd
    third = WandbSession(cfg, run_id="r1", run_dir=run_dir, config=config)
    third.log_progress({"scoring/done": 3})
    third.finish(exit_code=0)

    runs = runs_by_id(run_dir)
    driver, job = wandb_id("r1", "driver"), wandb_id("r1", "tiny", 2, "demo")
    assert set(runs) == {driver, job}
    assert len(runs[driver]) == 1 and len(runs[job]) == 1  # one log per id: what sync uploads
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
    assert "/" not in job and len(job) <= 64

    ((job_run, records),) = runs[job]
    assert job_run.display_name == "r1/tiny/L2/demo"
    job_config = {i.key: json.loads(i.value_json) for i in job_run.config.update}
    assert job_config["provenance"] == {"git_commit": "c0ffee"}
    summary = summary_of(records)
    assert summary["job/units"] == 3 and summary["job/tokens_this_session"] == 120
    row = report.tables["by_bin"].filter(dataset="demo", bin="fragile").row(0, named=True)
    assert summary["fragile/gain_pp"] == pytest.approx(row["gain_pp"])
    entries = [h for h in history_of(records) if "by_bin/_type" in h]
    assert len(entries) == 2  # one per report
    for entry in entries:
        table = json.loads((runs_dir_of(run_dir, job) / entry["by_bin/path"]).read_text())
        assert len(table["data"]) == 4

    ((driver_run, records),) = runs[driver]
    assert driver_run.display_name == "r1-driver"
    history = history_of(records)
    progress = [h for h in history if "scoring/done" in h]
    assert [h["scoring/done"] for h in progress] == [1, 2, 3]
    times = [h["_timestamp"] for h in progress]
    assert times[0] < between < times[1] < times[2]  # the time each session logged it
    summary = summary_of(records)
    assert summary["tiny/L2/fragile/gain_pp"] == pytest.approx(row["gain_pp"])
    assert summary["report"] == str(report.path)
    entries = [h for h in history if "tables/by_bin/_type" in h]
    assert len(entries) == 2
    for entry in entries:
        path = runs_dir_of(run_dir, driver) / entry["tables/by_bin/path"]
        table = json.loads(path.read_text())
        assert table["columns"] == report.tables["by_bin"].columns
        assert len(table["data"]) == report.tables["by_bin"].height
    for entry in [h for h in history if "figures/headline/_type" in h]:
        assert (runs_dir_of(run_dir, driver) / entry["figures/headline/path"]).stat().st_size > 0


def test_a_damaged_earlier_log_is_kept_beside_the_new_run(wandb_env, caplog):
    from orchestrator.wandb_run import wandb_id

    run_dir = wandb_env / "runs" / "r1"
    key = wandb_id("r1", "driver")
    damaged = run_dir / "wandb" / f"offline-run-20000101_000000-{key}" / f"run-{key}.wandb"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a W&B log")
    with caplog.at_level(logging.WARNING):
        session = WandbSession(WandbConfig(), run_id="r1", run_dir=run_dir, config={})
        session.log_progress({"a": 1})
        session.finish(0)
    assert damaged.exists()
    assert len(list((run_dir / "wandb").glob(f"offline-run-*/run-{key}.wandb"))) == 2
    (message,) = [r.getMessage() for r in caplog.records if r.name == "orchestrator.wandb_run"]
    assert "could not carry" in message and "not a W&B transaction log" in message


def test_jobs_are_reported_when_their_last_expected_unit_is_written(tmp_path):
    from orchestrator import plan
    from orchestrator.config import DatasetConfig, ModelConfig
    from orchestrator.pipeline import JobTracker
    from orchestrator.tasks import ScoringTask

    cell = plan.Cell(ModelConfig(name="m"), DatasetConfig(name="d"), {"early": 0, "final": 3})

    def unit(layer, k):
        key = f"m/layer={layer}/d/{k:05d}"
        return plan.Unit("scoring", key, tmp_path / key, "h", ScoringTask(tmp_path / "in", layer))

    units = [unit(0, 0), unit(0, 1), unit(3, 0), unit(3, 1)]
    seen = []
    jobs = JobTracker({cell: units}, lambda *job: seen.append(job))
    jobs.expect([units[0], units[1], units[3]])  # units[2] was complete already
    jobs.done(units[0], {"tokens": 5})
    assert seen == []
    jobs.done(units[3], {"tokens": 7})  # layer 3's only missing unit
    assert seen == [("m", 3, "d", {"units": 2, "tokens_this_session": 7})]
    jobs.done(units[1], {"tokens": 6})
    assert seen[-1] == ("m", 0, "d", {"units": 2, "tokens_this_session": 11})
    jobs.done(units[1], {"tokens": 6})  # a duplicate report changes nothing
    assert len(seen) == 2


FULL_DISK_SCRIPT = """
import logging, resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))  # every write past 2 KiB fails
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from orchestrator.wandb_run import WandbConfig, WandbSession
raise_before = logging.raiseExceptions
s = WandbSession(WandbConfig(mode="offline", progress_interval_s=0), run_id="r",
                 run_dir=sys.argv[1], config={"a": 1})
for i in range(20):
    s.log_progress({"x": i, "blob": "y" * 500})
s.finish(0)
print("restored", logging.raiseExceptions == raise_before)
"""


def test_a_full_disk_under_wandb_is_one_warning_line(tmp_path):
    # RLIMIT_FSIZE fails writes like ENOSPC (EFBIG; Python ignores SIGXFSZ), in wandb's
    # service process too; stderr goes to a pipe, which the limit does not touch.
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK_SCRIPT, str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, cwd=root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Logging error" not in proc.stderr and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("WARNING orchestrator.wandb_run: W&B"), lines
    assert "File too large" in lines[0]
    assert proc.stdout.strip() == "restored True"


def write_wandb_log(path: Path, records: list) -> None:
    """A .wandb file of these records (each in one FULL chunk; small records only)."""
    import struct
    import zlib

    data = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for record in records:
        body = record.SerializeToString()
        data += struct.pack("<IHB", zlib.crc32(body, zlib.crc32(bytes([1]))), len(body), 1) + body
    assert len(data) < 32 * 1024
    path.parent.mkdir(parents=True)
    path.write_bytes(bytes(data))


def test_an_earlier_log_pointing_outside_its_folder_is_not_followed(wandb_env, caplog):
    from wandb.proto import wandb_internal_pb2 as pb

    from orchestrator.wandb_run import wandb_id

    secret = wandb_env / "secret.table.json"
    secret.write_text(json.dumps({"columns": ["s"], "data": [["secret-7d1c"]]}))
    run_dir = wandb_env / "runs" / "r1"
    key = wandb_id("r1", "driver")
    crafted = run_dir / "wandb" / f"offline-run-20000101_000000-{key}" / f"run-{key}.wandb"
    row = pb.Record()
    for part, value in (("_type", "table-file"), ("path", "../../../../../secret.table.json")):
        row.history.item.add(nested_key=["t", part], value_json=json.dumps(value))
    write_wandb_log(crafted, [pb.Record(run=pb.RunRecord(run_id=key)), row])
    with caplog.at_level(logging.WARNING):
        session = WandbSession(WandbConfig(), run_id="r1", run_dir=run_dir, config={})
        session.finish(0)
    (message,) = [r.getMessage() for r in caplog.records if r.name == "orchestrator.wandb_run"]
    assert "outside its run folder" in message
    assert crafted.exists()
    for f in (run_dir / "wandb").rglob("*"):
        assert not f.is_file() or b"secret-7d1c" not in f.read_bytes(), f


def log_router_steps(session, run_dir: Path, *, run_id: str = "ru", model: str = "tiny") -> dict:
    """The router update's W&B logging (router_report.log_wandb), on hand-built results of one
    model: 2 problems x 2 samples per variant, a 3-step training log, a mechanism table."""
    import pyarrow as pa

    from analysis.passk import count_correct, paired_diff, passk_table, plot_passk
    from orchestrator.config import ModelConfig, RouterUpdateConfig
    from orchestrator.router_report import log_wandb
    from workers.io import write_arrow
    from workers.router.update import TRAIN_LOG_SCHEMA

    ru = RouterUpdateConfig(name="demo", train_datasets=["demo_train"], eval_datasets=["demo"])
    prefs = pl.DataFrame({"kind": ["prefer", "anchor", "anchor"], "position": [1, 2, 3]})
    train_path = run_dir / "router_update" / model / "train.arrow"
    log = [(i, 1.0 - i / 10, 0.5, 0.5 - i / 10, i / 3) for i in range(3)]
    rows = [dict(zip(TRAIN_LOG_SCHEMA.names, row, strict=True)) for row in log]
    write_arrow(pa.Table.from_pylist(rows, schema=TRAIN_LOG_SCHEMA), train_path, config_hash="h")
    train_summary = {"steps": 3, "final_loss": 0.8, "pref_accuracy": 2 / 3}
    counts = count_correct(
        pl.DataFrame(
            {
                "variant": ["original"] * 4 + ["updated"] * 4,
                "dataset": ["demo"] * 8,
                "problem_id": ["p0", "p0", "p1", "p1"] * 2,
                "verified": [True, False, False, False, True, True, False, True],
            }
        )
    )
    table = passk_table(counts, draws=50)
    diff = paired_diff(counts, "original", "updated", draws=50)
    figure = plot_passk(table, run_dir / "router_update" / model / "figures" / "passk.png")
    mech = pl.DataFrame(
        {
            "variant": ["updated", "updated"],
            "split": ["train", "held-out"],
            "group": ["flagged", "confident"],
            "route_changed": [0.5, 0.0],
        }
    )
    model_cfg = ModelConfig(name=model)
    log_wandb(
        session, run_id, model_cfg, ru, prefs, train_path, train_summary, table, diff, mech, figure
    )
    return {"table": table, "train_summary": train_summary, "log": log}


def test_router_update_steps_are_logged_offline(wandb_env):
    from orchestrator.wandb_run import wandb_id

    run_dir = wandb_env / "runs" / "ru"
    cfg = WandbConfig(mode="offline", progress_interval_s=3600)
    for _ in range(2):  # a rerun logs every step again, into the same runs
        session = WandbSession(cfg, run_id="ru", run_dir=run_dir, config={"a": 1})
        logged = log_router_steps(session, run_dir)
        session.finish(exit_code=0)

    runs = runs_by_id(run_dir)
    steps = ("preferences", "train", "eval-original", "eval-updated", "rescore")
    by_name = {}
    for step in steps:
        ((run, records),) = runs[wandb_id("ru", "tiny", "router", step)]
        assert run.display_name == f"ru/tiny/router/{step}" and run.run_group == "ru"
        by_name[step] = (run, records)
    assert len(runs) == len(steps) + 1  # and the driver
    job_types = {step: run.job_type for step, (run, _) in by_name.items()}
    assert job_types == {
        "preferences": "router_preferences",
        "train": "router_train",
        "eval-original": "router_eval",
        "eval-updated": "router_eval",
        "rescore": "router_rescore",
    }
    prefs = summary_of(by_name["preferences"][1])
    assert prefs["prefer_tokens"] == 1 and prefs["anchor_tokens"] == 2
    train = summary_of(by_name["train"][1])
    assert train["final_loss"] == 0.8 and train["steps"] == 3
    entries = [h for h in history_of(by_name["train"][1]) if "train_log/_type" in h]
    assert len(entries) == 2  # one per session
    entry = entries[-1]
    files = runs_dir_of(run_dir, wandb_id("ru", "tiny", "router", "train"))
    train_log = json.loads((files / entry["train_log/path"]).read_text())
    assert [row[0] for row in train_log["data"]] == [0, 1, 2]
    table = logged["table"]
    for variant in ("original", "updated"):
        summary = summary_of(by_name[f"eval-{variant}"][1])
        expected = table.filter(variant=variant)
        for k, value in expected.select("k", "pass_at_k").rows():
            assert summary[f"demo/pass@{k}"] == pytest.approx(value)
        assert summary["passk/_type"] == "table-file" and summary["passk/nrows"] == 2
        assert summary["passk_diff/_type"] == "table-file"
        assert summary["figures/passk/_type"] == "image-file"
    rescore = summary_of(by_name["rescore"][1])
    assert rescore["train/flagged/route_changed"] == 0.5
    assert rescore["held-out/confident/route_changed"] == 0.0


def runs_dir_of(run_dir: Path, run_key: str) -> Path:
    """The files/ folder of the one offline run with W&B id `run_key`."""
    (path,) = (run_dir / "wandb").glob(f"offline-run-*/run-{run_key}.wandb")
    return path.parent / "files"


@pytest.mark.usefixtures("local_ray")
def test_a_resumed_pipeline_run_keeps_one_offline_run_per_id(reference, wandb_env, capsys):
    """`python -m orchestrator` twice (in-process): the first scores one lost shard, the
    second skips everything; every W&B id still has one offline log, with both sessions in it."""
    from pipeline_runs import copy_run, run_inprocess, stage_counts

    from orchestrator.wandb_run import wandb_id

    runs = wandb_env / "runs"
    run_dir = copy_run(reference, runs, "wb", "problems", "trajectories", "scores")
    lost = run_dir / "scores" / "tiny" / "layer=2" / "demo" / "00001"
    for suffix in (".arrow", ".done.json"):
        lost.with_suffix(suffix).unlink()
    assert run_inprocess(runs, "wb", "wandb=offline") == 0
    assert stage_counts(capsys.readouterr().err)["scoring"]["computed"] == 1
    first = sorted((run_dir / "wandb").glob("offline-run-*"))
    between = time.time()
    assert run_inprocess(runs, "wb", "wandb=offline") == 0
    assert stage_counts(capsys.readouterr().err)["scoring"]["computed"] == 0

    logs = runs_by_id(run_dir)
    jobs = {wandb_id("wb", "tiny", layer, "demo") for layer in (0, 2, 3)}
    assert set(logs) == {wandb_id("wb", "driver"), *jobs}
    assert all(len(sessions) == 1 for sessions in logs.values())  # one log per id
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == len(first) == 4 and not set(folders) & set(first)
    dry_run = subprocess.run(
        [sys.executable, "-m", "wandb", "sync", "--dry-run", str(run_dir / "wandb")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "Would sync 4 run(s)" in dry_run.stdout + dry_run.stderr  # works offline
    ((_, records),) = logs[wandb_id("wb", "tiny", 2, "demo")]
    summary = summary_of(records)
    assert summary["job/units"] == 3 and summary["job/tokens_this_session"] > 0  # run 1
    assert "fragile/gain_pp" in summary  # the report, logged by both runs
    assert len([h for h in history_of(records) if "by_bin/_type" in h]) == 2
    ((_, records),) = logs[wandb_id("wb", "driver")]
    times = [h["_timestamp"] for h in history_of(records) if "scoring/done" in h]
    assert min(times) < between < max(times)  # progress of both runs


def test_the_cor_evaluation_is_logged_offline(wandb_env):
    """cor_stage.log_wandb: one run (job_type cor_eval) in the run's group, each condition's
    mean in its summary, the evaluation and CEI tables as W&B tables."""
    from analysis.cor_eval import evaluation_table
    from orchestrator.config import CorConfig, ModelConfig
    from orchestrator.cor_stage import log_wandb
    from orchestrator.wandb_run import wandb_id

    run_dir = wandb_env / "runs" / "cr"
    frame = pl.DataFrame(
        {
            "condition": ["standard", "standard", "cor", "cor"],
            "problem_id": ["q0", "q1", "q0", "q1"],
            "dataset": ["tq"] * 4,
            "mc1": [1.0, 0.0, 1.0, 1.0],
            "mc2": [0.5, 0.25, 0.75, 0.5],
            "em": [None] * 4,
        },
        schema_overrides={"em": pl.Float64},
    )
    table = evaluation_table(frame, draws=50, seed=0)
    layers = pl.DataFrame({"layer": [0, 1], "sensitivity": [0.1, 0.2]})
    experts = pl.DataFrame({"layer": [1], "expert": [3], "dormancy": [0.01]})
    session = WandbSession(
        WandbConfig(mode="offline", progress_interval_s=3600),
        run_id="cr",
        run_dir=run_dir,
        config={},
    )
    log_wandb(
        session, "cr", ModelConfig(name="tiny"), CorConfig(name="demo"), table, layers, experts
    )
    session.finish(exit_code=0)
    ((run, records),) = runs_by_id(run_dir)[wandb_id("cr", "tiny", "cor", "eval")]
    assert run.job_type == "cor_eval" and run.run_group == "cr"
    assert run.display_name == "cr/tiny/cor"
    summary = summary_of(records)
    assert summary["tq/mc1/standard"] == 0.5 and summary["tq/mc1/cor"] == 1.0
    assert summary["tq/mc2/cor"] == pytest.approx(0.625)
    assert summary["cor_eval/_type"] == "table-file" and summary["cor_eval/nrows"] == 4
    assert summary["cei_layers/_type"] == "table-file"
