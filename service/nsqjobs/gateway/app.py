"""The HTTP gateway: validates job submissions and publishes them to nsqd (tornado).

Routes: ``POST /v1/jobs`` (``?wait=`` for the result), ``POST /v1/jobs/batch``, ``GET /v1/tasks``,
``GET /openapi.json`` and the observability routes. Every error is ``application/problem+json``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
import time
import urllib.parse
from collections.abc import Awaitable
from http import HTTPStatus
from typing import Any

import msgspec
import tornado.httpserver
import tornado.httputil
import tornado.web
from prometheus_client import CollectorRegistry

from nsqjobs import wire
from nsqjobs.api import Accepted, BatchAccepted, BatchRequest, SubmitRequest
from nsqjobs.config import GatewayConfig
from nsqjobs.errors import DecodeError, InvalidArgumentsError, PublishError, UnknownTaskError
from nsqjobs.gateway.openapi import openapi_document
from nsqjobs.gateway.submit import Acceptor
from nsqjobs.http.server import HTTPServer
from nsqjobs.names import (
    DEAD_LETTER_TOPIC,
    GATEWAY_CHANNEL_PREFIX,
    MAX_WAIT_SECONDS,
    PROBLEM_CONTENT_TYPE,
    READER_OUTPUT_BUFFER_BYTES,
    READER_OUTPUT_BUFFER_TIMEOUT_MS,
    RESULTS_TOPIC,
)
from nsqjobs.nsq.admin import create_topics
from nsqjobs.nsq.publisher import Publisher
from nsqjobs.nsq.reader import Reader, close_reader, connected_count
from nsqjobs.observability.exposition import observability_routes
from nsqjobs.observability.metrics import GatewayMetrics
from nsqjobs.registry import Registry, field_error, validation_errors

log = logging.getLogger("nsqjobs.gateway")
_json = msgspec.json.Encoder()


class Problem(tornado.web.HTTPError):
    """An error answered as RFC 9457 problem+json with a stable ``type``."""

    def __init__(self, status: int, slug: str, detail: str, **extra: Any) -> None:
        super().__init__(status, detail)
        self.slug = slug
        self.detail = detail
        self.extra = extra


def problem_body(status: int, slug: str, detail: str, extra: dict[str, Any]) -> bytes:
    """The problem+json document for one error."""
    return _json.encode(
        {
            "type": f"urn:nsqjobs:problem:{slug}",
            "title": HTTPStatus(status).phrase,
            "status": status,
            "detail": detail,
            **extra,
        }
    )


def as_problem(exc: BaseException) -> Problem | None:
    """The problem a domain error is answered with; None for anything unexpected."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, UnknownTaskError):
        return Problem(404, "unknown-task", str(exc), task=exc.task)
    if isinstance(exc, InvalidArgumentsError):
        return Problem(422, "invalid-arguments", str(exc), errors=validation_errors(exc))
    if isinstance(exc, PublishError):
        log.warning("publish failed: %s", exc)
        return Problem(503, "unavailable", f"no nsqd accepted the job: {exc}")
    return None


def decode_body(body: bytes, kind: type[Any]) -> Any:
    """Parse a request body as ``kind``: 400 if it is not JSON, 422 if it has the wrong shape."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        err = field_error(str(exc), "body")
        raise Problem(
            422,
            "invalid-arguments",
            str(exc),
            errors=[{"field": err.field, "message": err.message}],
        ) from None
    except msgspec.DecodeError as exc:
        raise Problem(400, "malformed-json", f"body is not valid JSON: {exc}") from None


class ResultWaiter:
    """Listens to the results topic on its own ephemeral channel and wakes ``?wait=`` requests.

    Each gateway replica has its own channel, so each sees every result and answers its own
    waiters; results nobody waits for are dropped here (the results topic keeps its other
    channels' copies).
    """

    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self._waiting: dict[str, list[asyncio.Future[wire.ResultEnvelope]]] = {}
        self.config = config
        self.reader: Any = None

    def start(self) -> None:
        """Subscribe (after the results topic exists, so the first lookup finds it)."""
        config = self.config
        host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:24]
        channel = f"{GATEWAY_CHANNEL_PREFIX}_{host}_{os.getpid()}_{secrets.token_hex(3)}#ephemeral"
        self.reader = Reader(
            topic=RESULTS_TOPIC,
            channel=channel,
            message_handler=self._on_message,
            nsqd_tcp_addresses=list(config.nsqd_tcp_address),
            lookupd_http_addresses=list(config.lookupd_http_address) or None,
            lookupd_poll_interval=config.lookupd_poll_interval,
            max_in_flight=500,
            max_tries=0,
            output_buffer_size=READER_OUTPUT_BUFFER_BYTES,
            output_buffer_timeout=READER_OUTPUT_BUFFER_TIMEOUT_MS,
        )

    def _on_message(self, message: Any) -> bool:
        self.metrics.results_seen.inc()
        try:
            result = wire.decode_result(message.body)
        except DecodeError as exc:
            log.warning("results: dropping undecodable message %s: %s", message.id, exc)
            return True
        for fut in self._waiting.pop(result.id, ()):
            if not fut.done():
                fut.set_result(result)
        return True

    def register(self, job_id: str) -> asyncio.Future[wire.ResultEnvelope]:
        """Start listening for ``job_id`` (before publishing, so a fast result is not missed)."""
        fut: asyncio.Future[wire.ResultEnvelope] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(job_id, []).append(fut)
        return fut

    def forget(self, job_id: str, fut: asyncio.Future[wire.ResultEnvelope]) -> None:
        """Stop listening (timeout or error)."""
        futs = self._waiting.get(job_id)
        if futs and fut in futs:
            futs.remove(fut)
            if not futs:
                del self._waiting[job_id]

    def connected(self) -> bool:
        """True when subscribed to the results topic on at least one nsqd."""
        return self.reader is not None and connected_count(self.reader) > 0

    def close(self) -> None:
        """Close the reader's connections."""
        if self.reader is not None:
            close_reader(self.reader)


class ApiHandler(tornado.web.RequestHandler):
    """Common behaviour: JSON out, problem+json errors, request metrics by route."""

    route = "unmatched"

    def initialize(self, app: GatewayApp) -> None:
        self.app = app

    def check_xsrf_cookie(self) -> None:  # an API, never a browser form
        return None

    def write_json(self, status: int, body: Any) -> None:
        """Finish with a JSON body."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(_json.encode(body))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Render any error as problem+json."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, Problem):
            slug, detail, extra = exc.slug, exc.detail, exc.extra
        elif status_code == 405:
            slug, detail, extra = "method-not-allowed", f"{self.request.method} not allowed", {}
        elif status_code >= 500:
            slug, detail, extra = "internal", "internal error (see the gateway log)", {}
        else:
            slug, detail, extra = (
                "bad-request",
                (
                    exc.log_message
                    if isinstance(exc, tornado.web.HTTPError) and exc.log_message
                    else "bad request"
                ),
                {},
            )
        if status_code == 503:
            self.set_header("Retry-After", "1")
        self.set_header("Content-Type", PROBLEM_CONTENT_TYPE)
        self.finish(problem_body(status_code, slug, detail, extra))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Expected problems are not stack traces."""
        if isinstance(value, Problem) and value.status_code < 500:
            return
        super().log_exception(typ, value, tb)

    def on_finish(self) -> None:
        """Count the request by route template (bounded), method and status."""
        self.app.metrics.request_done(
            self.route, self.request.method or "-", self.get_status(), self.request.request_time()
        )


class NotFoundHandler(ApiHandler):
    """Any unknown path."""

    def prepare(self) -> None:
        raise Problem(404, "not-found", f"no route {self.request.path}")


class JobRequest(tornado.httputil.HTTPMessageDelegate):
    """``POST /v1/jobs`` (``?wait=``) and ``POST /v1/jobs/batch``: the gateway's hot path.

    Written on tornado's message-delegate interface rather than as a RequestHandler: a single
    job is validated when its body ends, published (coalesced with its neighbours into one
    MPUB), and answered from the publish's callback, with no coroutine of its own.
    The body limit (413) holds for chunked uploads too, and is checked as the body arrives.
    """

    def __init__(
        self,
        app: GatewayApp,
        conn: tornado.httputil.HTTPConnection,
        start_line: tornado.httputil.RequestStartLine,
        route: str,
        query: str,
    ) -> None:
        self.app = app
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
        if self.size > self.app.config.max_body_bytes:
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
            if self.route == "/v1/jobs" and not self.wait:
                req: SubmitRequest = decode_body(body, SubmitRequest)
                self.app.acceptor.submit(req).add_done_callback(self._accepted)
                return
            handler = asyncio.ensure_future(self._accept_slowly(body))
            handler.add_done_callback(self._handled)
        except Exception as exc:
            self._answer_exception(exc)

    def on_connection_close(self) -> None:
        """The client left; anything accepted stays accepted (nsqd has it)."""
        self.answered = True

    # -- answers --------------------------------------------------------------------------------

    def _check(self, headers: tornado.httputil.HTTPHeaders) -> None:
        method = self.method
        if method != "POST":
            raise Problem(
                405, "method-not-allowed", f"{method} not allowed; use POST", allow="POST"
            )
        ctype = headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise Problem(
                415,
                "unsupported-media-type",
                f"Content-Type must be application/json, got {ctype or 'none'!r}",
            )
        length = headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.app.config.max_body_bytes:
            raise self._too_large()
        if self.route == "/v1/jobs" and self.query:
            self.wait = self._wait_seconds()

    def _too_large(self) -> Problem:
        return Problem(
            413,
            "payload-too-large",
            f"body is over the {self.app.config.max_body_bytes}-byte limit",
        )

    def _wait_seconds(self) -> float:
        values = urllib.parse.parse_qs(self.query, keep_blank_values=True).get("wait")
        if not values:
            return 0.0
        raw = values[-1]
        try:
            wait = float(raw)
        except ValueError:
            wait = -1.0
        if not 0 <= wait <= MAX_WAIT_SECONDS:
            raise Problem(
                400,
                "bad-request",
                f"wait must be a number of seconds from 0 to {MAX_WAIT_SECONDS:g}",
                errors=[{"field": "query.wait", "message": f"got {raw!r}"}],
            )
        return wait

    def _accepted(self, accepted: asyncio.Future[wire.JobEnvelope]) -> None:
        try:
            env = accepted.result()
        except BaseException as exc:
            self._answer_exception(exc)
            return
        self._answer(202, "application/json", _json.encode(Accepted(id=env.id, task=env.task)))

    async def _accept_slowly(self, body: bytes) -> None:
        acceptor = self.app.acceptor
        if self.route == "/v1/jobs/batch":
            batch: BatchRequest = decode_body(body, BatchRequest)
            envs = await acceptor.accept_batch(batch.jobs)
            self._answer_json(202, BatchAccepted(ids=[e.id for e in envs]))
            return
        req: SubmitRequest = decode_body(body, SubmitRequest)
        # Build first (to learn the id), listen, then publish: a fast result is not missed.
        job_id = req.id or wire.new_job_id()
        req = msgspec.structs.replace(req, id=job_id)
        waiter = self.app.waiter
        fut = waiter.register(job_id)
        self.app.metrics.waiting.inc()
        try:
            env = await acceptor.accept(req)
            try:
                async with asyncio.timeout(self.wait):
                    result = await fut
            except TimeoutError:
                self._answer_json(202, Accepted(id=env.id, task=env.task))
                return
            self._answer_json(200, result)
        finally:
            waiter.forget(job_id, fut)
            self.app.metrics.waiting.dec()

    def _handled(self, handler: asyncio.Task[None]) -> None:
        if not handler.cancelled() and handler.exception() is not None:
            exc = handler.exception()
            assert exc is not None
            self._answer_exception(exc)

    def _answer_exception(self, exc: BaseException) -> None:
        problem = as_problem(exc)
        if problem is None:
            log.error("internal error on %s", self.route, exc_info=exc)
            problem = Problem(500, "internal", "internal error (see the gateway log)")
        self._answer_problem(problem)

    def _answer_problem(self, problem: Problem) -> None:
        extra = dict(problem.extra)
        headers = {}
        allow = extra.pop("allow", None)
        if allow is not None:
            headers["Allow"] = allow
        if problem.status_code == 503:
            headers["Retry-After"] = "1"
        body = problem_body(problem.status_code, problem.slug, problem.detail, extra)
        self._answer(problem.status_code, PROBLEM_CONTENT_TYPE, body, headers)

    def _answer_json(self, status: int, body: Any) -> None:
        self._answer(status, "application/json", _json.encode(body))

    def _answer(
        self, status: int, ctype: str, body: bytes, extra: dict[str, str] | None = None
    ) -> None:
        if self.answered:
            return
        self.answered = True
        headers = tornado.httputil.HTTPHeaders()
        headers["Date"] = _http_date()
        headers["Content-Type"] = ctype
        headers["Content-Length"] = str(len(body))
        if extra:
            for name, value in extra.items():
                headers[name] = value
        conn = self.conn
        conn.write_headers(
            tornado.httputil.ResponseStartLine("HTTP/1.1", status, _REASONS[status]),
            headers,
            body,
        )
        conn.finish()
        elapsed = time.perf_counter() - self.started
        self.app.metrics.request_done(self.route, self.method, status, elapsed)
        _log_request(status, self.method, self.uri, elapsed)


_REASONS = {s.value: s.phrase for s in HTTPStatus}
_date_cache: list[Any] = [0, ""]


def _http_date() -> str:
    """The Date header (RFC 9110 asks origin servers for one), formatted once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, tornado.httputil.format_timestamp(now)
    return str(_date_cache[1])


class GatewayRouter(tornado.httputil.HTTPServerConnectionDelegate):
    """Job submissions to :class:`JobRequest`; every other path to the tornado Application.

    Routing happens on the request line alone, so a job submission never builds tornado's
    ``HTTPServerRequest`` (whose query parsing and deep copies cost as much as the rest of the
    request). Works under either HTTP layer (see ``--http-server``).
    """

    JOB_ROUTES = frozenset(("/v1/jobs", "/v1/jobs/batch"))

    def __init__(self, app: GatewayApp, web: tornado.web.Application) -> None:
        self.app = app
        self.web = web

    def start_request(
        self, server_conn: object, request_conn: tornado.httputil.HTTPConnection
    ) -> tornado.httputil.HTTPMessageDelegate:
        """One request's delegate, decided when its headers arrive."""
        return _Routed(self, server_conn, request_conn)


class _Routed(tornado.httputil.HTTPMessageDelegate):
    """Forwards one request to the delegate its path selects."""

    __slots__ = ("conn", "router", "server_conn", "target")

    def __init__(
        self,
        router: GatewayRouter,
        server_conn: object,
        conn: tornado.httputil.HTTPConnection,
    ) -> None:
        self.router = router
        self.server_conn = server_conn
        self.conn = conn
        self.target: tornado.httputil.HTTPMessageDelegate | None = None

    def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: tornado.httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        """Pick the delegate, then hand it the headers."""
        assert isinstance(start_line, tornado.httputil.RequestStartLine)
        path, _, query = start_line.path.partition("?")
        router = self.router
        if path in router.JOB_ROUTES:
            self.target = JobRequest(router.app, self.conn, start_line, path, query)
        else:
            self.target = router.web.start_request(self.server_conn, self.conn)
        return self.target.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        """Forward body data."""
        assert self.target is not None
        return self.target.data_received(chunk)

    def finish(self) -> None:
        """Forward the end of the request."""
        assert self.target is not None
        self.target.finish()

    def on_connection_close(self) -> None:
        """Forward a disconnect."""
        if self.target is not None:
            self.target.on_connection_close()


class TasksHandler(ApiHandler):
    """``GET /v1/tasks``: the catalog with each task's argument JSON Schema."""

    route = "/v1/tasks"

    def get(self) -> None:
        """List the registered tasks."""
        self.write_json(
            200,
            {
                "tasks": [
                    {
                        "name": t.name,
                        "queue": t.queue,
                        "time_limit_s": t.time_limit_s,
                        "max_attempts": t.max_attempts,
                        "description": t.description,
                        "args_schema": t.schema,
                    }
                    for t in self.app.registry
                ]
            },
        )


class OpenApiHandler(ApiHandler):
    """``GET /openapi.json``: generated from the same types the gateway validates with."""

    route = "/openapi.json"

    def get(self) -> None:
        """Serve the OpenAPI 3.1 document."""
        self.write_json(200, self.app.openapi)


class GatewayApp:
    """The gateway's state: config, metrics, publisher, acceptor and the result waiter."""

    def __init__(
        self,
        config: GatewayConfig,
        registry: Registry,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.metrics = GatewayMetrics(metrics_registry or CollectorRegistry())
        self.publisher = Publisher(
            config.nsqd_tcp_address, timeout_s=config.publish_timeout_s, metrics=self.metrics
        )
        self.acceptor = Acceptor(registry, self.publisher, self.metrics)
        self.waiter = ResultWaiter(config, self.metrics)
        self.openapi = openapi_document(registry)
        self.server: tornado.httpserver.HTTPServer | HTTPServer | None = None

    def ready_problems(self) -> list[str]:
        """Empty when the gateway can accept jobs."""
        problems = []
        if not self.publisher.connected():
            problems.append("no nsqd connection for publishing")
        if not self.waiter.connected():
            problems.append("not subscribed to the results topic (wait= will time out)")
        return problems

    def make_app(self) -> tornado.web.Application:
        """The tornado application with every route."""
        ctx = {"app": self}
        routes: list[Any] = [
            (r"/v1/tasks", TasksHandler, ctx),
            (r"/openapi.json", OpenApiHandler, ctx),
            *observability_routes(self.metrics.registry, self.ready_problems),
        ]
        return tornado.web.Application(
            routes,
            default_handler_class=NotFoundHandler,
            default_handler_args=ctx,
            log_function=_log_handler,
        )

    async def start(self) -> None:
        """Create topics, connect, and listen."""
        topics = [*self.registry.queues(), RESULTS_TOPIC, DEAD_LETTER_TOPIC]
        for failure in await create_topics(self.config.nsqd_http_address, topics):
            log.warning("%s (continuing: the first publish creates it)", failure)
        self.waiter.start()
        router = GatewayRouter(self, self.make_app())
        # A backstop far above the gateway's own limit, which answers problem+json 413 itself.
        max_body = 4 * self.config.max_body_bytes + 65536
        if self.config.http_server == "tornado":
            server = tornado.httpserver.HTTPServer(router, max_body_size=max_body, xheaders=True)
            server.listen(self.config.port, self.config.host)
            self.server = server
        else:
            fast = HTTPServer(router, max_body_size=max_body, xheaders=True)
            await fast.listen(self.config.port, self.config.host)
            self.server = fast
        if not await self.publisher.wait_connected(5.0):
            log.warning(
                "no nsqd connection yet at %s; /readyz answers 503 until there is one",
                ",".join(self.config.nsqd_tcp_address),
            )
        log.info(
            "gateway listening on http://%s:%d (tasks: %s)",
            self.config.host,
            self.config.port,
            ", ".join(t.name for t in self.registry),
        )

    async def stop(self) -> None:
        """Stop accepting, let requests in progress finish briefly, close NSQ connections."""
        if self.server is not None:
            self.server.stop()
            try:
                await asyncio.wait_for(self.server.close_all_connections(), 5.0)
            except TimeoutError:
                # Requests still waiting for results; their jobs are safe in nsqd already.
                log.warning("closing with requests still open (they were waiting for results)")
        self.waiter.close()
        self.publisher.close()


def _log_request(status: int, method: str, uri: str, seconds: float) -> None:
    # One line per request; successes at DEBUG so a benchmark does not measure the logger.
    level = logging.DEBUG if status < 400 else logging.INFO if status < 500 else logging.WARNING
    if log.isEnabledFor(level):
        log.log(level, "%d %s %s %.1fms", status, method, uri, 1000.0 * seconds)


def _log_handler(handler: tornado.web.RequestHandler) -> None:
    request = handler.request
    _log_request(
        handler.get_status(), request.method or "-", request.uri or "", request.request_time()
    )


async def serve(config: GatewayConfig, registry: Registry, stop: asyncio.Event) -> None:
    """Run a gateway until ``stop`` is set."""
    app = GatewayApp(config, registry)
    await app.start()
    await stop.wait()
    log.info("gateway stopping")
    started = time.monotonic()
    await app.stop()
    log.info("gateway stopped in %.2fs", time.monotonic() - started)
