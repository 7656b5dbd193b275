"""Component sub-packages form a DAG (issue 12): parsed imports, no module imported."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

COMPONENTS = Path(__file__).resolve().parents[2] / "components"
KNOWN_CYCLES: set[frozenset[str]] = set()   # none: keep it that way


def package_imports() -> dict[str, set[str]]:
    """Sub-package -> the other component sub-packages its modules import (lazy ones too)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for f in COMPONENTS.rglob("*.py"):
        parts = f.relative_to(COMPONENTS).parts
        if len(parts) < 2:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                if name.startswith("retro.components.") and len(name.split(".")) > 2:
                    target = name.split(".")[2]
                    if target != parts[0] and (COMPONENTS / target).is_dir():
                        edges[parts[0]].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> set[frozenset[str]]:
    """The node sets of every simple cycle (found by DFS from each node)."""
    found = set()
    for start in edges:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    found.add(frozenset(path))
                elif nxt not in path:
                    stack.append((nxt, path + [nxt]))
    return found


def test_cycle_finder_finds_a_constructed_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {frozenset("abc")}
    assert cycles({"a": {"b"}, "b": set()}) == set()


def test_component_packages_import_without_cycles():
    edges = package_imports()
    assert "retrieval" in edges and "training" in edges   # the parser sees real imports
    new = cycles(edges) - KNOWN_CYCLES
    assert not new, f"import cycles between component sub-packages: {sorted(map(sorted, new))}"


def test_the_builtin_module_list_names_every_module_that_registers():
    """components/builtin.py imports the modules that register components: a module with a
    `@register(` / `@stage(` that the list misses would silently not exist for specs."""
    import re

    from retro.components.builtin import MODULES

    registering = set()
    for f in COMPONENTS.rglob("*.py"):
        if re.search(r"^@(register|stage)\(", f.read_text(), re.M):
            rel = f.relative_to(COMPONENTS).with_suffix("")
            registering.add("retro.components." + ".".join(rel.parts))
    assert registering, "the scan found no registering module"
    assert sorted(registering - set(MODULES)) == []
    assert sorted(m for m in MODULES if m not in registering) == []
