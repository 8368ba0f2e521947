"""The package layout keeps its shape: imports point down the layers, no circle, no module too long.

The graph is read from the source (every `import` of a miocli module: at module level, inside
functions and under TYPE_CHECKING alike), so a lazy import cannot hide an arrow. docs/architecture.md
draws the same layers.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "miocli"

# Top to bottom: a room may import only rooms on a lower line (and itself). "" is the package itself
# (`miocli/__init__.py`, the public names), which the edges may use and which only reaches into core.
LAYERS: list[tuple[str, ...]] = [
    ("__main__",),
    ("cli",),
    ("scale",),
    ("serve",),
    ("", "output"),
    ("core",),
    ("engines",),
    ("model",),
    ("codecs", "media"),
    ("protocol", "errors", "quiet"),
]
RANK = {room: depth for depth, rooms in enumerate(LAYERS) for room in rooms}
EDGES = ("cli", "scale", "serve")
MAX_CODE_LINES = 400
MAX_LOOSE_MODULES = 10


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def known(name: str) -> str | None:
    """The miocli module `name` refers to (a module, or the module that defines the name)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "miocli" or target.startswith("miocli."):
                resolved = known(target)
                if resolved is not None and resolved != module:
                    found.add(resolved)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def room(module: str) -> str:
    """The top-level package or module under miocli a module belongs to ("" for miocli itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_room_has_a_layer():
    assert sorted({room(m) for m in MODULES} - set(RANK)) == []


def test_imports_point_down_the_layers():
    upward = [f"{module} imports {target}" for module, targets in sorted(GRAPH.items()) for target in sorted(targets)
              if room(target) != room(module) and RANK[room(target)] <= RANK[room(module)]]
    assert upward == []


def test_nothing_below_an_edge_imports_one_and_core_reaches_no_edge():
    below_edges = [m for m in MODULES if RANK[room(m)] > max(RANK[e] for e in EDGES)]
    assert [(m, sorted(t for t in GRAPH[m] if room(t) in EDGES)) for m in below_edges
            if any(room(t) in EDGES for t in GRAPH[m])] == []
    assert RANK["core"] > max(RANK[e] for e in EDGES)


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle_between_modules():
    assert find_circle(GRAPH) is None


def test_no_import_circle_between_packages():
    packages: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        here = module.rpartition(".")[0] if MODULES[module].name != "__init__.py" else module
        for target in targets:
            there = target.rpartition(".")[0] if MODULES[target].name != "__init__.py" else target
            if there != here and not here.startswith(there + "."):
                packages.setdefault(here, set()).add(there)
    assert find_circle(packages) is None


def code_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.lstrip().startswith("#"))


def test_no_module_passes_the_size_limit():
    assert {m: code_lines(p) for m, p in MODULES.items() if code_lines(p) > MAX_CODE_LINES} == {}


def test_few_modules_stay_loose_at_the_top():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= MAX_LOOSE_MODULES, loose


PACKAGES = sorted(m for m, p in MODULES.items() if p.name == "__init__.py" and m.count(".") == 1)


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_says_what_it_is_for_and_what_it_may_import(package: str):
    """The docstring's last line, "May import: a, b.", names rooms below it and every room it imports."""
    doc = ast.get_docstring(ast.parse(MODULES[package].read_text(encoding="utf-8"))) or ""
    match = re.search(r"^May import: (?P<rooms>[^\n]*?)\.?$", doc, re.MULTILINE)
    assert doc and match, f"{package}: no docstring with a 'May import: …' line"
    named = {"" if r == "miocli" else r.removeprefix("miocli.")
             for r in (part.strip().strip("`") for part in match["rooms"].split(","))} - {"nothing"}
    here = room(package)
    assert sorted(r for r in named if r not in RANK or RANK[r] <= RANK[here]) == []
    used = {room(t) for m in MODULES if room(m) == here for t in GRAPH[m]} - {here}
    assert sorted(used - named) == []
