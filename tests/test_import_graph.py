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
    functions too (a function-level import is how a load-time cycle is usually hidden).
    Modules of subpackages are named by their dotted path below the package
    ("stages.generation"; a subpackage's __init__ by its own name, "stages")."""
    name = package.name
    paths = {module_name(package, p): p for p in sorted(package.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        deps: set[str] = set()
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree) if lazy else tree.body:
            if isinstance(node, ast.Import):
                deps |= {
                    a.name[len(name) + 1 :] for a in node.names if a.name.startswith(f"{name}.")
                }
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == name or node.module.startswith(f"{name}."):
                    inner = node.module[len(name) + 1 :]
                    # from orchestrator import plan; from orchestrator.stages import scoring
                    deps |= {f"{inner}.{a.name}".lstrip(".") for a in node.names}
                    if inner:
                        deps.add(inner)
        graph[module] = (deps & set(paths)) - {module}
    return graph


def module_name(package: Path, path: Path) -> str:
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


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
    assert {"executor", "actors", "pipeline", "errors", "config", "stage", "stages.scoring"} <= set(
        graph
    )
    order = list(graphlib.TopologicalSorter(graph).static_order())  # CycleError on a cycle
    lazy = module_graph(ROOT / "orchestrator", lazy=True)
    list(graphlib.TopologicalSorter(lazy).static_order())
    runs = {"pipeline", "router_stage", "__main__"}  # the runs: plan, run pools, finish
    stages = {m for m in graph if m.startswith("stages.")}
    # The executor knows actors, not the stages: it imports no stage, worker or run.
    assert not lazy["executor"] & {"actors", "stage", *stages, *runs}
    # A stage is the protocol filled in: it knows no run, and the protocol knows no stage.
    assert not lazy["stage"] & {"actors", *stages, *runs}
    for module in stages:
        assert not lazy[module] & runs, module
    # The main run and the router update share stages, not each other.
    assert "pipeline" not in lazy["router_stage"] and "router_stage" not in lazy["pipeline"]
    assert order.index("executor") < order.index("stage") < order.index("stages.generation")
    assert order.index("stages.generation") < order.index("pipeline")


def test_the_check_finds_a_cycle(tmp_path):
    package = tmp_path / "orchestrator"
    package.mkdir()
    (package / "a.py").write_text("from orchestrator.b import f\n")
    (package / "b.py").write_text("from orchestrator import a\n\ndef f():\n    import os\n")
    (package / "c.py").write_text("def g():\n    from orchestrator import a\n")
    (package / "sub").mkdir()
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "d.py").write_text("from orchestrator.sub import e\nimport orchestrator.c\n")
    (package / "sub" / "e.py").write_text("from orchestrator import sub\n")
    assert module_graph(package)["sub.d"] == {"sub", "sub.e", "c"}
    assert module_graph(package)["sub.e"] == {"sub"}
    for path in (package / "sub").iterdir():
        path.unlink()
    (package / "sub").rmdir()
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


def top_level_imports(package: Path) -> set[str]:
    """The project's top-level packages that any module of `package` imports, anywhere."""
    project = {"orchestrator", "workers", "analysis", "tools"}
    found: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found & project - {package.name}


def test_the_packages_are_floors_and_tools_are_imported_by_no_run():
    """workers/ at the bottom, analysis/ above it, orchestrator/ on top; tools/ use them all
    and nothing imports tools/ (they are not installed)."""
    assert top_level_imports(ROOT / "workers") == set()
    assert top_level_imports(ROOT / "analysis") == {"workers"}
    assert top_level_imports(ROOT / "orchestrator") == {"workers", "analysis"}
    assert "orchestrator" not in top_level_imports(ROOT / "tools")


def test_workers_are_split_by_concern():
    """Scoring, generation and the router update import the shared floor, not each other
    (the scoring CLI and the router update may read generation's data sets)."""
    graph = module_graph(ROOT / "workers", lazy=True)
    for module, deps in graph.items():
        if module.startswith("scoring"):
            assert not {d for d in deps if d.startswith(("generation", "router"))}, module
        if module.startswith("generation"):
            assert not {d for d in deps if d.startswith(("scoring", "router"))}, module
