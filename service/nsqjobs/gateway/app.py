"""The HTTP gateway: validates job submissions and publishes them to nsqd.

Routes: ``POST /v1/jobs`` (``?wait=`` for the result) and ``POST /v1/jobs/batch``
(``nsqjobs.gateway.jobs``), ``POST /v1/jobs/wait`` (many jobs at once,
``nsqjobs.gateway.waitmany``), ``GET /v1/tasks`` and ``GET /openapi.json``
(``nsqjobs.gateway.catalog``), and the observability routes. With the job ledger: ``GET
/v1/jobs``, ``GET|DELETE /v1/jobs/{id}`` (``nsqjobs.gateway.status``) and the dead-letter routes
(``nsqjobs.gateway.deadletters``). Every error is
``application/problem+json`` (``nsqjobs.http.problems``). This module wires them together and
runs the gateway's lifecycle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any

import tornado.httpserver
import tornado.httputil
import tornado.web
from prometheus_client import CollectorRegistry

from nsqjobs import wire
from nsqjobs.config import GatewayConfig, spelled
from nsqjobs.errors import listening
from nsqjobs.gateway.auth import PROTECTED_PREFIX, Tokens
from nsqjobs.gateway.catalog import OpenApiHandler, TasksHandler
from nsqjobs.gateway.deadletters import (
    BULK_REPLAY_PATTERN,
    DEAD_LETTER_PATTERN,
    DEAD_LETTERS_PATTERN,
    REPLAY_PATTERN,
    BulkReplayHandler,
    DeadLetterHandler,
    DeadLettersHandler,
    ReplayHandler,
)
from nsqjobs.gateway.jobs import JobRoutes
from nsqjobs.gateway.openapi import openapi_document
from nsqjobs.gateway.status import (
    BATCH_JOB_PATTERN,
    JOB_PATTERN,
    JOBS_PATTERN,
    BatchJobHandler,
    JobsHandler,
    JobStatusHandler,
    LedgerOps,
)
from nsqjobs.gateway.submit import Acceptor
from nsqjobs.gateway.waiting import ResultWaiter
from nsqjobs.gateway.waitmany import WAIT_PATTERN, LedgerWaitManyHandler, WaitManyHandler
from nsqjobs.http.access import AccessLog
from nsqjobs.http.handlers import NotFoundHandler
from nsqjobs.http.problems import Problem, render_problem
from nsqjobs.http.responses import write_response
from nsqjobs.http.server import HTTPServer
from nsqjobs.ledger import Store, open_store
from nsqjobs.ledger.outcomes import OutcomeRecorder
from nsqjobs.ledger.relay import Relay
from nsqjobs.ledger.session import Session
from nsqjobs.names import CANCEL_TOPIC, DEAD_LETTER_TOPIC, RESULTS_TOPIC, STARTED_TOPIC
from nsqjobs.nsq.admin import create_topics, nsqd_limit
from nsqjobs.nsq.publisher import Publisher
from nsqjobs.observability.exposition import observability_routes
from nsqjobs.observability.metrics import GatewayMetrics, LedgerMetrics
from nsqjobs.registry import Registry

log = logging.getLogger("nsqjobs.gateway")
# What chose the address the gateway listens on (named when it cannot).
_ADDRESS_SETTINGS = spelled(GatewayConfig, "host", "port")


class GatewayRouter(tornado.httputil.HTTPServerConnectionDelegate):
    """Job submissions to :class:`~nsqjobs.gateway.jobs.JobRoutes`; every other path to the
    tornado Application.

    Routing happens on the request line alone, so a job submission never builds tornado's
    ``HTTPServerRequest`` (whose query parsing and deep copies cost as much as the rest of the
    request). Works under either HTTP layer (see ``--http-server``). With ``tokens``, every
    ``/v1`` route needs a bearer token; ``check_framing`` refuses what RFC 9112 says a server
    must (no ``Host``, a transfer coding other than chunked), for a layer that does not itself.
    With ``listing`` (the ledger is on), ``/v1/jobs`` and ``/v1/jobs/batch`` by any method but
    POST are the tornado Application's (``GET /v1/jobs`` lists jobs, ``GET /v1/jobs/batch`` is
    the job whose id is ``batch``).
    """

    def __init__(
        self,
        jobs: JobRoutes,
        web: tornado.web.Application,
        tokens: Tokens | None = None,
        check_framing: bool = False,
        listing: bool = False,
    ) -> None:
        self.jobs = jobs
        self.web = web
        self.tokens = tokens
        self.check_framing = check_framing
        self.listing = listing

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
        # Until the headers pick the real one: a delegate that ignores everything.
        self.target = _UNROUTED

    def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: tornado.httputil.HTTPHeaders,
    ) -> Awaitable[None] | None:
        """Pick the delegate, then hand it the headers."""
        if not isinstance(start_line, tornado.httputil.RequestStartLine):
            raise TypeError("a server receives a RequestStartLine")
        path, _, query = start_line.path.partition("?")
        router = self.router
        refusal = None
        if router.check_framing:
            refusal = _framing_problem(start_line, headers)
        if refusal is None and router.tokens is not None and path.startswith(PROTECTED_PREFIX):
            refusal = router.tokens.refusal(headers.get("Authorization"))
        if refusal is not None:
            route = path if path in router.jobs.PATHS or path == "/v1/tasks" else "unmatched"
            self.target = _Refused(self.conn, refusal, router.jobs.access, route, start_line)
        elif path in router.jobs.PATHS and (start_line.method == "POST" or not router.listing):
            self.target = router.jobs.start(self.conn, start_line, path, query)
        else:
            self.target = router.web.start_request(self.server_conn, self.conn)
        return self.target.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Awaitable[None] | None:
        """Forward body data."""
        return self.target.data_received(chunk)

    def finish(self) -> None:
        """Forward the end of the request."""
        self.target.finish()

    def on_connection_close(self) -> None:
        """Forward a disconnect."""
        self.target.on_connection_close()


_UNROUTED = tornado.httputil.HTTPMessageDelegate()


def _framing_problem(
    start_line: tornado.httputil.RequestStartLine, headers: tornado.httputil.HTTPHeaders
) -> Problem | None:
    """RFC 9112: 400 for an HTTP/1.1 request without exactly one Host (3.2), 501 for a transfer
    coding the server does not know, 400 when chunked is not the one, final coding (6.1)."""
    if start_line.version == "HTTP/1.1" and len(headers.get_list("Host")) != 1:
        return Problem(400, "bad-request", "an HTTP/1.1 request needs exactly one Host header")
    codings = [
        c.strip().lower() for v in headers.get_list("Transfer-Encoding") for c in v.split(",")
    ]
    if not codings or codings == ["chunked"]:
        return None
    if codings[-1] != "chunked" or codings.count("chunked") > 1:
        return Problem(400, "bad-request", "Transfer-Encoding must end in a single chunked")
    return Problem(
        501,
        "not-implemented",
        f"transfer coding {', '.join(c for c in codings if c != 'chunked')!r} is not "
        "supported (only chunked)",
        headers={"Connection": "close"},
    )


class _Refused(tornado.httputil.HTTPMessageDelegate):
    """Answers a problem as soon as the headers are in; the body, if any, is not read."""

    def __init__(
        self,
        conn: tornado.httputil.HTTPConnection,
        problem: Problem,
        access: AccessLog,
        route: str,
        start_line: tornado.httputil.RequestStartLine,
    ) -> None:
        self.conn = conn
        self.problem = problem
        self.access = access
        self.route = route
        self.start_line = start_line

    def headers_received(
        self,
        start_line: tornado.httputil.RequestStartLine | tornado.httputil.ResponseStartLine,
        headers: tornado.httputil.HTTPHeaders,
    ) -> None:
        """Answer the problem."""
        started = time.perf_counter()
        status, out, body = render_problem(self.problem)
        write_response(self.conn, status, out, body, head=self.start_line.method == "HEAD")
        line = self.start_line
        elapsed = time.perf_counter() - started
        self.access.request_done(self.route, line.method, line.path, status, elapsed)


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
        self.access = AccessLog(log, self.metrics)
        self.publisher = Publisher(
            config.nsqd_tcp_address, timeout_s=config.publish_timeout_s, metrics=self.metrics
        )
        # The job ledger (off by default): jobs recorded before they are published, outcomes
        # recorded from the results and dead-letter topics.
        self.store: Store | None = None
        self.outcomes: OutcomeRecorder | None = None
        # Re-drives lost jobs and publishes long delays as they come due.
        self.relay: Relay | None = None
        # This gateway's session: jobs are recorded as published in the write that records
        # them; the relay's heartbeat is the evidence should the gateway die before nsqd's ack.
        self.session: Session | None = None
        if config.ledger_url:
            ledger_metrics = LedgerMetrics(self.metrics.registry)
            self.store = open_store(
                config.ledger_url, observe_write=ledger_metrics.write_seconds.observe
            )
            self.outcomes = OutcomeRecorder(
                self.store,
                ledger_metrics,
                config.nsqd_tcp_address,
                config.lookupd_http_address,
                config.lookupd_poll_interval,
            )
            self.session = Session(self.store)
            self.relay = Relay(
                self.store,
                self.publisher,
                registry,
                ledger_metrics,
                config.nsqd_http_address,
                poll_s=config.ledger_poll_s,
                grace_s=config.ledger_grace_s,
                # Past every retry of a publish (each up to the publish timeout), so a claim
                # outlives the relay's own attempt at it.
                lease_s=3 * config.publish_timeout_s + 2 * config.ledger_poll_s,
                result_ttl_s=config.result_ttl,
                # A tenth of the retention, so nothing outstays it by much, once a minute at most.
                prune_every_s=min(60.0, max(config.ledger_poll_s, config.result_ttl / 10)),
                # Counting a million jobs takes a second of a core: not every poll.
                stats_every_s=5 * config.ledger_poll_s,
                session=self.session,
                # A gateway's relay beats its session every poll; a tick may wait on
                # publishes (each up to the publish timeout) before it beats again.
                session_stale_s=3 * config.ledger_poll_s + 2 * config.publish_timeout_s,
            )
        self.acceptor = Acceptor(
            registry,
            self.publisher,
            self.metrics,
            None if self.store is None else self.store.record_accepted,
            published=None if self.store is None else self._mark_published,
            session=self.session,
            max_msg_size=config.nsqd_max_msg_size,
            max_body_size=config.nsqd_max_body_size,
        )
        self.waiter = ResultWaiter(config, self.metrics, self.store)
        # The ledger's routes; a replay kicks the relay.
        self.ledger_ops: LedgerOps | None = None
        if self.store is not None:
            self.ledger_ops = LedgerOps(self.store, self._publish_cancel)
            if self.relay is not None:  # a replayed job is published at once, not next poll
                self.ledger_ops.on_replayed = self.relay.kick
        self.openapi = openapi_document(
            registry,
            max_wait_s=config.max_wait_s,
            authenticated=bool(config.api_tokens),
            ledger=self.store is not None,
        )
        self.server: tornado.httpserver.HTTPServer | HTTPServer | None = None

    async def _publish_cancel(self, job_id: str) -> None:
        await self.publisher.pub(CANCEL_TOPIC, wire.encode(wire.Cancel(id=job_id, at=wire.now())))

    def _mark_published(self, ids: list[str]) -> None:
        if self.store is not None:
            self.store.mark_published(ids).add_done_callback(_log_ledger_failure)

    def ready_problems(self) -> list[str]:
        """Empty when the gateway can accept jobs."""
        problems = []
        if not self.publisher.connected():
            problems.append("no nsqd connection for publishing")
        if not self.waiter.connected():
            problems.append("not subscribed to the results topic (wait= will time out)")
        if self.outcomes is not None and not self.outcomes.connected():
            problems.append("the ledger is not subscribed to the results and dead-letter topics")
        if self.relay is not None and self.relay.problem is not None:
            problems.append(self.relay.problem)
        return problems

    def make_app(self) -> tornado.web.Application:
        """The tornado application with every route but the job routes."""
        wait = {"waiter": self.waiter, "store": self.store, "max_wait_s": self.config.max_wait_s}
        routes: list[Any] = [
            (r"/v1/tasks", TasksHandler, {"registry": self.registry}),
            (r"/openapi.json", OpenApiHandler, {"document": self.openapi}),
            *observability_routes(self.metrics.registry, self.ready_problems),
        ]
        if self.ledger_ops is None:
            routes.append((WAIT_PATTERN, WaitManyHandler, wait))
        else:
            ops = {"ops": self.ledger_ops}
            routes += [
                # Before the job pattern, which it also matches (as the job with id "wait").
                (WAIT_PATTERN, LedgerWaitManyHandler, {**wait, **ops}),
                (JOBS_PATTERN, JobsHandler, ops),
                (BATCH_JOB_PATTERN, BatchJobHandler, ops),
                (JOB_PATTERN, JobStatusHandler, ops),
                (DEAD_LETTERS_PATTERN, DeadLettersHandler, ops),
                (BULK_REPLAY_PATTERN, BulkReplayHandler, ops),
                (REPLAY_PATTERN, ReplayHandler, ops),
                (DEAD_LETTER_PATTERN, DeadLetterHandler, ops),
            ]
        return tornado.web.Application(
            routes,
            default_handler_class=NotFoundHandler,
            log_function=self.access.tornado_request_done,
            max_body_bytes=self.config.max_body_bytes,
        )

    def make_router(self) -> GatewayRouter:
        """Every route: the job routes' delegate, and the tornado application."""
        config = self.config
        jobs = JobRoutes(
            self.acceptor,
            self.waiter,
            self.metrics,
            self.access,
            config.max_body_bytes,
            config.max_wait_s,
        )
        tokens = Tokens(config.api_tokens) if config.api_tokens else None
        # Our HTTP layer refuses bad framing itself, as problem+json; tornado's does not.
        return GatewayRouter(
            jobs,
            self.make_app(),
            tokens,
            config.http_server == "tornado",
            listing=self.store is not None,
        )

    async def read_nsqd_limits(self) -> None:
        """Take nsqd's live --max-msg-size and --max-body-size (the least over the configured
        nsqd), so the gateway refuses what nsqd would; keep the settings when none answers."""
        config, acceptor = self.config, self.acceptor
        addresses = config.nsqd_http_address
        acceptor.max_msg_size = await nsqd_limit(
            addresses, "max_msg_size", config.nsqd_max_msg_size
        )
        acceptor.max_body_size = await nsqd_limit(
            addresses, "max_body_size", config.nsqd_max_body_size
        )
        self.publisher.set_limits(acceptor.max_msg_size, acceptor.max_body_size)

    async def start(self) -> None:
        """Create topics, read nsqd's limits, connect, and listen."""
        config = self.config
        topics = [*self.registry.queues(), RESULTS_TOPIC, DEAD_LETTER_TOPIC]
        if self.store is not None:
            # The ledger reads STARTED_TOPIC too: made now, its reader finds it in nsqlookupd
            # at once rather than logging a warning until a worker first publishes there.
            topics += [CANCEL_TOPIC, STARTED_TOPIC]
        for failure in await create_topics(config.nsqd_http_address, topics):
            log.warning("%s (continuing: the first publish creates it)", failure)
        await self.read_nsqd_limits()
        self.waiter.start()
        if self.outcomes is not None:
            self.outcomes.start()
        if self.relay is not None:
            self.relay.start()
        router = self.make_router()
        # A backstop far above the gateway's own limit, which answers problem+json 413 itself.
        max_body = 4 * config.max_body_bytes + 65536
        if config.http_server == "tornado":
            server = tornado.httpserver.HTTPServer(
                router,
                max_body_size=max_body,
                xheaders=True,
                # tornado counts the wait for a request's headers from the previous response.
                idle_connection_timeout=config.idle_timeout_s,
                body_timeout=config.body_timeout_s,
            )
            with listening(config.host, config.port, _ADDRESS_SETTINGS):
                server.listen(config.port, config.host)
            self.server = server
        else:
            fast = HTTPServer(
                router,
                max_body_size=max_body,
                xheaders=True,
                idle_timeout_s=config.idle_timeout_s,
                header_timeout_s=config.header_timeout_s,
                body_timeout_s=config.body_timeout_s,
                max_incomplete_bytes=config.max_incomplete_bytes,
            )
            with listening(config.host, config.port, _ADDRESS_SETTINGS):
                await fast.listen(config.port, config.host)
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
        if self.relay is not None:
            await self.relay.stop()  # its publishes end before the publisher closes
        self.waiter.close()
        if self.outcomes is not None:
            self.outcomes.close()
        self.publisher.close()
        if self.store is not None:
            self.store.close()  # after the last request: its writes are committed first


def _log_ledger_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("ledger: could not note a publish: %s", fut.exception())


async def serve(config: GatewayConfig, registry: Registry, stop: asyncio.Event) -> None:
    """Run a gateway until ``stop`` is set."""
    app = GatewayApp(config, registry)
    await app.start()
    await stop.wait()
    log.info("gateway stopping")
    started = time.monotonic()
    await app.stop()
    log.info("gateway stopped in %.2fs", time.monotonic() - started)
