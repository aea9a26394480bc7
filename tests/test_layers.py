"""The library's import graph: no cycles, and arrows point down only (DESIGN.md's layering)."""

from __future__ import annotations

import ast

import pytest

from tests.helpers import REPO


def import_graph() -> dict[str, set[str]]:
    """Module -> library modules it imports (at any level, TYPE_CHECKING blocks included)."""
    mods = {}
    for package in ("diloco", "demo_optim"):
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[mod] |= {n for n in names if n in mods and n != mod}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    done: set[str] = set()

    def visit(mod: str, path: list[str]) -> None:
        if mod in path:
            pytest.fail("import cycle: " + " -> ".join([*path[path.index(mod) :], mod]))
        if mod in done:
            return
        for dep in sorted(graph[mod]):
            visit(dep, [*path, mod])
        done.add(mod)

    for mod in sorted(graph):
        visit(mod, [])


# package -> library packages it must never import
FORBIDDEN = {
    "demo_optim": ("diloco",),
    "diloco.comm": ("diloco.exchange", "diloco.adversary", "diloco.algorithms", "diloco.build",
                    "diloco.trainer", "diloco.sync", "diloco.asynchronous"),
    "diloco.adversary": ("diloco.exchange", "diloco.comm", "diloco.algorithms", "diloco.build",
                         "diloco.trainer"),
    "diloco.exchange": ("diloco.algorithms", "diloco.build", "diloco.trainer", "diloco.sync"),
    "diloco.algorithms": ("diloco.exchange", "diloco.build", "diloco.trainer", "diloco.sync"),
}  # fmt: skip


def test_arrows_point_down():
    bad = [
        f"{mod} imports {dep}"
        for mod, deps in import_graph().items()
        for package, banned in FORBIDDEN.items()
        if mod == package or mod.startswith(package + ".")
        for dep in deps
        if any(dep == b or dep.startswith(b + ".") for b in banned)
    ]
    assert not bad, bad
