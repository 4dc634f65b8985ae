"""The package import boundaries of docs/design.md, checked by parsing every import.

- Only orchestrator/ imports ray, hydra or wandb.
- workers/ at module level imports only the standard library, torch, transformers, pyarrow
  (and what they themselves are built on); anything else is imported inside a function.
  vllm is imported only inside the vLLM backend, inside a function.
- analysis/ never imports ray, torch, transformers, vllm, hydra or wandb.
- workers/ never imports orchestrator/ or analysis/; analysis/ never imports orchestrator/.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DRIVER_ONLY = {"ray", "hydra", "wandb"}
WORKERS_CORE = {"torch", "transformers", "pyarrow", "numpy", "safetensors", "tokenizers"}
FIRST_PARTY = {"workers", "orchestrator", "analysis"}


def imports(path: Path) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level?) for every import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], top) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], top))
            visit(child, top and not nested)

    visit(tree, True)
    return found


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_the_packages_exist():
    for package in ("orchestrator", "workers", "analysis"):
        assert files(package), package


@pytest.mark.parametrize("package", ["workers", "analysis"])
def test_only_the_orchestrator_imports_ray_hydra_wandb(package):
    bad = [
        (p.relative_to(ROOT), m) for p in files(package) for m, _ in imports(p) if m in DRIVER_ONLY
    ]
    assert not bad, f"{package}/ must not import {sorted(DRIVER_ONLY)}: {bad}"


def test_workers_core_imports_only_torch_transformers_pyarrow_at_module_level():
    allowed = WORKERS_CORE | FIRST_PARTY | set(sys.stdlib_module_names) | {"__future__"}
    bad = [
        (str(p.relative_to(ROOT)), m)
        for p in files("workers")
        for m, top in imports(p)
        if top and m not in allowed
    ]
    assert not bad, f"import these inside the functions that need them: {bad}"


def test_vllm_only_lazily_inside_the_vllm_backend():
    for path in files("workers") + files("orchestrator") + files("analysis"):
        for module, top in imports(path):
            if module == "vllm":
                assert path.name == "vllm_backend.py" and not top, path


def test_analysis_stays_free_of_ray_torch_and_models():
    banned = DRIVER_ONLY | {"torch", "transformers", "vllm"}
    bad = [
        (p.relative_to(ROOT), m) for p in files("analysis") for m, _ in imports(p) if m in banned
    ]
    assert not bad, bad


def test_workers_and_analysis_do_not_import_the_driver():
    for package, banned in (
        ("workers", {"orchestrator", "analysis"}),
        ("analysis", {"orchestrator"}),
    ):
        bad = [
            (p.relative_to(ROOT), m) for p in files(package) for m, _ in imports(p) if m in banned
        ]
        assert not bad, bad


def test_the_parser_sees_nested_and_module_level_imports(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("import ray\nfrom a.b import c\ndef f():\n    import vllm\n")
    assert imports(source) == [("ray", True), ("a", True), ("vllm", False)]
