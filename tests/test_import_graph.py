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
    functions too (a function-level import is how a load-time cycle is usually hidden)."""
    name = package.name
    modules = {p.stem for p in package.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted(package.glob("*.py")):
        deps: set[str] = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree) if lazy else tree.body:
            if isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith(f"{name}.")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == name:  # from orchestrator import plan
                    deps |= {a.name for a in node.names if a.name in modules}
                elif node.module.startswith(f"{name}."):
                    deps.add(node.module.split(".")[1])
        graph[path.stem] = deps & modules
    return graph


def test_the_orchestrator_modules_import_without_a_cycle():
    graph = module_graph(ROOT / "orchestrator")
    assert {"executor", "actors", "pipeline", "errors"} <= set(graph)
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
