"""Worker hooks: the job transitions the worker reports, and their fan-out to every hook.

Metrics are one hook (:mod:`nsqjobs.observability.worker_hooks`); the job ledger will be
another. A hook is resolved once per task (:meth:`WorkerHook.for_task`), so the success path
costs a few plain calls per job. A hook that raises is logged (once per hook and transition,
with its traceback; later ones at debug level) and never breaks the job it reports on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

from nsqjobs import wire

log = logging.getLogger("nsqjobs.worker.hooks")

# Why a message went back to nsqd unanswered (to be delivered again, to this worker or another).
RequeueReason = Literal["shutdown", "unacknowledged", "internal_error", "not_due"]


class JobView(Protocol):
    """What a hook may read of a job. Read-only: hooks never change a job."""

    @property
    def job_id(self) -> str | None:
        """The envelope's id; ``None`` for a message that is not a job envelope."""

    @property
    def message_id(self) -> str:
        """nsqd's id of the message carrying the job."""

    @property
    def task_name(self) -> str:
        """The task's registered name; ``-`` when unknown or undecodable (bounded labels)."""

    @property
    def attempt(self) -> int:
        """This attempt's number, from 1 (0 until the job is admitted)."""

    @property
    def max_attempts(self) -> int:
        """The attempts the job may use (0 until the job is admitted)."""

    @property
    def in_progress(self) -> bool:
        """An attempt is under way: started, and neither succeeded nor failed yet."""


class TaskHook(Protocol):
    """The transitions of the jobs of one task, in the order a job goes through them.

    ``received`` (a job of a known task arrived) -> ``started`` (its attempt runs) -> one of
    ``succeeded`` (result acknowledged by nsqd, message FINed) or ``attempt_failed``, which is
    followed by ``retried`` or ``dead_lettered``. Jobs that cannot start (expired, attempts spent
    by crashes, unknown task, undecodable) go straight to ``dead_lettered``. ``requeued`` may come
    at any point: the message went back to nsqd unanswered (shutdown, unacknowledged publish,
    internal error, or ``not_due``: a delayed job that arrived early); ``job.in_progress`` tells
    whether an attempt was under way. A job given back at shutdown before its attempt ended, or
    deferred as not due, keeps its attempt: the next delivery runs with the same number.
    ``cancelled`` ends a job cancelled through the API: skipped on arrival or while waiting
    for a slot, or ended while running in a child process (``job.in_progress`` says which);
    the message is FINed and no result is published.
    """

    def received(self, job: JobView) -> None:
        """A job of a known task arrived."""

    def started(self, job: JobView) -> None:
        """Attempt ``job.attempt`` was handed to the executor."""

    def succeeded(self, job: JobView, duration_s: float, result_bytes: int) -> None:
        """nsqd acknowledged the result (``result_bytes`` long); the message is FINed."""

    def attempt_failed(self, job: JobView, error: wire.ErrorInfo, duration_s: float) -> None:
        """The attempt failed (raised, timed out, or its result could not be published)."""

    def retried(self, job: JobView, delay_s: float) -> None:
        """Another attempt is scheduled in ``delay_s`` seconds."""

    def dead_lettered(
        self, job: JobView, reason: wire.DeadLetterReason, error: wire.ErrorInfo
    ) -> None:
        """The job was published to the dead-letter topic and will not run again."""

    def requeued(self, job: JobView, why: RequeueReason, delay_s: float) -> None:
        """The message went back to nsqd unanswered, to be delivered again in ``delay_s``."""

    def cancelled(self, job: JobView) -> None:
        """The job was cancelled: FINed without a result, and will not run (again)."""


class WorkerHook(Protocol):
    """A worker hook: hands out its per-task part once per task name."""

    def for_task(self, task: str) -> TaskHook:
        """The hook for jobs of ``task`` (``-`` for messages without a known task)."""


class TaskHooks:
    """Every hook's part for one task; each transition calls them in order, contained."""

    __slots__ = (
        "_attempt_failed",
        "_cancelled",
        "_dead_lettered",
        "_hooks",
        "_received",
        "_requeued",
        "_retried",
        "_started",
        "_succeeded",
    )

    def __init__(self, hooks: Hooks, parts: Sequence[TaskHook]) -> None:
        self._hooks = hooks
        # Bound methods resolved once: a transition is a loop over a tuple of calls.
        self._received = tuple(p.received for p in parts)
        self._started = tuple(p.started for p in parts)
        self._succeeded = tuple(p.succeeded for p in parts)
        self._attempt_failed = tuple(p.attempt_failed for p in parts)
        self._retried = tuple(p.retried for p in parts)
        self._dead_lettered = tuple(p.dead_lettered for p in parts)
        self._requeued = tuple(p.requeued for p in parts)
        self._cancelled = tuple(p.cancelled for p in parts)

    def _emit(self, fns: tuple[Callable[..., None], ...], event: str, *args: object) -> None:
        for fn in fns:
            try:
                fn(*args)
            except Exception as exc:
                self._hooks.failed(fn, event, exc)

    def received(self, job: JobView) -> None:
        """Tell every hook a job arrived."""
        self._emit(self._received, "received", job)

    def started(self, job: JobView) -> None:
        """Tell every hook an attempt started."""
        self._emit(self._started, "started", job)

    def succeeded(self, job: JobView, duration_s: float, result_bytes: int) -> None:
        """Tell every hook the job succeeded."""
        self._emit(self._succeeded, "succeeded", job, duration_s, result_bytes)

    def attempt_failed(self, job: JobView, error: wire.ErrorInfo, duration_s: float) -> None:
        """Tell every hook the attempt failed."""
        self._emit(self._attempt_failed, "attempt_failed", job, error, duration_s)

    def retried(self, job: JobView, delay_s: float) -> None:
        """Tell every hook a retry is scheduled."""
        self._emit(self._retried, "retried", job, delay_s)

    def dead_lettered(
        self, job: JobView, reason: wire.DeadLetterReason, error: wire.ErrorInfo
    ) -> None:
        """Tell every hook the job went to dead letters."""
        self._emit(self._dead_lettered, "dead_lettered", job, reason, error)

    def requeued(self, job: JobView, why: RequeueReason, delay_s: float) -> None:
        """Tell every hook the message went back to nsqd."""
        self._emit(self._requeued, "requeued", job, why, delay_s)

    def cancelled(self, job: JobView) -> None:
        """Tell every hook the job was cancelled."""
        self._emit(self._cancelled, "cancelled", job)


class Hooks:
    """The worker's hooks, in order; per-task fan-outs are built once and kept."""

    def __init__(self, hooks: Sequence[WorkerHook] = ()) -> None:
        self.hooks = tuple(hooks)
        self.failures: dict[tuple[str, str], int] = {}  # (hook, transition) -> times it raised
        self._tasks: dict[str, TaskHooks] = {}

    def for_task(self, task: str) -> TaskHooks:
        """The fan-out for jobs of ``task``."""
        found = self._tasks.get(task)
        if found is None:
            parts = []
            for hook in self.hooks:
                try:
                    parts.append(hook.for_task(task))
                except Exception as exc:  # that hook sees nothing of this task
                    self.failed(hook.for_task, "for_task", exc)
            found = self._tasks[task] = TaskHooks(self, parts)
        return found

    def failed(self, fn: Callable[..., object], event: str, exc: Exception) -> None:
        """A hook raised: log it the first time for this hook and transition, count it always."""
        owner = getattr(fn, "__self__", fn)
        key = (type(owner).__qualname__, event)
        seen = self.failures.get(key, 0)
        self.failures[key] = seen + 1
        if seen:
            log.debug("hook %s.%s raised again (%d times): %r", *key, seen + 1, exc)
        else:
            log.error(
                "hook %s.%s raised; contained, the job goes on (later failures at debug level)",
                *key,
                exc_info=exc,
            )
