"""What the job ledger stores and the one interface every store implements.

Every method returns an :class:`asyncio.Future` rather than being a coroutine, so the gateway's
hot path can chain callbacks on it; a store batches the calls of one event-loop turn into one
transaction.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from nsqjobs import wire
from nsqjobs.errors import NsqjobsError
from nsqjobs.names import MAX_DELAY_MS

JobStatus = Literal["queued", "running", "succeeded", "failed", "dead", "cancelled"]
STATUSES: tuple[JobStatus, ...] = ("queued", "running", "succeeded", "failed", "dead", "cancelled")
# Not finished: the statuses a re-drive, a cancel or the oldest-unfinished gauge looks at.
UNFINISHED: tuple[JobStatus, ...] = ("queued", "running")
# Ended or handled gateway sessions are forgotten after this long (Store.redrive_lost_sessions).
SESSION_TTL_S: Final = 86400.0
# Why a job was published again (the label of nsqjobs_ledger_redrives_total):
# nsqd_restart: published to an nsqd that restarted since (it lost what it held in memory);
# unpublished: recorded, but nsqd's acknowledgement never recorded (publish failed, or the
# gateway died between the two); due: a delay beyond nsqd's limit came due; replay: replayed.
RedriveReason = Literal["nsqd_restart", "unpublished", "due", "replay"]
# What recording one outcome came to: recorded, a later duplicate (ignored), or an id the ledger
# never accepted (a job accepted while the ledger was off, or by another ledger).
OutcomeVerdict = Literal["recorded", "duplicate", "unknown"]


def held(job: wire.JobEnvelope) -> bool:
    """True for a job due further from its acceptance (``created_at``) than nsqd can defer
    (``MAX_DELAY_MS``): the gateway records it without publishing, and the ledger's relay
    publishes it as it comes due. Judged from the job alone, never from a clock read later, so
    the gateway and the store (which writes a little after) always agree on it."""
    return job.due_at is not None and job.due_at - job.created_at > MAX_DELAY_MS / 1000


def remaining_delay_ms(due_at: float | None, now: float) -> int:
    """What is left of a job's delay at ``now``, in whole milliseconds rounded up (a job the
    relay publishes is never delivered before it is due), within what nsqd defers."""
    if due_at is None or due_at <= now:
        return 0
    return min(MAX_DELAY_MS, math.ceil((due_at - now) * 1000))


class LedgerError(NsqjobsError):
    """The ledger could not do what was asked (its storage failed, or it is closed)."""


@dataclass(frozen=True, slots=True)
class JobRecord:
    """One job as the ledger knows it.

    ``status`` is ``dead`` once a dead letter names the job, else the first result's status
    (``succeeded``/``failed``), else ``queued``. ``published_at`` is when nsqd first
    acknowledged the job (None: recorded, never known to be published).
    """

    id: str
    task: str
    args: dict[str, Any]
    status: JobStatus
    created_at: float
    accepted_at: float
    published_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    worker: str | None = None
    result: Any = None
    error: wire.ErrorInfo | None = None
    dead_reason: str | None = None
    dead_at: float | None = None
    # Schema 2: when a delayed job is due; when a worker reported it started (tasks with
    # track_started); how often it was re-driven and replayed; its failed attempts (the
    # latest run's); the earlier runs, one dict per replay (status, attempts, error, ...).
    due_at: float | None = None
    started_at: float | None = None
    redrives: int = 0
    replays: int = 0
    history: tuple[wire.Attempt, ...] = ()
    runs: tuple[dict[str, Any], ...] = ()

    def run_started_by(self, started_at: float) -> bool:
        """Whether an outcome whose attempt started at ``started_at`` can be this run's: for a
        replayed job, only after the run before ended (its ``dead_at``, or the replay if that
        is sooner), as the stores judge outcomes they record; an earlier one is a late
        outcome of the run before."""
        if not self.replays or not self.runs:
            return True
        last = self.runs[-1]
        bounds = [
            t for t in (last.get("replayed_at"), last.get("dead_at")) if isinstance(t, int | float)
        ]
        return not bounds or started_at > min(bounds)

    def view(self) -> dict[str, Any]:
        """The record as ``GET /v1/jobs/{id}`` answers it."""
        error = self.error
        return {
            "id": self.id,
            "task": self.task,
            "args": self.args,
            "status": self.status,
            "attempts": self.attempts,
            "worker": self.worker,
            "result": self.result,
            "error": None if error is None else {"type": error.type, "message": error.message},
            "dead_reason": self.dead_reason,
            "created_at": self.created_at,
            "accepted_at": self.accepted_at,
            "published_at": self.published_at,
            "finished_at": self.finished_at,
            "dead_at": self.dead_at,
            "due_at": self.due_at,
            "started_at": self.started_at,
            "redrives": self.redrives,
            "replays": self.replays,
            "history": [
                {
                    "attempt": a.attempt,
                    "worker": a.worker,
                    "started_at": a.started_at,
                    "finished_at": a.finished_at,
                    "error": {"type": a.error.type, "message": a.error.message},
                }
                for a in self.history
            ],
            "runs": list(self.runs),
        }


@dataclass(frozen=True, slots=True)
class Accepted:
    """What recording one job came to: ``new`` (recorded now), ``same`` (the id was recorded
    before with the same task and args: ``existing``), or ``conflict`` (with other ones).

    ``published``: a new job recorded as published already, in the caller's session (see
    :meth:`Store.record_accepted`): the caller writes nothing more when nsqd acknowledges it,
    and :meth:`Store.mark_unpublished` when the publish fails or its outcome is unknown."""

    kind: Literal["new", "same", "conflict"]
    existing: JobRecord | None = None
    published: bool = False


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing; ``cursor`` fetches the next one (None: this was the last)."""

    jobs: list[JobRecord]
    cursor: str | None


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job the relay is to publish now: its queue topic is looked up from ``task``;
    ``body`` is the job envelope as recorded; ``delay_ms`` what is left of its delay."""

    id: str
    task: str
    body: bytes
    delay_ms: int
    reason: RedriveReason


@dataclass(frozen=True, slots=True)
class LedgerStats:
    """The gauges' source: jobs by status, and when the oldest unfinished job became runnable
    (its acceptance, or its due time when delayed)."""

    by_status: dict[str, int]
    oldest_unfinished_at: float | None


class Store(Protocol):
    """A job ledger's storage."""

    def record_accepted(
        self,
        jobs: list[wire.JobEnvelope],
        session: str | None = None,
        bodies: Sequence[bytes] | None = None,
    ) -> asyncio.Future[list[Accepted]]:
        """Record jobs as queued, durably, all or none: when any id exists with another task
        or other args, nothing is recorded (the answers say which conflict). ``bodies``: the
        jobs' envelopes as :func:`nsqjobs.wire.encode` wrote them for the publish, in order
        (else the store encodes them again).

        With ``session`` (a gateway session that :meth:`beat_session` registered and nobody
        has ended or handled), a store may record the new jobs it will not hold as published
        at once (their answers say ``published``): the caller publishes them now, and the
        session's evidence covers a crash before nsqd's acknowledgement (see
        :meth:`redrive_lost_sessions`). Else they are recorded unpublished, and the caller
        notes the acknowledgement with :meth:`mark_published`."""
        ...

    def mark_published(self, ids: list[str]) -> asyncio.Future[None]:
        """Note that nsqd acknowledged these jobs (the first time counts)."""
        ...

    def mark_unpublished(self, ids: list[str]) -> asyncio.Future[None]:
        """The publish of jobs recorded as ``published`` by :meth:`record_accepted` failed, or
        its outcome is unknown: they lose ``published_at`` (unless a relay has claimed them
        since), so the relay publishes them after its grace (reason ``unpublished``), and a
        resubmission of the same id publishes again."""
        ...

    # -- gateway sessions: the evidence for jobs recorded as published before nsqd's ack -------

    def beat_session(self, session: str, low: float, now: float) -> asyncio.Future[bool]:
        """Register the session (first call) or note that it is alive at ``now``; ``low`` is
        no later than the ``sent_at`` of any of its jobs whose publish is not settled
        (acknowledged, or :meth:`mark_unpublished` written). False when the session was
        ended or handled: its jobs are recorded unpublished from then on, and the gateway
        starts another session."""
        ...

    def end_session(self, session: str, now: float) -> asyncio.Future[None]:
        """A clean stop with every publish of the session settled: nothing to re-drive."""
        ...

    def redrive_lost_sessions(self, stale_before: float, now: float) -> asyncio.Future[int]:
        """Sessions neither ended nor handled whose heartbeat is older than ``stale_before``
        (their gateway died, or stalled): each is marked handled (by one relay only), and
        its unfinished jobs sent at or after its ``low`` lose ``published_at``, so the
        relay publishes them at once (reason ``unpublished``). How many jobs."""
        ...

    def record_result(self, result: wire.ResultEnvelope) -> asyncio.Future[OutcomeVerdict]:
        """Record a job's result; the first terminal outcome (result, dead letter, cancel) wins
        and sets ``finished_at``, later ones are ``duplicate``. One exception: a worker that
        dead-letters a job publishes the letter and a failed result of the same final attempt
        (same worker, same time): whichever comes second completes the first (the job is
        ``dead``, with the result's attempts) and is ``recorded``, once."""
        ...

    def record_dead_letter(self, letter: wire.DeadLetter) -> asyncio.Future[OutcomeVerdict]:
        """Record that a job was dead-lettered (see :meth:`record_result`)."""
        ...

    def get(self, job_id: str) -> asyncio.Future[JobRecord | None]:
        """The job with this id, or None."""
        ...

    def list_jobs(
        self,
        *,
        status: JobStatus | None = None,
        task: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> asyncio.Future[Page]:
        """Jobs in the order they were accepted, filtered by status and task."""
        ...

    # -- the relay: re-drive, long delays, retention (nsqjobs.ledger.relay) -------------------

    def claim_unpublished(
        self, *, now: float, grace_s: float, horizon_s: float, lease_s: float, limit: int
    ) -> asyncio.Future[list[Claimed]]:
        """Unfinished jobs that must be published by the relay, claimed for ``lease_s`` (another
        gateway's relay skips them meanwhile); ``sent_at`` becomes ``now``.

        Claimed are jobs with no recorded acknowledgement (``published_at`` NULL) whose
        ``sent_at`` is older than ``grace_s`` (an accept path still publishing is left alone),
        or never sent (a long delay, or a replay), and whose ``due_at`` is NULL or before
        ``now + horizon_s``; or whose earlier claim's lease ended. Oldest first. Each one's
        reason: ``nsqd_restart`` when :meth:`redrive_sent_before` took it, ``replay`` or
        ``due`` when never sent (replayed or not), else ``unpublished``.
        """
        ...

    def redrive_sent_before(self, started_at: float) -> asyncio.Future[int]:
        """An nsqd started at ``started_at`` (its /stats ``start_time``): every unfinished job
        whose latest publish was sent before that, and whose publish was acknowledged, loses
        its ``published_at`` (so the relay publishes it again, at once: no grace) and counts a
        re-drive. How many. Calling it again with the same time changes nothing more."""
        ...

    def prune_finished(self, before: float, limit: int) -> asyncio.Future[int]:
        """Delete up to ``limit`` succeeded, failed or cancelled jobs whose outcome the ledger
        recorded before ``before`` (by its own clock, not the worker's ``finished_at``: an
        outcome taken in late is kept its full retention); dead ones stay until replayed or
        purged. How many."""
        ...

    def stats(self) -> asyncio.Future[LedgerStats]:
        """Jobs by status, and when the oldest unfinished job became runnable (accepted, or
        due when delayed; a time ahead when none is due yet)."""
        ...

    # -- operations (API and CLI) ---------------------------------------------------------------

    def record_started(self, job_id: str, worker: str, at: float) -> asyncio.Future[OutcomeVerdict]:
        """A worker started a job (tasks with ``track_started``): ``queued`` becomes
        ``running``; anything else is left as it is (``duplicate``)."""
        ...

    def cancel(self, job_id: str) -> asyncio.Future[JobRecord | None]:
        """Cancel a job that has not finished: status ``cancelled``, finished now (so any later
        outcome is a duplicate, and no re-drive publishes it). The job as it now stands (its
        status says whether the cancel took), or None for an unknown id."""
        ...

    def replay(
        self, ids: list[str] | None = None, *, task: str | None = None, limit: int = 1000
    ) -> asyncio.Future[list[JobRecord]]:
        """Replay dead jobs (these ids, or up to ``limit`` matching ``task``; oldest first):
        each one's run so far is appended to ``runs`` (status, attempts, error, dead_reason,
        finished_at, dead_at, history, replayed_at), it becomes ``queued`` with a fresh attempt
        history and no ``published_at`` or ``sent_at``, ``replays`` + 1; the relay publishes
        it. A recorded envelope whose ``deadline`` has passed loses it (it would only expire
        again). The jobs replayed."""
        ...

    def purge(
        self, ids: list[str] | None = None, *, task: str | None = None, limit: int = 1000
    ) -> asyncio.Future[int]:
        """Delete dead jobs (these ids, or up to ``limit`` matching ``task``; oldest first).
        How many."""
        ...

    def close(self) -> None:
        """Finish the writes handed over so far and release the storage."""
        ...
