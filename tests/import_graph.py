"""The first-party import graph, read from source with :mod:`ast` (nothing is imported or run).

Every ``import``/``from ... import`` counts, wherever it stands: module level, inside functions, under
``if TYPE_CHECKING``. Relative imports are resolved against the importing module. The contract
itself (which package may import which) lives in tests/test_import_contract.py; this module only
finds edges and checks them against rules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Edge:
    """One import statement's target: ``source`` (module) imports ``target`` (module or module.name)."""

    source: str
    target: str
    path: Path
    line: int
    names: tuple[str, ...] = ()  # the names of a ``from target import a, b``; empty for ``import target``

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root)}:{self.line}"


@dataclass(frozen=True)
class Forbidden:
    """Modules under ``source`` must not import anything under any of ``targets``."""

    source: str
    targets: tuple[str, ...]
    why: str


def is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of a relative ``from`` import (``level`` dots) inside ``module``."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def edges_of_file(root: Path, path: Path) -> Iterator[Edge]:
    module = module_name(root, path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Edge(module, alias.name, path, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                target = _resolve(module, path.name == "__init__.py", node.level, node.module)
            yield Edge(module, target, path, node.lineno, tuple(alias.name for alias in node.names))


def import_edges(root: Path, packages: Iterable[str]) -> list[Edge]:
    """Every import statement in the ``.py`` files of ``packages`` (folders directly under ``root``)."""
    edges: list[Edge] = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            edges.extend(edges_of_file(root, path))
    return edges


def imported(edge: Edge) -> tuple[str, ...]:
    """What an edge may import: its target, and for ``from package import name`` each ``package.name``
    too (the name may be a submodule: ``from ctp_node.node import work`` imports ``ctp_node.node.work``)."""
    return (edge.target, *(f"{edge.target}.{name}" for name in edge.names if name != "*"))


def forbidden_edges(edges: Iterable[Edge], rules: Sequence[Forbidden]) -> list[tuple[Edge, Forbidden]]:
    """Edges that break a rule (an edge inside the forbidden package itself never does)."""
    found = []
    for edge in edges:
        for rule in rules:
            if not is_under(edge.source, rule.source):
                continue
            if any(
                is_under(target, t) and not is_under(edge.source, t) for target in imported(edge) for t in rule.targets
            ):
                found.append((edge, rule))
    return found


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(edges: Iterable[Edge], first_party: Sequence[str]) -> list[Edge]:
    """``from X import _name`` or ``import X._module`` where X is a first-party module other than the
    importer: private means private to the defining module, so a package's ``__init__`` is no exception."""
    found = []
    for edge in edges:
        if not any(is_under(edge.target, p) for p in first_party) or edge.target == edge.source:
            continue
        if any(is_private(part) for part in edge.target.split(".")) or any(is_private(n) for n in edge.names):
            found.append(edge)
    return found
