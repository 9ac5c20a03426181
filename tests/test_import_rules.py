"""The import rules of sfdbench, checked by reading every module's imports with ``ast``.

``ALLOWED`` below is the single source of the layer rules; ``docs/architecture.md`` shows the same
table and points here. Every ``import`` / ``from ... import`` anywhere in a module counts, including
imports inside functions (lazy imports) and under ``if TYPE_CHECKING:``, and so does
``importlib.import_module("sfdbench....")`` with a constant name. Relative imports are resolved
against the importing module's package.

A module's layer is the first component of its name after ``sfdbench.``: a sub-package (diffusion,
networks, metrics, methods, suites, harness, report, baselines) or a top-level module (records, io,
errors, cli, __main__); ``sfdbench/__init__.py`` is the layer ``sfdbench`` (the package root).

Run ``python tests/test_import_rules.py`` to print every (layer -> layer) import of the tree, ok or FORBIDDEN.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "sfdbench"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

ANYTHING = "*"
ROOT = PACKAGE  # the layer of sfdbench/__init__.py (it holds __version__)

# layer -> the other layers it may import (every layer may import its own modules).
ALLOWED: dict[str, frozenset[str] | str] = {
    "errors": frozenset(),
    "io": frozenset({"errors"}),
    "parallel": frozenset({"errors"}),
    "diffusion": frozenset({"errors"}),
    "networks": frozenset({"diffusion", "io", "errors"}),
    "metrics": frozenset({"networks", "io", "errors"}),
    "methods": frozenset({"diffusion", "networks", "io", "parallel", "errors"}),
    "suites": frozenset({"diffusion", "networks", "metrics", "io", "errors"}),
    "records": frozenset({"io", "errors"}),
    "baselines": frozenset({"io", "errors"}),
    "harness": frozenset({"diffusion", "networks", "methods", "metrics", "suites", "records", "io", "parallel",
                          "errors"}),
    "report": frozenset({"records", "baselines", "io", "errors"}),
    "cli": ANYTHING,
    "__main__": ANYTHING,
    ROOT: ANYTHING,
}

# The package root only defines __version__, and importing any sfdbench module runs it anyway: every
# layer may import it except the two at the bottom, which import nothing above themselves.
ROOT_IMPORTABLE_FROM = frozenset(ALLOWED) - {"diffusion", "errors"}

# diffusion is pure math: besides its own modules only the error types.
DIFFUSION_MAY_IMPORT = ("sfdbench.diffusion", "sfdbench.errors")


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, e.g. "sfdbench.methods.sfd"
    target: str  # imported sfdbench module (or package), e.g. "sfdbench.harness.accounting"
    line: int
    lazy: bool  # inside a function / class body / conditional, not at module top level

    def where(self) -> str:
        return f"{self.source}:{self.line}{' (lazy)' if self.lazy else ''}"


def module_files() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def layer_of(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == PACKAGE, module
    return parts[1] if len(parts) > 1 else ROOT


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve_relative(module: str, level: int, name: str | None) -> str:
    """``from <level dots><name> import ...`` inside ``module`` -> absolute module name."""
    package = module if _is_package(module) else module.rpartition(".")[0]
    parts = package.split(".")
    if level - 1 >= len(parts):
        raise ValueError(f"{module}: relative import beyond the top-level package")
    base = parts[: len(parts) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str):
        self.module = module
        self.depth = 0  # > 0 inside a def / class / if / try / with / loop: a lazy or conditional import
        self.edges: list[Edge] = []

    def _add(self, target: str, node: ast.AST) -> None:
        if _in_package(target):
            self.edges.append(Edge(self.module, target, node.lineno, self.depth > 0))

    def generic_visit(self, node: ast.AST) -> None:
        nested = not isinstance(node, ast.Module) and isinstance(node, (ast.stmt, ast.ExceptHandler)) and any(
            isinstance(value, list) and value and isinstance(value[0], ast.stmt)
            for _, value in ast.iter_fields(node))
        self.depth += nested
        super().generic_visit(node)
        self.depth -= nested

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve_relative(self.module, node.level, node.module) if node.level else node.module
        if base is None:
            return
        submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
        names_only = [alias for alias in node.names if f"{base}.{alias.name}" not in MODULES]
        # ``from pkg import submodule`` imports the submodule (and runs pkg/__init__); ``from pkg import
        # name`` imports pkg itself. Record the submodules, and the package when a plain name comes from it.
        for target in submodules:
            self._add(target, node)
        if names_only or not submodules:
            self._add(base, node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
        if name in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                self._add(arg.value, node)
        self.generic_visit(node)


def imports_of(module: str) -> list[Edge]:
    path = MODULES[module]
    collector = _Collector(module)
    collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return collector.edges


ALL_EDGES = [edge for module in MODULES for edge in imports_of(module)]


def forbidden(edge: Edge) -> str | None:
    """Why ``edge`` breaks the layer rules, or None when it is allowed."""
    src, dst = layer_of(edge.source), layer_of(edge.target)
    if src not in ALLOWED:
        return f"module in unknown layer {src!r} (add the layer to ALLOWED and to docs/architecture.md)"
    if dst not in ALLOWED:
        return f"imports {edge.target}, which is in no known layer"
    if src == dst or ALLOWED[src] == ANYTHING:
        return None
    if dst == ROOT:
        return None if src in ROOT_IMPORTABLE_FROM else f"{src} -> the package root"
    return None if dst in ALLOWED[src] else f"{src} -> {dst}"


def _report(bad: list[tuple[Edge, str]]) -> str:
    by_rule = defaultdict(list)
    for edge, why in bad:
        by_rule[why].append(f"{edge.where()} imports {edge.target}")
    lines = [f"{len(bad)} import(s) break the layer rules (tests/test_import_rules.py ALLOWED, "
             "docs/architecture.md):"]
    for why in sorted(by_rule):
        lines.append(f"  {why}:")
        lines.extend(f"    {item}" for item in by_rule[why])
    return "\n".join(lines)


def test_the_rules_point_one_way():
    """The table itself is a hierarchy: no two layers may import each other, even indirectly."""
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(layer: str, path: list[str]) -> None:
        if seen.get(layer) == 2:
            return
        assert seen.get(layer) != 1, "ALLOWED has a cycle: " + " -> ".join([*path, layer])
        seen[layer] = 1
        allowed = ALLOWED[layer]
        for below in sorted(allowed if allowed != ANYTHING else ()):
            visit(below, [*path, layer])
        seen[layer] = 2

    for layer in ALLOWED:
        assert ALLOWED[layer] == ANYTHING or ALLOWED[layer] <= set(ALLOWED), f"{layer}: unknown layer in its row"
        visit(layer, [])


def test_every_module_is_in_a_known_layer():
    unknown = sorted(m for m in MODULES if layer_of(m) not in ALLOWED)
    assert not unknown, (f"modules in no layer of ALLOWED: {', '.join(unknown)}; add the layer to "
                         "tests/test_import_rules.py and docs/architecture.md")


def test_imports_follow_the_layer_rules():
    assert MODULES, f"no modules found under {PACKAGE_DIR}"
    bad = [(edge, why) for edge in ALL_EDGES if (why := forbidden(edge)) is not None]
    assert not bad, _report(bad)


def test_diffusion_imports_only_itself_and_errors():
    bad = [edge for edge in ALL_EDGES
           if layer_of(edge.source) == "diffusion"
           and not any(edge.target == allowed or edge.target.startswith(allowed + ".")
                       for allowed in DIFFUSION_MAY_IMPORT)]
    assert not bad, "diffusion must import nothing of sfdbench but sfdbench.diffusion.* and sfdbench.errors:\n" + \
        "\n".join(f"  {edge.where()} imports {edge.target}" for edge in bad)


def _cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for edge in edges:
        if edge.target in MODULES and edge.target != edge.source:
            graph[edge.source].add(edge.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(MODULES):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def _registry_edge(edge: Edge) -> bool:
    """A package's ``__init__`` importing its own submodules (how registries load their entries)."""
    return _is_package(edge.source) and edge.target.startswith(edge.source + ".")


def test_no_import_cycles_between_modules():
    """No two modules import each other, directly or through others, lazy imports included; the one
    exception is a package's ``__init__`` importing its own submodules (registries)."""
    cycles = _cycles([edge for edge in ALL_EDGES if not _registry_edge(edge)])
    lines = []
    for component in cycles:
        members = set(component)
        lines.append("  " + ", ".join(component))
        lines.extend(f"    {edge.where()} imports {edge.target}" for edge in ALL_EDGES
                     if edge.source in members and edge.target in members and not _registry_edge(edge))
    assert not cycles, "import cycles between modules:\n" + "\n".join(lines)


if __name__ == "__main__":
    crossing = sorted({(layer_of(e.source), layer_of(e.target)) for e in ALL_EDGES
                       if layer_of(e.source) != layer_of(e.target)})
    for src, dst in crossing:
        ok = forbidden(Edge(f"{PACKAGE}.{src}" if src != ROOT else PACKAGE,
                            f"{PACKAGE}.{dst}" if dst != ROOT else PACKAGE, 0, False)) is None
        print(f"{src:>10} -> {dst:<10} {'ok' if ok else 'FORBIDDEN'}")
    sys.exit(0)
