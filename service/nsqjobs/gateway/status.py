"""The job ledger over HTTP (served only with a ledger): ``GET /v1/jobs`` (a listing),
``GET /v1/jobs/{id}`` (one job) and ``DELETE /v1/jobs/{id}`` (cancel).

The dead-letter routes are ``nsqjobs.gateway.deadletters``; both answer every error as
problem+json: a bad query 400, an unknown id 404, a job in the wrong state 409, a ledger that
cannot be read or written 503.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from nsqjobs.errors import PublishError
from nsqjobs.gateway.queries import Query, make_cursor, parse_query
from nsqjobs.http.handlers import ProblemHandler
from nsqjobs.http.problems import Problem
from nsqjobs.ledger import UNFINISHED, JobRecord, LedgerError, Page, Store

log = logging.getLogger("nsqjobs.gateway")
T = TypeVar("T")

JOBS_PATTERN: Final = r"/v1/jobs"
JOB_PATTERN: Final = r"/v1/jobs/([^/]+)"
# The batch route's path, which is also the path of the job whose id is "batch".
BATCH_JOB_PATTERN: Final = r"/v1/jobs/(batch)"
LISTING_PARAMETERS: Final = ("status", "task", "limit", "cursor")
# What some HTTP libraries send as "no body" with a JSON helper (``json={}``): taken as none.
_EMPTY_BODY: Final = re.compile(rb"\s*(?:\{\s*\}|null)?\s*")


def ledger_unavailable(exc: BaseException) -> Problem:
    """The 503 for a ledger that could not read or write (retry later)."""
    return Problem(503, "ledger-unavailable", f"the job ledger is unavailable: {exc}")


class LedgerOps:
    """What the ledger's routes share: the store, how to tell workers of a cancel, and the hook
    told of replayed jobs (the relay's ``kick``, so it publishes them without waiting for its
    next poll)."""

    def __init__(self, store: Store, publish_cancel: Callable[[str], Awaitable[None]]) -> None:
        self.store = store
        self.publish_cancel = publish_cancel
        self.on_replayed: Callable[[], object] | None = None

    def replayed(self) -> None:
        """Tell the relay (when one is wired) that replayed jobs wait to be published."""
        if self.on_replayed is not None:
            self.on_replayed()

    async def call(self, start: Callable[[], Awaitable[T]]) -> T:
        """Run one store call; a store failure is a 503 problem."""
        try:
            return await start()
        except LedgerError as exc:
            log.warning("ledger: %s", exc)
            raise ledger_unavailable(exc) from exc

    async def page(self, listing: str, query: Query) -> dict[str, Any]:
        """One page of jobs matching ``query``, and the cursor of the next one."""
        try:
            pending = self.store.list_jobs(
                status=query.status, task=query.task, limit=query.limit, cursor=query.after
            )
        except LedgerError as exc:  # raised at once: the store refuses the filter or cursor
            raise Problem(
                400,
                "bad-query",
                str(exc),
                errors=[{"field": "query.cursor", "message": str(exc)}],
            ) from exc

        async def wait() -> Page:
            return await pending

        page = await self.call(wait)
        return {
            "jobs": [record.view() for record in page.jobs],
            "next_cursor": make_cursor(listing, query, page.cursor),
        }

    async def known(self, job_id: str) -> JobRecord:
        """The job with this id; 404 when the ledger has none."""
        record = await self.call(lambda: self.store.get(job_id))
        if record is None:
            raise unknown_job(job_id)
        return record


def unknown_job(job_id: str) -> Problem:
    """The 404 for an id the ledger does not hold."""
    return Problem(404, "unknown-job", f"no job with id {job_id!r} in the ledger", id=job_id)


class LedgerHandler(ProblemHandler):
    """A ledger route: takes the :class:`LedgerOps`, refuses query parameters it does not know."""

    def initialize(self, **kwargs: Any) -> None:
        """Take the ledger's operations."""
        self.ops: LedgerOps = kwargs["ops"]

    def prepare(self) -> None:
        """Refuse a body (after the size limit): these routes take their filters as query
        parameters, and a filter sent as a body must not be ignored (a purge of everything)."""
        super().prepare()
        if self.request.method not in self.allowed_methods():
            return  # answered 405 (Allow names the methods) before anything is read
        body = self.request.body
        if body and not _EMPTY_BODY.fullmatch(body) and not self.takes_body():
            raise Problem(
                400,
                "bad-request",
                f"{self.request.method} {self.route} takes no request body: give its "
                "parameters in the query string (e.g. ?task=NAME)",
            )

    def takes_body(self) -> bool:
        """Whether this request may carry a body (none of the ledger's routes but one)."""
        return False

    def query(self, allowed: tuple[str, ...] = (), **kwargs: Any) -> Query:
        """This request's query parameters, checked (400 on any bad one)."""
        return parse_query(self.request.query_arguments, allowed, **kwargs)


class JobsHandler(LedgerHandler):
    """``GET /v1/jobs?status=&task=&limit=&cursor=``: jobs in the order they were accepted."""

    route = "/v1/jobs"

    @classmethod
    def allowed_methods(cls) -> list[str]:
        """GET (and HEAD) here; POST (submitting) is answered on the gateway's hot path."""
        return ["GET", "HEAD", "POST"]

    async def get(self) -> None:
        """Answer one page."""
        query = self.query(LISTING_PARAMETERS, listing="jobs")
        self.write_json(200, await self.ops.page("jobs", query))


class JobStatusHandler(LedgerHandler):
    """``GET /v1/jobs/{id}``: the job's status, attempts, error, result and timestamps;
    ``DELETE /v1/jobs/{id}``: cancel it. 404 for an unknown id."""

    route = "/v1/jobs/{id}"

    async def get(self, job_id: str) -> None:
        """Answer the job's record."""
        self.query()
        self.write_json(200, (await self.ops.known(job_id)).view())

    async def delete(self, job_id: str) -> None:
        """Cancel a queued or running job: recorded in the ledger first (any later outcome is a
        duplicate), then its id is published on the cancels topic so workers skip it."""
        self.query()
        ops = self.ops
        record = await ops.call(lambda: ops.store.cancel(job_id))
        if record is None:
            raise unknown_job(job_id)
        if record.status != "cancelled":
            raise Problem(
                409,
                "already-finished",
                f"job {job_id!r} is {record.status}: only a queued or running job can be cancelled",
                id=job_id,
                job_status=record.status,
            )
        try:
            await ops.publish_cancel(job_id)
        except PublishError as exc:
            raise Problem(
                503,
                "cancel-not-announced",
                f"job {job_id!r} is cancelled in the ledger (its outcome will not count), but "
                f"workers could not be told to skip it ({exc}): retry the DELETE to tell them",
                id=job_id,
            ) from exc
        self.write_json(200, record.view())


class BatchJobHandler(JobStatusHandler):
    """With the ledger, ``/v1/jobs/batch`` is also the path of the job whose id is ``batch``:
    GET and DELETE answer for that job; POST (a batch) is the hot path's and never gets here."""

    @classmethod
    def allowed_methods(cls) -> list[str]:
        """The job's methods and the batch route's POST."""
        return [*super().allowed_methods(), "POST"]


def finished(record: JobRecord) -> bool:
    """True once the job has its terminal outcome (succeeded, failed, dead, cancelled)."""
    return record.status not in UNFINISHED
