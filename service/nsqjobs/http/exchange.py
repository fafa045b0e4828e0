"""One request/response exchange on an HTTP/1.1 connection: tornado's ``request.connection``.

It frames the response (Content-Length or chunked, keep-alive or close) and hands the bytes to
its connection (``nsqjobs.http.connection``), which it knows only as a :class:`Carrier`.
"""

from __future__ import annotations

import asyncio
import http.client
from collections.abc import Callable
from typing import Any, Final, Protocol

import tornado.netutil
from tornado.httputil import (
    HTTPConnection,
    HTTPHeaders,
    HTTPMessageDelegate,
    HTTPOutputError,
    RequestStartLine,
    ResponseStartLine,
)

# The delegate of a request that has none yet, or none any more: ignores everything.
NO_DELEGATE: Final = HTTPMessageDelegate()


class Carrier(Protocol):
    """What an exchange needs from the connection it arrived on."""

    loop: asyncio.AbstractEventLoop
    closing: bool  # shutting down: no keep-alive
    done: asyncio.Future[None]  # returned by writes that need no waiting

    @property
    def context(self) -> ClientContext:
        """The client's address and scheme, as the socket says."""

    def write(self, data: bytes) -> asyncio.Future[None]:
        """Write response bytes."""

    def refused(self) -> asyncio.Future[None]:
        """A failed future for writes after the response or the connection ended."""

    def close(self, *, linger: bool = False) -> None:
        """Close the connection."""

    def response_done(self, request: Exchange) -> None:
        """The response is complete."""

    def body_timed_out(self, request: Exchange) -> None:
        """The body did not arrive in time."""


class ClientContext:
    """What tornado reads from ``request.connection.context`` (``HTTPServerRequest``, logs)."""

    __slots__ = ("address", "address_family", "protocol", "remote_ip", "trusted_downstream")

    def __init__(self, address: Any, family: int | None, remote_ip: str, protocol: str) -> None:
        self.address = address
        self.address_family = family
        self.remote_ip = remote_ip
        self.protocol = protocol
        self.trusted_downstream: frozenset[str] = frozenset()

    def __str__(self) -> str:
        return self.remote_ip

    def behind_proxy(self, headers: HTTPHeaders) -> ClientContext:
        """This context, or a copy with the client address and scheme a proxy's headers name."""
        ip = self.remote_ip
        for hop in reversed(",".join(headers.get_list("X-Forwarded-For")).split(",")):
            if (hop := hop.strip()) and hop not in self.trusted_downstream:
                ip = hop
                break
        ip = ",".join(headers.get_list("X-Real-Ip")) or ip
        if ip != self.remote_ip and not tornado.netutil.is_valid_ip(ip):
            ip = self.remote_ip
        schemes = headers.get_list("X-Scheme") or headers.get_list("X-Forwarded-Proto")
        scheme = schemes[-1].rsplit(",", 1)[-1].strip() if schemes else self.protocol
        if scheme not in ("http", "https"):
            scheme = self.protocol
        if ip == self.remote_ip and scheme == self.protocol:
            return self
        return ClientContext(self.address, self.address_family, ip, scheme)


class Exchange(HTTPConnection):
    """One request/response exchange: tornado's ``request.connection``."""

    def __init__(
        self,
        conn: Carrier,
        start_line: RequestStartLine,
        headers: HTTPHeaders,
        keep: bool,
        max_body_size: int,
        xheaders: bool,
    ) -> None:
        self.conn = conn
        self.start_line = start_line
        self.headers = headers
        self.keep_alive = keep
        self._context: ClientContext | None = None  # see the context property
        self.max_body_size = max_body_size
        self.xheaders = xheaders
        self.error = 0  # answer this status instead of handing the request to the delegate
        self.error_detail = ""  # and why, when the status alone does not say
        self.delegate = NO_DELEGATE
        self.phase = 0  # 0: waiting its turn, 1: headers delivered, 2: body flowing
        self.waiting = False  # an awaitable returned by the delegate is pending
        self.delegate_over = False  # the delegate got finish() or on_connection_close()
        self.chunks: list[bytes] = []  # body received, not yet delivered
        self.received = 0
        self.message_done = False  # the parser has seen the whole request
        self.body_timer: asyncio.TimerHandle | None = None
        self.close_callback: Callable[[], None] | None = None
        self.started = False  # response headers written
        self.finished = False  # response complete
        self.gone = False  # response complete or connection closed: writes are refused
        self.no_body = False
        self.chunking = False
        self.remaining: int | None = None  # Content-Length still to write

    @property
    def context(self) -> ClientContext:
        """The client's address and scheme (behind a proxy, as its headers say, with xheaders).

        Worked out on first use: a delegate that never asks (the gateway's job route) pays
        nothing for it.
        """
        context = self._context
        if context is None:
            context = self.conn.context
            if self.xheaders:
                context = context.behind_proxy(self.headers)
            self._context = context
        return context

    def set_close_callback(self, callback: Callable[[], None] | None) -> None:
        """Run ``callback`` if the connection closes after the request was read."""
        self.close_callback = callback

    def set_max_body_size(self, max_body_size: int) -> None:
        """Override the server's body size limit for this request."""
        self.max_body_size = max_body_size

    def set_body_timeout(self, timeout: float) -> None:
        """Close the connection unless the body is in within ``timeout`` seconds."""
        if self.body_timer is not None:
            self.body_timer.cancel()
        if not self.message_done:
            self.body_timer = self.conn.loop.call_later(timeout, self.conn.body_timed_out, self)

    def write_headers(
        self,
        start_line: RequestStartLine | ResponseStartLine,
        headers: HTTPHeaders,
        chunk: bytes | None = None,
    ) -> asyncio.Future[None]:
        """Frame the response as tornado does; write its head and first chunk at once."""
        if self.gone:
            return self.conn.refused()
        try:
            if not isinstance(start_line, ResponseStartLine):
                raise TypeError("a server writes a ResponseStartLine")
            data = self._head(start_line, headers)
        except Exception:
            self.conn.close()  # nothing can follow a head that was not sent
            raise
        if chunk and not self.no_body:
            data += self._frame(chunk)
        return self.conn.write(data)

    def _head(self, start_line: ResponseStartLine, headers: HTTPHeaders) -> bytes:
        code = start_line.code
        version = self.start_line.version
        self.started = True
        self.no_body = code < 200 or code in (204, 304) or self.start_line.method == "HEAD"
        # Keep-alive needs the whole request read: its unread rest would parse as the next one.
        keep = self.keep_alive and self.message_done and not self.conn.closing
        if self.no_body:
            pass
        elif "Content-Length" in headers:
            self.remaining = int(headers["Content-Length"])
        elif version == "HTTP/1.1":
            self.chunking = True
            headers["Transfer-Encoding"] = "chunked"
        else:
            keep = False  # an HTTP/1.0 body without a length ends where the connection does
        if keep and "Connection" in headers:
            keep = "close" not in [t.strip() for t in headers["Connection"].lower().split(",")]
        self.keep_alive = keep
        if version == "HTTP/1.1":
            if not keep:
                headers["Connection"] = "close"
        elif keep:
            headers["Connection"] = "Keep-Alive"
        reason = start_line.reason or http.client.responses.get(code, "Unknown")
        lines = [f"HTTP/1.1 {code} {reason}"]
        lines.extend([f"{name}: {value}" for name, value in headers.get_all()])
        head = "\r\n".join(lines)
        breaks = len(lines) - 1
        if head.count("\n") != breaks or head.count("\r") != breaks:
            raise ValueError(f"CR or LF inside a response header: {head!r}")
        return (head + "\r\n\r\n").encode("latin-1")

    def write(self, chunk: bytes) -> asyncio.Future[None]:
        """Write a chunk of the response body."""
        if self.gone:
            return self.conn.refused()
        if not self.started:
            raise HTTPOutputError("write() before write_headers()")
        if not chunk or self.no_body:
            return self.conn.done
        return self.conn.write(self._frame(chunk))

    def finish(self) -> None:
        """End the response; the connection moves on to the next request or closes."""
        if self.gone:
            return
        conn = self.conn
        if not self.started:
            raise HTTPOutputError("finish() before write_headers()")
        if self.remaining:
            conn.close()
            raise HTTPOutputError(f"Tried to write {self.remaining} bytes less than Content-Length")
        if self.chunking:
            conn.write(b"0\r\n\r\n")
        self.finished = self.gone = True
        self.close_callback = None
        conn.response_done(self)

    def _frame(self, chunk: bytes) -> bytes:
        if self.remaining is not None:
            self.remaining -= len(chunk)
            if self.remaining < 0:
                self.conn.close()
                raise HTTPOutputError("Tried to write more data than Content-Length")
        if self.chunking:
            return b"%x\r\n%b\r\n" % (len(chunk), chunk)
        return chunk
