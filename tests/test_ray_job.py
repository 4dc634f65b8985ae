"""The README's cluster command, for real: `ray start --head` on 127.0.0.1, then the demo as
`ray job submit --working-dir . -- python -m orchestrator cluster=address ...`.

The head is isolated from every other Ray on the machine: its own ports and its own
--temp-dir (where `ray start` writes ray_current_cluster, so a plain `ray.init()` elsewhere
does not find it), started with --block in a process group of its own, and stopped by
killing that group and any process left under its temp dir. Never `ray stop`: that stops
every Ray on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from pipeline_runs import ROOT, SMALL, stage_counts, tables

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """Kill exactly this head: its process group, then anything still running from its dir."""
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait()
    for pid in processes_under(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def processes_under(temp_dir: str) -> list[int]:
    """Pids whose command line mentions `temp_dir` (Ray's processes carry their session dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and temp_dir.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def test_demo_through_ray_job_submit(tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    # Ray >= 2.5x turns token authentication on for a new cluster; head and client share
    # one token here (a real cluster hands it out as RAY_AUTH_TOKEN or a token file).
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    # Unix socket paths under the temp dir must stay short (107 bytes): not pytest's tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")
    gcs, dashboard = free_port(), free_port()
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", f"--port={gcs}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}",
            # Every port of its own: the defaults (e.g. the job agent's 52365) may be taken
            # by another Ray on this machine, and then no job can be submitted.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats",
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    runs = tmp_path / "runs"
    try:
        assert not Path("/tmp/ray/ray_current_cluster").is_file() or (
            f"127.0.0.1:{gcs}" not in Path("/tmp/ray/ray_current_cluster").read_text()
        )
        overrides = [
            *SMALL, "cluster=address", "cluster.use_gpus=false", "cluster.scorers=2",
            "cluster.cpus_per_actor=1", "cluster.torch_threads=1", f"runs_dir={runs}",
            "run_id=job",
        ]  # fmt: skip
        submit = [
            str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
            "--working-dir", ".", "--", "python", "-m", "orchestrator", *overrides,
        ]  # fmt: skip
        deadline = time.monotonic() + 120
        while True:  # the dashboard and its job agent take a few seconds to come up
            result = subprocess.run(
                submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
            )
            out = result.stdout + result.stderr
            not_up = "Failed to connect" in out or "try again later" in out
            if result.returncode == 0 or not not_up or time.monotonic() > deadline:
                break
            time.sleep(3)
    finally:
        stop_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "succeeded" in out
    counts = stage_counts(out)
    assert counts["generation"]["failed"] == 0 and counts["scoring"]["failed"] == 0
    assert counts["scoring"]["computed"] > 0
    got = tables(runs / "job")
    assert {"overall", "by_bin"} <= set(got) and got["overall"].height > 0
    time.sleep(1)
    assert processes_under(temp_dir) == [], "a process of the test's Ray head is still running"
