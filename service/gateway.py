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
from http import HTTPStatus
from typing import Any

import msgspec
import nsq
import tornado.httpserver
import tornado.web
from prometheus_client import CollectorRegistry

from service import wire
from service.accept import Accepted, Acceptor, BatchAccepted, BatchRequest, SubmitRequest
from service.config import GatewayConfig
from service.constants import (
    DEAD_LETTER_TOPIC,
    GATEWAY_CHANNEL_PREFIX,
    MAX_WAIT_SECONDS,
    PROBLEM_CONTENT_TYPE,
    READER_OUTPUT_BUFFER_BYTES,
    READER_OUTPUT_BUFFER_TIMEOUT_MS,
    RESULTS_TOPIC,
)
from service.errors import DecodeError, InvalidArgumentsError, PublishError, UnknownTaskError
from service.metrics import GatewayMetrics, observability_routes
from service.nsqio import Publisher, close_reader, connected_count, create_topics
from service.openapi import openapi_document
from service.registry import Registry, field_error, validation_errors

log = logging.getLogger("nsqjobs.gateway")
_json = msgspec.json.Encoder()


class Problem(tornado.web.HTTPError):
    """An error answered as RFC 9457 problem+json with a stable ``type``."""

    def __init__(self, status: int, slug: str, detail: str, **extra: Any) -> None:
        super().__init__(status, detail)
        self.slug = slug
        self.detail = detail
        self.extra = extra


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
        self.reader = nsq.Reader(
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
        body = {
            "type": f"urn:nsqjobs:problem:{slug}",
            "title": HTTPStatus(status_code).phrase,
            "status": status_code,
            "detail": detail,
            **extra,
        }
        self.finish(_json.encode(body))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Expected problems are not stack traces."""
        if isinstance(value, Problem) and value.status_code < 500:
            return
        super().log_exception(typ, value, tb)

    def on_finish(self) -> None:
        """Count the request by route template (bounded), method and status."""
        m = self.app.metrics
        m.requests.labels(self.route, self.request.method, str(self.get_status())).inc()
        m.request_duration.labels(self.route).observe(self.request.request_time())
        if self.get_status() >= 400 and self.route.startswith("/v1/jobs"):
            m.jobs_rejected.labels(str(self.get_status())).inc()


class NotFoundHandler(ApiHandler):
    """Any unknown path."""

    def prepare(self) -> None:
        raise Problem(404, "not-found", f"no route {self.request.path}")


@tornado.web.stream_request_body
class BodyHandler(ApiHandler):
    """A POST handler that enforces the body limit (413) and the JSON content type (415)."""

    def prepare(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        if self.request.method != "POST":
            self.set_header("Allow", "POST")
            raise Problem(405, "method-not-allowed", f"{self.request.method} not allowed; use POST")
        ctype = self.request.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise Problem(
                415,
                "unsupported-media-type",
                f"Content-Type must be application/json, got {ctype or 'none'!r}",
            )
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.app.config.max_body_bytes:
            raise self._problem_413()

    def data_received(self, chunk: bytes) -> None:
        """Collect the body, refusing it as soon as it passes the limit (chunked uploads)."""
        if self._finished:
            return
        self._size += len(chunk)
        if self._size > self.app.config.max_body_bytes:
            self.send_error(413, exc_info=(Problem, self._problem_413(), None))
            return
        self._chunks.append(chunk)

    def _problem_413(self) -> Problem:
        return Problem(
            413,
            "payload-too-large",
            f"body is over the {self.app.config.max_body_bytes}-byte limit",
        )

    def decode(self, kind: type[Any]) -> Any:
        """Parse the body as ``kind``: 400 if it is not JSON, 422 if it has the wrong shape."""
        body = b"".join(self._chunks)
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

    async def publish(self, coro: Any) -> Any:
        """Await an acceptance, mapping domain errors to problems."""
        try:
            return await coro
        except UnknownTaskError as exc:
            raise Problem(404, "unknown-task", str(exc), task=exc.task) from None
        except InvalidArgumentsError as exc:
            raise Problem(
                422, "invalid-arguments", str(exc), errors=validation_errors(exc)
            ) from None
        except PublishError as exc:
            log.warning("publish failed: %s", exc)
            raise Problem(503, "unavailable", f"no nsqd accepted the job: {exc}") from None


class JobsHandler(BodyHandler):
    """``POST /v1/jobs``: one job, optionally waiting for its result."""

    route = "/v1/jobs"

    async def post(self) -> None:
        """Accept a job; 202 when queued, 200 with the result if it came within ``wait``."""
        if self._finished:
            return
        wait = self._wait_seconds()
        req: SubmitRequest = self.decode(SubmitRequest)
        if not wait:
            env = await self.publish(self.app.acceptor.accept(req))
            self.write_json(202, Accepted(id=env.id, task=env.task))
            return
        # Build first (to learn the id), listen, then publish: a fast result is not missed.
        task_id = req.id or wire.new_job_id()
        req = msgspec.structs.replace(req, id=task_id)
        waiter = self.app.waiter
        fut = waiter.register(task_id)
        self.app.metrics.waiting.inc()
        try:
            env = await self.publish(self.app.acceptor.accept(req))
            try:
                async with asyncio.timeout(wait):
                    result = await fut
            except TimeoutError:
                self.write_json(202, Accepted(id=env.id, task=env.task))
                return
            self.write_json(200, result)
        finally:
            waiter.forget(task_id, fut)
            self.app.metrics.waiting.dec()

    def _wait_seconds(self) -> float:
        raw = self.get_query_argument("wait", None)
        if raw is None:
            return 0.0
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


class BatchHandler(BodyHandler):
    """``POST /v1/jobs/batch``: up to 1000 jobs, all or nothing."""

    route = "/v1/jobs/batch"

    async def post(self) -> None:
        """Accept a batch; 202 with the ids in request order."""
        if self._finished:
            return
        req: BatchRequest = self.decode(BatchRequest)
        envs = await self.publish(self.app.acceptor.accept_batch(req.jobs))
        self.write_json(202, BatchAccepted(ids=[e.id for e in envs]))


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
        self.server: tornado.httpserver.HTTPServer | None = None

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
            (r"/v1/jobs", JobsHandler, ctx),
            (r"/v1/jobs/batch", BatchHandler, ctx),
            (r"/v1/tasks", TasksHandler, ctx),
            (r"/openapi.json", OpenApiHandler, ctx),
            *observability_routes(self.metrics.registry, self.ready_problems),
        ]
        return tornado.web.Application(
            routes,
            default_handler_class=NotFoundHandler,
            default_handler_args=ctx,
            log_function=_log_request,
        )

    async def start(self) -> None:
        """Create topics, connect, and listen."""
        topics = [*self.registry.queues(), RESULTS_TOPIC, DEAD_LETTER_TOPIC]
        for failure in await create_topics(self.config.nsqd_http_address, topics):
            log.warning("%s (continuing: the first publish creates it)", failure)
        self.waiter.start()
        self.server = tornado.httpserver.HTTPServer(
            self.make_app(), max_body_size=4 * self.config.max_body_bytes + 65536, xheaders=True
        )
        self.server.listen(self.config.port, self.config.host)
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


def _log_request(handler: tornado.web.RequestHandler) -> None:
    # One line per request; successes at DEBUG so a benchmark does not measure the logger.
    status = handler.get_status()
    level = logging.DEBUG if status < 400 else logging.INFO if status < 500 else logging.WARNING
    if log.isEnabledFor(level):
        log.log(
            level,
            "%d %s %s %.1fms",
            status,
            handler.request.method,
            handler.request.uri,
            1000.0 * handler.request.request_time(),
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
