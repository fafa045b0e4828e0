"""What the job ledger stores and the one interface every store implements.

Every method returns an :class:`asyncio.Future` rather than being a coroutine, so the gateway's
hot path can chain callbacks on it; a store batches the calls of one event-loop turn into one
transaction.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from nsqjobs import wire
from nsqjobs.errors import NsqjobsError

JobStatus = Literal["queued", "succeeded", "failed", "dead"]
STATUSES: tuple[JobStatus, ...] = ("queued", "succeeded", "failed", "dead")
# What recording one outcome came to: recorded, a later duplicate (ignored), or an id the ledger
# never accepted (a job accepted while the ledger was off, or by another ledger).
OutcomeVerdict = Literal["recorded", "duplicate", "unknown"]


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
        }


@dataclass(frozen=True, slots=True)
class Accepted:
    """What recording one job came to: ``new`` (recorded now), ``same`` (the id was recorded
    before with the same task and args: ``existing``), or ``conflict`` (with other ones)."""

    kind: Literal["new", "same", "conflict"]
    existing: JobRecord | None = None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing; ``cursor`` fetches the next one (None: this was the last)."""

    jobs: list[JobRecord]
    cursor: str | None


class Store(Protocol):
    """A job ledger's storage."""

    def record_accepted(self, jobs: list[wire.JobEnvelope]) -> asyncio.Future[list[Accepted]]:
        """Record jobs as queued, durably, all or none: when any id exists with another task
        or other args, nothing is recorded (the answers say which conflict)."""
        ...

    def mark_published(self, ids: list[str]) -> asyncio.Future[None]:
        """Note that nsqd acknowledged these jobs (the first time counts)."""
        ...

    def record_result(self, result: wire.ResultEnvelope) -> asyncio.Future[OutcomeVerdict]:
        """Record a job's result; the first one wins, later ones are ``duplicate``."""
        ...

    def record_dead_letter(self, letter: wire.DeadLetter) -> asyncio.Future[OutcomeVerdict]:
        """Record that a job was dead-lettered; the first letter wins."""
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

    def close(self) -> None:
        """Finish the writes handed over so far and release the storage."""
        ...
