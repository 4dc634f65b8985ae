"""Runs on object storage (workers/store.py), against a real S3 server on 127.0.0.1 (moto's
server mode, started here): the commit protocol of one data file, then the demo on an s3://
runs_dir killed mid-run and resumed, and a corrupted object redone, compared with one
uninterrupted local run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow as pa
import pytest
from pipeline_runs import assert_same_tables, cli_command, settled, stage_counts

from workers import store as S
from workers.io import read_verified, verify, write_arrow

pytest.importorskip("moto.server", reason="moto[server] (the dev extra) runs the local S3")
boto3 = pytest.importorskip("boto3", reason="boto3 (the dev extra) talks to the local S3")

BUCKET = "runs-test"
SECRET = "moto-secret-7f3a9c"  # must appear in no file a run writes, nor in its output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on a free local port; its address and credentials as AWS_* variables."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "no S3 server"
                time.sleep(0.1)
        yield env
    finally:
        server.terminate()
        server.wait()


@pytest.fixture
def s3(s3_server, tmp_path, monkeypatch):
    """A fresh bucket and mirror cache for this process; returns a boto3 client."""
    for key, value in {**s3_server, S.CACHE_ENV: str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    S.open_store.cache_clear()
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)
    S.open_store.cache_clear()


def keys(client, prefix: str = "") -> list[str]:
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"] for o in listed if not o["Key"].endswith("/"))


def test_a_data_file_is_committed_by_its_sidecar_and_superseded_attempts_go(s3, tmp_path):
    run = S.mirror_of(f"s3://{BUCKET}/p") / "r"
    path = run / "scores" / "00000.arrow"
    write_arrow(pa.table({"x": [1, 2]}), path, config_hash="h", root=run)
    side = json.loads(s3.get_object(Bucket=BUCKET, Key="p/r/scores/00000.done.json")["Body"].read())
    first = side["object"]
    assert set(keys(s3, "p/r/scores/")) == {f"p/r/scores/{first}", "p/r/scores/00000.done.json"}
    # An upload that was never committed (a writer killed before its sidecar) is trusted by no
    # reader; the next commit of the unit removes it and the attempt it supersedes.
    s3.put_object(Bucket=BUCKET, Key="p/r/scores/00000.0123456789ab.arrow", Body=b"half")
    write_arrow(pa.table({"x": [3, 4, 5]}), path, config_hash="h", root=run)
    side = json.loads(s3.get_object(Bucket=BUCKET, Key="p/r/scores/00000.done.json")["Body"].read())
    assert side["object"] != first and side["rows"] == 3
    assert set(keys(s3, "p/r/scores/")) == {
        f"p/r/scores/{side['object']}",
        "p/r/scores/00000.done.json",
    }
    # Another node (its own, empty mirror) reads the committed pair through verify.
    os.environ[S.CACHE_ENV] = str(tmp_path / "other-node")
    elsewhere = S.mirror_of(f"s3://{BUCKET}/p") / "r" / "scores" / "00000.arrow"
    table, sidecar = read_verified(elsewhere, "h")
    assert table.column("x").to_pylist() == [3, 4, 5] and sidecar["sha256"] == side["sha256"]
    # The unit rewritten on the first node: the other node's copy is replaced when next read.
    os.environ[S.CACHE_ENV] = str(tmp_path / "cache")
    write_arrow(pa.table({"x": [6]}), path, config_hash="h", root=run)
    os.environ[S.CACHE_ENV] = str(tmp_path / "other-node")
    assert read_verified(elsewhere, "h")[0].column("x").to_pylist() == [6]
    side = json.loads(s3.get_object(Bucket=BUCKET, Key="p/r/scores/00000.done.json")["Body"].read())
    # Bytes in the store that are not the sidecar's: the pull names the unit, removes it
    # locally and on the store (so it is redone), and nothing is read.
    s3.put_object(Bucket=BUCKET, Key=f"p/r/scores/{side['object']}", Body=b"x" * 100)
    [problem] = S.pull_run(elsewhere.parent.parent)
    assert "sha256 differs" in problem and not elsewhere.exists()
    assert keys(s3, "p/r/scores/") == []
    with pytest.raises(Exception, match="not complete"):
        verify(elsewhere)
    # The sidecar is put only if absent: a second writer of the same name loses.
    store = S.open_store("s3", BUCKET)
    assert store.conditional
    assert store.write_new("p/r/x.done.json", b"{}") and not store.write_new("p/r/x.done.json", b"")


@pytest.mark.parametrize(
    "uri", ["http://bucket/p", "file:///tmp/x", "s3://key:secret@bucket/p", "s3://bucket/../p"]
)
def test_runs_dir_uris_other_than_s3_or_gs_are_refused(uri, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator", f"runs_dir={uri}", "wandb=disabled"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: runs_dir") and "secret" not in line


def test_a_bucket_that_cannot_be_reached_is_one_error_line(s3, tmp_path):
    for uri in ("s3://no-such-bucket/runs", f"s3://{BUCKET}/runs"):
        env = {**os.environ}
        if uri.endswith(f"{BUCKET}/runs"):
            env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"  # nothing listens
        result = subprocess.run(
            [sys.executable, "-m", "orchestrator", f"runs_dir={uri}", "wandb=disabled"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2, result.stderr[-2000:]
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("error: cannot write the run's lease: s3://"), line


def drive(tmp_path, run_id: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_command(f"s3://{BUCKET}/runs", run_id),  # type: ignore[arg-type]
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def committed(client, prefix: str) -> list[str]:
    return [k for k in keys(client, prefix) if k.endswith(".done.json")]


@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_demo_on_s3_killed_resumed_and_a_corrupted_object_redone(s3, reference, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    driver = subprocess.Popen(
        cli_command(f"s3://{BUCKET}/runs", "k"),  # type: ignore[arg-type]
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its Ray processes share the group: killed below
    )
    try:
        deadline = time.monotonic() + 240
        while not committed(s3, "runs/k/scores/"):
            assert driver.poll() is None and time.monotonic() < deadline, "no unit finished"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):  # the local Ray it started
            os.killpg(driver.pid, signal.SIGKILL)
    # Actors already inside a unit may still commit it before they notice.
    done = settled(lambda: committed(s3, "runs/k/scores/"))
    assert 1 <= len(done) < 9, "the driver was not killed mid-run"

    # The resume starts from an empty mirror (another node): all it has is the store.
    env[S.CACHE_ENV] = str(tmp_path / "node2")
    run_dir = tmp_path / "node2" / "s3" / BUCKET / "runs" / "k"
    result = drive(tmp_path, "k", env)
    assert result.returncode == 0, result.stderr[-2000:]
    counts = stage_counts(result.stderr)
    assert counts["generation"]["computed"] == 0
    assert (counts["scoring"]["skipped"], counts["scoring"]["computed"]) == (
        len(done),
        9 - len(done),
    )
    assert_same_tables(run_dir, reference)
    assert "tables/headline.parquet" in str(keys(s3, "runs/k/tables/"))
    # The status command reads the run from the bucket alone, into a mirror of its own.
    status = subprocess.run(
        [sys.executable, "-m", "orchestrator.status", f"s3://{BUCKET}/runs/k", "--json"],
        env={**env, S.CACHE_ENV: str(tmp_path / "laptop")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    totals = json.loads(status.stdout)["stages"]["scoring"]
    assert (totals["done"], totals["pending"]) == (9, 0)
    written = [p.read_bytes() for p in (tmp_path / "node2").rglob("*") if p.is_file()]
    assert not [b for b in written if SECRET.encode() in b] and SECRET not in result.stderr

    # One object's bytes overwritten in the bucket: found at the next start and redone.
    side_key = committed(s3, "runs/k/scores/")[0]
    side = json.loads(s3.get_object(Bucket=BUCKET, Key=side_key)["Body"].read())
    obj_key = side_key.rsplit("/", 1)[0] + "/" + side["object"]
    data = bytearray(s3.get_object(Bucket=BUCKET, Key=obj_key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    s3.put_object(Bucket=BUCKET, Key=obj_key, Body=bytes(data))
    result = drive(tmp_path, "k", env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{obj_key}: sha256 differs from its sidecar's; redone" in result.stderr
    assert stage_counts(result.stderr)["scoring"]["computed"] == 1
    redone = json.loads(s3.get_object(Bucket=BUCKET, Key=side_key)["Body"].read())
    assert redone["object"] != side["object"] and redone["sha256"] == side["sha256"]
    assert obj_key not in keys(s3, "runs/k/scores/")
    assert_same_tables(run_dir, reference)


def test_the_lease_on_the_store_keeps_a_second_driver_out_until_released(s3):
    from orchestrator.lock import RunLockedError, StoreLock

    run = S.mirror_of(f"s3://{BUCKET}/p") / "r"
    first = StoreLock(run, heartbeat_s=0.05)
    first.acquire()
    try:
        assert keys(s3) == ["p/r/.driver.lock"]
        with pytest.raises(RunLockedError, match="in use by another driver"):
            StoreLock(run).acquire()
        time.sleep(0.2)  # heartbeats rewrite the object; it stays ours
        assert (
            json.loads(s3.get_object(Bucket=BUCKET, Key="p/r/.driver.lock")["Body"].read())["token"]
            == first.token
        )
    finally:
        first.release()
    assert keys(s3) == []
    with StoreLock(run):
        pass
