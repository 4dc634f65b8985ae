"""No import cycle among the driver's modules: each orchestrator/ module can be imported first,
on its own, and none needs a function-level import to dodge a cycle at load time."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_graph(package: Path, *, lazy: bool = False) -> dict[str, set[str]]:
    """{module: modules of the same package it imports at module level}; with `lazy`, inside
    functions too (a function-level import is how a load-time cycle is usually hidden). A
    subpackage (orchestrator/config/) is one module: its files' imports together."""
    name = package.name
    subpackages = {p.parent for p in package.glob("*/__init__.py")}
    modules = {p.stem for p in package.glob("*.py")} | {p.name for p in subpackages}
    graph: dict[str, set[str]] = {}
    for path in sorted([*package.glob("*.py"), *package.glob("*/*.py")]):
        node_name = path.parent.name if path.parent in subpackages else path.stem
        if path.parent != package and path.parent not in subpackages:
            continue
        deps = imported(path, name, lazy) & modules
        graph[node_name] = graph.get(node_name, set()) | (deps - {node_name})
    return graph


def imported(path: Path, name: str, lazy: bool) -> set[str]:
    """The first component after `name.` of every `name.` import in `path`."""
    deps: set[str] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree) if lazy else tree.body:
        if isinstance(node, ast.Import):
            deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith(f"{name}.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == name:  # from orchestrator import plan
                deps |= {a.name for a in node.names}
            elif node.module.startswith(f"{name}."):
                deps.add(node.module.split(".")[1])
    return deps


def test_the_config_package_is_layered_schema_compose_validate():
    """orchestrator/config/: the schema imports neither of the others, composition only the
    schema; the checks come last. Only orchestrator.errors and orchestrator.wandb_run (the
    wandb group's schema) are imported from the rest of the driver."""
    package = ROOT / "orchestrator" / "config"
    graph = {p.stem: imported_from(p, "orchestrator.config") for p in package.glob("*.py")}
    assert graph["schema"] == set() and graph["compose"] == {"schema"}
    assert graph["validate"] == {"schema", "compose"}
    assert graph["__init__"] == {"schema", "compose", "validate"}
    assert graph["describe"] == {"schema"}
    outside = set().union(*(imported(p, "orchestrator", True) for p in package.glob("*.py")))
    assert outside == {"config", "errors", "wandb_run"}


def imported_from(path: Path, prefix: str) -> set[str]:
    """The modules of `prefix` (e.g. orchestrator.config) that `path` imports, anywhere."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        node.module.removeprefix(f"{prefix}.")
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(f"{prefix}.")
    }


def test_the_orchestrator_modules_import_without_a_cycle():
    graph = module_graph(ROOT / "orchestrator")
    assert {"executor", "actors", "pipeline", "errors", "config"} <= set(graph)
    order = list(graphlib.TopologicalSorter(graph).static_order())  # CycleError on a cycle
    list(graphlib.TopologicalSorter(module_graph(ROOT / "orchestrator", lazy=True)).static_order())
    # The executor knows actors, not the stages: it imports neither the workers nor them.
    assert not graph["executor"] & {"actors", "pipeline", "router_stage"}
    assert order.index("executor") < order.index("pipeline")


def test_the_check_finds_a_cycle(tmp_path):
    package = tmp_path / "orchestrator"
    package.mkdir()
    (package / "a.py").write_text("from orchestrator.b import f\n")
    (package / "b.py").write_text("from orchestrator import a\n\ndef f():\n    import os\n")
    (package / "c.py").write_text("def g():\n    from orchestrator import a\n")
    graph = module_graph(package)
    assert graph == {"a": {"b"}, "b": {"a"}, "c": set()}
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(graph).static_order())
    # A cycle dodged by a function-level import is one too.
    (package / "b.py").write_text("def f():\n    from orchestrator import c\n")
    assert module_graph(package) == {"a": {"b"}, "b": set(), "c": set()}
    assert module_graph(package, lazy=True) == {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    with pytest.raises(graphlib.CycleError):
        list(graphlib.TopologicalSorter(module_graph(package, lazy=True)).static_order())
