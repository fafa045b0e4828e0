"""nsqjobs.http.server: HTTP/1.1 checked byte by byte on raw sockets, on asyncio and uvloop.

The server runs a small tornado Application on an event loop in a thread; the tests talk to it
with blocking sockets (and once with tornado's own client), so what is checked is what is on
the wire. No NSQ needed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import pytest
import tornado.httpclient
import tornado.httputil
import tornado.routing
import tornado.web
from nsqjobs.http.server import HTTPServer
from nsqjobs.testing import wait_for

# -- the application under test ------------------------------------------------------------------


@dataclass
class State:
    """What the handlers saw; written on the server's loop, polled by the tests."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    entered: list[str] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    streamed: list[int] = field(default_factory=list)
    big_sent: list[int] = field(default_factory=list)
    write_blocked: bool = False


class Handler(tornado.web.RequestHandler):
    def initialize(self, state: State) -> None:
        self.state = state


class JsonHandler(Handler):
    def get(self) -> None:
        self.write({"uri": self.request.uri})

    def head(self) -> None:
        self.get()


class EchoHandler(Handler):
    def post(self) -> None:
        self.write({"length": len(self.request.body)})


class SlowHandler(Handler):
    async def get(self) -> None:
        await asyncio.sleep(float(self.get_argument("s")))
        self.write({"uri": self.request.uri})


class GateHandler(Handler):
    """Answers once the test opens the gate."""

    async def get(self) -> None:
        self.state.entered.append("gate")
        await self.state.gate.wait()
        self.write("released")


class HangHandler(Handler):
    """Waits for the client to go away, then tries to answer anyway."""

    async def get(self) -> None:
        self.gone = asyncio.Event()
        self.state.entered.append("hang")
        await self.gone.wait()
        self.write("too late")

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self.state.closed.append("hang")
        self.gone.set()


@tornado.web.stream_request_body
class StreamHandler(Handler):
    def prepare(self) -> None:
        self.request.connection.set_max_body_size(1_000_000)  # type: ignore[union-attr]
        if "timeout" in self.request.arguments:
            timeout = float(self.get_argument("timeout"))
            self.request.connection.set_body_timeout(timeout)  # type: ignore[union-attr]
        self.total = 0

    async def data_received(self, chunk: bytes) -> None:
        await asyncio.sleep(0)
        self.total += len(chunk)
        self.state.streamed.append(self.total)

    def post(self) -> None:
        self.write({"streamed": self.total})

    def on_connection_close(self) -> None:
        super().on_connection_close()  # ends the wait for the body
        self.state.closed.append("stream")


class FlushHandler(Handler):
    async def get(self) -> None:
        self.write("first,")
        await self.flush()
        self.write("second")


class BigHandler(Handler):
    """Writes until the transport pushes back, then a little more."""

    async def get(self) -> None:
        chunk, sent, extra = b"x" * 262_144, 0, 4
        while extra and sent < 256 * len(chunk):
            self.write(chunk)
            sent += len(chunk)
            flushed = self.flush()
            if not flushed.done():
                self.state.write_blocked = True
            if self.state.write_blocked:
                extra -= 1
            await flushed
        self.state.big_sent.append(sent)


class IpHandler(Handler):
    def get(self) -> None:
        self.write({"ip": self.request.remote_ip, "protocol": self.request.protocol})


def boom(request: tornado.httputil.HTTPServerRequest) -> None:
    raise RuntimeError("boom")


def make_app(state: State) -> tornado.routing.Router:
    handlers: list[tuple[str, type[Handler]]] = [
        ("/json", JsonHandler),
        ("/echo", EchoHandler),
        ("/slow", SlowHandler),
        ("/gate", GateHandler),
        ("/hang", HangHandler),
        ("/stream", StreamHandler),
        ("/flush", FlushHandler),
        ("/big", BigHandler),
        ("/ip", IpHandler),
    ]
    rules: list[Any] = [(path, cls, {"state": state}) for path, cls in handlers]
    app = tornado.web.Application([*rules, ("/boom", boom)])
    # A plain Router in front: /nowhere gets tornado.routing's bare 404 delegate.
    everything_else = tornado.routing.PathMatches("/(?!nowhere).*")
    return tornado.routing.RuleRouter([tornado.routing.Rule(everything_else, app)])


# -- a server in a thread, and a raw client ------------------------------------------------------


class Served:
    """An HTTPServer on its own event loop (asyncio or uvloop) in a thread."""

    def __init__(self, loop_kind: str, **options: Any) -> None:
        self.loop: asyncio.AbstractEventLoop
        if loop_kind == "uvloop":
            import uvloop  # not installed on Windows

            self.loop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.state = State()
        self.server = HTTPServer(make_app(self.state), **options)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.server.listen(0, "127.0.0.1"))
        self.port = self.server.port

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.submit(coro).result(10)

    def open_gate(self) -> None:
        self.loop.call_soon_threadsafe(self.state.gate.set)

    async def shut_down(self) -> None:
        self.server.stop()
        await self.server.close_all_connections()

    def close(self) -> None:
        async def finish() -> None:
            self.open_gate()
            try:
                await asyncio.wait_for(self.shut_down(), 5)
            finally:
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(finish())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes
    chunks: list[bytes] | None  # the chunks of a chunked body


class Client:
    """A blocking socket that reads HTTP/1.1 responses, as they are, off the wire."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def read_until(self, mark: bytes) -> bytes:
        while mark not in self.buf:
            if not self._fill():
                raise AssertionError(f"connection closed before {mark!r}; got {self.buf!r}")
        data, _, self.buf = self.buf.partition(mark)
        return data + mark

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise AssertionError(f"connection closed after {len(self.buf)} of {n} bytes")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def at_eof(self) -> bool:
        """True when the server has closed the connection (and sent nothing more)."""
        while self._fill():
            pass
        return not self.buf

    def response(self, *, head: bool = False) -> Response:
        status_line, *lines = self.read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")[:-2]
        version, status, _ = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        code = int(status)
        if head or code in (204, 304) or code < 200:
            return Response(code, headers, b"", None)
        if "content-length" in headers:
            assert "transfer-encoding" not in headers
            return Response(code, headers, self.read_exact(int(headers["content-length"])), None)
        if headers.get("transfer-encoding") == "chunked":
            chunks = []
            while size := int(self.read_until(b"\r\n")[:-2], 16):
                chunks.append(self.read_exact(size))
                assert self.read_exact(2) == b"\r\n"
            assert self.read_exact(2) == b"\r\n"
            return Response(code, headers, b"".join(chunks), chunks)
        while self._fill():
            pass
        body, self.buf = self.buf, b""
        return Response(code, headers, body, None)


def request(
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    version: str = "HTTP/1.1",
) -> bytes:
    all_headers = {"Host": "test"} if version == "HTTP/1.1" else {}
    if body:
        all_headers["Content-Length"] = str(len(body))
    all_headers.update(headers or {})
    lines = [f"{method} {path} {version}", *(f"{k}: {v}" for k, v in all_headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"


def uri_of(response: Response) -> str:
    uri: str = json.loads(response.body)["uri"]
    return uri


# -- fixtures ------------------------------------------------------------------------------------


class Servers:
    """Starts servers on one kind of event loop; the fixture stops them all."""

    def __init__(self, loop_kind: str) -> None:
        self.loop_kind = loop_kind
        self.started: list[Served] = []
        self.errors_expected = False  # else any ERROR log record fails the test

    def __call__(self, **options: Any) -> Served:
        served = Served(self.loop_kind, **options)
        self.started.append(served)
        return served


NO_UVLOOP = pytest.mark.skipif(sys.platform == "win32", reason="uvloop has no Windows build")


@pytest.fixture(params=["asyncio", pytest.param("uvloop", marks=NO_UVLOOP)])
def serve(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture) -> Iterator[Servers]:
    caplog.set_level(logging.DEBUG, logger="nsqjobs.http")
    servers = Servers(request.param)
    yield servers
    for served in servers.started:
        served.close()
    if not servers.errors_expected:
        records = caplog.get_records("call") + caplog.get_records("teardown")
        errors = [r for r in records if r.levelno >= logging.ERROR]
        assert not errors, [r.getMessage() for r in errors]


# -- keep-alive and framing ----------------------------------------------------------------------


def test_keep_alive_serves_three_requests_on_one_connection(serve: Servers) -> None:
    srv = serve()
    with Client(srv.port) as client:
        client.send(request("GET", "/json?n=1"))
        first = client.response()
        client.send(request("POST", "/echo", body=b"hello"))
        second = client.response()
        client.send(request("GET", "/json?n=3"))
        third = client.response()
    assert [first.status, second.status, third.status] == [200, 200, 200]
    assert uri_of(first) == "/json?n=1" and uri_of(third) == "/json?n=3"
    assert json.loads(second.body) == {"length": 5}
    assert all("connection" not in r.headers for r in (first, second, third))


def test_connection_close_from_client_is_honoured(serve: Servers) -> None:
    srv = serve()
    with Client(srv.port) as client:
        client.send(request("GET", "/json", headers={"Connection": "close"}))
        response = client.response()
        assert response.status == 200 and response.headers["connection"] == "close"
        assert client.at_eof()


def test_http10_closes_unless_keep_alive_is_asked(serve: Servers) -> None:
    srv = serve()
    with Client(srv.port) as client:
        client.send(request("GET", "/json", version="HTTP/1.0"))
        response = client.response()
        assert response.status == 200 and "connection" not in response.headers
        assert client.at_eof()
    with Client(srv.port) as client:
        for n in (1, 2):
            client.send(request("GET", f"/json?n={n}", version="HTTP/1.0", headers=KEEP_ALIVE))
            response = client.response()
            assert response.headers["connection"] == "Keep-Alive"
            assert uri_of(response) == f"/json?n={n}"
        # A body without Content-Length cannot be chunked for HTTP/1.0: it ends at the close.
        client.send(request("GET", "/flush", version="HTTP/1.0", headers=KEEP_ALIVE))
        response = client.response()
        assert "transfer-encoding" not in response.headers
        assert "connection" not in response.headers
        assert response.body == b"first,second"


KEEP_ALIVE = {"Connection": "keep-alive"}


def test_head_response_has_no_body(serve: Servers) -> None:
    srv = serve()
    with Client(srv.port) as client:
        client.send(request("HEAD", "/json"))
        head = client.response(head=True)
        client.send(request("GET", "/json"))
        get = client.response()
    assert head.status == 200 and int(head.headers["content-length"]) == len(get.body) > 0
    assert get.status == 200 and uri_of(get) == "/json"


def test_flushing_handler_gets_a_chunked_response(serve: Servers) -> None:
    srv = serve()
    with Client(srv.port) as client:
        client.send(request("GET", "/flush"))
        response = client.response()
        client.send(request("GET", "/json"))  # the connection is still usable
        assert client.response().status == 200
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.chunks == [b"first,", b"second"]


def test_unknown_path_gets_the_routers_404(serve: Servers) -> None:
    srv = serve()
    with Client(srv.port) as client:
        client.send(request("GET", "/nowhere") + request("GET", "/json"))
        missing, found = client.response(), client.response()
    assert missing.status == 404 and missing.body == b""
    assert found.status == 200


def test_large_response_respects_write_flow_control(serve: Servers) -> None:
    srv = serve()
    with Client(srv.port) as client:
        client.send(request("GET", "/big"))
        wait_for(lambda: srv.state.write_blocked, 10, "a write future that waits for the reader")
        response = client.response()
    assert response.status == 200
    assert len(response.body) == srv.state.big_sent[0] and set(response.body) == {ord("x")}


# -- pipelining ----------------------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order(serve: Servers) -> None:
    srv = serve()
    paths = ["/slow?s=0.2", "/json?n=1", "/slow?s=0.01", "/json?n=2"]
    with Client(srv.port) as client:
        client.send(b"".join(request("GET", path) for path in paths))
        assert [uri_of(client.response()) for _ in paths] == paths


def test_many_pipelined_requests_with_bodies(serve: Servers) -> None:
    srv = serve()
    batch = []
    for i in range(60):
        if i % 3 == 0:
            batch.append(request("POST", "/echo", body=b"b" * i))
        elif i % 10 == 1:
            batch.append(request("GET", f"/slow?s=0.01&i={i}"))
        else:
            batch.append(request("GET", f"/json?i={i}"))
    with Client(srv.port) as client:
        client.send(b"".join(batch))
        for i in range(60):
            response = client.response()
            if i % 3 == 0:
                assert json.loads(response.body) == {"length": i}
            else:
                assert uri_of(response).endswith(f"i={i}")


def test_a_read_full_of_tiny_pipelined_requests(serve: Servers) -> None:
    srv = serve()  # more than the server queues at once: the rest is parsed as the queue drains
    with Client(srv.port) as client:
        client.send(b"".join(request("GET", f"/json?i={i}") for i in range(1000)))
        assert [uri_of(client.response()) for _ in range(1000)] == [
            f"/json?i={i}" for i in range(1000)
        ]


# -- request bodies ------------------------------------------------------------------------------


def test_expect_100_continue(serve: Servers) -> None:
    srv = serve()
    with Client(srv.port) as client:
        headers = {"Content-Length": "5", "Expect": "100-continue"}
        client.send(request("POST", "/echo", headers=headers))
        assert client.read_until(b"\r\n\r\n") == b"HTTP/1.1 100 (Continue)\r\n\r\n"
        client.send(b"12345")
        response = client.response()
    assert response.status == 200 and json.loads(response.body) == {"length": 5}


def test_chunked_request_body(serve: Servers) -> None:
    srv = serve()
    headers = {"Transfer-Encoding": "chunked"}
    with Client(srv.port) as client:
        client.send(request("POST", "/echo", headers=headers))
        body = chunked(b"a" * 10, b"b" * 1000, b"c")
        client.send(body[:7])  # the body arrives in pieces
        client.send(body[7:500])
        client.send(body[500:])
        response = client.response()
        assert json.loads(response.body) == {"length": 1011}
        client.send(request("POST", "/stream", headers=headers) + chunked(b"s" * 300, b"t" * 7))
        assert json.loads(client.response().body) == {"streamed": 307}


def test_stream_handler_may_raise_its_body_limit(serve: Servers) -> None:
    srv = serve(max_body_size=100)
    with Client(srv.port) as client:
        client.send(request("POST", "/stream", body=b"z" * 5000))
        assert json.loads(client.response().body) == {"streamed": 5000}
    assert srv.state.streamed[-1] == 5000


def test_413_by_content_length_before_the_body_is_sent(serve: Servers) -> None:
    srv = serve(max_body_size=100)
    with Client(srv.port) as client:
        headers = {"Content-Length": "101", "Expect": "100-continue"}
        client.send(request("POST", "/echo", headers=headers))
        response = client.response()
        assert response.status == 413 and response.headers["connection"] == "close"
        assert client.at_eof()
    with Client(srv.port) as client:  # the limit itself is allowed
        client.send(request("POST", "/echo", body=b"x" * 100))
        assert json.loads(client.response().body) == {"length": 100}


def test_413_reaches_a_client_that_sends_its_body_anyway(serve: Servers) -> None:
    srv = serve(max_body_size=100)
    with Client(srv.port) as client:
        # No Expect: the whole body follows at once, and the server must not reset the
        # connection (unread input at close) before the client has read the 413.
        client.send(request("POST", "/echo", body=b"x" * 2_000_000))
        response = client.response()
        assert response.status == 413 and response.headers["connection"] == "close"
        assert client.at_eof()


def test_413_by_chunked_total(serve: Servers) -> None:
    srv = serve(max_body_size=100)
    with Client(srv.port) as client:
        client.send(request("POST", "/echo", headers={"Transfer-Encoding": "chunked"}))
        client.send(b"3c\r\n" + b"x" * 60 + b"\r\n")
        client.send(b"3c\r\n" + b"y" * 60 + b"\r\n")  # 120 bytes: over, no final chunk sent
        response = client.response()
        assert response.status == 413 and response.headers["connection"] == "close"
        assert client.at_eof()


# -- bad requests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: test\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: test\r\n\r\n",
        b"GET /json HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"GET /json HTTP/1.1\r\n\r\n",  # no Host: tornado's HTTPInputError
        b"POST /echo HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_malformed_request_gets_400_and_close(
    serve: Servers, caplog: pytest.LogCaptureFixture, raw: bytes
) -> None:
    srv = serve()
    with Client(srv.port) as client:
        client.send(request("GET", "/json") + raw)
        assert client.response().status == 200  # the good request before it is answered
        response = client.response()
        assert response.status == 400 and response.headers["connection"] == "close"
        assert_problem(response, 400, "bad-request")
        assert client.at_eof()
    logged = [r for r in caplog.records if r.name == "nsqjobs.http"]
    assert logged and all(r.levelno == logging.INFO for r in logged)


def assert_problem(response: Response, status: int, slug: str) -> dict[str, Any]:
    """``response`` is problem+json ``slug`` with a Date, as every error the server answers."""
    assert response.status == status, response
    assert response.headers["content-type"] == "application/problem+json", response.headers
    assert response.headers["date"].endswith(" GMT"), response.headers
    body: dict[str, Any] = json.loads(response.body)
    assert body["type"] == f"urn:nsqjobs:problem:{slug}" and body["status"] == status, body
    return body


# RFC 9112: one Host on an HTTP/1.1 request (3.2); chunked is the only transfer coding we know,
# and it must come last, once (6.1). Each case: the request, the status, the problem type.
FRAMING = [
    (b"GET /json HTTP/1.1\r\n\r\n", 400, "bad-request"),
    (b"GET /json HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "bad-request"),
    (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
        + chunked(b"hello"),
        501,
        "not-implemented",
    ),
    (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunked(b"hello"),
        501,
        "not-implemented",
    ),
    (b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: identity\r\n\r\n", 400, "bad-request"),
    (
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"
        + chunked(b"hello"),
        400,
        "bad-request",
    ),
]


@pytest.mark.parametrize(("raw", "status", "slug"), FRAMING)
def test_framing_rfc9112_is_enforced_as_problems(
    serve: Servers, raw: bytes, status: int, slug: str
) -> None:
    srv = serve()
    with Client(srv.port) as client:
        client.send(raw)
        response = client.response()
        assert response.headers["connection"] == "close"
        assert_problem(response, status, slug)
        assert client.at_eof()
    with Client(srv.port) as client:  # chunked alone is fine
        client.send(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: Chunked\r\n\r\n"
            + chunked(b"hello")
        )
        assert json.loads(client.response().body) == {"length": 5}


def test_request_head_size_is_limited(serve: Servers) -> None:
    srv = serve()
    with Client(srv.port) as client:
        client.send(request("GET", "/json", headers={"X-Big": "a" * 30_000}))
        assert client.response().status == 200
        client.send(b"GET /json HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 200_000)
        response = client.response()
        assert response.status == 431 and response.headers["connection"] == "close"
        assert client.at_eof()
    # A complete head just over the limit, in one write (so maybe one read), and split over
    # many headers: counted as the parser hands it over, not only per read.
    big = {f"X-Part-{i}": "b" * 1000 for i in range(70)}
    with Client(srv.port) as client:
        client.send(request("GET", "/json", headers=big))
        response = client.response()
        assert response.status == 431 and response.headers["connection"] == "close"
        assert client.at_eof()


def test_delegate_exception_is_logged_and_answered_500(
    serve: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    serve.errors_expected = True
    srv = serve()
    with Client(srv.port) as client:
        client.send(request("GET", "/boom"))
        response = client.response()
        assert response.status == 500 and response.headers["connection"] == "close"
        assert b"boom" not in response.body
        assert client.at_eof()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.name for r in errors] == ["nsqjobs.http"]
    assert errors[0].exc_info is not None and "GET /boom" in errors[0].getMessage()


# -- closing -------------------------------------------------------------------------------------


def test_client_disconnect_calls_on_connection_close(serve: Servers) -> None:
    srv = serve()
    with Client(srv.port) as client:
        client.send(request("GET", "/hang"))
        wait_for(lambda: "hang" in srv.state.entered, 5, "the handler to start")
    wait_for(lambda: "hang" in srv.state.closed, 5, "on_connection_close of the handler")
    with Client(srv.port) as client:  # a streaming upload cut short
        client.send(request("POST", "/stream", headers={"Content-Length": "1000"}) + b"x" * 10)
        wait_for(lambda: srv.state.streamed, 5, "the first body chunk")
    wait_for(lambda: "stream" in srv.state.closed, 5, "on_connection_close of the stream")


def test_body_timeout_closes_the_connection(serve: Servers) -> None:
    srv = serve()
    with Client(srv.port) as client:
        headers = {"Content-Length": "1000"}
        client.send(request("POST", "/stream?timeout=0.2", headers=headers) + b"x" * 10)
        assert client.at_eof()
    wait_for(lambda: "stream" in srv.state.closed, 5, "on_connection_close of the stream")


def test_a_head_trickled_past_the_header_timeout_gets_408(serve: Servers) -> None:
    srv = serve(header_timeout_s=0.3, idle_timeout_s=30)
    started = time.monotonic()
    with Client(srv.port) as client:
        client.send(b"GET /json HTTP/1.1\r\nHost: t\r\n")
        client.send(b"X-Slow: 1\r\n")  # more is coming, slowly: the clock does not restart
        response = client.response()
        assert_problem(response, 408, "request-timeout")
        assert client.at_eof()
    assert time.monotonic() - started < 5


def test_a_body_trickled_past_the_body_timeout_gets_408(serve: Servers) -> None:
    srv = serve(body_timeout_s=0.3, idle_timeout_s=30)
    started = time.monotonic()
    with Client(srv.port) as client:
        client.send(request("POST", "/echo", headers={"Content-Length": "1000"}) + b"x" * 10)
        client.send(b"x" * 10)
        response = client.response()
        assert_problem(response, 408, "request-timeout")
        assert client.at_eof()
    assert time.monotonic() - started < 5
    # A whole request on a keep-alive connection is untouched by either clock.
    with Client(srv.port) as client:
        for _ in range(3):
            client.send(request("POST", "/echo", body=b"x" * 100))
            assert json.loads(client.response().body) == {"length": 100}


def test_incomplete_bodies_are_bounded_across_connections(serve: Servers) -> None:
    srv = serve(max_incomplete_bytes=100_000)
    head = request("POST", "/echo", headers={"Content-Length": "80000"})
    with Client(srv.port) as first, Client(srv.port) as second:
        first.send(head + b"x" * 60_000)
        wait_for(lambda: srv.server.incomplete_bytes == 60_000, 5, "the first body held")
        second.send(head + b"x" * 60_000)  # 120,000 held: over the bound
        response = second.response()
        assert_problem(response, 503, "unavailable")
        assert response.headers["retry-after"] == "1"
        assert second.at_eof()
        first.send(b"x" * 20_000)  # the first completes: its bytes are released
        assert json.loads(first.response().body) == {"length": 80_000}
        wait_for(lambda: srv.server.incomplete_bytes == 0, 5, "nothing held")
    with Client(srv.port) as third:  # a cut-short body is released too
        third.send(head + b"x" * 50_000)
        wait_for(lambda: srv.server.incomplete_bytes == 50_000, 5, "the third body held")
    wait_for(lambda: srv.server.incomplete_bytes == 0, 5, "nothing held after the close")


def test_idle_keep_alive_connection_is_closed(serve: Servers) -> None:
    srv = serve(idle_timeout_s=0.2)
    with Client(srv.port) as client:
        client.send(request("GET", "/json"))
        assert client.response().status == 200
        assert client.at_eof()


def test_stop_and_close_all_connections_wait_for_the_request_in_progress(
    serve: Servers,
) -> None:
    srv = serve()
    with Client(srv.port) as idle, Client(srv.port) as busy:
        idle.send(request("GET", "/json"))
        assert idle.response().status == 200
        busy.send(request("GET", "/gate"))
        wait_for(lambda: "gate" in srv.state.entered, 5, "the gated handler")
        closing = srv.submit(srv.shut_down())
        assert idle.at_eof()  # idle keep-alive connections go at once
        assert not closing.done()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", srv.port), timeout=5).close()
        srv.open_gate()
        response = busy.response()
        assert response.status == 200 and response.body == b"released"
        assert response.headers["connection"] == "close"
        assert busy.at_eof()
        closing.result(5)


# -- other clients and proxies -------------------------------------------------------------------


def test_tornado_http_client(serve: Servers) -> None:
    srv = serve()
    base = f"http://127.0.0.1:{srv.port}"

    async def produce(write: Callable[[bytes], Any]) -> None:
        await write(b"a" * 300)
        await write(b"b" * 200)

    async def fetch_all() -> list[tornado.httpclient.HTTPResponse]:
        client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
        try:
            return [
                await client.fetch(f"{base}/json"),
                await client.fetch(f"{base}/echo", method="POST", body=b"p" * 1000),
                await client.fetch(f"{base}/flush"),
                await client.fetch(
                    f"{base}/stream", method="POST", body_producer=produce, expect_100_continue=True
                ),
            ]
        finally:
            client.close()

    got, echoed, flushed, streamed = asyncio.run(fetch_all())
    assert json.loads(got.body) == {"uri": "/json"}
    assert json.loads(echoed.body) == {"length": 1000}
    assert flushed.body == b"first,second"
    assert json.loads(streamed.body) == {"streamed": 500}


def test_xheaders_set_remote_ip_and_protocol(serve: Servers) -> None:
    proxied = serve(xheaders=True)
    with Client(proxied.port) as client:
        cases = [
            ({"X-Real-Ip": "10.1.2.3", "X-Forwarded-Proto": "https"}, "10.1.2.3", "https"),
            ({}, "127.0.0.1", "http"),  # nothing leaks into the next request
            ({"X-Forwarded-For": "1.1.1.1, 2.2.2.2"}, "2.2.2.2", "http"),
            ({"X-Real-Ip": "not an ip", "X-Scheme": "gopher"}, "127.0.0.1", "http"),
        ]
        for headers, ip, protocol in cases:
            client.send(request("GET", "/ip", headers=headers))
            assert json.loads(client.response().body) == {"ip": ip, "protocol": protocol}
    direct = serve()
    with Client(direct.port) as client:
        client.send(request("GET", "/ip", headers={"X-Real-Ip": "10.1.2.3"}))
        assert json.loads(client.response().body) == {"ip": "127.0.0.1", "protocol": "http"}
