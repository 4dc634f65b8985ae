"""What produced a file: library versions, the project's commit, the scoring code's version.

Contract: plain functions, no Ray. `library_versions()` reads installed package metadata
(nothing is imported: vllm is absent on CPU nodes and importing torch costs seconds);
`git_commit(root)` is the checkout's HEAD, with "+dirty" when tracked files differ, or None
outside a git checkout (Ray ships working_dir without .git, so the driver records it);
`scoring_code_version()` hashes the source of the modules that decide a score, so a change
to any of them is seen even without a commit; `model_revision(path)` is the commit of a
Hugging Face cache snapshot directory, or None for a local directory.
"""

from __future__ import annotations

import hashlib
import subprocess
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "transformers", "vllm", "ray")
# The modules whose code decides a score's value (SCORES_SCHEMA's columns).
SCORING_MODULES = (
    "scoring/scorer",
    "scoring/kv",
    "adapters",
    "scoring/routes",
    "layers",
    "schemas",
)  # paths below workers/
ROOT = Path(__file__).resolve().parent.parent


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(root: str | Path = ROOT) -> str | None:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def scoring_code_version() -> str:
    digest = hashlib.sha256()
    for name in SCORING_MODULES:
        digest.update((Path(__file__).parent / f"{name}.py").read_bytes())
    return digest.hexdigest()[:12]


def model_revision(path: str | Path) -> str | None:
    """.../models--org--name/snapshots/<commit>: the commit; else None."""
    path = Path(path)
    return path.name if path.parent.name == "snapshots" else None
