"""Every daemon's metric instruments, built on an explicit registry (tests use a fresh one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nsqjobs.names import BATCH_ROUTE, SUBMIT_ROUTE
from nsqjobs.names import METRIC_PREFIX as P
from nsqjobs.observability.tallies import HistogramTally, Tallies, Tally
from nsqjobs.version import __version__

_SUBMISSIONS = frozenset((SUBMIT_ROUTE, BATCH_ROUTE))
# The method label's values: any other token a client sends (tornado's server takes any) is
# "other", so a client cannot make new series.
_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"))

# Publishes take ~100 us on loopback; jobs run from microseconds to hours.
PUBLISH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)
# A ledger commit is one fsync (or a few, under group commit): ~0.1 ms on NVMe, ~10 ms on disk.
LEDGER_WRITE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
JOB_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


class _PublishingMetrics:
    """What every daemon that publishes to nsqd measures: time to OK, and failures."""

    def __init__(self, registry: CollectorRegistry, daemon: str) -> None:
        self.registry = registry
        self._gauge("build_info", "nsqjobs version and daemon kind", "version", "daemon").labels(
            __version__, daemon
        ).set(1)
        self.publish_duration = self._histogram(
            "publish_duration_seconds",
            "time from publish to nsqd's OK, by command",
            "command",
            buckets=PUBLISH_BUCKETS,
        )
        self.publish_errors = self._counter(
            "publish_errors_total", "publishes nsqd did not acknowledge, by command", "command"
        )

    # Every metric is nsqjobs_<name>, on this daemon's registry.
    def _counter(self, name: str, doc: str, *labels: str) -> Counter:
        return Counter(f"{P}_{name}", doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, *labels: str) -> Gauge:
        return Gauge(f"{P}_{name}", doc, labels, registry=self.registry)

    def _histogram(
        self, name: str, doc: str, *labels: str, buckets: tuple[float, ...]
    ) -> Histogram:
        return Histogram(f"{P}_{name}", doc, labels, registry=self.registry, buckets=buckets)


class GatewayMetrics(_PublishingMetrics):
    """HTTP, acceptance and publish metrics of the gateway."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "gateway")
        # What every request moves: tallies (see nsqjobs.observability.tallies).
        tallies = Tallies()
        self.requests = tallies.counter(
            f"{P}_http_requests_total",
            "HTTP requests by route, method and status",
            "route",
            "method",
            "status",
        )
        self.request_duration = tallies.histogram(
            f"{P}_http_request_duration_seconds",
            "HTTP request handling time by route",
            "route",
            buckets=JOB_BUCKETS,
        )
        self.jobs_accepted = tallies.counter(
            f"{P}_jobs_accepted_total",
            "jobs acknowledged by nsqd and answered 202/200, by task",
            "task",
        )
        registry.register(tallies)
        self.jobs_rejected = self._counter(
            "jobs_rejected_total", "job submissions refused, by reason", "reason"
        )
        self.waiting = self._gauge("result_waiters", "requests waiting for a result (?wait=)")
        self.results_seen = self._counter(
            "gateway_results_received_total", "result envelopes read from the results topic"
        )
        # Tallies resolved once per label set.
        self._request_children: dict[tuple[str, str, int], tuple[Tally, HistogramTally]] = {}
        self._accepted_children: dict[str, Tally] = {}

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request (route templates only: bounded labels)."""
        if method not in _METHODS:
            method = "other"
        key = (route, method, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (
                self.requests.labels(route, method, str(status)),
                self.request_duration.labels(route),
            )
        children[0].value += 1
        children[1].observe(seconds)
        if status >= 400 and method == "POST" and route in _SUBMISSIONS:
            # Submissions only: a 404 for GET /v1/jobs/{id} or a 409 for a cancel is no job
            # refused.
            self.jobs_rejected.labels(str(status)).inc()

    def accepted(self, task: str, count: int = 1) -> None:
        """Count jobs nsqd acknowledged."""
        child = self._accepted_children.get(task)
        if child is None:
            child = self._accepted_children[task] = self.jobs_accepted.labels(task)
        child.value += count


class LedgerMetrics:
    """What the job ledger measures, on the gateway's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.outcomes = Counter(
            f"{P}_ledger_outcomes_total",
            "outcome messages read by the ledger, by topic and what they came to (recorded, "
            "duplicate, unknown: an id the ledger never accepted)",
            ("topic", "verdict"),
            registry=registry,
        )
        self.duplicate_outcomes = Counter(
            f"{P}_ledger_duplicate_outcomes_total",
            "outcomes for a job whose outcome was already recorded (ignored: the first wins)",
            registry=registry,
        )
        self.jobs = Gauge(
            f"{P}_ledger_jobs",
            "jobs in the ledger by status (refreshed by the relay every poll)",
            ("status",),
            registry=registry,
        )
        self.oldest_unfinished_age = Gauge(
            f"{P}_ledger_oldest_unfinished_age_seconds",
            "age of the oldest queued or running job, counted from when it was accepted or, "
            "delayed, due (0 when there is none)",
            registry=registry,
        )
        self.redrives = Counter(
            f"{P}_ledger_redrives_total",
            "jobs the ledger's relay published again or for the first time, by reason "
            "(nsqd_restart, unpublished, due, replay)",
            ("reason",),
            registry=registry,
        )
        self.write_seconds = Histogram(
            f"{P}_ledger_write_seconds",
            "time of one ledger commit (one transaction for all the writes it groups)",
            registry=registry,
            buckets=LEDGER_WRITE_BUCKETS,
        )


class WorkerMetrics(_PublishingMetrics):
    """Job lifecycle metrics of a worker, by task (recorded by ``worker_hooks.MetricsHook``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "worker")
        c = self._counter
        # What every job moves: tallies (see nsqjobs.observability.tallies).
        tallies = Tallies()
        self.received = tallies.counter(
            f"{P}_jobs_received_total", "job messages received, by task", "task"
        )
        self.succeeded = tallies.counter(
            f"{P}_jobs_succeeded_total", "jobs whose result was published as succeeded", "task"
        )
        self.duration = tallies.histogram(
            f"{P}_job_duration_seconds",
            "task run time, by task and outcome",
            "task",
            "status",
            buckets=JOB_BUCKETS,
        )
        self.in_progress = tallies.gauge(
            f"{P}_jobs_in_progress",
            "jobs with an attempt under way (running, or publishing its result), by task",
            "task",
        )
        registry.register(tallies)
        self.failed = c(
            "jobs_failed_total", "jobs whose final result was published as failed", "task"
        )
        self.retried = c("jobs_retried_total", "failed attempts scheduled for another try", "task")
        self.dead_lettered = c(
            "jobs_dead_lettered_total", "messages sent to the dead-letter topic", "task", "reason"
        )
        self.errors = c(
            "job_errors_total",
            "exceptions raised by tasks, by task and exception type",
            "task",
            "error",
        )
        self.slots = self._gauge(
            "worker_slots", "executor slots of this worker (its concurrency): jobs it may run"
        )
        self.requeued_on_shutdown = c(
            "jobs_requeued_on_shutdown_total",
            "jobs handed back to nsqd unfinished at shutdown",
            "task",
        )
        self.delivery_switches = c(
            "worker_delivery_switches_total",
            "times a queue connection turned eager (nsqd sends each message at once) or "
            "batched (nsqd batches deliveries), by the mode it turned to",
            "mode",
        )
        self.cancelled = c(
            "worker_jobs_cancelled_total",
            "cancelled jobs this worker skipped or ended (FINed without a result), by task",
            "task",
        )
