"""Import structure of gswarm: no cycles, no private names across modules, layers kept apart.

Reads every module under gswarm/ with `ast` (nothing is imported). What counts as an import:

- every `import` / `from ... import` statement, also inside functions (a lazy import that dodges a
  cycle is still a cycle), but not inside an `if TYPE_CHECKING:` block;
- `from gswarm.x import y` is an edge to gswarm.x, and to gswarm.x.y when that is a module;
  relative imports are resolved; a package's `__init__` is a node of its own (named like the package).

The layering rules are the tables below; edit them there.

Module patterns used in the tables: "gswarm.head*" is gswarm.head and everything under it (not
gswarm.headless); any other pattern is an fnmatch pattern on the dotted name ("gswarm.cli.*run*").
"""

from __future__ import annotations

import ast
import fnmatch
import itertools
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = "gswarm"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / ROOT

# --- layering rules ---------------------------------------------------------------------------------

HEAD = "gswarm.head*"
AGENT = "gswarm.agent*"
CLI = "gswarm.cli*"

# Modules that head, agent, cli and client all build on (including ones that do not exist yet).
CORE = [
    "gswarm.protocol*",
    "gswarm.devices*",
    "gswarm.errors*",
    "gswarm.config*",
    "gswarm.registry*",
    "gswarm.workflow*",
    "gswarm.sources*",
    "gswarm.grants*",
    "gswarm.ops*",
    "gswarm.api*",
    "gswarm.states*",
    "gswarm.policy*",
]

# (importers, modules they must not import)
FORBIDDEN: list[tuple[list[str], list[str]]] = [
    (CORE, [HEAD, AGENT, CLI, "gswarm.client", "gswarm.store"]),
    ([HEAD], [AGENT]),
    ([AGENT], [HEAD]),
    ([CLI], [HEAD, AGENT, "gswarm.store"]),
    (["gswarm.client"], [HEAD, AGENT, CLI]),
]

# (importers, modules they may import even though FORBIDDEN says otherwise)
ALLOWED: list[tuple[list[str], list[str]]] = [
    # The process-running part of the cli starts the head and the agent.
    (
        ["gswarm.cli", "gswarm.cli.*process*", "gswarm.cli.*run*"],
        ["gswarm.head.app", "gswarm.head.server", "gswarm.agent.main", "gswarm.agent.serving"],
    ),
]

# --- the checker -------------------------------------------------------------------------------------


def matches(module: str, pattern: str) -> bool:
    if pattern.endswith("*") and "*" not in pattern[:-1] and not pattern.endswith(".*"):
        base = pattern[:-1]
        return module == base or module.startswith(base + ".")
    return fnmatch.fnmatchcase(module, pattern)


def matches_any(module: str, patterns: Iterable[str]) -> bool:
    return any(matches(module, p) for p in patterns)


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    lazy: bool  # inside a function

    def where(self) -> str:
        return f"{self.source}:{self.line}{' (lazy)' if self.lazy else ''}"


@dataclass(frozen=True)
class PrivateImport:
    source: str
    target: str
    name: str
    line: int


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, modules: Collection[str]) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.edges: list[Edge] = []
        self.private: list[PrivateImport] = []
        self.depth = 0

    def _edge(self, target: str, node: ast.stmt) -> None:
        if target == ROOT or target.startswith(ROOT + "."):
            self.edges.append(Edge(self.module, target, node.lineno, self.depth > 0))

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.visit(node.test)
            for stmt in node.body:
                self.visit(stmt)
        for stmt in node.orelse:
            self.visit(stmt)

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._edge(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".")
            base = ".".join(parts[: len(parts) - (node.level - 1)])
            target = f"{base}.{node.module}" if node.module else base
        else:
            target = node.module or ""
        if not (target == ROOT or target.startswith(ROOT + ".")):
            return
        submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in self.modules]
        # `from . import sub` inside the package's own __init__ is not a self-import.
        if not (target == self.module and len(submodules) == len(node.names)):
            self._edge(target, node)
        for sub in submodules:
            self._edge(sub, node)
        for alias in node.names:
            name = alias.name
            if not name.startswith("_") or name.startswith("__") or target == self.module:
                continue
            # A private submodule is private to its package, so siblings may use it.
            if f"{target}.{name}" in self.modules and self.module.startswith(target + "."):
                continue
            self.private.append(PrivateImport(self.module, target, name, node.lineno))


def collect(
    sources: Mapping[str, str], packages: Collection[str] = ()
) -> tuple[list[Edge], list[PrivateImport]]:
    """Edges and private-name imports of `sources` (dotted module name -> source text).

    A module is a package (its source is the __init__) if it is in `packages` or has submodules.
    """
    edges: list[Edge] = []
    private: list[PrivateImport] = []
    for module, text in sorted(sources.items()):
        is_package = module in packages or any(m.startswith(module + ".") for m in sources)
        collector = _ImportCollector(module, is_package, sources)
        collector.visit(ast.parse(text, filename=module))
        edges += collector.edges
        private += collector.private
    return edges, private


def _strongly_connected(graph: Mapping[str, Collection[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
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
                result.append(sorted(component))
    return result


def _shortest_cycle(graph: Mapping[str, Collection[str]], start: str, within: set[str]) -> list[str]:
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in within:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is not on a cycle")


def find_cycles(edges: Iterable[Edge], modules: Collection[str]) -> list[str]:
    graph: dict[str, set[str]] = {m: set() for m in modules}
    where: dict[tuple[str, str], list[Edge]] = {}
    for e in edges:
        if e.target in graph:
            graph[e.source].add(e.target)
            where.setdefault((e.source, e.target), []).append(e)
    problems = []
    for component in _strongly_connected(graph):
        members = set(component)
        if len(component) == 1 and component[0] not in graph[component[0]]:
            continue
        seen: set[tuple[str, ...]] = set()
        # One shortest cycle through each member of the component.
        for start in component:
            cycle = _shortest_cycle(graph, start, members)
            ring = cycle[:-1]
            i = ring.index(min(ring))
            canonical = tuple(ring[i:] + ring[:i])
            if canonical in seen:
                continue
            seen.add(canonical)
            path = [*canonical, canonical[0]]
            lines = ", ".join("/".join(e.where() for e in where[(a, b)]) for a, b in itertools.pairwise(path))
            problems.append(f"import cycle: {' -> '.join(path)}  [{lines}]")
    return problems


def find_private(private: Iterable[PrivateImport]) -> list[str]:
    return [
        f"private import: {p.source}:{p.line} imports {p.name} from {p.target}"
        for p in sorted(private, key=lambda p: (p.source, p.line, p.name))
    ]


def find_layering(edges: Iterable[Edge]) -> list[str]:
    problems = []
    for e in sorted(set(edges), key=lambda e: (e.source, e.line, e.target)):
        for importers, forbidden in FORBIDDEN:
            if not (matches_any(e.source, importers) and matches_any(e.target, forbidden)):
                continue
            if any(matches_any(e.source, who) and matches_any(e.target, what) for who, what in ALLOWED):
                continue
            rule = f"{' / '.join(importers)} must not import {' / '.join(forbidden)}"
            problems.append(f"layering: {e.where()} imports {e.target}  ({rule})")
            break
    return problems


def check(sources: Mapping[str, str], packages: Collection[str] = ()) -> dict[str, list[str]]:
    edges, private = collect(sources, packages)
    return {
        "cycles": find_cycles(edges, sources),
        "private": find_private(private),
        "layering": find_layering(edges),
    }


def read_package(directory: Path = PACKAGE_DIR) -> tuple[dict[str, str], set[str]]:
    sources: dict[str, str] = {}
    packages: set[str] = set()
    for path in sorted(directory.rglob("*.py")):
        parts = list(path.relative_to(directory.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
            packages.add(".".join(parts))
        sources[".".join(parts)] = path.read_text(encoding="utf-8")
    return sources, packages


def _report(kind: str, problems: list[str]) -> str:
    return f"{len(problems)} {kind} violation(s):\n  " + "\n  ".join(problems)


# --- the tests ---------------------------------------------------------------------------------------


def _real() -> dict[str, list[str]]:
    sources, packages = read_package()
    assert "gswarm.protocol" in sources and "gswarm.head" in packages
    return check(sources, packages)


def test_no_import_cycles() -> None:
    problems = _real()["cycles"]
    assert not problems, _report("cycle", problems)


def test_no_private_imports() -> None:
    problems = _real()["private"]
    assert not problems, _report("private import", problems)


def test_layering() -> None:
    problems = _real()["layering"]
    assert not problems, _report("layering", problems)


SYNTHETIC = {
    "gswarm": "",
    "gswarm.protocol": "from gswarm.head.app import Head\n",
    "gswarm.errors": "",
    "gswarm.head": "from . import app\n",
    "gswarm.head.app": (
        "from typing import TYPE_CHECKING\n"
        "from gswarm.errors import BadRequest\n"
        "if TYPE_CHECKING:\n"
        "    from gswarm.head.jobs import Job\n"
        "def setup():\n"
        "    from .routes import setup_routes\n"
    ),
    "gswarm.head.routes": "from gswarm.head.app import Head\n",
    "gswarm.head.jobs": (
        "from gswarm.head.app import Head\n"
        "from .routes import _query_int, __all__\n"
        "from gswarm.head import _util\n"
        "from gswarm.agent.main import Agent\n"
    ),
    "gswarm.head._util": "",
    "gswarm.agent": "",
    "gswarm.agent.main": "from gswarm.head._util import x\n",
    "gswarm.cli": "def run():\n    from gswarm.head.app import Head\n    from gswarm.agent.main import A\n",
    "gswarm.cli.tables": "import gswarm.store\n",
    "gswarm.cli.run_head": "from gswarm.head.app import HeadServer\nfrom gswarm.head.jobs import x\n",
    "gswarm.store": "",
    "gswarm.client": "from gswarm.cli import main\n",
}


def test_checker_finds_each_kind_of_violation() -> None:
    found = check(SYNTHETIC)
    assert found["cycles"] == [
        "import cycle: gswarm.head.app -> gswarm.head.routes -> gswarm.head.app  "
        "[gswarm.head.app:6 (lazy), gswarm.head.routes:1]"
    ]
    assert found["private"] == [
        "private import: gswarm.head.jobs:2 imports _query_int from gswarm.head.routes"
    ]
    layering = [line.split("  (")[0] for line in found["layering"]]
    assert layering == [
        "layering: gswarm.agent.main:1 imports gswarm.head._util",
        "layering: gswarm.cli.run_head:2 imports gswarm.head.jobs",
        "layering: gswarm.cli.tables:1 imports gswarm.store",
        "layering: gswarm.client:1 imports gswarm.cli",
        "layering: gswarm.head.jobs:4 imports gswarm.agent.main",
        "layering: gswarm.protocol:1 imports gswarm.head.app",
    ]
    assert "gswarm.protocol* / " in found["layering"][-1]


def test_checker_reports_self_loops_and_private_names_from_outside_the_package() -> None:
    found = check(
        {"gswarm": "", "gswarm.a": "import gswarm.a\n", "gswarm.b": "from gswarm.a import _x as y\n"}
    )
    assert found["cycles"] == ["import cycle: gswarm.a -> gswarm.a  [gswarm.a:1]"]
    assert found["private"] == ["private import: gswarm.b:1 imports _x from gswarm.a"]
