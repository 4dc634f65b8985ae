"""Install torch into this Python's environment as a CPU build, and refuse a CUDA build on a
machine without an NVIDIA GPU.

`make setup` runs it with the virtualenv's Python before installing the project, so the
project's loose `torch>=2.4` requirement finds torch already there and keeps it:

    python tools/install_torch.py --torch torch==2.13.0 --index https://download.pytorch.org/whl/cpu
    python tools/install_torch.py --check          # only the check (after every later install)

PyPI's Linux wheels of torch are CUDA builds (several GB with their CUDA, cuDNN and NCCL
packages); PyTorch's CPU index has the `+cpu` builds. The CPU index is used when it answers;
only when it cannot be reached does pip fall back to its default index, and then the check
refuses the CUDA build it would get on an ordinary machine (exit 1), unless ALLOW_CUDA_TORCH=1
or the machine has an NVIDIA GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path


def reachable(index: str, timeout: float = 15.0) -> bool:
    """True when the index answers at all (any HTTP status): a refused connection, an unknown
    host or a timeout is False."""
    try:
        urllib.request.urlopen(index.rstrip("/") + "/torch/", timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/version").exists()


def verdict(version: str, cuda: str | None, gpu: bool, allow_cuda: bool) -> str | None:
    """The error for this torch build on this machine, or None when it may stay."""
    if cuda is None or gpu or allow_cuda:
        return None
    return (
        f"torch {version} is a CUDA build (CUDA {cuda}) and this machine has no NVIDIA GPU: it"
        " costs several GB and runs on the CPU only. Reinstall from PyTorch's CPU index"
        " (rm -rf .venv && make setup; TORCH_INDEX=<url> for a mirror of it), or keep it with"
        " ALLOW_CUDA_TORCH=1"
    )


def check() -> int:
    probe = "import torch, json; print(json.dumps([torch.__version__, torch.version.cuda]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(
            "error: torch does not import:", out.stderr.strip().splitlines()[-1:], file=sys.stderr
        )
        return 1
    import json

    version, cuda = json.loads(out.stdout)
    problem = verdict(version, cuda, has_nvidia_gpu(), os.environ.get("ALLOW_CUDA_TORCH") == "1")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    print(f"torch {version}: {'CUDA ' + cuda if cuda else 'CPU'} build")
    return 0


def install(torch: str, index: str) -> int:
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    if index and reachable(index):
        print(f"torch: {torch} from {index}")
        code = subprocess.call([*pip, "--index-url", index, torch])
    else:
        print(
            f"warning: {index or 'no CPU index'} cannot be reached; {torch} from pip's default"
            " index (a CUDA build unless a CPU wheel is at hand: checked next)",
            file=sys.stderr,
        )
        code = subprocess.call([*pip, torch])
    return code or check()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", default="torch", help="requirement, e.g. torch==2.13.0")
    parser.add_argument("--index", default="https://download.pytorch.org/whl/cpu")
    parser.add_argument("--check", action="store_true", help="only check the installed build")
    args = parser.parse_args(argv)
    return check() if args.check else install(args.torch, args.index)


if __name__ == "__main__":
    sys.exit(main())
