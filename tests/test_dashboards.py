"""The Grafana dashboards and Prometheus rules, checked without Grafana.

Structure (ids, layout, datasource, variables, units); every query's PromQL syntax against a
real Prometheus; every panel's query returning data from a real Prometheus scraping a real
local stack; the alert rules with ``promtool check rules`` and ``promtool test rules``.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from nsqjobs.testing import Daemon, Nsq, need_binary, wait_for

from tests.dashboards import (
    ALL,
    DASHBOARDS,
    PROMETHEUS_HINT,
    check_queries,
    panels,
    query,
    start_local_stack,
    start_prometheus,
    submit_mix,
    substitute,
)

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
KNOWN_UNITS = {"ops", "reqps", "s", "short", "percentunit", "Bps"}


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def test_both_dashboards_exist() -> None:
    assert [p.name for p in DASHBOARDS] == ["nsqd.json", "overview.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    board = json.loads(path.read_text())
    found = panels(path)
    ids = [p.id for p in found]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    assert board["uid"] and board["title"]
    # Layout: inside the 24-column grid, no two panels overlapping.
    cells: dict[tuple[int, int], str] = {}
    for p in found:
        g = p.raw["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["x"] + g["w"] <= 24, p.title
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p.title} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p.title
    variables = {v["name"]: v for v in board["templating"]["list"]}
    for v in variables.values():
        assert v["datasource"] == {"type": "prometheus", "uid": "prometheus"}, v["name"]
    for p in found:
        if p.raw["type"] == "row":
            continue
        assert p.expr, f"{p.title} has no query"
        assert p.raw["datasource"]["uid"] == "prometheus", p.title
        assert all(t["datasource"]["uid"] == "prometheus" for t in p.raw["targets"]), p.title
        assert p.unit in KNOWN_UNITS, f"{p.title}: unit {p.unit!r}"
        for expr in p.expr:
            used = set(re.findall(r"\$\{?(\w+)", expr)) - {"__rate_interval"}
            assert used <= set(variables), f"{p.title} uses undefined {used - set(variables)}"


def test_overview_variables_and_datasource() -> None:
    board = json.loads((GRAFANA_DIR / "dashboards" / "overview.json").read_text())
    assert {v["name"] for v in board["templating"]["list"]} == {"task", "queue", "instance"}
    datasource = (GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text()
    assert "uid: prometheus" in datasource and "url: http://prometheus:9090" in datasource
    provider = (GRAFANA_DIR / "provisioning" / "dashboards" / "nsqjobs.yml").read_text()
    assert "path: /var/lib/grafana/dashboards" in provider
    titles = " | ".join(p.title for p in panels(GRAFANA_DIR / "dashboards" / "overview.json"))
    for words in ("accepted", "succeeded", "failed", "retried", "dead-lettered", "Queue depth"):
        assert words in titles
    for words in ("In flight", "duration", "slots busy vs total", "Workers up", "Publish"):
        assert words in titles


def test_ledger_panels_take_the_shared_gauges_once() -> None:
    # Every gateway replica exports the same gauges of the one shared ledger: a sum would count
    # each job once per replica.
    found = panels(GRAFANA_DIR / "dashboards" / "overview.json")
    ledger = [p for p in found if any("nsqjobs_ledger_" in e for e in p.expr)]
    titles = " | ".join(p.title for p in ledger)
    for words in ("by status", "Oldest unfinished", "Re-drives", "Duplicate", "write latency"):
        assert words in titles, titles
    assert "Outcomes read" in titles, titles
    gauges = [
        e
        for p in ledger
        for e in p.expr
        if re.search(r"nsqjobs_ledger_(jobs|oldest_unfinished_age_seconds)\b", e)
    ]
    assert len(gauges) == 2 and all(e.startswith("max") for e in gauges), gauges


@pytest.mark.integration
def test_every_query_parses(stack: ExitStack, tmp_path: Path) -> None:
    # promtool has no parse command: an empty Prometheus answers a bad query with an error.
    url = start_prometheus(stack, tmp_path, {})
    errors = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        exprs = [e for p in panels(path) for e in p.expr]
        exprs += [v["query"]["query"] for v in board["templating"]["list"]]
        for expr in exprs:
            if expr.startswith("label_values("):
                # Grafana's own function: its argument is the PromQL to check.
                expr = expr.removeprefix("label_values(").rpartition(",")[0]
            ok, answer = query(url, substitute(expr, ALL))
            if not ok:
                errors.append(f"{path.name}: {expr}: {answer}")
    ok, _ = query(url, "sum(rate(")
    assert not ok, "a bad query must be refused, or this check proves nothing"
    assert errors == []
    # With nothing scraped, every query is a failure for want of data: the check can fail.
    empty = check_queries(url, DASHBOARDS, ALL)
    assert empty and all("no data" in f for f in empty if "vector(0)" not in f)


def test_alert_rules_pass_promtool() -> None:
    promtool = need_binary("promtool", hint=PROMETHEUS_HINT)
    for argv in (
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
        ["check", "config", "prometheus.yml"],
    ):
        done = subprocess.run(
            [promtool, *argv], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
    alerts = (PROMETHEUS_DIR / "alerts.yml").read_text()
    names = re.findall(r"- alert: (\w+)", alerts)
    assert names == [
        "QueueWithoutConsumer",
        "QueueDepthGrowing",
        "DeadLetters",
        "GatewayErrorRatio",
        "DaemonDown",
        "NoneUp",
        "NsqdDown",
        "NsqjobsOldestUnfinishedJob",
    ]
    assert alerts.count("runbook:") == len(names)
    tests = (PROMETHEUS_DIR / "alerts_test.yml").read_text()
    for name in names:
        assert f"alertname: {name}" in tests, f"{name} has no unit test"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_every_panel_has_data_from_a_local_stack(
    nsq: Nsq, daemons: Callable[..., Daemon], stack: ExitStack, tmp_path: Path
) -> None:
    local = start_local_stack(nsq, tmp_path, stack, daemons)
    submit_mix(local.gateway.url, rounds=3)
    failures: list[str] = []

    def all_have_data() -> bool:
        failures[:] = check_queries(local.prometheus_url, DASHBOARDS, ALL)
        return not failures

    try:
        wait_for(all_have_data, 90, "every panel query to return data", interval=1.0)
    except Exception:
        pytest.fail("panels without data:\n" + "\n".join(failures), pytrace=False)
    up = query(local.prometheus_url, 'sum(up{job="worker"})')[1]
    assert float(up[0]["value"][1]) == 2
