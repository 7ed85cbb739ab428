"""The package layout docs/design.md §6 describes: ``passes/`` holds onnx_ir passes only, nothing else is named
like one, and no module imports itself back through others at import time."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import onnx_ir as ir

import bayesq_onnx
import bayesq_onnx.passes

ROOT = Path(bayesq_onnx.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package: dotted name -> (file, is a package's __init__)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return out


def _import_time_edges(name: str, path: Path, is_package: bool, modules) -> set[str]:
    """The package modules ``name`` imports when it is imported (imports inside functions and classes run
    later, so they cannot close a cycle at import time)."""
    base = name.split(".") if is_package else name.split(".")[:-1]
    edges: set[str] = set()
    stack = list(ast.parse(path.read_text()).body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Import):
            edges |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = ".".join(base[:len(base) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else node.module or ""
            edges.add(target)
            edges |= {f"{target}.{a.name}" for a in node.names}
        else:
            stack.extend(ast.iter_child_nodes(node))
    # importing a.b.c runs a and a.b first (except the packages ``name`` itself lives in, already importing)
    edges |= {".".join(e.split(".")[:i]) for e in edges for i in range(1, e.count(".") + 1)}
    return {e for e in edges if e in modules and e != name and not name.startswith(e + ".")}


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _import_time_edges(name, path, is_package, modules) for name, (path, is_package) in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for nxt in sorted(graph[name]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [name, nxt] if nxt in path else [name, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_passes_holds_only_onnx_ir_passes():
    for info in pkgutil.iter_modules(bayesq_onnx.passes.__path__):
        module = importlib.import_module(f"bayesq_onnx.passes.{info.name}")
        classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
        assert classes, module.__name__
        for cls in classes:
            assert issubclass(cls, ir.passes.PassBase) and cls.__name__.endswith("Pass"), cls


def test_only_onnx_ir_passes_are_named_pass():
    for name, (path, _) in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Pass"):
                assert name.startswith("bayesq_onnx.passes."), f"{name}.{node.name} is not an onnx_ir pass"
