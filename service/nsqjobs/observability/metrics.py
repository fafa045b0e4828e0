"""Every daemon's metric instruments, built on an explicit registry (tests use a fresh one)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from nsqjobs.names import METRIC_PREFIX as P
from nsqjobs.version import __version__

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
        self.requests = self._counter(
            "http_requests_total",
            "HTTP requests by route, method and status",
            "route",
            "method",
            "status",
        )
        self.request_duration = self._histogram(
            "http_request_duration_seconds",
            "HTTP request handling time by route",
            "route",
            buckets=JOB_BUCKETS,
        )
        self.jobs_accepted = self._counter(
            "jobs_accepted_total", "jobs acknowledged by nsqd and answered 202/200, by task", "task"
        )
        self.jobs_rejected = self._counter(
            "jobs_rejected_total", "job submissions refused, by reason", "reason"
        )
        self.waiting = self._gauge("result_waiters", "requests waiting for a result (?wait=)")
        self.results_seen = self._counter(
            "gateway_results_received_total", "result envelopes read from the results topic"
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


class JobTally:
    """One task's counts of the job lifecycle, as plain numbers: every job moves them, so they
    cost an addition each instead of an instrument's lock and checks (about 6 % of a worker's
    dispatch rate, measured). Only the worker's event loop thread writes them; a scrape reads
    them (:class:`JobTallies`)."""

    __slots__ = ("durations", "in_progress", "received", "succeeded", "sums")

    def __init__(self) -> None:
        self.received = 0
        self.succeeded = 0
        self.in_progress = 0
        # By status ("succeeded", "failed"): a count per bucket of JOB_BUCKETS, then +Inf.
        self.durations = {s: [0] * (len(JOB_BUCKETS) + 1) for s in _DURATION_STATUSES}
        self.sums = dict.fromkeys(_DURATION_STATUSES, 0.0)

    def observe(self, status: str, seconds: float) -> None:
        """A run of ``seconds`` that ended ``status`` (a bucket's bound is inclusive)."""
        self.durations[status][bisect_left(JOB_BUCKETS, seconds)] += 1
        self.sums[status] += seconds


_DURATION_STATUSES = ("succeeded", "failed")


class JobTallies:
    """The collector of every task's :class:`JobTally`: ``jobs_received_total``,
    ``jobs_succeeded_total``, ``jobs_in_progress`` and ``job_duration_seconds``, by task."""

    def __init__(self) -> None:
        self.tasks: dict[str, JobTally] = {}

    def for_task(self, task: str) -> JobTally:
        """The task's tally (created at zero, so the task shows before its first job)."""
        tally = self.tasks.get(task)
        if tally is None:
            tally = self.tasks[task] = JobTally()
        return tally

    def describe(self) -> list[Metric]:
        """The families, without samples (the registry checks names with these)."""
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        """Every task's figures now."""
        return self._families(dict(self.tasks))

    @staticmethod
    def _families(tasks: dict[str, JobTally]) -> Iterator[Metric]:
        received = CounterMetricFamily(
            f"{P}_jobs_received", "job messages received, by task", labels=["task"]
        )
        succeeded = CounterMetricFamily(
            f"{P}_jobs_succeeded",
            "jobs whose result was published as succeeded",
            labels=["task"],
        )
        in_progress = GaugeMetricFamily(
            f"{P}_jobs_in_progress",
            "jobs with an attempt under way (running, or publishing its result), by task",
            labels=["task"],
        )
        duration = HistogramMetricFamily(
            f"{P}_job_duration_seconds",
            "task run time, by task and outcome",
            labels=["task", "status"],
        )
        bounds = [*map(floatToGoString, JOB_BUCKETS), "+Inf"]
        for task, t in tasks.items():
            received.add_metric([task], t.received)
            succeeded.add_metric([task], t.succeeded)
            in_progress.add_metric([task], t.in_progress)
            for status in _DURATION_STATUSES:
                counts, running, buckets = t.durations[status], 0, []
                for bound, n in zip(bounds, counts, strict=True):
                    running += n
                    buckets.append((bound, running))
                duration.add_metric([task, status], buckets, t.sums[status])
        yield from (received, succeeded, in_progress, duration)


class WorkerMetrics(_PublishingMetrics):
    """Job lifecycle metrics of a worker, by task (recorded by ``worker_hooks.MetricsHook``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry, "worker")
        c = self._counter
        # Received, succeeded, in progress and run times: plain tallies (see JobTally).
        self.jobs = JobTallies()
        registry.register(self.jobs)
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
