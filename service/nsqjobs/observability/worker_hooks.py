"""The worker's metrics as a worker hook: each job transition moves the matching instruments.

Structurally a ``nsqjobs.worker.hooks.WorkerHook``; this module imports nothing of the worker
(imports point from the worker to observability), so what it reads of a job is :class:`JobFacts`.
"""

from __future__ import annotations

from typing import Protocol

from nsqjobs import wire
from nsqjobs.observability.metrics import WorkerMetrics


class JobFacts(Protocol):
    """What the metrics read of a job."""

    @property
    def task_name(self) -> str:
        """The task's name (``-`` when unknown: labels stay bounded)."""

    @property
    def in_progress(self) -> bool:
        """An attempt is under way (counted in ``nsqjobs_jobs_in_progress``)."""


class MetricsHook:
    """Records job transitions in a :class:`WorkerMetrics`."""

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics

    def for_task(self, task: str) -> TaskMetricsHook:
        """The metrics of one task, with its labelled children resolved now."""
        return TaskMetricsHook(self.metrics, task)


class TaskMetricsHook:
    """One task's instruments and tallies, resolved once (``labels()`` costs a lookup)."""

    def __init__(self, metrics: WorkerMetrics, task: str) -> None:
        self.metrics = metrics
        self.task = task
        self._received = metrics.received.labels(task)
        self._succeeded = metrics.succeeded.labels(task)
        self._failed = metrics.failed.labels(task)
        self._retried = metrics.retried.labels(task)
        self._in_progress = metrics.in_progress.labels(task)
        self._duration_succeeded = metrics.duration.labels(task, "succeeded")
        self._duration_failed = metrics.duration.labels(task, "failed")
        self._requeued_on_shutdown = metrics.requeued_on_shutdown.labels(task)
        self._cancelled = metrics.cancelled.labels(task)

    def received(self, job: JobFacts) -> None:
        """Count a job received."""
        self._received.value += 1

    def started(self, job: JobFacts) -> None:
        """One more attempt under way."""
        self._in_progress.value += 1

    def succeeded(self, job: JobFacts, duration_s: float, result_bytes: int) -> None:
        """Count a success and its run time."""
        self._in_progress.value -= 1
        self._duration_succeeded.observe(duration_s)
        self._succeeded.value += 1

    def attempt_failed(self, job: JobFacts, error: wire.ErrorInfo, duration_s: float) -> None:
        """Count the error by type, and the failed attempt's run time."""
        self._in_progress.value -= 1
        self.metrics.errors.labels(self.task, error.type).inc()
        self._duration_failed.observe(duration_s)

    def retried(self, job: JobFacts, delay_s: float) -> None:
        """Count a retry."""
        self._retried.inc()

    def dead_lettered(
        self, job: JobFacts, reason: wire.DeadLetterReason, error: wire.ErrorInfo
    ) -> None:
        """Count the dead letter, and the failed result published with it (jobs only)."""
        if reason != "undecodable":  # no job, so no result to publish
            self._failed.inc()
        self.metrics.dead_lettered.labels(self.task, reason).inc()

    def requeued(self, job: JobFacts, why: str, delay_s: float) -> None:
        """Count requeues at shutdown, and internal errors (ours, not the task's)."""
        if job.in_progress:
            self._in_progress.value -= 1
        if why == "shutdown":
            self._requeued_on_shutdown.inc()
        elif why == "internal_error":
            self.metrics.errors.labels(self.task, "InternalError").inc()

    def cancelled(self, job: JobFacts) -> None:
        """Count a cancelled job (and the attempt it ended, if one ran)."""
        if job.in_progress:
            self._in_progress.value -= 1
        self._cancelled.inc()
