"""``POST /v1/jobs/wait``: wait for many jobs at once (a long poll), instead of a request per job.

The outcomes known when the request comes (a result that went by lately, a finished job in the
ledger) are answered at once; the others are waited for on the gateway's results subscriber
(:class:`~nsqjobs.gateway.waiting.ResultWaiter`, which also looks waits older than half a second
up in the ledger) until the first or all of them finish, or ``timeout_s`` passes. Without a
ledger only results that arrive during the wait, or lately before it on this gateway, can be
reported: the answer says ``"ledger": false``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from nsqjobs import wire
from nsqjobs.api import JobOutcome, OutcomeError, WaitAnswer, WaitRequest
from nsqjobs.gateway.bodies import check_content_type, decode_wait
from nsqjobs.gateway.status import JobStatusHandler, ledger_unavailable
from nsqjobs.gateway.waiting import Outcome, ResultWaiter
from nsqjobs.http.handlers import ProblemHandler
from nsqjobs.http.problems import Problem
from nsqjobs.ledger import UNFINISHED, JobRecord, LedgerError, Store

WAIT_PATTERN: Final = r"/v1/jobs/wait"


def outcome_of(outcome: Outcome) -> JobOutcome:
    """A result message or a finished job's record, as the wait route answers it."""
    error = outcome.error
    return JobOutcome(
        id=outcome.id,
        task=outcome.task,
        status=outcome.status,  # type: ignore[arg-type]  # a finished job: never queued/running
        result=outcome.result,
        error=None if error is None else OutcomeError(error.type, error.message),
        attempts=outcome.attempts,
        worker=outcome.worker,
        finished_at=outcome.finished_at,
    )


class WaitManyHandler(ProblemHandler):
    """``POST /v1/jobs/wait`` with a :class:`~nsqjobs.api.WaitRequest`: a
    :class:`~nsqjobs.api.WaitAnswer`. Bad input is a 4xx problem, a ledger that cannot be read
    a 503."""

    route = WAIT_PATTERN

    def initialize(self, **kwargs: Any) -> None:
        """Take the results subscriber, the ledger (or None) and the longest wait."""
        self.waiter: ResultWaiter = kwargs["waiter"]
        self.store: Store | None = kwargs.get("store")
        self.max_wait_s: float = kwargs["max_wait_s"]
        self.gone = asyncio.Event()

    def on_connection_close(self) -> None:
        """The client left: stop waiting for it."""
        self.gone.set()

    async def post(self) -> None:
        """Answer what is known, after waiting for the first or all of the ids."""
        if self.request.query:
            raise Problem(
                400, "bad-request", "this route takes no query parameters (the body says all)"
            )
        check_content_type(self.request.headers.get("Content-Type", ""))
        req = decode_wait(self.request.body)
        if req.timeout_s > self.max_wait_s:
            message = f"at most {self.max_wait_s:g} (this gateway's --max-wait-s)"
            raise Problem(
                422,
                "invalid-arguments",
                f"body.timeout_s: {message}",
                errors=[{"field": "body.timeout_s", "message": message}],
            )
        answer = await self._wait(req)
        if not self.gone.is_set():
            self.write_json(200, answer)

    async def _wait(self, req: WaitRequest) -> WaitAnswer:
        ids = list(dict.fromkeys(req.ids))
        waiter = self.waiter
        # Listen first: a result that arrives during the lookups below is not missed.
        futs = {job_id: waiter.register(job_id) for job_id in ids}
        try:
            done: dict[str, JobOutcome] = {}
            unknown: set[str] = set()
            # With the ledger, its record decides: a finished job is answered from it, and a
            # result that went by counts only for an unfinished job and its current run (not a
            # late result of the run before a replay; a cancelled job is the ledger's).
            records = await self._look_up(ids, done, unknown)
            for job_id in ids:
                if job_id in done or job_id in unknown:
                    continue
                recent = waiter.recent(job_id)
                if recent is not None and self._counts(records, job_id, recent):
                    done[job_id] = outcome_of(recent)
            waiting = [futs[i] for i in ids if i not in done and i not in unknown]
            enough = bool(done) if req.return_when == "first" else not waiting
            if waiting and not enough and req.timeout_s > 0:
                # One future for "all": every job in. The wait also ends if the client leaves.
                watched = waiting if req.return_when == "first" else [asyncio.gather(*waiting)]
                gone = asyncio.ensure_future(self.gone.wait())
                try:
                    await asyncio.wait(
                        [*watched, gone], timeout=req.timeout_s, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    gone.cancel()
            for job_id in ids:
                fut = futs[job_id]
                if (
                    job_id not in done
                    and fut.done()
                    and not fut.cancelled()
                    and self._counts(records, job_id, fut.result())
                ):
                    done[job_id] = outcome_of(fut.result())
        finally:
            for job_id, fut in futs.items():
                waiter.forget(job_id, fut)
        return WaitAnswer(
            done=[done[i] for i in ids if i in done],
            pending=[i for i in ids if i not in done and i not in unknown],
            unknown=[i for i in ids if i in unknown],
            ledger=self.store is not None,
        )

    @staticmethod
    def _counts(records: dict[str, JobRecord], job_id: str, outcome: Outcome) -> bool:
        """Whether a result seen on the results topic answers for the job as the ledger has
        it (always, without a ledger)."""
        record = records.get(job_id)
        if record is None or not isinstance(outcome, wire.ResultEnvelope):
            return True
        return record.run_started_by(outcome.started_at)

    async def _look_up(
        self, ids: list[str], done: dict[str, JobOutcome], unknown: set[str]
    ) -> dict[str, JobRecord]:
        """The ledger's records of the unfinished jobs among ``ids`` (finished ones go in
        ``done``, ids it does not hold in ``unknown``); nothing without a ledger."""
        store = self.store
        if store is None or not ids:
            return {}
        try:
            records: list[JobRecord | None] = await asyncio.gather(*(store.get(i) for i in ids))
        except LedgerError as exc:
            raise ledger_unavailable(exc) from exc
        unfinished: dict[str, JobRecord] = {}
        for job_id, record in zip(ids, records, strict=True):
            if record is None:
                unknown.add(job_id)
            elif record.status not in UNFINISHED:
                done[job_id] = outcome_of(record)
            else:
                unfinished[job_id] = record
        return unfinished


class LedgerWaitManyHandler(WaitManyHandler, JobStatusHandler):
    """With the ledger, ``/v1/jobs/wait`` is also the path of the job whose id is ``wait``:
    GET and DELETE answer for that job, as ``/v1/jobs/{id}`` does for any other."""

    def initialize(self, **kwargs: Any) -> None:
        """Take what both routes need."""
        WaitManyHandler.initialize(self, **kwargs)
        JobStatusHandler.initialize(self, **kwargs)

    def takes_body(self) -> bool:
        """POST is waiting for many jobs (its ids in the body)."""
        return self.request.method == "POST"

    async def get(self, job_id: str = "wait") -> None:
        """The job ``wait``'s record."""
        await JobStatusHandler.get(self, job_id)

    async def delete(self, job_id: str = "wait") -> None:
        """Cancel the job ``wait``."""
        await JobStatusHandler.delete(self, job_id)
