"""The packages depend one way: data <- parallel <- pretrain <- launch. Every import statement of every
module is read (also those inside functions and under TYPE_CHECKING: a lazy import is still a
dependency), and the package graph must have no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "parallel", "pretrain", "launch")


def imported_modules(path: Path) -> list[str]:
    """The absolute module names `path` imports anywhere in its body; relative imports resolved."""
    package = ["foundry", path.parent.name]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from foundry import pretrain` names the package in the alias, not in the module.
            names += [f"{module}.{alias.name}" for alias in node.names] if module == "foundry" else [module]
    return names


def package_edges() -> dict[tuple[str, str], list[str]]:
    """(importing package, imported package) -> the files that make the edge."""
    edges: dict[tuple[str, str], list[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for name in imported_modules(path):
                parts = name.split(".")
                if len(parts) > 1 and parts[0] == "foundry" and parts[1] in PACKAGES and parts[1] != package:
                    edges.setdefault((package, parts[1]), []).append(str(path.relative_to(REPO)))
    return edges


def find_cycle(edges: dict[tuple[str, str], list[str]]) -> list[str] | None:
    """One cycle of packages, as [a, b, ..., a], or None."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)

    def walk(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        for nxt in graph.get(node, []):
            if found := walk(nxt, path + [node]):
                return found
        return None

    for start in graph:
        if cycle := walk(start, []):
            return cycle
    return None


def test_packages_import_each_other_without_a_cycle():
    edges = package_edges()
    cycle = find_cycle(edges)
    if cycle:
        steps = [f"{a} -> {b} ({', '.join(sorted(set(edges[a, b])))})" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import cycle between packages: " + "; ".join(steps))


def test_each_package_imports_only_those_below_it():
    # The intended order, stricter than acyclic: a package may import only those listed before it.
    below = {p: set(PACKAGES[:i]) for i, p in enumerate(PACKAGES)}
    wrong = {f"{a} -> {b}": sorted(set(files)) for (a, b), files in package_edges().items() if b not in below[a]}
    assert not wrong, f"imports against data <- parallel <- pretrain <- launch: {wrong}"


def test_the_reader_sees_every_kind_of_import(tmp_path):
    # The checks above are only as good as the reader: lazy, aliased, relative and TYPE_CHECKING imports count.
    source = tmp_path / "parallel" / "example.py"
    source.parent.mkdir()
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import foundry.data.stream as s\n"
        "from . import tensor\n"
        "from ..pretrain.config import ModelConfig\n"
        "from foundry import launch\n"
        "if TYPE_CHECKING:\n"
        "    from foundry.pretrain.model import Llama\n"
        "def f():\n"
        "    import foundry.pretrain.kernels\n"
    )
    assert imported_modules(source) == [
        "typing", "foundry.data.stream", "foundry.parallel", "foundry.pretrain.config", "foundry.launch",
        "foundry.pretrain.model", "foundry.pretrain.kernels",
    ]
    assert find_cycle({("parallel", "pretrain"): ["x"], ("pretrain", "parallel"): ["y"]}) in (
        ["parallel", "pretrain", "parallel"], ["pretrain", "parallel", "pretrain"])
    assert find_cycle({("pretrain", "parallel"): ["y"], ("launch", "pretrain"): ["z"]}) is None
