"""Grafana dashboards read without Grafana: their panels' queries, run against a real Prometheus.

Shared by the dashboard tests (a local stack of processes) and the compose test (the compose
stack's Prometheus on its published 127.0.0.1 port). Also starts ``nsqjobs exporter`` and a
plain Prometheus process for the local runs.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsqjobs.config import ExporterConfig, GatewayConfig, env_var
from nsqjobs.names import LEDGER_SQLITE_SCHEME
from nsqjobs.testing import (
    Daemon,
    Nsq,
    Proc,
    free_port,
    http,
    need_binary,
    nsqjobs_command,
    spawn,
    wait_ready,
)

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS_HINT = "apt-get install prometheus"


@dataclass(frozen=True)
class Panel:
    """One panel of a dashboard: its id, title, unit and PromQL expressions."""

    id: int
    title: str
    expr: list[str]
    unit: str
    raw: Mapping[str, Any]


def _all_panels(items: list[Any]) -> Iterator[Mapping[str, Any]]:
    for item in items:
        yield item
        yield from _all_panels(item.get("panels") or [])


def panels(path: Path) -> list[Panel]:
    """Every panel of the dashboard at ``path`` (rows included, with no queries)."""
    board = json.loads(path.read_text())
    return [
        Panel(
            id=int(p["id"]),
            title=str(p.get("title", "")),
            expr=[str(t["expr"]) for t in p.get("targets") or [] if t.get("expr")],
            unit=str(p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")),
            raw=p,
        )
        for p in _all_panels(board.get("panels") or [])
    ]


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """``expr`` with Grafana's ``$var``, ``${var}`` and ``$__rate_interval`` replaced."""
    values = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h", **variables}

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"no value for ${name} in {expr!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", one, expr)


def query(prometheus_url: str, expr: str, timeout: float = 10.0) -> tuple[bool, Any]:
    """Run an instant query: (True, result) or (False, the error Prometheus gave)."""
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    status, _, body = http("GET", url, timeout=timeout)
    if status == 200 and isinstance(body, dict) and body.get("status") == "success":
        return True, body["data"]["result"]
    error = body.get("error") if isinstance(body, dict) else str(body)[:200]
    return False, f"{status} {error}"


def check_queries(
    prometheus_url: str, dashboards: list[Path], variables: dict[str, str]
) -> list[str]:
    """Run every panel query; a failure is a query that errors or returns no data."""
    failures = []
    for path in dashboards:
        for panel in panels(path):
            for expr in panel.expr:
                try:
                    concrete = substitute(expr, variables)
                except KeyError as exc:
                    failures.append(f"{path.name} / {panel.title}: {exc}")
                    continue
                ok, result = query(prometheus_url, concrete)
                if not ok:
                    failures.append(f"{path.name} / {panel.title}: {concrete}: {result}")
                elif not result:
                    failures.append(f"{path.name} / {panel.title}: no data: {concrete}")
    return failures


def start_exporter(
    nsq: Nsq, log_dir: Path, stack: ExitStack, env: Mapping[str, str] | None = None
) -> Daemon:
    """``nsqjobs exporter`` against ``nsq`` on a free port, ready; ``stack`` stops it."""
    port = free_port()
    full_env = {
        **nsq.env(),
        env_var(ExporterConfig, "port"): str(port),
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    log_path = log_dir / f"exporter-{port}.log"
    proc = spawn([*nsqjobs_command(), "exporter"], log_path, name="exporter", env=full_env)
    daemon = Daemon(proc.name, proc.proc, log_path, port)
    stack.callback(daemon.stop)
    wait_ready(daemon, daemon.url + "/readyz", 30.0)
    return daemon


def start_prometheus(
    stack: ExitStack, work_dir: Path, targets: Mapping[str, list[str]], interval: str = "1s"
) -> str:
    """Debian's ``prometheus`` as a plain process on a free loopback port; returns its URL.

    ``targets`` maps a job name to its host:port targets (none: an empty scrape config, for
    syntax checks). Rule files are not loaded here: ``promtool`` checks them.
    """
    binary = need_binary("prometheus", hint=PROMETHEUS_HINT)
    port = free_port()
    jobs = [
        {"job_name": job, "static_configs": [{"targets": list(hosts)}]}
        for job, hosts in targets.items()
    ]
    config = work_dir / "prometheus.yml"
    # JSON is YAML: no YAML library needed.
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": interval, "evaluation_interval": interval},
                "scrape_configs": jobs,
            }
        )
    )
    data = work_dir / "prometheus-data"
    data.mkdir()
    proc: Proc = spawn(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        work_dir / "prometheus.log",
        name="prometheus",
        stack=stack,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url + "/-/ready", 30.0)
    return url


# Worker settings for the local runs: failures reach their last attempt within a second.
FAST_FAILURES = {
    "NSQJOBS_MAX_ATTEMPTS": "2",
    "NSQJOBS_BACKOFF_BASE_S": "0.1",
    "NSQJOBS_BACKOFF_CAP_S": "0.2",
}
#: The template variables of the dashboards, as "All" in Grafana.
ALL = {"task": ".*", "queue": ".*", "instance": ".*", "node": ".*", "topic": ".*", "channel": ".*"}


@dataclass
class LocalStack:
    """A gateway, two workers and the exporter on a real nsq pair, scraped by a real Prometheus."""

    prometheus_url: str
    gateway: Daemon
    workers: list[Daemon]
    exporter: Daemon


def start_local_stack(
    nsq: Nsq, work_dir: Path, stack: ExitStack, start: Any, workers: int = 2
) -> LocalStack:
    """Start the stack; ``start(kind, nsq, **env)`` starts a daemon (the ``daemons`` fixture).
    The gateway keeps a ledger (SQLite in ``work_dir``), as the local stack of ``make run``."""
    ledger = f"{LEDGER_SQLITE_SCHEME}{work_dir / 'ledger.sqlite3'}"
    gateway = start("gateway", nsq, **{env_var(GatewayConfig, "ledger_url"): ledger})
    started = [start("worker", nsq, **FAST_FAILURES) for _ in range(workers)]
    exporter = start_exporter(nsq, work_dir, stack)
    url = start_prometheus(
        stack,
        work_dir,
        {
            "gateway": [f"127.0.0.1:{gateway.port}"],
            "worker": [f"127.0.0.1:{w.port}" for w in started],
            "exporter": [f"127.0.0.1:{exporter.port}"],
        },
    )
    return LocalStack(url, gateway, started, exporter)


def submit_mix(gateway_url: str, rounds: int = 1) -> None:
    """Jobs of every outcome: successes, errors retried then dead-lettered, permanent
    failures, retries, 4xx answers, and a long job so a slot is busy."""
    jobs: list[dict[str, Any]] = [
        {"task": "noop", "args": {}},
        {"task": "primes.count", "args": {"start": 0, "stop": 200_000}},
        {"task": "debug.fail", "args": {"mode": "error"}},
        {"task": "debug.throws", "args": {}},
        {"task": "debug.retry", "args": {"delay": 0.1}},
        {"task": "debug.sleep", "args": {"seconds": 2}},
    ]
    for _ in range(rounds):
        for job in jobs:
            status, _, body = http("POST", gateway_url + "/v1/jobs", job)
            if status != 202:
                raise AssertionError(f"{job['task']}: {status} {body}")
        http("POST", gateway_url + "/v1/jobs", {"task": "no.such.task", "args": {}})
