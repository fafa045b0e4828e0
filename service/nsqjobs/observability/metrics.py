"""Every daemon's metric instruments, built on an explicit registry (tests use a fresh one)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nsqjobs.names import METRIC_PREFIX as P
from nsqjobs.version import __version__

# Publishes take ~100 us on loopback; jobs run from microseconds to hours.
PUBLISH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
JOB_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


class _PublishingMetrics:
    """What every daemon that publishes to nsqd measures: time to OK, and failures."""

    def __init__(self, registry: CollectorRegistry, daemon: str) -> None:
        self.registry = registry
        Gauge(
            f"{P}_build_info",
            "nsqjobs version and daemon kind",
            ["version", "daemon"],
            registry=registry,
        ).labels(__version__, daemon).set(1)
        self.publish_duration = Histogram(
            f"{P}_publish_duration_seconds",
            "time from publish to nsqd's OK, by command",
            ["command"],
            registry=registry,
            buckets=PUBLISH_BUCKETS,
        )
        self.publish_errors = Counter(
            f"{P}_publish_errors_total",
            "publishes nsqd did not acknowledge, by command",
            ["command"],
            registry=registry,
        )


class GatewayMetrics(_PublishingMetrics):
    """HTTP, acceptance and publish metrics of the gateway."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "gateway")
        self.requests = Counter(
            f"{P}_http_requests_total",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            f"{P}_http_request_duration_seconds",
            "HTTP request handling time by route",
            ["route"],
            registry=registry,
            buckets=JOB_BUCKETS,
        )
        self.jobs_accepted = Counter(
            f"{P}_jobs_accepted_total",
            "jobs acknowledged by nsqd and answered 202/200, by task",
            ["task"],
            registry=registry,
        )
        self.jobs_rejected = Counter(
            f"{P}_jobs_rejected_total",
            "job submissions refused, by reason",
            ["reason"],
            registry=registry,
        )
        self.waiting = Gauge(
            f"{P}_result_waiters", "requests waiting for a result (?wait=)", registry=registry
        )
        self.results_seen = Counter(
            f"{P}_gateway_results_received_total",
            "result envelopes read from the results topic",
            registry=registry,
        )
        # Children resolved once per label set: labels() costs a lock and a lookup per call.
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._accepted_children: dict[str, Any] = {}

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request (route templates only: bounded labels)."""
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(route, method, str(status)),
                self.request_duration.labels(route),
            )
        children[0].inc()
        children[1].observe(seconds)
        if status >= 400 and route.startswith("/v1/jobs"):
            self.jobs_rejected.labels(str(status)).inc()

    def accepted(self, task: str, count: int = 1) -> None:
        """Count jobs nsqd acknowledged."""
        child = self._accepted_children.get(task)
        if child is None:
            child = self._accepted_children[task] = self.jobs_accepted.labels(task)
        child.inc(count)


@dataclass(frozen=True)
class TaskMetrics:
    """One task's labelled children, resolved once (``labels()`` costs a lock and a lookup)."""

    received: Any
    succeeded: Any
    in_progress: Any
    duration_succeeded: Any


class WorkerMetrics(_PublishingMetrics):
    """Job lifecycle metrics of a worker, by task."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "worker")
        self._tasks: dict[str, TaskMetrics] = {}
        self.received = Counter(
            f"{P}_jobs_received_total",
            "job messages received, by task",
            ["task"],
            registry=registry,
        )
        self.succeeded = Counter(
            f"{P}_jobs_succeeded_total",
            "jobs whose result was published as succeeded",
            ["task"],
            registry=registry,
        )
        self.failed = Counter(
            f"{P}_jobs_failed_total",
            "jobs whose final result was published as failed",
            ["task"],
            registry=registry,
        )
        self.retried = Counter(
            f"{P}_jobs_retried_total",
            "failed attempts scheduled for another try",
            ["task"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            f"{P}_jobs_dead_lettered_total",
            "messages sent to the dead-letter topic",
            ["task", "reason"],
            registry=registry,
        )
        self.errors = Counter(
            f"{P}_job_errors_total",
            "exceptions raised by tasks, by task and exception type",
            ["task", "error"],
            registry=registry,
        )
        self.duration = Histogram(
            f"{P}_job_duration_seconds",
            "task run time, by task and outcome",
            ["task", "status"],
            registry=registry,
            buckets=JOB_BUCKETS,
        )
        self.in_progress = Gauge(
            f"{P}_jobs_in_progress", "jobs running now, by task", ["task"], registry=registry
        )
        self.requeued_on_shutdown = Counter(
            f"{P}_jobs_requeued_on_shutdown_total",
            "jobs handed back to nsqd unfinished at shutdown",
            ["task"],
            registry=registry,
        )

    def for_task(self, task: str) -> TaskMetrics:
        """The per-job hot-path metrics of ``task``."""
        found = self._tasks.get(task)
        if found is None:
            found = self._tasks[task] = TaskMetrics(
                received=self.received.labels(task),
                succeeded=self.succeeded.labels(task),
                in_progress=self.in_progress.labels(task),
                duration_succeeded=self.duration.labels(task, "succeeded"),
            )
        return found
