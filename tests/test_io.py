"""Completion semantics of workers.io: what is complete, what is not, and that nothing partial is read."""

import json
import time

import pyarrow as pa
import pytest

from workers import io


def _table(n=5):
    return pa.table({"a": pa.array(range(n), pa.int32()), "b": [f"x{i}" for i in range(n)]})


def test_write_then_read_roundtrip(tmp_path):
    path = tmp_path / "sub" / "shard-00000.arrow"
    started = time.time()
    sidecar = io.write_arrow(_table(), path, config_hash="abc", started=started, extra={"unit": "u1"})
    assert io.done_path(path) == tmp_path / "sub" / "shard-00000.done.json"
    on_disk = json.loads(io.done_path(path).read_text())
    assert on_disk == sidecar
    assert sidecar["rows"] == 5 and sidecar["config_hash"] == "abc" and sidecar["unit"] == "u1"
    assert sidecar["sha256"] == io.file_sha256(path)
    assert sidecar["seconds"] >= 0
    assert io.is_complete(path) and io.is_complete(path, "abc")
    assert io.read_arrow(path).equals(_table())
    # No temporary files are left next to the outputs.
    assert sorted(p.name for p in path.parent.iterdir()) == ["shard-00000.arrow", "shard-00000.done.json"]


def test_config_hash_mismatch_is_not_complete(tmp_path):
    path = tmp_path / "x.arrow"
    io.write_arrow(_table(), path, config_hash="abc")
    assert not io.is_complete(path, "other")


@pytest.mark.parametrize("sidecar", ["[]", "3", '"done"', "null", '{"rows": 5}'])
def test_a_sidecar_that_is_not_our_object_is_no_sidecar(tmp_path, sidecar):
    # Valid JSON of the wrong shape used to crash is_complete and so block every resume.
    path = tmp_path / "x.arrow"
    io.write_arrow(_table(), path, config_hash="abc")
    io.done_path(path).write_text(sidecar)
    assert io.read_sidecar(path) is None
    assert not io.is_complete(path) and not io.is_complete(path, "abc")
    io.write_arrow(_table(), path, config_hash="abc")  # the unit is simply redone
    assert io.is_complete(path, "abc")


def test_missing_sidecar_is_never_read(tmp_path):
    path = tmp_path / "x.arrow"
    io.write_arrow(_table(), path, config_hash="abc")
    io.done_path(path).unlink()
    assert not io.is_complete(path)
    with pytest.raises(io.IncompleteFileError, match="not complete"):
        io.read_arrow(path)
    assert io.read_arrow(path, require_complete=False).num_rows == 5


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_file_is_detected(tmp_path, damage):
    path = tmp_path / "x.arrow"
    io.write_arrow(_table(100), path, config_hash="abc")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not io.is_complete(path)
    # A truncated file has no Arrow footer, so the cheap checks catch it; a flipped byte in
    # the data is caught only by the checksum.
    assert io.is_complete(path, checksum=False) == (damage == "flip")


def test_rewrite_replaces_and_discard_removes(tmp_path):
    path = tmp_path / "x.arrow"
    io.write_arrow(_table(3), path, config_hash="one")
    io.write_arrow(_table(7), path, config_hash="two")
    assert io.read_sidecar(path)["rows"] == 7 and io.is_complete(path, "two")
    io.discard(path)
    assert not path.exists() and not io.done_path(path).exists()
    assert io.read_sidecar(path) is None


def test_failed_write_leaves_nothing_complete(tmp_path):
    path = tmp_path / "x.arrow"
    io.write_arrow(_table(3), path, config_hash="one")
    # The sidecar cannot be serialised, so the write fails after the data file was replaced:
    # the old sidecar must be gone (it vouched for the old file) and no temp file may remain.
    with pytest.raises(TypeError):
        io.write_arrow(_table(4), path, config_hash="two", extra={"not_json": object()})
    assert not io.is_complete(path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_config_hash_is_stable_and_order_free():
    assert io.config_hash({"a": 1, "b": [1, 2]}) == io.config_hash({"b": [1, 2], "a": 1})
    assert io.config_hash({"a": 1}) != io.config_hash({"a": 2})
    assert len(io.config_hash({})) == 16


def test_files_are_zstd_compressed_and_read_back_identical(tmp_path):
    import polars as pl

    table = pa.table({"name": ["model-a"] * 4000, "u": pa.array(range(4000), pa.float32())})
    packed, plain = tmp_path / "packed.arrow", tmp_path / "plain.arrow"
    io.write_arrow(table, packed, config_hash="h")
    io.write_arrow(table, plain, config_hash="h", compression="none")
    assert packed.stat().st_size < plain.stat().st_size / 2
    assert io.read_arrow(packed).equals(table)
    assert pl.scan_ipc(packed).collect().equals(pl.from_arrow(table))
    assert io.verify(packed, "h")["rows"] == 4000
    with pytest.raises(ValueError, match="compression='brotli'"):
        io.write_arrow(table, tmp_path / "x.arrow", config_hash="h", compression="brotli")
    assert not (tmp_path / "x.arrow").exists()
