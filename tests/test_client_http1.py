"""The blocking client's own HTTP/1.1 pool (``nsqjobs.client.http1``) against a scripted server
on a real socket: every way an answer can be framed, keep-alive reuse and its stale
connections, interim answers, timeouts and resets; and when the client uses httpx instead."""

from __future__ import annotations

import gzip
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from nsqjobs.client import (
    Client,
    GatewayError,
    GatewayUnreachable,
    InvalidArguments,
    RetryPolicy,
    SenderStopped,
    core,
    http1,
)
from nsqjobs.client.problems import problem_error
from nsqjobs.errors import ConfigError

pytestmark = pytest.mark.timeout(30)

JSON_OK = b'{"ok":true}'


@dataclass
class Seen:
    """One request as the server read it."""

    conn: int
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


Script = Callable[[Seen, int], bytes | str | tuple[str, bytes]]


@dataclass
class Server:
    """Answers each request with ``script(request, n)`` (``n`` counts requests from 0): bytes
    to send, ``("close-after", bytes)`` (send, then close), or ``"close"`` (close without
    answering), ``"reset"`` (RST), ``"hang"``."""

    script: Script
    sock: socket.socket = field(init=False)
    seen: list[Seen] = field(default_factory=list)
    conns: int = 0
    open_now: int = 0
    most_open: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> str:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        threading.Thread(target=self._accept, daemon=True).start()
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                number = self.conns
                self.conns += 1
                self.open_now += 1
                self.most_open = max(self.most_open, self.open_now)
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        buf = b""
        try:
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ")
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                while len(buf) < length:
                    buf += conn.recv(65536)
                body, buf = buf[:length], buf[length:]
                with self._lock:
                    seen = Seen(number, method, target, headers, body)
                    self.seen.append(seen)
                    n = len(self.seen) - 1
                answer = self.script(seen, n)
                if isinstance(answer, tuple):
                    conn.sendall(answer[1])
                    return
                if answer == "close":
                    return
                if answer == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    return
                if answer == "hang":
                    self._stop.wait(10)
                    return
                assert isinstance(answer, bytes)
                conn.sendall(answer)
                if b"connection: close" in answer.lower():
                    return
        finally:
            conn.close()
            with self._lock:
                self.open_now -= 1


def answer(body: bytes = JSON_OK, status: str = "200 OK", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


@pytest.fixture
def serve() -> Iterator[Callable[[Script], tuple[Server, str]]]:
    servers: list[Server] = []

    def start(script: Script) -> tuple[Server, str]:
        server = Server(script)
        servers.append(server)
        return server, server.start()

    yield start
    for server in servers:
        server.stop()


def test_keep_alive_reuses_one_connection_and_frames_each_answer(
    serve: Callable[[Script], tuple[Server, str]],
) -> None:
    server, url = serve(lambda seen, n: answer(b'{"n":%d}' % n))
    with Client(url + "/base/", token="t0k") as client:
        for n in range(5):
            reply = client.request("POST", "/v1/jobs", body={"task": "noop"}, params={"w": n})
            assert reply.json() == {"n": n}
    assert server.conns == 1
    first = server.seen[0]
    assert (first.method, first.target) == ("POST", "/base/v1/jobs?w=0")
    assert first.headers["host"] == url.removeprefix("http://")
    assert first.headers["authorization"] == "Bearer t0k"
    assert first.headers["content-type"] == "application/json"
    assert first.body == b'{"task":"noop"}'
    assert server.seen[1].headers["content-length"] == str(len(b'{"task":"noop"}'))


def test_chunked_close_delimited_interim_and_gzip_answers(
    serve: Callable[[Script], tuple[Server, str]],
) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4;ext=1\r\n{"a"\r\n3\r\n:1}\r\n0\r\nX-Trailer: y\r\n\r\n'
    )
    to_close = b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"b":2}'
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b'{"c":3}')
    zipped = gzip.compress(b'{"d":4}')
    gz = answer(zipped, extra="Content-Encoding: gzip\r\n")
    old = b'HTTP/1.0 200 OK\r\nContent-Length: 7\r\n\r\n{"e":5}'
    script = [chunked, to_close, interim, gz, old, answer(b'{"f":6}')]
    server, url = serve(lambda seen, n: script[n])
    with Client(url) as client:
        got = [client.request("GET", "/x").json() for _ in script]
    assert got == [{"a": 1}, {"b": 2}, {"c": 3}, {"d": 4}, {"e": 5}, {"f": 6}]
    # A new connection after the close-delimited answer and after the HTTP/1.0 one.
    assert [s.conn for s in server.seen] == [0, 0, 1, 1, 1, 2]


def test_problem_answers_raise_their_exception_with_retry_after(
    serve: Callable[[Script], tuple[Server, str]],
) -> None:
    problem = b'{"type":"urn:nsqjobs:problem:unavailable","status":503,"detail":"busy"}'
    server, url = serve(
        lambda seen, n: answer(problem, "503 Service Unavailable", "Retry-After: 7\r\n")
    )
    with Client(url, retry=RetryPolicy(0)) as client, pytest.raises(Exception) as caught:
        client.request("GET", "/v1/anything")
    error = caught.value
    assert type(error).__name__ == "Unavailable"
    assert getattr(error, "retry_after", None) == 7
    assert len(server.seen) == 1


@pytest.mark.parametrize("check_idle_s", [0.0, 60.0])
def test_an_idle_connection_the_server_closed_is_not_used(
    serve: Callable[[Script], tuple[Server, str]],
    monkeypatch: pytest.MonkeyPatch,
    check_idle_s: float,
) -> None:
    # The server answers keep-alive, then ends the connection while it idles in the pool (its
    # idle timeout): the next request must go on a new connection, sent once. A connection
    # idle longer than _CHECK_IDLE_S is checked first; one idle less is tried, found dead
    # before any answer, and the request sent again on a new one.
    monkeypatch.setattr(http1, "_CHECK_IDLE_S", check_idle_s)
    checks: list[bool] = []
    real = http1._Conn.dropped

    def dropped(conn: Any) -> bool:
        checks.append(real(conn))
        return checks[-1]

    server, url = serve(lambda seen, n: ("close-after", answer()) if n == 0 else answer())
    with Client(url, retry=RetryPolicy(0)) as client:
        client.request("POST", "/one", body={})
        pool = client._pool
        assert pool is not None
        wait_closed(pool)
        monkeypatch.setattr(http1._Conn, "dropped", dropped)
        client.request("POST", "/two", body={})
    assert [(s.target, s.conn) for s in server.seen] == [("/one", 0), ("/two", 1)]
    assert checks == ([True] if check_idle_s == 0.0 else [])


def wait_closed(pool: http1.Pool) -> None:
    """Poll until the pool's idle connection has seen the server's FIN."""
    end = time.monotonic() + 5
    while not pool._idle[0].dropped():
        assert time.monotonic() < end, "the server's close never arrived"
        time.sleep(0.005)


def test_a_reused_connection_dropped_unanswered_is_tried_once_on_a_new_one(
    serve: Callable[[Script], tuple[Server, str]],
) -> None:
    # The close races the request (an idle timeout firing as it arrives): nothing came back,
    # so the pool sends it again on a new connection, once, even with retries off.
    server, url = serve(lambda seen, n: "close" if n == 1 else answer())
    with Client(url, retry=RetryPolicy(0)) as client:
        client.request("GET", "/one")
        client.request("GET", "/two")
    assert [(s.target, s.conn) for s in server.seen] == [("/one", 0), ("/two", 0), ("/two", 1)]


def test_no_answer_is_a_transport_failure_retried_with_the_same_request(
    serve: Callable[[Script], tuple[Server, str]],
) -> None:
    for fault in ("close", "reset"):

        def script(seen: Seen, n: int, fault: str = fault) -> bytes | str:
            return fault if n == 0 else answer()

        server, url = serve(script)
        with Client(url, retry=RetryPolicy(0)) as once, pytest.raises(GatewayUnreachable):
            once.request("POST", "/v1/jobs", body={"id": "same"})
        with Client(url) as client:
            client.request("POST", "/v1/jobs", body={"id": "same"})
        assert [s.body for s in server.seen] == [b'{"id":"same"}'] * 2


def test_timeouts_and_refused_connections(
    serve: Callable[[Script], tuple[Server, str]],
) -> None:
    _, url = serve(lambda seen, n: "hang")
    with (
        Client(url, timeout_s=0.3, retry=RetryPolicy(0)) as client,
        pytest.raises(GatewayUnreachable, match="in time"),
    ):
        client.request("GET", "/slow")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
    with (
        Client(f"http://127.0.0.1:{port}", retry=RetryPolicy(0)) as client,
        pytest.raises(GatewayUnreachable, match="cannot connect"),
    ):
        client.request("GET", "/")


def test_garbage_answers_are_transport_failures(
    serve: Callable[[Script], tuple[Server, str]],
) -> None:
    bad = [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70_000 + b"\r\n\r\n",
    ]
    _, url = serve(lambda seen, n: bad[n])
    with Client(url, retry=RetryPolicy(0)) as client:
        for _ in bad:
            with pytest.raises(GatewayUnreachable):
                client.request("GET", "/")


def test_threads_share_the_pool_within_its_limit(
    serve: Callable[[Script], tuple[Server, str]],
) -> None:
    server, url = serve(lambda seen, n: answer(seen.body))
    errors: list[BaseException] = []
    with Client(url, max_connections=2) as client:

        def work(t: int) -> None:
            try:
                for i in range(30):
                    body = {"t": t, "i": i}
                    assert client.request("POST", "/echo", body=body).json() == body
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
    assert errors == []
    assert len(server.seen) == 180
    assert server.most_open <= 2


def test_which_transport_the_client_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with Client("http://127.0.0.1:1") as plain:
        assert plain._pool is not None and plain._http is None
    with Client("https://gateway.example") as tls:
        assert tls._pool is None and tls._http is not None
    with Client("http://127.0.0.1:1", transport=httpx.HTTPTransport()) as custom:
        assert custom._pool is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert not http1.usable("http://gateway.example:8080")
    monkeypatch.setenv("NO_PROXY", "gateway.example")
    assert http1.usable("http://gateway.example:8080")


def test_a_reply_from_httpx_reads_like_one_from_the_pool() -> None:
    response = httpx.Response(
        503, headers={"Retry-After": "2"}, content=b"{}", request=httpx.Request("GET", "http://x/")
    )
    reply = core.Reply.of(response)
    assert reply.status_code == 503 and not reply.is_success
    assert reply.headers["retry-after"] == "2" and reply.json() == {} and reply.url == "http://x/"


def test_a_proxys_failure_without_a_problem_is_retried_and_a_gateways_own_is_not(
    serve: Callable[[Script], tuple[Server, str]],
) -> None:
    html = b"<html><body>502 Bad Gateway</body></html>"
    proxy = answer(html, "502 Bad Gateway", "X-Why: no replica\r\n")

    def script(seen: Seen, n: int) -> bytes:
        return proxy if n == 0 else answer()

    server, url = serve(script)
    with Client(url) as client:
        client.request("POST", "/v1/jobs", body={"id": "same"})
    assert [s.body for s in server.seen] == [b'{"id":"same"}'] * 2
    # The gateway's own 500 (problem+json or not) is not a proxy's: raised at once.
    _, url = serve(lambda seen, n: answer(b"oops", "500 Internal Server Error"))
    with Client(url) as client, pytest.raises(GatewayError) as caught:
        client.request("GET", "/v1/jobs/x")
    assert not isinstance(caught.value, GatewayUnreachable) and caught.value.status == 500
    # Every try answered by a proxy that reaches no replica: GatewayUnreachable, status kept.
    _, url = serve(lambda seen, n: proxy)
    with Client(url, retry=RetryPolicy(0.3)) as client, pytest.raises(GatewayUnreachable) as gone:
        client.request("POST", "/v1/jobs", body={"id": "same"})
    assert gone.value.status == 502 and gone.value.retryable


def test_an_answer_that_cannot_be_decoded_is_a_transport_failure(
    serve: Callable[[Script], tuple[Server, str]],
) -> None:
    bad = answer(b"not gzip at all", extra="Content-Encoding: gzip\r\n")
    server, url = serve(lambda seen, n: bad if n == 0 else answer())
    with Client(url, retry=RetryPolicy(0)) as client:
        with pytest.raises(GatewayUnreachable, match="gzip"):
            client.request("GET", "/a")
        client.request("GET", "/b")  # the bad answer's connection was closed, not reused
    assert [(s.target, s.conn) for s in server.seen] == [("/a", 0), ("/b", 1)]


def test_submit_many_names_the_jobs_accepted_before_a_chunk_is_refused(
    serve: Callable[[Script], tuple[Server, str]],
) -> None:
    problem = json.dumps(
        {"type": "urn:nsqjobs:problem:invalid-arguments", "status": 422, "detail": "bad"}
    ).encode()

    def script(seen: Seen, n: int) -> bytes:
        return answer(b"{}", "202 Accepted") if n == 0 else answer(problem, "422 Unprocessable")

    server, url = serve(script)
    with Client(url) as client:
        with pytest.raises(InvalidArguments) as caught:
            client.submit_many("noop", [{"i": i} for i in range(3)], chunk_size=2)
        first = [job["id"] for job in json.loads(server.seen[0].body)["jobs"]]
        assert [job.id for job in caught.value.accepted] == first and len(first) == 2
        for size in (0, -1, 1.5, True):
            with pytest.raises(ConfigError, match="chunk_size"):
                client.submit_many("noop", [{}], chunk_size=size)  # type: ignore[arg-type]
    assert len(server.seen) == 2  # nothing sent for the bad chunk sizes


def test_a_forked_child_opens_its_own_connections_and_stops_its_senders(
    serve: Callable[[Script], tuple[Server, str]],
) -> None:
    # A child reading from its parent's keep-alive connection would take the parent's answers.
    server, url = serve(lambda seen, n: answer(b"{}", "202 Accepted"))
    with Client(url) as client:
        client.request("GET", "/parent-before")  # leaves connection 0 idle in the pool
        sender = client.sender()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: one request, then whether its sender refuses work
            code = 1
            try:
                client.request("GET", "/child")
                try:
                    sender.submit("noop", {})
                except SenderStopped as exc:
                    os.write(write, str(exc.__cause__).encode())
                    code = 0
            finally:
                os._exit(code)
        os.close(write)
        said = os.read(read, 500).decode()
        os.close(read)
        _, status = os.waitpid(pid, 0)
        client.request("GET", "/parent-after")
        sender.submit("noop", {})
        sender.close()  # the parent's sender still works
    assert os.waitstatus_to_exitcode(status) == 0 and "before a fork" in said, said
    conns = {s.target: s.conn for s in server.seen}
    assert conns["/parent-before"] == conns["/parent-after"] == 0
    assert conns["/child"] not in (0, conns["/v1/jobs"])


def test_retry_after_is_a_floor_on_the_pause_bounded_by_the_deadline() -> None:
    error = problem_error(503, {"type": "urn:nsqjobs:problem:unavailable"}, "0.5")
    retrier = core.Retrier(RetryPolicy(deadline_s=10, first_delay_s=0.01, max_delay_s=0.1))
    pause = retrier.delay(error)
    assert pause is not None and 0.5 <= pause <= 10  # over max_delay_s: the server asked
    short = core.Retrier(RetryPolicy(deadline_s=0.2, first_delay_s=0.01, max_delay_s=0.1))
    pause = short.delay(error)
    assert pause is not None and pause <= 0.2  # never past the deadline
