"""The package's layers (DESIGN.md, "Layers"): its import graph, every function-level import
included, has no cycle, no stage imports another stage, and no shared layer imports a stage
(only the entry points, the CLI and the pipeline, do)."""

from __future__ import annotations

import ast
from pathlib import Path

import psoups_ray

PACKAGE = Path(psoups_ray.__file__).parent
STAGES = ("base", "feedback", "rewards", "policies", "tune", "evaluate", "report", "serve")
ENTRY_POINTS = ("psoups_ray.__main__", "psoups_ray.pipeline")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its body. ``from pkg import sub``
    of a submodule depends on ``pkg.sub``, not on ``pkg``'s own ``__init__``."""
    known = modules()

    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                subs = [f"{node.module}.{a.name}" for a in node.names]
                inner = [sub for sub in subs if sub in known]
                targets = inner if len(inner) == len(subs) else [node.module, *inner]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == "psoups_ray":
                    resolved = owner(target)
                    if resolved and resolved != name:
                        edges.add(resolved)
        graph[name] = edges
    return graph


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_the_scan_sees_the_whole_package():
    graph = import_graph()
    assert {f"psoups_ray.{stage}" for stage in STAGES} <= set(graph)
    assert "psoups_ray.runtime.sampling" in graph["psoups_ray.runtime.evaluator"]
    # function-level imports count: the pipeline imports every stage inside functions
    assert {"psoups_ray.tune.stage", "psoups_ray.base.stage"} <= graph["psoups_ray.pipeline"]
    assert "psoups_ray.runtime.evaluator" in graph["psoups_ray.runtime.pool"]  # in an actor


def test_no_stage_imports_another_and_no_shared_layer_imports_a_stage():
    crossings = []
    for source, targets in import_graph().items():
        if source in ENTRY_POINTS:
            continue
        for target in targets:
            if stage_of(target) is not None and stage_of(target) != stage_of(source):
                crossings.append(f"{source} -> {target}")
    assert not crossings, "imports across the layers:\n  " + "\n  ".join(sorted(crossings))


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)
