"""One HTTP/1.1 client connection on asyncio and httptools (llhttp): parses requests as they
arrive, hands them to the tornado delegate one at a time (pipelined ones wait), applies the
limits, and answers what cannot reach the delegate (400, 413, 431, 500).

Limits, all answered as problem+json and a close: a request head must be in within
``header_timeout_s`` of its first byte and its body within ``body_timeout_s`` of its head (408),
an idle keep-alive connection closes after ``idle_timeout_s``, and the bodies of requests still
arriving may hold at most ``max_incomplete_bytes`` together (503), so slow clients cannot pile
up memory. RFC 9112's framing rules are enforced: an HTTP/1.1 request needs exactly one
``Host`` (400), and chunked is the only transfer coding (501 for another, 400 when chunked is
not last).

One state machine over one object, so it stays one module past the ~400-line mark: split, its
halves would import each other. Each request's response framing is ``nsqjobs.http.exchange``'s.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Final, Protocol, cast

import httptools
from tornado.httputil import (
    HTTPHeaders,
    HTTPInputError,
    HTTPServerConnectionDelegate,
    RequestStartLine,
)
from tornado.iostream import StreamClosedError

from nsqjobs.http.exchange import NO_DELEGATE, ClientContext, Exchange
from nsqjobs.http.problems import problem_body
from nsqjobs.http.responses import http_date

log = logging.getLogger("nsqjobs.http")

# Request body bytes received but not yet taken by the delegate; above this, reading pauses.
_READ_HIGH_WATER: Final = 256 * 1024
# Input is parsed in slices, and parsing stops while this many pipelined requests wait: a read
# full of tiny requests must not turn into thousands of queued request objects.
_PARSE_SLICE: Final = 16 * 1024


class _HeadTooLarge(Exception):
    """Raised in a parser callback: the head went over :data:`_MAX_HEAD_BYTES`."""


_MAX_QUEUED: Final = 32
# Request line and headers (tornado's default max_header_size); llhttp itself has no limit.
_MAX_HEAD_BYTES: Final = 64 * 1024
# How long a connection closed on an error keeps reading (and dropping) what the client sends.
_LINGER_S: Final = 2.0
_CONTINUE: Final = b"HTTP/1.1 100 (Continue)\r\n\r\n"
_VERSIONS: Final = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}
# What the connection answers itself, as problem+json: (slug, detail) by status.
_ERRORS: Final = {
    400: ("bad-request", "malformed HTTP request"),
    408: ("request-timeout", "the request did not arrive in time"),
    413: ("payload-too-large", "request body over the server's limit"),
    431: ("headers-too-large", "request line and headers over 64 KiB"),
    500: ("internal", "internal error (see the server log)"),
    501: ("not-implemented", "transfer coding not supported (only chunked)"),
    503: ("unavailable", "the server holds too many incomplete requests; retry"),
}


def _error_response(status: int, detail: str = "") -> bytes:
    """A whole problem+json answer that closes the connection."""
    slug, default = _ERRORS[status]
    body = problem_body(status, slug, detail or default, {})
    retry = "Retry-After: 1\r\n" if status == 503 else ""
    return (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nDate: {http_date()}\r\n"
        f"Content-Type: application/problem+json\r\nContent-Length: {len(body)}\r\n{retry}"
        "Connection: close\r\n\r\n"
    ).encode() + body


_UNPARSED: Final = RequestStartLine("-", "-", "HTTP/1.1")


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """What every connection of one server reads, set once by ``HTTPServer``."""

    delegate: HTTPServerConnectionDelegate
    max_body_size: int
    xheaders: bool
    idle_timeout_s: float
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_incomplete_bytes: int = 64 * 1024 * 1024


class ConnectionTracker(Protocol):
    """The server's side of a connection's life (``HTTPServer``)."""

    # Body bytes of requests still arriving, every connection together.
    incomplete_bytes: int

    def connection_opened(self, conn: Connection) -> bool:
        """Count ``conn`` in; False when the server is shutting down (close it at once)."""

    def connection_closed(self, conn: Connection) -> None:
        """``conn`` is closed."""


class Connection(asyncio.Protocol):
    """One client connection (tornado's ``server_conn``): parses requests as they arrive and
    hands them to the delegate one at a time, in order; pipelined ones wait in a queue."""

    context: ClientContext
    _transport: asyncio.Transport

    def __init__(self, settings: ServerSettings, tracker: ConnectionTracker) -> None:
        self.settings = settings
        self.tracker = tracker
        self.loop = asyncio.get_running_loop()
        self.closing = False  # shutting down: close once the current response is out
        self.closed = False
        self.done = self.loop.create_future()  # returned by writes that need no waiting
        self.done.set_result(None)
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers = HTTPHeaders()
        self._unparsed = b""  # input held back while _MAX_QUEUED requests wait
        self._in_head = False
        self._heads_begun = 0
        self._head_bytes = 0  # of the head in progress, counted from the read after it began
        self._head_size = 0  # of the head in progress, as the parser handed it over
        self._parsing: Exchange | None = None  # headers complete, body still arriving
        self._active: Exchange | None = None  # the one the delegate has
        self._queue: collections.deque[Exchange] = collections.deque()
        self._buffered = 0  # body bytes held for the delegate, all requests together
        self._input_done = False  # error or closing: parse nothing more
        self._reading = True
        self._dispatching = False
        self._write_paused = False
        self._drain: list[asyncio.Future[None]] = []
        self._idle_since: float | None = None
        self._head_since: float | None = None  # a head is arriving (since about then)
        self._body_since: float | None = None  # a body is arriving
        self._held = 0  # body bytes of the request arriving, counted in incomplete_bytes
        self._hosts = 0  # Host header lines of the head in progress
        self._codings = ""  # its Transfer-Encoding values, comma-joined
        self._parsing_detail = ""
        self._timer: asyncio.TimerHandle | None = None  # deadlines, then linger
        self._timer_at = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        address = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        family = sock.family if sock is not None else None
        inet = family in (socket.AF_INET, socket.AF_INET6) and address
        self.context = ClientContext(address, family, address[0] if inet else "0.0.0.0", "http")
        if not self.tracker.connection_opened(self):
            self.close()
        else:
            self._become_idle()

    def data_received(self, data: bytes) -> None:
        if not self._input_done:
            self._parse(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self._input_done = True
        self._release()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiters, self._drain = self._drain, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(StreamClosedError())
                waiter.exception()  # retrieved: a handler that ignores it must not log
        request, self._active = self._active, None
        self._queue.clear()
        self._unparsed = b""
        if request is not None:
            request.gone = True
            if not request.finished:
                self._notify_closed(request)
        self.tracker.connection_closed(self)
        self._quietly(functools.partial(self.settings.delegate.on_close, self))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain = self._drain, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # httptools callbacks (llhttp has validated the syntax by the time each is called)

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = HTTPHeaders()
        self._in_head = True
        self._heads_begun += 1
        self._head_bytes = 0
        self._head_size = 0
        self._hosts = 0
        self._codings = ""

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count_head(len(url))

    def _count_head(self, n: int) -> None:
        """Count what the parser handed over of the head; a head that arrived whole in one
        read is never seen by the per-read count in :meth:`_parse`."""
        self._head_size += n
        if self._head_size > _MAX_HEAD_BYTES:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._parsing is not None:
            return  # a trailer after a chunked body: ignored, as tornado does
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
        key = name.decode("latin-1")
        text = value.decode("latin-1").rstrip(" \t")
        if len(name) == 4 and name.lower() == b"host":
            self._hosts += 1
        elif len(name) == 17 and name.lower() == b"transfer-encoding":
            self._codings += "," + text if self._codings else text
        headers = self._headers
        if key in headers:
            headers.add(key, text)
        else:
            headers[key] = text

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_since = None
        if self._input_done:
            return
        parser = self._parser
        version = parser.get_http_version()
        start_line = RequestStartLine(
            parser.get_method().decode("ascii"),
            self._url.decode("latin-1"),
            _VERSIONS.get(version) or f"HTTP/{version}",
        )
        settings = self.settings
        request = Exchange(
            self,
            start_line,
            self._headers,
            parser.should_keep_alive(),
            settings.max_body_size,
            settings.xheaders,
        )
        self._parsing = request
        self._idle_since = None
        if parser.should_upgrade() or version not in _VERSIONS:
            log.info("Unsupported request from %s: %s", self.context, start_line)
            request.error = 400
            self._input_done = True
        elif (self._hosts != 1 and version == "1.1") or self._codings:
            request.error = self._framing_error(start_line)
            request.error_detail = self._parsing_detail
            self._input_done = request.error != 0
        self._enqueue(request)

    def _framing_error(self, start_line: RequestStartLine) -> int:
        """RFC 9112: 400 for an HTTP/1.1 request without exactly one Host (3.2); for transfer
        codings, 400 unless chunked is last and once (6.1), else 501 for any other (6.1)."""
        if self._hosts != 1 and start_line.version == "HTTP/1.1":
            log.info("Request without one Host from %s: %s", self.context, start_line)
            self._parsing_detail = "an HTTP/1.1 request needs exactly one Host header"
            return 400
        codings = [c.strip().lower() for c in self._codings.split(",")]
        if codings == ["chunked"]:
            return 0
        log.info("Transfer-Encoding %r from %s refused", self._codings, self.context)
        if codings[-1] != "chunked" or codings.count("chunked") > 1:
            self._parsing_detail = "Transfer-Encoding must end in a single chunked"
            return 400
        self._parsing_detail = f"transfer coding {self._codings!r} is not supported (only chunked)"
        return 501

    def on_body(self, body: bytes) -> None:
        request = self._parsing
        if self._input_done or request is None:
            return
        request.received += len(body)
        self._held += len(body)
        tracker = self.tracker
        tracker.incomplete_bytes += len(body)
        if tracker.incomplete_bytes > self.settings.max_incomplete_bytes:
            log.warning(
                "Refusing a request from %s: incomplete bodies over the limit", self.context
            )
            self._release()
            self._reject(request, 503)
        elif request.phase == 2 and request.received > request.max_body_size:
            self._reject(request, 413)
        elif request.phase != 2 or request.waiting or request.chunks or request.delegate_over:
            request.chunks.append(body)
            self._buffered += len(body)
        else:
            self._deliver(request, body)

    def on_message_complete(self) -> None:
        request = self._parsing
        if self._input_done or request is None:
            return
        self._parsing = None
        self._body_since = None
        self._release()
        request.message_done = True
        if request.body_timer is not None:
            request.body_timer.cancel()
            request.body_timer = None
        if request.phase == 2 and not (request.waiting or request.chunks or request.delegate_over):
            self._finish_reading(request)

    def _parse(self, data: bytes) -> None:
        view = memoryview(data) if len(data) > _PARSE_SLICE else data  # no copies when sliced
        try:
            for start in range(0, len(data), _PARSE_SLICE):
                if self._input_done:
                    break
                if len(self._queue) >= _MAX_QUEUED:
                    self._unparsed = data[start:]  # parsed once the queue is shorter
                    break
                piece = view[start : start + _PARSE_SLICE]
                began = self._heads_begun
                self._parser.feed_data(piece)
                if self._in_head and began == self._heads_begun:
                    self._head_bytes += len(piece)
                    if self._head_bytes > _MAX_HEAD_BYTES:
                        self._bad_input(431, "request head too large")
        except httptools.HttpParserUpgrade:
            pass  # on_headers_complete has flagged the request for a 400
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._bad_input(431, "request head too large")
            else:
                log.error("Error parsing a request from %s", self.context, exc_info=exc.__context__)
                self._bad_input(400, exc)
        except httptools.HttpParserError as exc:
            self._bad_input(400, exc)
        if not self._input_done and (self._in_head or self._parsing is not None):
            self._receiving()
        self._update_reading()

    def _receiving(self) -> None:
        """A request is partly in: start the clock on its head or body."""
        if self._in_head:
            if self._head_since is None:
                self._head_since = self.loop.time()
                self._arm()
        elif self._body_since is None:
            self._body_since = self.loop.time()
            self._arm()

    def _release(self) -> None:
        if self._held:
            self.tracker.incomplete_bytes -= self._held
            self._held = 0

    # Requests, one at a time

    def _enqueue(self, request: Exchange) -> None:
        if self._active is None and not self._queue and not self._dispatching:
            self._activate(request)
        else:
            self._queue.append(request)

    def _activate(self, request: Exchange) -> None:
        self._active = request
        if request.error:
            self._abort(request, request.error)
            return
        request.phase = 1
        try:
            request.delegate = self.settings.delegate.start_request(self, request)
            pending = request.delegate.headers_received(request.start_line, request.headers)
        except Exception as exc:
            self._delegate_failed(request, exc)
            return
        if pending is None or not self._wait(request, pending):
            self._begin_body(request)

    def _begin_body(self, request: Exchange) -> None:
        # Checked only now: a stream_request_body handler may raise the limit in prepare().
        request.phase = 2
        declared = request.headers.get_list("Content-Length")
        if max(request.received, int(declared[0]) if declared else 0) > request.max_body_size:
            self._reject(request, 413)
            return
        if (
            not request.message_done
            and not request.started
            and request.start_line.version == "HTTP/1.1"
            and "Expect" in request.headers
            and request.headers["Expect"].lower() == "100-continue"
        ):
            self._transport.write(_CONTINUE)
        self._pump(request)

    def _pump(self, request: Exchange) -> None:
        while request.phase == 2 and not (request.waiting or request.delegate_over):
            if request.chunks:
                chunks, request.chunks = request.chunks, []
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._buffered -= len(data)
                self._deliver(request, data)
            elif request.message_done:
                self._finish_reading(request)
            else:
                break
        self._update_reading()

    def _deliver(self, request: Exchange, data: bytes) -> None:
        try:
            pending = request.delegate.data_received(data)
        except Exception as exc:
            self._delegate_failed(request, exc)
            return
        if pending is not None:
            self._wait(request, pending)

    def _finish_reading(self, request: Exchange) -> None:
        request.delegate_over = True
        try:
            request.delegate.finish()
        except Exception as exc:
            request.delegate_over = False  # so it hears on_connection_close, as in tornado
            self._delegate_failed(request, exc)

    def _wait(self, request: Exchange, pending: Awaitable[None]) -> bool:
        """Respect an awaitable from the delegate; False when it is already done and fine."""
        if isinstance(pending, asyncio.Future) and pending.done():
            if pending.cancelled():
                self.close()
            elif (exc := pending.exception()) is not None:
                self._delegate_failed(request, exc)
            else:
                return False
            return True
        request.waiting = True
        future = asyncio.ensure_future(pending, loop=self.loop)
        future.add_done_callback(functools.partial(self._resume, request))
        return True

    def _resume(self, request: Exchange, future: asyncio.Future[None]) -> None:
        request.waiting = False
        exc = None if future.cancelled() else future.exception()
        if request.gone or request.delegate_over:
            return
        if future.cancelled():
            self.close()
        elif exc is not None:
            self._delegate_failed(request, exc)
        elif request.phase == 1:
            self._begin_body(request)
        else:
            self._pump(request)

    def response_done(self, request: Exchange) -> None:
        """The delegate finished its response: next request, or close."""
        self._active = None
        if request.body_timer is not None:
            request.body_timer.cancel()
        if not request.delegate_over:  # answered before the request was all read
            self._buffered -= sum(map(len, request.chunks))
            request.chunks = []
            self._notify_closed(request)
        request.delegate = NO_DELEGATE  # breaks the cycle through tornado's request
        if not request.message_done:
            self.close(linger=True)
        elif not request.keep_alive or self.closing:
            self.close()
        else:
            self._dispatch_next()

    def _dispatch_next(self) -> None:
        if self._dispatching:
            return  # a response finished inside _activate: the loop below goes on
        self._dispatching = True
        try:
            while self._active is None and self._queue and not self.closed:
                self._activate(self._queue.popleft())
        finally:
            self._dispatching = False
        if self._active is None and not self.closed:
            self._become_idle()
        if self._unparsed and len(self._queue) < _MAX_QUEUED and not self._input_done:
            data, self._unparsed = self._unparsed, b""
            self._parse(data)
        else:
            self._update_reading()

    # Failures

    def _bad_input(self, status: int, why: object) -> None:
        if self._input_done:
            return
        if status == 408:
            log.info("Timeout reading a request from %s: %s", self.context, why)
        else:
            log.info("Malformed HTTP request from %s: %s", self.context, why)
        if self._parsing is None:
            settings = self.settings
            request = Exchange(
                self, _UNPARSED, HTTPHeaders(), False, settings.max_body_size, settings.xheaders
            )
            request.error = status
            self._input_done = True
            self._enqueue(request)
        else:
            self._reject(self._parsing, status)

    def _reject(self, request: Exchange, status: int) -> None:
        self._input_done = True
        if request is self._active and request.phase:
            self._abort(request, status)
        else:
            request.error = status  # answered when its turn comes

    def _delegate_failed(self, request: Exchange, exc: BaseException) -> None:
        if isinstance(exc, HTTPInputError):
            log.info("Bad request from %s: %s", request.context, exc)
            status = 400
        else:
            method, path = request.start_line.method, request.start_line.path
            log.error("Uncaught exception serving %s %s", method, path, exc_info=exc)
            status = 500
        self._input_done = True
        self._abort(request, status)

    def _abort(self, request: Exchange, status: int) -> None:
        """Answer ``status`` unless a response has begun, tell the delegate, close."""
        if request is self._active:
            self._active = None
            if not request.started and not self.closed:
                self._transport.write(_error_response(status, request.error_detail))
        request.gone = True
        self._notify_closed(request)
        self.close(linger=True)

    def _notify_closed(self, request: Exchange) -> None:
        if request.phase and not request.delegate_over:
            request.delegate_over = True
            self._quietly(request.delegate.on_connection_close)
        elif request.close_callback is not None:
            callback, request.close_callback = request.close_callback, None
            self._quietly(callback)
        if request.body_timer is not None:
            request.body_timer.cancel()
            request.body_timer = None
        request.delegate = NO_DELEGATE

    @staticmethod
    def _quietly(callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            log.exception("Uncaught exception in a connection close callback")

    def body_timed_out(self, request: Exchange) -> None:
        request.body_timer = None
        if not request.message_done and not self.closed:
            log.info("Timeout reading body from %s", request.context)
            self.close()

    # Transport

    def write(self, data: bytes) -> asyncio.Future[None]:
        """Write ``data``; the future waits only while the transport's buffer is over its mark."""
        self._transport.write(data)
        if not self._write_paused:
            return self.done
        waiter = self.loop.create_future()
        self._drain.append(waiter)
        return waiter

    def refused(self) -> asyncio.Future[None]:
        """A failed future for writes after the response or the connection ended."""
        future = self.loop.create_future()
        future.set_exception(StreamClosedError())
        future.exception()  # retrieved: a handler that ignores it must not log
        return future

    def _update_reading(self) -> None:
        want = not (self._input_done or self._queue or self._unparsed) and (
            self._buffered < _READ_HIGH_WATER
        )
        if want is not self._reading and not self.closed:
            self._reading = want
            if want:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()

    def _become_idle(self) -> None:
        self._idle_since = self.loop.time()
        self._arm()

    def _deadline(self) -> float | None:
        """When what the connection waits for is late: a head, a body, or (idle) the next
        request."""
        settings = self.settings
        if self._head_since is not None:
            return self._head_since + settings.header_timeout_s
        if self._body_since is not None:
            return self._body_since + settings.body_timeout_s
        if self._idle_since is not None:
            return self._idle_since + settings.idle_timeout_s
        return None

    def _arm(self) -> None:
        # One timer per connection, moved on lazily (fired early, it looks again), instead of a
        # new one per request: a keep-alive request that arrives whole costs no timer at all.
        deadline = self._deadline()
        if deadline is None or self.closed:
            return
        if self._timer is not None:
            if self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        deadline = self._deadline()
        if deadline is None or self.closed:
            return
        if self.loop.time() < deadline - 0.001:  # timers may fire a hair early
            self._arm()
        elif self._head_since is not None or self._body_since is not None:
            what = "head" if self._head_since is not None else "body"
            self._head_since = self._body_since = None
            self._bad_input(408, f"request {what} not complete in time")
            self._update_reading()
        else:
            log.debug("Closing idle connection from %s", self.context)
            self.close()

    def shutdown(self) -> None:
        """Close now if idle, else once the response in progress is out."""
        self.closing = True
        if self._active is None:
            self.close()

    def close(self, *, linger: bool = False) -> None:
        """Close once buffered output is sent. ``linger``: half-close, then read and drop input
        for a moment first; closing with unread input makes the kernel reset the connection,
        and the client could lose the response (a 413 while it is still sending, say)."""
        if self.closed:
            return
        self.closed = self._input_done = True
        self._release()
        if self._active is not None:
            self._active.gone = True
        if not (linger and self._transport.can_write_eof()):
            self._transport.close()
            return
        self._transport.write_eof()
        if not self._reading:
            self._reading = True
            self._transport.resume_reading()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(_LINGER_S, self._transport.close)

    def abort(self) -> None:
        """Close at once, dropping buffered output."""
        self.closed = self._input_done = True
        self._transport.abort()
