"""The Grafana dashboard asks only for metrics the coordinator exports; the monitoring profile
is wired to the files it names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import promql_parser
import pytest
import yaml

from coordinator.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
# Grafana fills these in before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}


def exported_names() -> set[str]:
    """Every series name the coordinator's registry can expose (histograms as their parts)."""
    return {
        family.name + suffix
        for family in Metrics("any").registry.collect()
        for suffix in SUFFIXES[family.type]
    }


def metric_names(node) -> set[str]:
    """The metric names a parsed PromQL expression selects, walking the whole tree."""
    if isinstance(node, promql_parser.VectorSelector):
        return {node.name}
    if isinstance(node, promql_parser.MatrixSelector):
        return metric_names(node.vector_selector)
    children = []
    for attribute in ("expr", "param", "lhs", "rhs"):
        children.append(getattr(node, attribute, None))
    children += getattr(node, "args", None) or []
    return set().union(*(metric_names(c) for c in children if c is not None))


def queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs, "a dashboard with no queries"
    return exprs


def variable_metrics(dashboard: dict) -> set[str]:
    """Metrics named by template variables such as `label_values(metric, label)`."""
    names = set()
    for variable in dashboard["templating"]["list"]:
        query = (
            variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        )
        names |= set(re.findall(r"label_values\((\w+),", query))
    return names


@pytest.fixture(scope="module", params=DASHBOARDS, ids=[d.name for d in DASHBOARDS])
def dashboard(request) -> dict:
    return json.loads(request.param.read_text())


def test_every_query_parses_and_uses_only_exported_metrics(dashboard):
    exported = exported_names()
    assert "disagg_time_to_first_token_seconds_bucket" in exported  # the collection works
    used = set(variable_metrics(dashboard))
    for expr in queries(dashboard):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        names = metric_names(promql_parser.parse(expr))
        assert names, f"no metric in {expr!r}"
        used |= names
    assert not used - exported, f"not exported by the coordinator: {sorted(used - exported)}"


def test_a_misspelt_metric_would_be_caught():
    names = metric_names(promql_parser.parse("sum(rate(disagg_time_to_first_token[1m])) / 2"))
    assert names == {"disagg_time_to_first_token"} and not names <= exported_names()


def test_dashboard_covers_the_headline_metrics(dashboard):
    text = " ".join(queries(dashboard))
    for name in ("time_to_first_token", "time_between_tokens", "requests_waiting",
                 "kv_blocks_used", "requests_total"):  # fmt: skip
        assert f"disagg_{name}" in text, name


def test_datasource_provisioned_under_the_uid_the_dashboard_uses(dashboard):
    provisioned = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uids = {d["uid"] for d in provisioned["datasources"]}
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] in uids, panel["title"]


def test_monitoring_profile_scrapes_the_coordinator_and_mounts_what_exists():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            assert (ROOT / volume.split(":")[0]).exists(), volume
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (target,) = config["scrape_configs"][0]["static_configs"][0]["targets"]
    coordinator = services["coordinator"]["command"]
    host, port = target.split(":")
    assert host == "coordinator" and port == coordinator[coordinator.index("--http-port") + 1]


def test_compose_publishes_the_http_and_kserve_grpc_ports():
    coordinator = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"][
        "coordinator"
    ]
    command = coordinator["command"]
    published = set(coordinator["ports"])
    for flag in ("--http-port", "--grpc-port"):
        port = command[command.index(flag) + 1]
        assert f"{port}:{port}" in published, flag
