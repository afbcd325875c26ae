"""No import cycle between trustplane's packages: a package imports only packages below it.

The layers are described in docs/architecture.md ("Layers"); the analysis is ``tests/import_layers.py``
(run ``python -m tests.import_layers`` to see the whole graph and any cycle).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.import_layers import Import, cycles, describe, graph, imports, layers

SOURCE = Path(__file__).resolve().parents[1] / "src" / "trustplane"

#: Package edges that still close a cycle, each with the import that makes it and what removes it.
#: The goal is an empty set: never add to it, remove an entry when its import goes.
ALLOWED_CYCLE_EDGES: frozenset[tuple[str, str]] = frozenset()


def _without_allowed(edges: list[Import]) -> list[Import]:
    return [e for e in edges if (e.source, e.target) not in ALLOWED_CYCLE_EDGES]


def test_no_import_cycle_between_packages() -> None:
    edges = _without_allowed(imports(SOURCE))
    found = cycles(graph(edges))
    assert not found, "\n".join(describe(edges, component) for component in found)


def test_every_allowed_edge_still_exists_and_still_closes_a_cycle() -> None:
    """An allow-list entry whose import went away (or no longer closes a cycle) must be removed."""
    edges = imports(SOURCE)
    present = {(e.source, e.target) for e in edges}
    assert present >= ALLOWED_CYCLE_EDGES, ALLOWED_CYCLE_EDGES - present
    for source, target in ALLOWED_CYCLE_EDGES:
        component = next(c for c in cycles(graph(edges)) if source in c)
        assert target in component, (source, target)


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_the_analysis_finds_a_cycle_and_names_its_imports(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "low/__init__.py": "",
            # a lazy import inside a function is still an edge
            "low/a.py": "def f():\n    from pkg.high.b import g\n    return g\n",
            "high/__init__.py": "",
            "high/b.py": "from ..low import a\n\ndef g():\n    return a\n",
            "top.py": "import pkg.high.b\nfrom pkg import low\n",
        },
    )
    edges = imports(root)
    found = cycles(graph(edges))
    assert found == [["pkg.high", "pkg.low"]]
    message = describe(edges, found[0])
    assert "pkg.high -> pkg.low (pkg.high.b:1)" in message
    assert "pkg.low -> pkg.high (pkg.low.a:2)" in message


@pytest.mark.parametrize(
    "guard",
    ["if TYPE_CHECKING:", "if typing.TYPE_CHECKING:"],
)
def test_type_checking_imports_are_not_edges_but_their_else_is(tmp_path: Path, guard: str) -> None:
    root = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "low.py": f"import typing\nfrom typing import TYPE_CHECKING\n{guard}\n    import pkg.high\n",
            "high.py": "import pkg.low\n",
        },
    )
    assert cycles(graph(imports(root))) == []
    (root / "low.py").write_text(f"{guard}\n    pass\nelse:\n    import pkg.high\n")
    assert cycles(graph(imports(root))) == [["pkg.high", "pkg.low"]]


def test_an_attribute_of_the_root_package_is_not_a_node(tmp_path: Path) -> None:
    """``from pkg import __version__`` depends on the root, not on a package named ``__version__``;
    ``from pkg import settings`` names the module ``pkg.settings``."""
    root = _tree(
        tmp_path,
        {
            "__init__.py": "__version__ = '1'\n",
            "settings.py": "from pkg import __version__\n",
            "app.py": "from pkg import settings\n",
        },
    )
    assert {(e.source, e.target) for e in imports(root)} == {("pkg.app", "pkg.settings")}


def test_layers_put_each_package_above_what_it_imports(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "errors.py": "",
            "store/__init__.py": "from pkg import errors\n",
            "feature/__init__.py": "from pkg.store import x\nfrom pkg import errors\n",
        },
    )
    assert layers(graph(imports(root))) == [["pkg.errors"], ["pkg.store"], ["pkg.feature"]]
