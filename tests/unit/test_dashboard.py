"""The Grafana dashboard and the Prometheus rules query only metrics the code really exports.

The list of real names comes from instantiating CoordinatorMetrics and
AgentMetrics and reading their registries, so renaming a metric in the code
without updating deploy/ fails here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from polyarch.agent.metrics import AgentMetrics
from polyarch.coordinator.metrics import CoordinatorMetrics, FleetSnapshot

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "polyarch-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "polyarch.rules.yml"

# Series Prometheus itself adds to every scrape.
PROMETHEUS_SERIES = {"up"}
# Labels with a small, fixed set of values (`agent` and `instance`: one per machine).
BOUNDED_LABELS = {
    "platform", "mode", "result", "state", "arch", "reason", "kind", "agent", "le",
    "instance", "job", "host",
}  # fmt: skip
UNBOUNDED_LABELS = {"tag", "tags", "digest", "build", "build_id", "id", "job_id", "repository"}

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "inf", "nan",
}  # fmt: skip


def exported_metric_names() -> set[str]:
    """Every series name the coordinator and agent registries expose, as Prometheus sees it."""
    coordinator = CoordinatorMetrics()
    coordinator.watch_fleet()
    coordinator.publish_fleet(
        FleetSnapshot(
            queued_by_platform={"linux/arm64": 2},
            agents_by_state={("ready", "amd64"): 1},
            slots={"builder-1": (2, 1)},
            builds_by_state={"running": 1},
        )
    )
    names: set[str] = set()
    for registry in (coordinator.registry, AgentMetrics(slots=1).registry):
        for family in registry.collect():
            # Labelled metrics yield no samples until first used: expand by type.
            suffixes = {
                "counter": ("_total",),
                "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",),
            }[family.type]
            names.update(family.name + suffix for suffix in suffixes)
            names.update(sample.name for sample in family.samples)
    return names


def recording_rule_names() -> set[str]:
    return set(re.findall(r"^\s*- record:\s*(\S+)\s*$", RULES.read_text(), re.MULTILINE))


def rule_exprs() -> list[str]:
    """The `expr:` of every rule, folded block scalars (`>-`) joined into one line."""
    lines = RULES.read_text().splitlines()
    exprs = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        indent, value = len(m.group(1)), m.group(2).strip()
        if value in (">-", ">", "|", "|-"):
            body = []
            for following in lines[i + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                body.append(following.strip())
            value = " ".join(part for part in body if part)
        exprs.append(value)
    return exprs


def dashboard() -> dict[str, object]:
    data: dict[str, object] = json.loads(DASHBOARD.read_text())
    return data


def panels() -> Iterator[dict[str, object]]:
    for panel in dashboard()["panels"]:  # type: ignore[attr-defined]
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in panels() for t in p.get("targets", [])]  # type: ignore[attr-defined]
    for variable in dashboard()["templating"]["list"]:  # type: ignore[index]
        if variable["type"] == "query":
            exprs.append(variable["definition"])
    return exprs


def metric_names_in(expr: str) -> set[str]:
    """Series names an expression selects (not functions, keywords, labels or durations)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    # label_values(metric, label): the second argument is a label, not a series
    text = re.sub(r"label_values\(\s*([\w:]+)\s*,\s*\w+\s*\)", r"\1", text)
    names = set()
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def grouping_labels(expr: str) -> set[str]:
    labels = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels.update(label.strip() for label in clause.split(",") if label.strip())
    return labels


def test_the_exported_names_are_found() -> None:
    """Guards the derivation itself: a broken collect() must not make every check vacuous."""
    names = exported_metric_names()
    for expected in (
        "polyarch_builds_finished_total", "polyarch_job_duration_seconds_bucket",
        "polyarch_queue_depth", "polyarch_agents", "polyarch_agent_slots_in_use",
        "polyarch_agent_jobs_total", "polyarch_agent_connected",
    ):  # fmt: skip
        assert expected in names
    assert "polyarch_builds_finished" not in names  # a counter is only queryable as _total
    assert {"polyarch:emulated_share:ratio", "polyarch:agent_slots_in_use:ratio"} <= (
        recording_rule_names()
    )


def test_the_expression_parser_finds_series_names() -> None:
    expr = (
        "histogram_quantile(0.9, sum by (platform, le) (rate(polyarch_queue_wait_seconds_bucket"
        '{platform=~"$platform", mode="by"}[$__rate_interval]))) > 300 and on () '
        "(up == 1) unless polyarch:agents:sum_by_arch offset 5m"
    )
    assert metric_names_in(expr) == {
        "polyarch_queue_wait_seconds_bucket", "up", "polyarch:agents:sum_by_arch",
    }  # fmt: skip
    assert grouping_labels(expr) == {"platform", "le"}


def test_every_panel_has_a_title_a_datasource_and_queries() -> None:
    seen = 0
    for panel in panels():
        assert panel.get("title"), panel
        if panel["type"] == "row":
            continue
        seen += 1
        assert panel.get("datasource") == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel[
            "title"
        ]
        targets = panel.get("targets")
        assert targets, panel["title"]
        for target in targets:  # type: ignore[attr-defined]
            assert target.get("expr", "").strip(), panel["title"]
            assert target.get("refId"), panel["title"]
    assert seen >= 10


def test_dashboard_declares_its_datasource_and_platform_variables() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 39  # type: ignore[operator]
    variables = {v["name"]: v for v in board["templating"]["list"]}  # type: ignore[index]
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["platform"]["type"] == "query"
    assert "platform" in variables["platform"]["definition"]
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_covers_what_ops_asked_for() -> None:
    queried = set().union(*(metric_names_in(e) for e in dashboard_exprs()))
    for needed in (
        "polyarch_queue_depth", "polyarch:queue_wait_seconds:p90_by_platform",
        "polyarch:job_duration_seconds:p50_by_platform_mode", "polyarch:emulated_share:ratio",
        "polyarch_builds_finished_total", "polyarch_job_requeues_total", "polyarch_agents",
        "polyarch:agent_slots_in_use:ratio", "polyarch_index_assembly_seconds_bucket",
        "polyarch_registry_request_errors_total", "polyarch_context_bytes_received_total",
    ):  # fmt: skip
        assert needed in queried, f"no panel queries {needed}"


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_queries_use_only_exported_metrics_and_bounded_labels(source: str) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else rule_exprs()
    assert exprs
    known = exported_metric_names() | recording_rule_names() | PROMETHEUS_SERIES
    for expr in exprs:
        unknown = metric_names_in(expr) - known
        assert not unknown, f"{source} queries {sorted(unknown)}, which nothing exports: {expr}"
        labels = grouping_labels(expr)
        assert not labels & UNBOUNDED_LABELS, f"{source} groups by an unbounded label: {expr}"
        assert labels <= BOUNDED_LABELS, f"{source} groups by {sorted(labels)}: {expr}"
