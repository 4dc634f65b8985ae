"""tools/install_torch.py: CPU torch from PyTorch's CPU index, a fallback where it cannot be
reached, and a check that refuses a CUDA build on a machine without an NVIDIA GPU."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "install_torch.py"
spec = importlib.util.spec_from_file_location("install_torch", SCRIPT)
install_torch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(install_torch)


@pytest.mark.parametrize(
    "version, cuda, gpu, allow, refused",
    [
        ("2.13.0+cpu", None, False, False, False),
        ("2.13.0", "13.0", False, False, True),  # PyPI's build on a CPU machine
        ("2.13.0", "13.0", False, True, False),  # ALLOW_CUDA_TORCH=1
        ("2.13.0", "13.0", True, False, False),  # a GPU machine
        ("2.13.0+cu126", "12.6", False, False, True),
    ],
)
def test_a_cuda_build_is_refused_only_without_a_gpu_and_unless_allowed(
    version, cuda, gpu, allow, refused
):
    problem = install_torch.verdict(version, cuda, gpu, allow)
    assert (problem is not None) == refused
    if refused:
        assert version in problem and "ALLOW_CUDA_TORCH=1" in problem


def test_an_index_that_cannot_be_reached_is_told_apart_from_one_that_answers(tmp_path):
    assert not install_torch.reachable("http://127.0.0.1:9/whl/cpu", timeout=5)
    assert not install_torch.reachable("not a url", timeout=5)


def test_the_check_passes_for_this_environments_cpu_torch():
    import torch

    if torch.version.cuda and not install_torch.has_nvidia_gpu():
        pytest.skip("this environment has a CUDA torch without a GPU (ALLOW_CUDA_TORCH?)")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert torch.__version__ in done.stdout


def test_an_unreachable_cpu_index_falls_back_to_the_default_index_and_still_checks():
    """With torch already installed pip has nothing to fetch: the fallback path runs end to
    end offline, says that it fell back, and ends with the check."""
    import torch

    if torch.version.cuda and not install_torch.has_nvidia_gpu():
        pytest.skip("this environment has a CUDA torch without a GPU")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--torch", f"torch=={torch.__version__.split('+')[0]}",
         "--index", "http://127.0.0.1:9/whl/cpu"],
        capture_output=True, text=True, check=False, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "cannot be reached" in done.stderr and "default index" in done.stderr
    assert f"torch {torch.__version__}" in done.stdout
