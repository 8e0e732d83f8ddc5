"""The layout is the architecture: data flows one way and no package imports one built on it."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import covidcxr

SRC = Path(covidcxr.__file__).parent
#: A package may import packages of its own level or below (shared helpers are level 0 too).
LEVEL = {"errors": 0, "paths": 0, "files": 0, "progress": 0, "plotting": 0, "_lazy": 0, "covidcxr": 0,
         "data": 1, "models": 2, "training": 3, "evaluation": 3, "explain": 3, "serving": 4, "audit": 4, "cli": 5,
         "__main__": 5}


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every covidcxr import of every module, function-level (lazy) imports included."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            graph[_module(path)].update(n for n in names if n.split(".")[0] == "covidcxr")
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_no_package_imports_a_higher_layer():
    offenders = [f"{m} imports {i}" for m, imported in _imports().items() for i in imported
                 if LEVEL[_package(i)] > LEVEL[_package(m)]]
    assert not offenders


def test_packages_of_one_level_do_not_import_each_other_both_ways():
    edges = {(_package(m), _package(i)) for m, imported in _imports().items() for i in imported}
    both_ways = sorted({tuple(sorted(e)) for e in edges if e[0] != e[1] and (e[1], e[0]) in edges})
    assert not both_ways


def test_no_module_import_cycles():
    imports = _imports()
    graph = {m: {i for i in imported if i in imports} for m, imported in imports.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt == node or nxt.startswith(node + "."):
                continue  # a package importing its own submodules (re-exports) is not a cycle
            if state.get(nxt) == 1 and not node.startswith(nxt + "."):
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles


def test_no_source_file_over_400_lines():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert {k: v for k, v in sizes.items() if v > 400} == {}
