"""``POST /v1/jobs`` (``?wait=``) and ``POST /v1/jobs/batch``: the gateway's hot path.

Written on tornado's message-delegate interface rather than as RequestHandlers: a single job is
validated when its body ends, published (coalesced with its neighbours into one MPUB), and
answered from the publish's callback, with no coroutine of its own. Accepting itself is
``nsqjobs.gateway.submit``'s; errors are rendered by ``nsqjobs.http.problems``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import urllib.parse
from typing import Any, Final

import msgspec
import tornado.httputil

from nsqjobs import wire
from nsqjobs.api import Accepted, BatchAccepted, BatchRequest, SubmitRequest
from nsqjobs.errors import PublishError, PublishTimeout
from nsqjobs.gateway.bodies import check_content_type, decode_batch, decode_submit
from nsqjobs.gateway.queries import bad_query
from nsqjobs.gateway.status import ledger_unavailable
from nsqjobs.gateway.submit import (
    Acceptor,
    BatchPartlyPublished,
    DuplicateIds,
    IdConflict,
    JobExists,
)
from nsqjobs.gateway.waiting import Outcome, ResultWaiter
from nsqjobs.http.access import AccessLog
from nsqjobs.http.problems import (
    Problem,
    as_problem,
    internal_error,
    method_not_allowed,
    render_problem,
)
from nsqjobs.http.responses import JSON_HEADERS, write_response
from nsqjobs.ledger import UNFINISHED, LedgerError
from nsqjobs.names import BATCH_ROUTE, MAX_WAIT_SECONDS, SUBMIT_ROUTE
from nsqjobs.observability.metrics import GatewayMetrics
from nsqjobs.registry import validation_errors

log = logging.getLogger("nsqjobs.gateway")
_json = msgspec.json.Encoder()

SINGLE: Final = SUBMIT_ROUTE
BATCH: Final = BATCH_ROUTE
# A query number as JSON writes one (so "1e-05" and "-0" are, and "1_0", "+1", "inf", ".5" are not).
_NUMBER: Final = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
# The usual query, ``wait=`` and a plain number, read without parse_qs (the general case).
_JUST_WAIT: Final = re.compile(r"wait=([0-9]+(?:\.[0-9]+)?)")


def _partly_published(exc: BatchPartlyPublished) -> Problem:
    unknown = isinstance(exc.cause, PublishTimeout)
    return Problem(
        503,
        "partially-accepted",
        "nsqd acknowledged the jobs of some queues of this batch, then a publish failed "
        f"({exc.cause}): resubmit only `unaccepted_ids`"
        + (" (their outcome is unknown: nsqd did not answer in time)" if unknown else ""),
        accepted_ids=exc.published,
        unaccepted_ids=exc.unpublished,
    )


def _accepted(env: wire.JobEnvelope) -> Accepted:
    """The 202 answer: the job's id and task, and when it is due if it is delayed."""
    if env.due_at is None:
        return Accepted(id=env.id, task=env.task)
    return Accepted(id=env.id, task=env.task, due_at=env.due_at)


class JobRoutes:
    """What every job request shares; :meth:`start` makes one request's delegate."""

    PATHS: Final = frozenset((SINGLE, BATCH))

    def __init__(
        self,
        acceptor: Acceptor,
        waiter: ResultWaiter,
        metrics: GatewayMetrics,
        access: AccessLog,
        max_body_bytes: int,
        max_wait_s: float = MAX_WAIT_SECONDS,
    ) -> None:
        self.acceptor = acceptor
        self.waiter = waiter
        self.metrics = metrics
        self.access = access
        self.max_body_bytes = max_body_bytes
        self.max_wait_s = max_wait_s

    def start(
        self,
        conn: tornado.httputil.HTTPConnection,
        start_line: tornado.httputil.RequestStartLine,
        path: str,
        query: str,
    ) -> JobRequest:
        """The delegate of one request to ``path`` (one of :attr:`PATHS`)."""
        return JobRequest(self, conn, start_line, path, query)


class JobRequest(tornado.httputil.HTTPMessageDelegate):
    """One job submission, from its headers to its answer.

    The body limit (413) holds for chunked uploads too, and is checked as the body arrives.
    """

    def __init__(
        self,
        routes: JobRoutes,
        conn: tornado.httputil.HTTPConnection,
        start_line: tornado.httputil.RequestStartLine,
        route: str,
        query: str,
    ) -> None:
        self.routes = routes
        self.conn = conn
        self.method = start_line.method
        self.uri = start_line.path
        self.route = route
        self.query = query
        self.started = time.perf_counter()
        self.chunks: list[bytes] = []
        self.size = 0
        self.wait = 0.0
        self.answered = False
        self.job_id = ""  # once decided: named in an outcome-unknown answer
        # A ?wait= request while it waits: its job, the wait's end, a known id's record.
        self.env: wire.JobEnvelope | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.exists: JobExists | None = None

    # -- tornado.httputil.HTTPMessageDelegate ---------------------------------------------------

    def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: tornado.httputil.HTTPHeaders,
    ) -> None:
        """Refuse early what the headers already show: method, content type, declared size."""
        try:
            self._check(headers)
        except Problem as problem:
            self._answer_problem(problem)

    def data_received(self, chunk: bytes) -> None:
        """Collect the body, refusing it as soon as it passes the limit."""
        if self.answered:
            return
        self.size += len(chunk)
        if self.size > self.routes.max_body_bytes:
            self.chunks = []
            self._answer_problem(self._too_large())
            return
        self.chunks.append(chunk)

    def finish(self) -> None:
        """The body is complete: accept the job(s)."""
        if self.answered:
            return
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks = []
        try:
            if self.route != SINGLE:
                batch: BatchRequest = decode_batch(body)
                asyncio.ensure_future(self._accept_batch(batch)).add_done_callback(self._handled)
                return
            req: SubmitRequest = decode_submit(body)
            if self.wait:
                self._accept_and_wait(req)
                return
            # The hot path: no coroutine, answered from the publish.
            acceptor = self.routes.acceptor
            task, env = acceptor.build(req)
            self.job_id = env.id
            fresh = req.id is None
            acceptor.publish(task, env, fresh_id=fresh).add_done_callback(self._accepted)
        except Exception as exc:
            self._answer_exception(exc)

    def on_connection_close(self) -> None:
        """The client left; anything accepted stays accepted (nsqd has it). A wait ends now,
        not at its timeout: nobody is there to answer."""
        self.answered = True
        self.chunks = []  # a body cut short is dropped now, not when its cycle is collected
        self._stop_waiting()

    # -- checks ---------------------------------------------------------------------------------

    def _check(self, headers: tornado.httputil.HTTPHeaders) -> None:
        if self.method != "POST":
            raise method_not_allowed(self.method, ("POST",))
        check_content_type(headers.get("Content-Type", ""))
        length = headers.get("Content-Length") or ""
        if length.isascii() and length.isdigit() and int(length) > self.routes.max_body_bytes:
            raise self._too_large()
        if self.query:
            if self.route == SINGLE:
                self.wait = self._wait_seconds()
            else:
                _no_parameters(self.query, "a batch takes no query parameters (wait: one job)")

    def _too_large(self) -> Problem:
        return Problem(
            413,
            "payload-too-large",
            f"body is over the {self.routes.max_body_bytes}-byte limit",
        )

    def _wait_seconds(self) -> float:
        plain = _JUST_WAIT.fullmatch(self.query)
        if plain is not None and (wait := float(plain[1])) <= self.routes.max_wait_s:
            return wait
        query = urllib.parse.parse_qs(self.query, keep_blank_values=True)
        values = query.pop("wait", None)
        if query:
            _no_parameters(self.query, "the only query parameter here is wait", keep=("wait",))
        if not values:
            return 0.0
        raw = values[-1]
        limit = self.routes.max_wait_s
        wait = float(raw) if _NUMBER.fullmatch(raw) else -1.0
        if len(values) > 1 or not 0 <= wait <= limit:
            raise Problem(
                400,
                "bad-request",
                f"wait must be given once, as a decimal number of seconds from 0 to {limit:g}",
                errors=[{"field": "query.wait", "message": f"got {', '.join(map(repr, values))}"}],
            )
        return wait

    # -- accepting ------------------------------------------------------------------------------

    def _accepted(self, accepted: asyncio.Future[wire.JobEnvelope]) -> None:
        try:
            env = accepted.result()
        except BaseException as exc:
            self._answer_exception(exc)
            return
        self._answer(202, JSON_HEADERS, _json.encode(_accepted(env)))

    def _accept_and_wait(self, req: SubmitRequest) -> None:
        """Build, listen and publish; answered by the first of the outcome (the moment it
        arrives, see ResultWaiter.listen), the wait's end, or a failed publish."""
        acceptor, waiter = self.routes.acceptor, self.routes.waiter
        task, env = acceptor.build(req)
        self.job_id = env.id
        self.env = env
        # Listen before publishing: a fast result is not missed.
        waiter.listen(env.id, self._outcome)
        self.routes.metrics.waiting.inc()
        self.timer = asyncio.get_running_loop().call_later(self.wait, self._waited)
        # The request is read: a disconnect from now on is heard through the connection (both
        # servers' connections have tornado's HTTP1Connection.set_close_callback).
        set_close_callback = getattr(self.conn, "set_close_callback", None)
        if set_close_callback is not None:
            set_close_callback(self.on_connection_close)
        try:
            published = acceptor.publish(task, env, fresh_id=req.id is None)
        except BaseException:
            self._stop_waiting()
            raise
        published.add_done_callback(self._published)

    def _published(self, published: asyncio.Future[wire.JobEnvelope]) -> None:
        if self.timer is None:
            return  # answered already
        exc: BaseException | None
        if published.cancelled():  # only while the gateway stops: no nsqd took it here
            exc = PublishError("the publish was cancelled (the gateway is stopping)")
        else:
            exc = published.exception()
        if exc is None:
            return  # the outcome or the wait's end answers
        if isinstance(exc, JobExists) and exc.record.status in UNFINISHED:
            # Nothing published for a known id: the wait is for the earlier submission's
            # outcome (from the ledger, when it has it); at its end, the job as it stands.
            self.exists = exc
            return
        self._stop_waiting()
        self._answer_exception(exc)

    def _outcome(self, outcome: Outcome) -> None:
        if self.timer is None:
            return
        self._stop_waiting()
        try:
            view = outcome if isinstance(outcome, wire.ResultEnvelope) else outcome.view()
            self._answer_json(200, view)
        except Exception as exc:
            self._answer_exception(exc)

    def _waited(self) -> None:
        if self.timer is None:
            return
        self._stop_waiting()
        if self.exists is not None:
            self._answer_exception(self.exists)
        elif self.env is not None:
            self._answer_json(202, _accepted(self.env))

    def _stop_waiting(self) -> None:
        if self.timer is None:
            return
        self.timer.cancel()
        self.timer = None
        self.routes.waiter.forget(self.job_id, self._outcome)
        self.routes.metrics.waiting.dec()

    async def _accept_batch(self, batch: BatchRequest) -> None:
        envs = await self.routes.acceptor.accept_batch(batch.jobs)
        self._answer_json(202, BatchAccepted(ids=[e.id for e in envs]))

    def _handled(self, handler: asyncio.Future[None]) -> None:
        if handler.cancelled():
            return
        exc = handler.exception()
        if exc is not None:
            self._answer_exception(exc)

    # -- answers --------------------------------------------------------------------------------

    def _answer_exception(self, exc: BaseException) -> None:
        problem: Problem | None
        if isinstance(exc, JobExists):  # not an error: the job as the ledger has it
            self._answer_json(200, exc.record.view())
            return
        if isinstance(exc, BatchPartlyPublished):
            problem = _partly_published(exc)
        elif isinstance(exc, LedgerError):
            log.warning("ledger: %s", exc)
            problem = ledger_unavailable(exc)
        elif isinstance(exc, DuplicateIds):
            problem = Problem(
                409,
                "duplicate-id",
                f"jobs of one batch need distinct ids: {exc}",
                errors=validation_errors(exc),
            )
        elif isinstance(exc, IdConflict):
            problem = Problem(
                409,
                "id-conflict",
                "a job with this id was accepted before with another task or other args",
                errors=[
                    {"field": field, "message": "id taken by another job"} for field in exc.fields
                ],
            )
        else:
            problem = as_problem(exc)
        if problem is None:
            log.error("internal error on %s", self.route, exc_info=exc)
            problem = internal_error()
        elif isinstance(exc, PublishError):
            log.warning("publish failed: %s", exc)
            if isinstance(exc, PublishTimeout) and self.job_id:
                problem.extra["id"] = self.job_id
        self._answer_problem(problem)

    def _answer_problem(self, problem: Problem) -> None:
        status, headers, body = render_problem(problem)
        self._answer(status, headers, body)

    def _answer_json(self, status: int, body: Any) -> None:
        self._answer(status, JSON_HEADERS, _json.encode(body))

    def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
        if self.answered:
            return
        self.answered = True
        write_response(self.conn, status, headers, body, head=self.method == "HEAD")
        elapsed = time.perf_counter() - self.started
        self.routes.access.request_done(self.route, self.method, self.uri, status, elapsed)


def _no_parameters(query: str, why: str, keep: tuple[str, ...] = ()) -> None:
    """Refuse the query's parameters (but ``keep``) with a 400 naming each: a misspelt one
    would otherwise be ignored without a word."""
    names = [n for n in urllib.parse.parse_qs(query, keep_blank_values=True) if n not in keep]
    if names:
        raise bad_query([{"field": f"query.{n}", "message": why} for n in names])
