"""Package-level import graph of a source tree, and its cycles (Tarjan's strongly connected components).

A node is the first component under the root package: `trustplane.oauth` for every module in
`trustplane/oauth/`, and a top-level module such as `trustplane.settings` is its own node. Every
`import` and `from ... import` counts, at module level and inside functions alike (a lazy import still
ties the two packages together at run time); only imports under `if TYPE_CHECKING:` are left out,
because they never run.

Run `python -m tests.import_layers [src/trustplane]` to print the edges, the layers and any cycle.
"""

from __future__ import annotations

import ast
import itertools
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Import:
    """One import statement that makes `source` depend on `target` (both nodes)."""

    source: str
    target: str
    module: str
    line: int

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.module}:{self.line})"


def module_name(root: Path, path: Path) -> str:
    """`root/oauth/http.py` -> `trustplane.oauth.http`; a package's `__init__` is the package."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def node_of(root_name: str, dotted: str) -> str | None:
    """The node a dotted module name belongs to, or None if it is outside the tree."""
    parts = dotted.split(".")
    if parts[0] != root_name:
        return None
    return ".".join(parts[:2])


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import node that can run: the bodies of `if TYPE_CHECKING:` are skipped (not their else)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names an import statement loads, relative imports resolved against `module`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".")
        if not is_package:
            package.pop()
        if node.level > 1:
            package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base]) if base else ".".join(package)
    # `from pkg import name` may load the submodule `pkg.name`; a node is decided by the first two
    # components, so only `from trustplane import x` depends on the imported names.
    return [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"] or [base]


def imports(root: Path) -> list[Import]:
    """Every import in the tree under `root` that crosses from one node to another."""
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(root, path) for path in paths}
    found: set[Import] = set()
    for path in paths:
        module = module_name(root, path)
        source = node_of(root.name, module)
        assert source is not None
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for statement in _runtime_imports(tree):
            for dotted in _targets(module, path.name == "__init__.py", statement):
                # `from trustplane import __version__` names an attribute of the root, not a module
                loaded = dotted if dotted in modules else dotted.rpartition(".")[0]
                target = (
                    node_of(root.name, loaded)
                    if isinstance(statement, ast.ImportFrom)
                    else node_of(root.name, dotted)
                )
                if target is not None and target != source and target != root.name:
                    found.add(Import(source, target, module, statement.lineno))
    return sorted(found, key=lambda edge: (edge.source, edge.target, edge.module, edge.line))


def graph(edges: list[Import]) -> dict[str, set[str]]:
    successors: dict[str, set[str]] = {}
    for edge in edges:
        successors.setdefault(edge.source, set()).add(edge.target)
        successors.setdefault(edge.target, set())
    return successors


def strongly_connected(successors: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the strongly connected components, each sorted, in reverse topological order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(successors[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(successors):
        if node not in index:
            visit(node)
    return components


def cycles(successors: dict[str, set[str]]) -> list[list[str]]:
    """The components with more than one node: each is at least one import cycle between packages."""
    return [c for c in strongly_connected(successors) if len(c) > 1]


def shortest_cycle(successors: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first node, as `[a, b, ..., a]`, to name in a failure."""
    start = component[0]
    members = set(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for successor in sorted(successors[node] & members):
            if successor == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if successor not in came_from:
                came_from[successor] = node
                queue.append(successor)
    raise ValueError(f"{component} is not a cycle")


def describe(edges: list[Import], component: list[str]) -> str:
    """A component, one concrete cycle through it, and the import lines that make that cycle."""
    successors = graph(edges)
    path = shortest_cycle(successors, component)
    lines = [f"cycle between packages {{{', '.join(component)}}}: {' -> '.join(path)}"]
    for source, target in itertools.pairwise(path):
        lines.extend(
            f"  {edge}" for edge in edges if (edge.source, edge.target) == (source, target)
        )
    return "\n".join(lines)


def layers(successors: dict[str, set[str]]) -> list[list[str]]:
    """The nodes by layer: 0 imports nothing in the tree, and each node sits one above the highest
    node it imports. A cycle's members share a layer (they are one component of the condensation)."""
    component_of = {n: tuple(c) for c in strongly_connected(successors) for n in c}
    level: dict[tuple[str, ...], int] = {}
    for component in dict.fromkeys(component_of.values()):  # reverse topological: callees first
        below = {component_of[s] for n in component for s in successors[n]} - {component}
        level[component] = 1 + max((level[b] for b in below), default=-1)
    out: list[list[str]] = [[] for _ in range(1 + max(level.values(), default=-1))]
    for component, index in level.items():
        out[index].extend(component)
    return [sorted(row) for row in out]


def main(argv: list[str]) -> int:
    root = Path(argv[0] if argv else "src/trustplane")
    edges = imports(root)
    successors = graph(edges)
    for source in sorted(successors):
        print(f"{source} -> {', '.join(sorted(successors[source])) or '-'}")
    for index, row in enumerate(layers(successors)):
        print(f"layer {index}: {', '.join(n.removeprefix(root.name + '.') for n in row)}")
    found = cycles(successors)
    for component in found:
        print(describe(edges, component))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
