"""deploy/grafana/ctp-node.json: loads as a Grafana dashboard, imports asking for its data source, and
every query names metrics the node exports, taken from a receiver's and a worker's live registries
(NodeMetrics and the webhook counters), not a list."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ctp_node.config import Settings, StorageSettings
from ctp_node.node.receive.receiver import Receiver
from ctp_node.node.shared.jobs import JobStore
from ctp_node.node.shared.prometheus import NodeMetrics
from tests.deploy.tools import REPO

promql_parser = pytest.importorskip("promql_parser", reason="pip install promql-parser (the test extra)")

DASHBOARD = REPO / "deploy" / "grafana" / "ctp-node.json"
# Grafana's variables, replaced by something of the same kind so that the query parses as PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$worker": ".*"}
SERIES_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created")}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    """Every series name the serve process exposes, from its registry's exposition text."""
    folder = tmp_path_factory.mktemp("grafana")
    settings = Settings(storage=StorageSettings(data_dir=folder))
    store = JobStore(settings.database_url)
    store.record_instance("1.2.3", "1.2.3.4", "SCANNER")  # so that the job-state gauge has a sample
    receiver = Receiver(settings, store)
    try:
        text = generate_latest(receiver.metrics.registry).decode()
    finally:
        receiver.notifier.close()
    worker = NodeMetrics()  # what `ctp-node worker` serves with --metrics-port
    worker.describe_worker("host-1234", "cuda:0")
    text += generate_latest(worker.registry).decode()
    names = set()
    for family in text_string_to_metric_families(text):
        # a labelled counter has no sample until first counted: its series names follow from its type
        names.update(family.name + suffix for suffix in SERIES_SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    assert {"ctp_node_received_instances_total", "ctp_node_jobs", "ctp_node_webhook_notifications_total"} <= names
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(items: list[dict]) -> Iterator[dict]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def expressions() -> list[str]:
    found = [t["expr"] for p in panels(dashboard()["panels"]) for t in p.get("targets", []) if "expr" in t]
    assert found, "the dashboard has no query"
    return found


def as_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know in {expr!r}"
    return expr


def selectors(node: object) -> Iterator[object]:
    """The vector selectors of a parsed PromQL expression, wherever they sit."""
    if isinstance(node, promql_parser.VectorSelector):
        yield node
    elif isinstance(node, promql_parser.MatrixSelector):
        yield node.vector_selector
    elif isinstance(node, promql_parser.BinaryExpr):
        yield from selectors(node.lhs)
        yield from selectors(node.rhs)
    elif isinstance(node, promql_parser.AggregateExpr):
        yield from selectors(node.expr)
        if node.param is not None:
            yield from selectors(node.param)
    elif isinstance(node, promql_parser.Call):
        for arg in node.args:
            yield from selectors(arg)
    elif isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
        yield from selectors(node.expr)


def metric_names(expr: str) -> list[str]:
    found = list(selectors(promql_parser.parse(as_promql(expr))))
    assert found, f"{expr!r} selects no metric"
    names = [s.name for s in found]
    assert all(names), f"{expr!r} selects a metric by something other than its name"
    return names


def test_the_dashboard_is_grafana_json():
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    ids = [p["id"] for p in panels(board["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(board["panels"]):
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"


def test_import_asks_for_the_prometheus_data_source():
    """Grafana's import asks for each of __inputs and puts the answer where ${NAME} stands: here the
    datasource variable's default, which every panel and query uses."""
    board = dashboard()
    (source,) = board["__inputs"]
    assert source["type"] == "datasource" and source["pluginId"] == "prometheus"
    placeholder = "${" + source["name"] + "}"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == placeholder
    used = set(re.findall(r"\$\{(DS_[A-Z_]+)\}", DASHBOARD.read_text()))
    assert used == {source["name"]}, "every ${DS_...} placeholder must be an input, and the input used"
    assert {"type": "datasource", "id": "prometheus"}.items() <= next(
        r for r in board["__requires"] if r["type"] == "datasource"
    ).items()


def test_the_worker_variable_lists_workers_not_the_receiver(exported):
    """The receiver exports the processing and delivery series too (at zero): listing the targets that
    have them would offer the receiver as a worker. ctp_node_worker_info only a worker exports."""
    variable = next(v for v in dashboard()["templating"]["list"] if v["name"] == "worker")
    query = variable["query"]["query"]
    metric = re.fullmatch(r"label_values\((\w+),\s*instance\)", query).group(1)
    assert metric == "ctp_node_worker_info" and metric in exported
    assert metric not in generate_latest(NodeMetrics().registry).decode()  # NodeMetrics as the receiver has it
    worker_panels = [
        t["expr"] for p in panels(dashboard()["panels"]) for t in p.get("targets", []) if "$worker" in t.get("expr", "")
    ]
    assert any("ctp_node_processing_seconds" in e for e in worker_panels)
    assert not any("ctp_node_jobs" in e or "received_instances" in e for e in worker_panels), "receiver series"


def test_every_query_names_only_metrics_the_node_exports(exported):
    for expr in expressions():
        unknown = [name for name in metric_names(expr) if name not in exported]
        assert not unknown, f"{expr!r} names {unknown}, which the node does not export"


def test_the_variables_query_an_exported_metric(exported):
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
        assert match, f"variable {variable['name']}: {query!r} is not label_values(metric, label)"
        assert match.group(1) in exported


def test_the_check_itself_catches_a_wrong_name(exported):
    assert metric_names('sum(rate(ctp_node_received_instances_total{instance=~"$worker"}[$__rate_interval]))') == [
        "ctp_node_received_instances_total"
    ]
    assert "ctp_node_received_instances" not in exported  # the counter's series carry _total
    with pytest.raises(AssertionError, match="other than its name"):
        metric_names('rate({__name__="ctp_node_sent_series_total"}[5m])')


def test_the_dashboard_file_is_where_the_docs_say(tmp_path: Path):
    readme = (REPO / "README.md").read_text()
    assert "deploy/grafana/ctp-node.json" in readme
