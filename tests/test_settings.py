"""Settings that pass the schema but cannot run are refused before Ray starts (one `error:`
line, exit 2, no run folder); the run's lease is never left empty and an impossible one is
stale; secrets never reach Hydra's files; Ray is quiet unless `verbose=true` and its local
processes do not outlive the driver."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from pipeline_runs import ROOT, SMALL

from orchestrator import config as C
from orchestrator.__main__ import LOCAL_RAY_RECORD, local_ray_processes, run
from orchestrator.lock import LOCK_NAME, RunLock

C.register_configs()


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_here(runs: Path, *overrides: str) -> int:
    """`python -m orchestrator` in this process (no Ray is started by the test)."""
    args = [*SMALL, f"runs_dir={runs}", "run_id=bad", *overrides]
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        dcfg = compose("config", overrides=args)
    return run(dcfg, overrides=args)


def error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    assert "Traceback" not in stderr
    return lines[0]


# ------------------------------------------------------- settings refused before Ray starts

BAD_SETTINGS = [
    ("model.temperature=-0.5", "temperature must be >= 0"),
    ("model.temperature=-1e-9", "temperature must be >= 0"),
    ("model.temperature=nan", "temperature must be >= 0"),
    ("model.top_p=1.5", "top_p must be in (0, 1]"),
    ("model.top_p=0", "top_p must be in (0, 1]"),
    ("model.top_p=-0.1", "top_p must be in (0, 1]"),
    ("cluster.unit_timeout_s=0", "cluster.unit_timeout_s=0.0 is out of range"),
    ("cluster.unit_timeout_s=-5", "cluster.unit_timeout_s=-5.0 is out of range"),
    ("cluster.num_gpus=-1", "cluster.num_gpus=-1 is out of range"),
    ("cluster.num_cpus=0", "cluster.num_cpus=0 is out of range"),
    ("cluster.actor_start_timeout_s=0", "cluster.actor_start_timeout_s=0.0 is out of range"),
    ("cluster.cpus_per_actor=-1", "cluster.cpus_per_actor=-1.0 is out of range"),
    ("model.template='{question}'", "template names unknown placeholders ['question']"),
    ("model.template='{prompt} {0}'", "template names unknown placeholders ['0']"),
    ("model.template='{}'", "template names unknown placeholders ['']"),
    ("model.template='{prompt.__class__}'", "unknown placeholders ['prompt.__class__']"),
    ("model.template='{prompt[0]}'", "unknown placeholders ['prompt[0]']"),
    ("model.template='{prompt'", "template is not a format string"),
    ("model.template='}{prompt}'", "template is not a format string"),
    ("model.template='{prompt:>{width}}'", "unknown placeholders ['width']"),
    ("runs_dir=''", "runs_dir is empty"),
    ("runs_dir='  '", "runs_dir is empty"),
    ("runs_dir=FILE", "is a file, not a folder"),
    ("runs_dir=FILE/below", "is a file, not a folder"),
    ("cluster.address=127.0.0.1:PORT", "cannot connect within"),
    ("cluster.address=ray://127.0.0.1:PORT", "cannot connect within"),
    ("cluster.address=nohost-xyz.invalid:6379", "cannot connect within"),
    ("cluster.address=127.0.0.1", "give host:port"),
    ("cluster.address=' '", "cluster.address is empty"),
    ("sweep.models=[REL]", "unknown model"),
    ("sweep.models=[tiny,../conf/model/tiny]", "unknown model '../conf/model/tiny'"),
    ("sweep.models=['file:/nonexistent/m.yaml']", "model file /nonexistent/m.yaml not found"),
    ("sweep.datasets=[../dataset/demo]", "unknown dataset '../dataset/demo'"),
    ("scoring.positions=1.5", "scoring.positions must be all, a fraction in (0, 1] or a whole"),
    ("scoring.positions=-3", "count >= 1, got '-3'"),
    ("scoring.positions=abc", "count >= 1, got 'abc'"),
    ("scoring.positions=0", "count >= 1, got '0'"),
]


@pytest.mark.parametrize("override,message", BAD_SETTINGS)
def test_a_setting_that_cannot_run_is_one_error_line_before_ray(
    override, message, tmp_path, monkeypatch, capsys
):
    import ray

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    elsewhere = tmp_path / "elsewhere" / "tiny.yaml"
    elsewhere.parent.mkdir()
    elsewhere.write_text((C.CONF_DIR / "model" / "tiny.yaml").read_text())
    override = (
        override.replace("FILE", str(tmp_path / "a-file"))
        .replace("PORT", str(closed_port()))
        .replace("REL", "elsewhere/tiny")
    )
    runs_dir = [] if override.startswith("runs_dir=") else [f"runs_dir={tmp_path / 'runs'}"]
    args = [*runs_dir, override]
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        dcfg = compose("config", overrides=[*SMALL, "run_id=bad", *args])
    assert run(dcfg, overrides=args) == 2
    assert message in error_line(capsys.readouterr().err)
    assert not ray.is_initialized()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "elsewhere"]


def test_a_sweep_model_file_is_taken_only_through_file_prefix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "my-model.yaml"
    model.write_text(
        (C.CONF_DIR / "model" / "tiny.yaml").read_text().replace("name: tiny", "name: mine")
    )
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        dcfg = compose("config", overrides=[f"sweep.models=['file:{model}']"])
    cfg = C.to_run_config(dcfg)
    assert [m.name for m in cfg.models] == ["mine"]
    C.validate(cfg)


def test_a_corrupt_config_yaml_in_an_existing_run_is_one_line_naming_it(tmp_path, capsys):
    import ray

    run_dir = tmp_path / "runs" / "bad"
    for garbage in ("{unclosed: [", "- a list\n- not a mapping\n", "provenance: 7\n"):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(garbage)
        assert run_here(tmp_path / "runs") == 2
        line = error_line(capsys.readouterr().err)
        assert str(run_dir / "config.yaml") in line
        assert not ray.is_initialized()
        assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]  # nothing else
        assert (run_dir / "config.yaml").read_text() == garbage


# ----------------------------------------------------------------------------- the lease


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{not json",
        "[1, 2]",
        "null",
        json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": "yesterday"}),
        json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": math.nan}),
        json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": math.inf}),
        json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": -math.inf}),
        # ten days ahead, filled in when the test runs (a test id must not change between
        # collections: the test processes each collect the suite and compare)
        '{"host": "elsewhere", "pid": 1, "heartbeat": TEN_DAYS_AHEAD}',
        json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": True}),
        json.dumps({"host": "elsewhere", "pid": 1}),
    ],
)
def test_an_empty_garbled_or_impossible_lease_is_stale(tmp_path, content):
    content = content.replace("TEN_DAYS_AHEAD", repr(time.time() + 10 * 86400))
    (tmp_path / LOCK_NAME).write_text(content)  # just written: young by its mtime
    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        held = json.loads((tmp_path / LOCK_NAME).read_text())
        assert held["token"] == lock.token and math.isfinite(held["heartbeat"])
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_live_lease_from_another_host_is_still_held(tmp_path):
    from orchestrator.lock import RunLockedError

    holder = {"host": "elsewhere", "pid": 1, "token": "t", "heartbeat": time.time() + 30}
    (tmp_path / LOCK_NAME).write_text(json.dumps(holder))  # a clock 30 s ahead: skew, not stale
    with pytest.raises(RunLockedError, match="in use by another driver"):
        RunLock(tmp_path).acquire()


def cli(cwd: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def test_a_full_disk_when_the_lease_is_written_leaves_nothing(tmp_path):
    # RLIMIT_FSIZE makes any write past 16 bytes fail (EFBIG), as ENOSPC would on a full disk.
    import resource

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))

    runs = tmp_path / "runs"
    for _ in range(2):  # and the second try is refused for the same reason, not for a lease
        result = cli(tmp_path, *SMALL, f"runs_dir={runs}", "run_id=full", preexec_fn=small_disk)
        line = error_line(result.stderr)
        assert result.returncode == 2
        assert line.startswith(f"error: cannot write the run's lease {runs / 'full' / LOCK_NAME}")
        assert not runs.exists()


def test_a_folder_the_driver_cannot_write_is_one_error_line(tmp_path):
    # /sys refuses new folders even to root (a chmod would not stop root).
    runs = Path("/sys/fs") / f"moe-runs-{os.getpid()}"
    result = cli(tmp_path, *SMALL, f"runs_dir={runs}", "run_id=ro")
    assert result.returncode == 2
    assert error_line(result.stderr).startswith("error: cannot write the run's lease")
    assert not runs.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ secrets and Hydra's files

SECRET = "sk-live-5ecret-0123456789abcdef"


@pytest.mark.parametrize(
    "args",
    [
        ["-m", f"+wandb.api_key={SECRET}", "dry_run=true"],
        ["-m", f"wandb.api_key={SECRET}", "dry_run=true", "scoring.seed=1,2"],
        ["--multirun", f"++model.auth_token={SECRET}", "dry_run=true"],
        ["-m", f"hydra.job.env_set.WANDB_API_KEY={SECRET}", "dry_run=true"],
        ["-m", f"+sweep.overrides.tiny.hf_token={SECRET}", "dry_run=true"],
        [f"+wandb.password={SECRET}", "dry_run=true"],
        ["--cfg", "job", f"+dataset.options.secret={SECRET}"],
    ],
)
def test_a_secret_on_the_command_line_is_refused_before_hydra_writes_it(tmp_path, args):
    runs = tmp_path / "runs"
    result = cli(tmp_path, f"runs_dir={runs}", *args)
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert "through the environment" in line and "WANDB_API_KEY" in line
    assert SECRET not in result.stdout + result.stderr
    for path in tmp_path.rglob("*"):  # runs/.multirun/, outputs/, multirun/, .hydra/ ...
        assert path.is_dir() or SECRET.encode() not in path.read_bytes(), path


def test_a_multirun_without_secrets_still_runs(tmp_path):
    result = cli(
        tmp_path, "-m", f"runs_dir={tmp_path / 'runs'}", "dry_run=true", "scoring.seed=1,2"
    )
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "override,prefix,valid",
    [
        ("scoring.foo=1", "scoring.foo", "alternatives"),
        ("+scoring.foo=1", "scoring.foo", "alternatives"),
        ("model.foo=1", "model.foo", "temperature"),
        ("model.engine.foo=1", "model.engine.foo", "max_num_seqs"),
        ("dataset.foo=1", "dataset.foo", "verifier"),
        ("cluster.foo=1", "cluster.foo", "unit_timeout_s"),
        ("generation.foo=1", "generation.foo", "samples_per_problem"),
        ("router_update.foo=1", "router_update.foo", "eval_datasets"),
        ("analysis.foo=1", "analysis.foo", ""),
        ("wandb.foo=1", "wandb.foo", "mode"),
        ("sweep.foo=1", "sweep.foo", "models"),
        ("foo=1", "foo", "runs_dir"),
        ("+foo=1", "foo", "verbose"),
        ("~scoring.foo", "scoring.foo", "alternatives"),
        ("-m scoring.foo=1,2 dry_run=true", "scoring.foo", "alternatives"),
        ("-m dry_run=true cluster.foo=1", "cluster.foo", "address"),
    ],
)
def test_an_unknown_key_lists_the_valid_keys(tmp_path, override, prefix, valid):
    result = cli(tmp_path, f"runs_dir={tmp_path / 'runs'}", *override.split())
    assert result.returncode == 2
    line = error_line(result.stderr)
    assert line.startswith(f"error: unknown key {prefix}; valid: ")
    assert valid in line.split("; valid: ")[1].split(", ") or not valid
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------- Ray


def start_ray_script(verbose: bool) -> str:
    return f"""
import ray
from orchestrator.__main__ import init_ray, stop_local_ray
from orchestrator.config import ClusterConfig
from pathlib import Path
run_dir = Path("run"); run_dir.mkdir()
assert init_ray(ClusterConfig(num_cpus=1), run_dir, verbose={verbose})
@ray.remote
def speak():
    import sys
    print("worker line on stdout", flush=True)
    print("worker line on stderr", file=sys.stderr, flush=True)
ray.get(speak.remote())
import time; time.sleep(1)  # the log monitor forwards worker output about once a second
stop_local_ray(run_dir)
"""


@pytest.mark.slow
def test_ray_is_quiet_unless_verbose_and_worker_output_still_shows(tmp_path):
    # A HOME without ~/.ray/auth_token and no RAY_AUTH_MODE: Ray's first run on a machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = {}
    for verbose in (False, True):
        cwd = tmp_path / f"verbose={verbose}"
        cwd.mkdir()
        result = subprocess.run(
            [sys.executable, "-c", start_ray_script(verbose)],
            cwd=cwd, env={**env, "HOME": str(cwd), "PYTHONPATH": str(ROOT)},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        out[verbose] = result.stdout + result.stderr
        assert "worker line on stdout" in out[verbose]
        assert "worker line on stderr" in out[verbose]
    ray_lines = ("Token authentication", "authentication token", "Started a local Ray")
    quiet = [ln for ln in out[False].splitlines() if ln.strip() and "worker line" not in ln]
    assert quiet == [], quiet
    assert all(text in out[True] for text in ray_lines), out[True]


def processes_of(session_dir: str) -> list[int]:
    """The live processes of the Ray session `session_dir` (they hold its log files open)."""
    pids = []
    for pid in local_ray_processes(session_dir):
        try:
            if (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(pid)
        except OSError:
            pass
    return pids


def agents(session_dir: str) -> list[int]:
    """Ray's dashboard and runtime-env agents of the session (they name themselves ray::...)."""
    found = []
    for pid in processes_of(session_dir):
        try:
            if (Path("/proc") / str(pid) / "cmdline").read_bytes().startswith(b"ray::"):
                found.append(pid)
        except OSError:
            pass
    return found


def wait_for(predicate, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_the_local_ray_stops_with_its_driver_or_is_cleared_at_the_next_start(tmp_path):
    """SIGTERM: the driver stops its Ray. SIGKILL: Ray's agents outlive it; the next driver
    of the run clears them before it starts its own. (Each driver is stopped while it
    generates: a new run has seconds of work.)"""
    record = tmp_path / "rk" / LOCAL_RAY_RECORD
    # Enough problems that no driver finishes before it is stopped.
    args = [*SMALL, f"runs_dir={tmp_path}", "run_id=rk", "dataset.options.n=512"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    seen: list[str] = []

    def recorded() -> str | None:
        try:
            return json.loads(record.read_text())["session_dir"]
        except (OSError, ValueError):
            return None

    def start() -> tuple[subprocess.Popen, str]:
        driver = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", *args], cwd=tmp_path, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        new = lambda: recorded() not in (None, *seen)  # noqa: E731
        wait_for(lambda: new() or driver.poll() is not None, timeout_s=300)
        assert driver.poll() is None, driver.stderr.read()[-3000:]
        session = recorded()
        seen.append(session)
        # Ray's agents (the raylet's children) start after ray.init returns, when the raylet
        # gets to them: seconds, or a minute on a loaded machine.
        wait_for(lambda: agents(session) or driver.poll() is not None, timeout_s=300)
        assert driver.poll() is None, driver.stderr.read()[-3000:]
        return driver, session

    try:
        driver, node = start()
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=120) == 130
        assert "interrupted; resume with" in driver.stderr.read()
        wait_for(lambda: not processes_of(node), timeout_s=30)

        driver, node = start()
        driver.kill()
        driver.wait()
        time.sleep(2)
        assert agents(node), "nothing of Ray outlived a SIGKILLed driver"
        left = set(processes_of(node))

        driver, _ = start()  # its record is written once the old node's processes are gone
        assert not set(processes_of(node)) & left
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=120) == 130
    finally:
        for session in seen:
            for pid in processes_of(session):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- report before the router


def test_a_failing_router_update_still_leaves_the_main_report(
    reference, local_ray, tmp_path, monkeypatch, capsys
):
    import shutil

    import orchestrator.__main__ as entry
    from orchestrator.errors import PipelineError

    run_dir = tmp_path / "rr"
    shutil.copytree(
        reference, run_dir, ignore=shutil.ignore_patterns("report.md", "tables", "figures")
    )

    def fail(*args, **kwargs):
        assert (run_dir / "report.md").is_file()  # built before the update starts
        raise PipelineError("router update failed")

    monkeypatch.setattr(entry, "run_router_update", fail)
    args = [*SMALL, f"runs_dir={tmp_path}", "run_id=rr", "router_update=demo"]
    with initialize_config_dir(config_dir=str(C.CONF_DIR), version_base=None):
        dcfg = compose("config", overrides=args)
    assert run(dcfg, overrides=args) == 2
    assert capsys.readouterr().err.strip().endswith("error: router update failed")
    assert (run_dir / "report.md").is_file()
    assert list((run_dir / "tables").glob("*.parquet")) and list((run_dir / "figures").iterdir())


def _session_record(run_dir: Path, session_dir: str, host: str | None = None) -> None:
    import socket

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCAL_RAY_RECORD).write_text(
        json.dumps({"host": host or socket.gethostname(), "session_dir": session_dir})
    )


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_forged_local_ray_record_kills_nothing(tmp_path):
    """The record names which processes the next driver kills: only a Ray session folder
    whose starting driver is gone (or is this process) counts; a live process holding a file
    in a forged folder survives, and so does the record's target when it is a link."""
    from orchestrator.__main__ import clear_local_ray, recorded_session

    name = f"session_2026-01-01_00-00-00_000001_{_dead_pid()}"
    good = str(tmp_path / "ray" / name)
    run = tmp_path / "run"
    _session_record(run, good)
    assert recorded_session(run) == good
    mine = f"session_2026-01-01_00-00-00_000001_{os.getpid()}"
    _session_record(run, str(tmp_path / mine))
    assert recorded_session(run) == str(tmp_path / mine)
    victim = subprocess.Popen(["sleep", "60"])
    try:
        live = f"session_2026-01-01_00-00-00_000001_{victim.pid}"
        forged = [
            str(tmp_path / live),  # another driver's Ray, still running
            str(tmp_path / "home" / "session_notes"),  # not a name Ray makes
            f"ray/{name}",  # relative
            f"{tmp_path}/x/../{name}",  # not normal
        ]
        for session_dir in forged:
            _session_record(run, session_dir)
            assert recorded_session(run) is None, session_dir
        _session_record(run, good, host="another-host")
        assert recorded_session(run) is None
        (run / LOCAL_RAY_RECORD).unlink()
        elsewhere = tmp_path / "elsewhere.json"
        elsewhere.write_text(json.dumps({"host": "h", "session_dir": good}))
        os.symlink(elsewhere, run / LOCAL_RAY_RECORD)
        assert recorded_session(run) is None
        # a process holding a file open in the session folder of that live driver survives
        folder = tmp_path / live
        folder.mkdir()
        (folder / "log").write_text("")
        with open(folder / "log") as log:
            holder = subprocess.Popen(["sleep", "60"], stdin=log)
        _session_record(run, str(folder))
        assert holder.pid in local_ray_processes(str(folder))
        assert clear_local_ray(run) == 0
        assert holder.poll() is None and victim.poll() is None
        holder.kill()
        holder.wait()
    finally:
        victim.kill()
        victim.wait()


def test_a_killed_but_unreaped_driver_counts_as_gone():
    """A zombie (exited, its parent has not reaped it yet) holds no lease and no Ray."""
    from orchestrator.lock import pid_alive

    child = subprocess.Popen(["true"])
    stat = Path(f"/proc/{child.pid}/stat")
    wait_for(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", timeout_s=30)
    try:
        assert not pid_alive(child.pid)
    finally:
        child.wait()
    assert not pid_alive(child.pid)
    assert pid_alive(os.getpid())
