"""Imports run one way: a new back-arrow fails here, naming file and line.

- ``model`` (the network and diffusion maths) imports neither ``training`` nor ``ctp_node``;
- ``training`` imports ``model`` and nothing of the node: phantom studies reach the trainer through
  ``training.datasets.StudySource``, which the CLI fills;
- inside the node, ``series`` (one series' path) knows nothing of the running node, the phantom, the
  evaluation or the CLI; ``node`` nothing of phantom, evaluation or CLI; ``perfusion`` and ``phantom``
  nothing of the node, evaluation or CLI (and ``perfusion`` nothing of the phantom);
- inside ``node``, every module lives in one of three folders: ``receive`` (what takes series in) and
  ``work`` (what processes and sends) import ``shared`` (the job store, the spool and results layouts,
  the retry policy, the transport) and never each other; ``shared`` imports neither. The two sides meet
  only in the job store and the spool;
- the job store's tables (``ctp_node.node.shared.job_tables``) and SQL are the store's own: the web
  layer and the command line read through ``ctp_node.node.shared.jobs_read`` (plain dataclasses) and
  import neither the tables nor SQLAlchemy, so a schema change cannot break the status page silently;
  the web layer (the STOW-RS server and the status page) imports nothing of the work side either;
- no library code imports the tests or the benchmarks;
- no module imports another module's private (``_name``) names.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.import_graph import (
    Edge,
    Forbidden,
    forbidden_edges,
    import_edges,
    imported,
    is_private,
    is_under,
    module_name,
    private_imports,
)

REPO = Path(__file__).resolve().parents[1]
CHECKED = ("ctp_node", "model", "training", "benchmarks")
FIRST_PARTY = (*CHECKED, "tests")
NODE = "ctp_node.node"
NODE_RECEIVE, NODE_WORK, NODE_SHARED = f"{NODE}.receive", f"{NODE}.work", f"{NODE}.shared"
NODE_SIDES = (NODE_RECEIVE, NODE_WORK, NODE_SHARED)

RULES = (
    Forbidden("model", ("ctp_node", "training", "benchmarks", "tests"), "the model is a library of its own"),
    Forbidden("training", ("ctp_node", "benchmarks", "tests"), "phantom studies reach the trainer as a StudySource"),
    Forbidden(
        "ctp_node.series",
        ("ctp_node.node", "ctp_node.phantom", "ctp_node.evaluation", "ctp_node.cli"),
        "a series' path does not know who runs it or where its test data comes from",
    ),
    Forbidden(
        "ctp_node.node",
        ("ctp_node.phantom", "ctp_node.evaluation", "ctp_node.cli"),
        "the running node does not depend on test data, evaluation or its command line",
    ),
    Forbidden(
        "ctp_node.perfusion",
        ("ctp_node.phantom", "ctp_node.node", "ctp_node.evaluation", "ctp_node.cli"),
        "perfusion maps are computed from any study, the phantom's included",
    ),
    Forbidden(
        "ctp_node.phantom",
        ("ctp_node.node", "ctp_node.evaluation", "ctp_node.cli"),
        "the phantom generates studies; it does not run or judge the node",
    ),
    Forbidden(
        NODE_RECEIVE,
        (NODE_WORK,),
        "the receiving side hands series on through the job store and the spool (ctp_node.node.shared), "
        "never to the work side directly",
    ),
    Forbidden(
        NODE_WORK,
        (NODE_RECEIVE,),
        "the work side finds what was received in the job store and the spool (ctp_node.node.shared), "
        "never in the receivers",
    ),
    Forbidden(NODE_SHARED, (NODE_RECEIVE, NODE_WORK), "what both sides share depends on neither"),
    Forbidden(
        "ctp_node.web",
        ("ctp_node.node.shared.job_tables", "sqlalchemy"),
        "the status page reads the job store through its read side (ctp_node.node.shared.jobs_read), never its tables",
    ),
    Forbidden(
        "ctp_node.web",
        (NODE_WORK,),
        "the web layer receives (STOW-RS) and shows; it neither processes nor sends (it queues work in the store)",
    ),
    Forbidden(
        "ctp_node.cli",
        ("ctp_node.node.shared.job_tables", "sqlalchemy"),
        "the commands read the job store through its read side (ctp_node.node.shared.jobs_read), never its tables",
    ),
    Forbidden("ctp_node", ("benchmarks", "tests"), "library code does not depend on its tests or benchmarks"),
)


def private_part(edge: Edge) -> str:
    names = [n for n in edge.names if is_private(n)]
    return f"{', '.join(names)} from {edge.target}" if names else edge.target


def report(lines: list[str]) -> str:
    """One offence per line, by file and line number."""

    def key(line: str) -> tuple[str, int]:
        where = line.split(": ", 1)[0]
        path, _, number = where.rpartition(":")
        return path, int(number)

    return "\n".join(sorted(lines, key=key))


def test_no_back_arrows_between_packages():
    edges = import_edges(REPO, CHECKED)
    found = forbidden_edges(edges, RULES)
    if found:
        pytest.fail(
            "imports against the one-way contract:\n"
            + report([f"{e.where(REPO)}: {e.source} imports {crossing(e, rule)} ({rule.why})" for e, rule in found])
        )


def crossing(edge: Edge, rule: Forbidden) -> str:
    """What ``edge`` imports that ``rule`` forbids (``from ctp_node.node import work``: ctp_node.node.work)."""
    return next((m for m in imported(edge) if any(is_under(m, t) for t in rule.targets)), edge.target)


def test_no_module_imports_a_private_name_of_another():
    found = private_imports(import_edges(REPO, CHECKED), FIRST_PARTY)
    if found:
        pytest.fail(
            "private names imported across modules (make them public or move them):\n"
            + report([f"{e.where(REPO)}: {e.source} imports {private_part(e)}" for e in found])
        )


def is_test_module(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last.startswith("test_") or last == "conftest"


def test_no_module_imports_a_test_module_or_a_conftest():
    """Shared test code lives in plain helper modules (tests/ports.py, tests/series/helpers.py, ...);
    fixtures in conftest.py reach tests through pytest, never through an import."""
    edges = import_edges(REPO, (*CHECKED, "tests"))
    found = [e for e in edges if is_under(e.target, "tests") and is_test_module(e.target) and e.target != e.source]
    if found:
        pytest.fail(
            "test modules or conftest imported (move what they share into a helper module):\n"
            + report([f"{e.where(REPO)}: {e.source} imports {e.target}" for e in found])
        )


def test_every_module_of_the_node_lives_in_one_of_its_three_folders():
    """A module directly under ``ctp_node/node/`` (or in a fourth folder) would escape the direction rules."""
    node = REPO / "ctp_node" / "node"
    outside = [
        path.relative_to(REPO).as_posix()
        for path in sorted(node.rglob("*.py"))
        if path != node / "__init__.py" and not any(is_under(module_name(REPO, path), side) for side in NODE_SIDES)
    ]
    assert outside == [], f"put these under ctp_node/node/receive, work or shared: {outside}"


def test_the_node_rules_catch_each_crossing(tmp_path):
    """The real RULES on a copy of the node's three folders, each importing across in a way the contract
    forbids (module level, function level, relative, ``from package import module``): every crossing is
    reported, the imports of ``shared`` from either side are not."""
    files = {
        "ctp_node/__init__.py": "",
        "ctp_node/node/__init__.py": "",
        "ctp_node/node/shared/__init__.py": "",
        "ctp_node/node/shared/jobs.py": "",
        "ctp_node/node/shared/store.py": "from ctp_node.node.receive import scp\n",  # shared -> receive
        "ctp_node/node/shared/layout.py": "def f():\n    from ..work.worker import Worker\n",  # shared -> work
        "ctp_node/node/receive/__init__.py": "",
        "ctp_node/node/receive/scp.py": "from ctp_node.node.shared.jobs import JobStore\n"
        "from ctp_node.node.work.scu import send_files\n",  # receive -> work
        "ctp_node/node/work/__init__.py": "",
        "ctp_node/node/work/worker.py": "from ctp_node.node.shared import jobs\nfrom ctp_node.node import receive\n",
        "ctp_node/node/work/scu.py": "import ctp_node.node.receive.scp\n",  # work -> receive
        "ctp_node/web/__init__.py": "",
        "ctp_node/web/app.py": "from ctp_node.node.work import send_stage\n",  # web -> work
    }
    root = write(tmp_path, files)
    found = forbidden_edges(import_edges(root, ("ctp_node",)), RULES)
    assert sorted((e.where(root), rule.source) for e, rule in found) == [
        ("ctp_node/node/receive/scp.py:2", NODE_RECEIVE),
        ("ctp_node/node/shared/layout.py:2", NODE_SHARED),
        ("ctp_node/node/shared/store.py:1", NODE_SHARED),
        ("ctp_node/node/work/scu.py:1", NODE_WORK),
        ("ctp_node/node/work/worker.py:2", NODE_WORK),
        ("ctp_node/web/app.py:1", "ctp_node.web"),
    ]


# --- the checker itself, on a small synthetic package ------------------------------------------------


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def package(tmp_path):
    return write(
        tmp_path,
        {
            "lib/__init__.py": "",
            "lib/core.py": "import numpy as np\nfrom lib import util\n",
            "lib/util.py": "def helper():\n    return 1\n\n\ndef _hidden():\n    return 2\n",
            "app/__init__.py": "",
            "app/main.py": "from lib.core import np\n",
        },
    )


LIB_RULES = (Forbidden("lib", ("app",), "lib is below app"),)


def test_a_clean_package_has_no_forbidden_edges(package):
    edges = import_edges(package, ("lib", "app"))
    assert {(e.source, e.target) for e in edges} >= {("lib.core", "lib"), ("app.main", "lib.core")}
    assert forbidden_edges(edges, LIB_RULES) == []
    assert private_imports(edges, ("lib", "app")) == []


def test_a_function_level_back_arrow_is_reported_with_file_and_line(package):
    write(package, {"lib/util.py": "def helper():\n    x = 1\n    from app.main import np\n    return np, x\n"})
    found = forbidden_edges(import_edges(package, ("lib", "app")), LIB_RULES)
    assert [(e.where(package), e.source, e.target) for e, _ in found] == [("lib/util.py:3", "lib.util", "app.main")]


def test_relative_and_type_checking_imports_count(package):
    write(
        package,
        {
            "lib/sub/__init__.py": "from ...app import main\n",
            "lib/late.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import app.main\n",
        },
    )
    found = forbidden_edges(import_edges(package, ("lib", "app")), LIB_RULES)
    assert sorted((e.where(package), e.target) for e, _ in found) == [
        ("lib/late.py:3", "app.main"),
        ("lib/sub/__init__.py:1", "app"),
    ]


def test_a_package_may_import_inside_itself_but_not_a_sibling_under_a_rule(tmp_path):
    root = write(tmp_path, {"p/__init__.py": "", "p/a/x.py": "from p.a import y\nfrom p.b import z\n"})
    rules = (Forbidden("p.a", ("p.b",), "a is below b"),)
    found = forbidden_edges(import_edges(root, ("p",)), rules)
    assert [e.target for e, _ in found] == ["p.b"]


def test_private_names_and_private_modules_from_another_module_are_reported(package):
    write(
        package,
        {"app/main.py": "from lib.util import helper, _hidden\nimport lib._impl\nfrom lib import __version__\n"},
    )
    found = private_imports(import_edges(package, ("lib", "app")), ("lib", "app"))
    assert [(e.where(package), e.target) for e in found] == [
        ("app/main.py:1", "lib.util"),
        ("app/main.py:2", "lib._impl"),
    ]


def test_a_third_party_package_can_be_forbidden_by_its_prefix(package):
    """The web layer's rule names SQLAlchemy itself: an edge to a package outside the checked ones counts."""
    write(package, {"app/main.py": "from sqlalchemy.exc import SQLAlchemyError\nimport sqlalchemy\n"})
    rules = (Forbidden("app", ("sqlalchemy",), "app reads through lib"),)
    found = forbidden_edges(import_edges(package, ("lib", "app")), rules)
    assert [(e.where(package), e.target) for e, _ in found] == [
        ("app/main.py:1", "sqlalchemy.exc"),
        ("app/main.py:2", "sqlalchemy"),
    ]


def test_private_names_of_third_party_modules_are_not_this_contract(package):
    write(package, {"app/main.py": "from numpy import _globals\n"})
    assert private_imports(import_edges(package, ("lib", "app")), ("lib", "app")) == []


def import_circle(edges: Iterable[Edge]) -> list[str]:
    """One circle of module imports among ``edges`` (``[a, b, ..., a]``), or [] when there is none."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done (no circle through it)
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[module] = 2
        return []

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return []


def test_the_phantoms_modules_import_one_another_without_a_circle():
    """phantom/config.py closed config -> motion -> anatomy -> config through a type-only import (issue
    24): such a circle works only while nobody evaluates the annotation. The package's own __init__
    (which imports its modules) is left out."""
    inner = [
        e
        for e in import_edges(REPO, ("ctp_node",))
        if e.source.startswith("ctp_node.phantom.") and e.target.startswith("ctp_node.phantom.")
    ]
    assert import_circle(inner) == []
