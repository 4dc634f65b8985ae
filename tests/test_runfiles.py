"""The run folder's plan and config are read only from regular files in the run folder."""

from __future__ import annotations

import os

import pytest

from workers.runfiles import CONFIG_FILE, PLAN_FILE, plan_text, read_plan, read_run_config

PLAN = plan_text([{"unit": "u", "path": "scores/x.arrow", "config_hash": "h"}], ["m/d"])


def test_reads_regular_files(tmp_path):
    (tmp_path / PLAN_FILE).write_text(PLAN)
    (tmp_path / CONFIG_FILE).write_text("run_id: r1\nmodel: {name: tiny}\n")
    assert read_plan(tmp_path)["unscored"] == ["m/d"]
    assert read_run_config(tmp_path) == {"run_id": "r1", "model": {"name": "tiny"}}


def test_missing_files_are_none(tmp_path):
    assert read_plan(tmp_path) is None and read_run_config(tmp_path) is None


def test_planted_links_are_not_followed(tmp_path):
    """A link at plan.json or config.yaml pointing at another (valid) file counts as absent:
    the run is never described by a file outside its folder."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / PLAN_FILE).write_text(PLAN)
    (elsewhere / CONFIG_FILE).write_text("run_id: other\n")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(elsewhere / PLAN_FILE, run / PLAN_FILE)
    os.symlink(elsewhere / CONFIG_FILE, run / CONFIG_FILE)
    assert read_plan(run) is None
    assert read_run_config(run) is None


def test_fifo_does_not_block(tmp_path):
    os.mkfifo(tmp_path / PLAN_FILE)
    os.mkfifo(tmp_path / CONFIG_FILE)
    assert read_plan(tmp_path) is None and read_run_config(tmp_path) is None


@pytest.mark.parametrize(
    ("name", "text", "reader", "message"),
    [
        (PLAN_FILE, "{not json", read_plan, "not readable JSON"),
        (PLAN_FILE, '{"x": 1}', read_plan, "no 'scores' key"),
        (CONFIG_FILE, "a: [", read_run_config, "not readable YAML"),
        (CONFIG_FILE, "- 1\n- 2\n", read_run_config, "not a YAML mapping"),
        (CONFIG_FILE, b"\xff\xfe", read_run_config, "not readable YAML"),
    ],
)
def test_bad_content_is_one_clear_error(tmp_path, name, text, reader, message):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=message) as err:
        reader(tmp_path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
