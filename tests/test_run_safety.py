"""Nothing lost, nothing silently wrong: path names, stale-file cleanup, content hashes, the
report's inputs and the one-driver lease, on real files and (where a driver runs) a real Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import pytest
from fault_workers import failing_scorer
from hydra import compose, initialize_config_dir
from pipeline_runs import ROOT, cli_command, copy_run, run_inprocess, tables

from orchestrator import config as C
from orchestrator import plan
from orchestrator.__main__ import resume_command
from orchestrator.lock import LOCK_NAME, RunLock, RunLockedError
from orchestrator.problems import prepare_problems
from orchestrator.shards import prune
from workers.io import check_path_name, done_path, read_arrow, write_arrow

pytestmark = pytest.mark.usefixtures("local_ray")
FIXTURES = Path(__file__).parent / "fixtures"


def typed(*overrides: str) -> C.RunConfig:
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        return C.to_run_config(compose("config", overrides=list(overrides)))


# ----------------------------------------------------------------------------- path names


@pytest.mark.parametrize(
    "name",
    ["..", ".", "", "../../v", "/abs/path", "a/b", "a\\b", "a\nb", "line\n", " a", ".hidden",
     "-x", "a b", "x" * 129, None, 7],
)  # fmt: skip
def test_unsafe_names_are_refused_by_the_one_rule(name):
    with pytest.raises(ValueError, match="cannot be a file name"):
        check_path_name(name, "model.name")


@pytest.mark.parametrize("name", ["tiny", "qwen3-30b-a3b", "math500", "s_del", "layer=2", "v1.0"])
def test_safe_names_pass(name):
    assert check_path_name(name, "x") == name


@pytest.mark.parametrize(
    "override, key",
    [
        ("dataset.name=../../victim", "dataset.name"),
        ("model.name=/tmp/abs", "model.name"),
        ("run_id=a/b", "run_id"),
        ("sweep.name=..", "sweep.name"),
    ],
)
def test_every_name_that_becomes_a_path_is_validated(override, key):
    with pytest.raises(C.ConfigError, match=f"^{key}="):
        C.validate(typed(override))


def test_dataset_name_traversal_neither_writes_nor_deletes_outside_runs_dir(tmp_path, capsys):
    # The victim folder sits where generated/ would land for the name below: twice the run
    # used to write there, and the second run's cleanup deleted the stranger's file.
    victim = tmp_path / "victim" / "generated"
    victim.mkdir(parents=True)
    (victim / "precious.arrow").write_bytes(b"precious")
    runs = tmp_path / "runs"
    for _ in range(2):
        code = run_inprocess(
            runs, "s_del", "dataset.name=../../../../victim", "scoring.layers=[early]"
        )
        assert code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: dataset.name=") and err.count("\n") == 1
    assert (victim / "precious.arrow").read_bytes() == b"precious"
    assert sorted(p.name for p in (tmp_path / "victim").rglob("*")) == [
        "generated",
        "precious.arrow",
    ]
    assert not runs.exists()


def test_prune_deletes_only_our_files_inside_the_run(tmp_path):
    run_dir = tmp_path / "run"
    scores = run_dir / "scores" / "m" / "layer=0" / "d"
    keep, stale = scores / "00000.arrow", scores / "00001.arrow"
    table = pl.DataFrame({"x": [1]}).to_arrow()
    for path in (keep, stale):
        write_arrow(table, path, config_hash="h")
    foreign = scores / "notes.arrow"  # a user's file, no sidecar of ours
    foreign.write_bytes(b"mine")
    garbage = scores / "00002.arrow"  # a sidecar that is not ours ([]), e.g. hand-made
    garbage.write_bytes(b"x")
    done_path(garbage).write_text("[]")
    outside = tmp_path / "elsewhere"
    write_arrow(table, outside / "00000.arrow", config_hash="h")

    assert prune(run_dir, [scores, outside], [keep]) == 1
    assert not stale.exists() and not done_path(stale).exists()
    assert keep.exists() and foreign.read_bytes() == b"mine" and garbage.exists()
    assert (outside / "00000.arrow").exists()


# ----------------------------------------------------------------------------- content hashes


def test_an_edited_local_data_file_redoes_the_problems(tmp_path):
    data = tmp_path / "math500.jsonl"
    shutil.copy(FIXTURES / "math500.jsonl", data)
    cfg = typed("dataset=math500", f"dataset.path={data}")
    run_dir = tmp_path / "run"
    first = prepare_problems(cfg, run_dir)["math500"]
    problems = run_dir / "problems" / "math500.arrow"
    before = pl.read_ipc(problems)["gold_answer"].to_list()

    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
    rows[0]["answer"] = "edited-answer"
    stat = data.stat()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    second = prepare_problems(cfg, run_dir)["math500"]
    after = pl.read_ipc(problems)["gold_answer"].to_list()
    assert second[1] != first[1]
    assert after[0] == "edited-answer" and after[1:] == before[1:]
    # The same content under another path is the same problems file (nothing redone).
    moved = tmp_path / "moved.jsonl"
    shutil.copy(data, moved)
    assert plan.problems_hash(typed("dataset=math500", f"dataset.path={moved}").dataset) == (
        plan.problems_hash(cfg.dataset)
    )


# ----------------------------------------------------------------------------- report inputs


def report_cli(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "analysis.report", str(run_dir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_report_leaves_out_and_names_a_corrupted_score_file(reference, tmp_path):
    run_dir = copy_run(reference, tmp_path, "z")
    victim = sorted((run_dir / "scores").rglob("*.arrow"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 256] = bytes(256)  # same size, zeroed bytes
    victim.write_bytes(bytes(data))
    result = report_cli(run_dir)
    assert result.returncode == 0, result.stderr
    unit = "tiny/layer=" + victim.parent.parent.name.split("=")[1] + "/demo/" + victim.stem
    assert f"1 corrupt or tampered (not as their sidecar says): {unit} (sha256 differs" in (
        result.stderr
    )
    text = (run_dir / "report.md").read_text()
    assert "**Incomplete" in text and unit in text
    ref_counts = tables(reference)["counts"]
    counts = tables(run_dir)["counts"]
    rows = read_arrow(reference / victim.relative_to(run_dir)).num_rows
    assert counts["tokens"].sum() == ref_counts["tokens"].sum() - rows


def test_report_after_a_failed_unit_under_a_new_seed_mixes_in_no_old_shard(
    reference, tmp_path, capsys
):
    run_dir = copy_run(reference, tmp_path, "s1")
    fail = failing_scorer("layer=2/demo/00001")
    assert run_inprocess(tmp_path, "s1", "scoring.seed=1", "scoring.retries=0", workers=fail) == 1
    err = capsys.readouterr().err
    assert "1 stale (other settings or not in the plan): tiny/layer=2/demo/00001" in err
    text = (run_dir / "report.md").read_text()
    assert "**Incomplete" in text and "tiny/layer=2/demo/00001" in text
    seed0 = read_arrow(run_dir / "scores/tiny/layer=2/demo/00001.arrow")  # still seed 0's
    counts = tables(run_dir)["counts"]
    ref = tables(reference)["counts"]
    layer2 = pl.col("layer") == 2
    assert (
        counts.filter(layer2)["tokens"].sum() == ref.filter(layer2)["tokens"].sum() - seed0.num_rows
    )


# ----------------------------------------------------------------------------- one driver


def wait_for(predicate, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_second_driver_on_the_same_run_exits_2_naming_the_first(reference, tmp_path, capsys):
    run_dir = copy_run(reference, tmp_path, "two", "problems", "trajectories")
    first = subprocess.Popen(
        cli_command(tmp_path, "two"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: (run_dir / LOCK_NAME).exists() or first.poll() is not None)
        assert first.poll() is None
        assert run_inprocess(tmp_path, "two") == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: run two is in use")
        assert f"host {socket.gethostname()}, pid {first.pid}, started 20" in err
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a crash: the lease stays on disk
        first.wait()
    # The crashed driver's lease does not hold the run: its pid is gone on this host.
    assert (run_dir / LOCK_NAME).exists()
    with RunLock(run_dir):
        assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (run_dir / LOCK_NAME).exists()


def test_a_lease_from_another_host_expires_without_heartbeats(tmp_path):
    def lease(age_s: float) -> None:
        tmp_path.joinpath(LOCK_NAME).write_text(
            json.dumps(
                {
                    "host": "node-7",
                    "pid": 1,
                    "started": "then",
                    "token": "t",
                    "heartbeat": time.time() - age_s,
                }
            )  # fmt: skip
        )

    lease(5)
    with pytest.raises(RunLockedError, match="host node-7, pid 1, started then"):
        RunLock(tmp_path, ttl_s=60).acquire()
    lease(61)
    lock = RunLock(tmp_path, ttl_s=60, heartbeat_s=0.05)
    lock.acquire()
    try:
        first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
        wait_for(lambda: json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first, 10)
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path, ttl_s=60).acquire()  # alive on this host: held
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


# ----------------------------------------------------------------------------- bad input


def driver(runs: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m orchestrator` with only these overrides (no SMALL: math500 has no `n`)."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", f"runs_dir={runs}", "wandb=disabled", *overrides],
        cwd=runs.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    return lines[0]


def test_a_data_file_row_lacking_a_field_is_one_error_line(tmp_path):
    data = tmp_path / "math.jsonl"
    rows = [json.loads(ln) for ln in (FIXTURES / "math500.jsonl").read_text().splitlines()]
    del rows[1]["answer"]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = tmp_path / "runs"
    line = one_error_line(driver(runs, "run_id=bad", "dataset=math500", f"dataset.path={data}"))
    assert "row 2 lacks columns ['answer']" in line
    assert not list(runs.rglob("*.done.json"))


def test_a_model_config_json_that_is_not_json_is_one_error_line(tmp_path):
    from workers.generation.demo_task import bundled_model_path

    model = shutil.copytree(bundled_model_path(), tmp_path / "model")
    (model / "config.json").write_text("{not json")
    line = one_error_line(driver(tmp_path / "runs", "run_id=bad", f"model.path={model}"))
    assert "config.json is not readable JSON" in line


def test_a_full_disk_while_the_problems_are_written_is_one_error_line(tmp_path):
    # RLIMIT_FSIZE makes every write past 8 KiB fail (EFBIG; Python ignores SIGXFSZ), the
    # same path through the writer as ENOSPC on a full disk, without filling a real disk.
    import resource

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    runs = tmp_path / "runs"
    result = subprocess.run(
        cli_command(runs, "full", "dataset.options.n=400"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_disk,
    )
    line = one_error_line(result)
    assert line.startswith(f"error: cannot write {runs / 'full/problems/demo.arrow'}")
    assert not list(runs.rglob("*.done.json")) and not list(runs.rglob("*.arrow"))
    assert not list(runs.rglob("*.tmp"))


# ----------------------------------------------------------------------------- secrets


def test_the_resume_command_masks_secret_values():
    overrides = ["scoring.seed=1", "+wandb.api_key=sk-live-0123456789", "model.auth_token=t0k"]
    resume = resume_command([*overrides, "run_id=old", "dry_run=true"], "r")
    assert resume == (
        "python -m orchestrator scoring.seed=1 '+wandb.api_key=***' 'model.auth_token=***' run_id=r"
    )


@pytest.mark.parametrize(
    "override", ["wandb.api_key=sk-live-0123456789", "model.auth_token=sk-live-0123456789"]
)
def test_a_secret_override_is_refused_without_echoing_it(tmp_path, override):
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", override, f"runs_dir={tmp_path}", "dry_run=true"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "through the environment" in result.stderr
    assert "sk-live" not in result.stderr + result.stdout


# ----------------------------------------------------------------------------- clusters


def test_cluster_local_starts_its_own_ray_on_a_node_where_ray_start_ran(reference, tmp_path):
    # RAY_TMPDIR keeps this head's address file (where a bare ray.init() finds the cluster
    # to join) away from every other Ray on the machine; a short path, for Ray's sockets.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    ray_cli = Path(sys.executable).parent / "ray"
    head = subprocess.Popen(
        [str(ray_cli), "start", "--head", "--block", "--num-cpus=1", "--include-dashboard=false",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: (ray_tmp / "ray" / "ray_current_cluster").exists() or head.poll())
        assert head.poll() is None, "ray start failed"
        copy_run(reference, tmp_path, "rs")
        result = subprocess.run(
            cli_command(tmp_path, "rs"), cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        kill_processes_mentioning(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)


def kill_processes_mentioning(marker: str) -> None:
    """SIGKILL the processes this test started (their command lines name its temp dir)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker.encode() in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def test_a_relative_runs_dir_inside_a_ray_job_is_refused(tmp_path):
    # What Ray's job supervisor sets in a submitted job's driver; its cwd is the temporary
    # copy of --working-dir, here tmp_path.
    env = {**os.environ, "RAY_JOB_CONFIG_JSON_ENV_VAR": '{"runtime_env": {"working_dir": "."}}'}
    for runs_dir in ("runs", str(tmp_path / "runs")):
        result = subprocess.run(
            [sys.executable, "-m", "orchestrator", f"runs_dir={runs_dir}", "wandb=disabled"],
            cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
            timeout=120,
        )  # fmt: skip
        line = one_error_line(result)
        assert f"runs_dir={runs_dir} is inside this Ray job's temporary working directory" in line
        assert list(tmp_path.iterdir()) == []
