"""A small HTTP/1.1 client on stdlib sockets: the blocking client's path to a plain ``http://``
gateway.

Measured at 50 jobs/s (``bench/results/peers.md``), httpx with httpcore and h11 added about
1 ms to every ``?wait=`` round trip of a no-op job on this machine, about half of the whole
trip. This pool writes each request in one ``send`` and parses the answer itself: status line,
headers, and a body framed by ``Content-Length``, chunked, or the connection's end.
``https://``, a proxy from the environment, or a transport of the caller's go through httpx
(see :class:`nsqjobs.client.Client`).

Failures are raised as httpx's transport exceptions, so the client retries them alike. A
connection is reused only when its answer was read whole and the server kept it open; an idle
one the server has closed is noticed before it is used. A request that found a reused
connection dead before any byte of an answer came back is sent once more on a new connection
(the server read nothing, or dropped it unanswered while closing an idle connection); any other
failure is the caller's, whose retries keep a job's id.
"""

from __future__ import annotations

import functools
import os
import select
import socket
import threading
import time
import urllib.parse
import urllib.request
import weakref
import zlib
from collections import deque
from collections.abc import Mapping
from typing import Final

import httpx

from nsqjobs.client.core import Reply

_MAX_HEAD: Final = 64 * 1024  # the gateway's own limit on a request head
_RECV: Final = 256 * 1024
_NO_BODY: Final = frozenset((204, 304))
# A request this small fits the socket's send buffer: sending it cannot wait on the server, so
# it is sent under the read timeout (one timeout set per request, none when it is unchanged).
_SMALL: Final = 64 * 1024
# A connection idle longer than this is checked for a close by the server before it is used
# (a system call); one idle less is used at once: should the server have closed it meanwhile,
# the request finds it dead before any answer and is sent once more on a new one (below).
# At light load every check ran cold and cost tens of microseconds per request.
_CHECK_IDLE_S: Final = 1.0


class _Conn:
    """One keep-alive connection: send a request, read its answer."""

    __slots__ = ("_buf", "idle_at", "sock", "timeout", "used")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        self.used = False
        self.idle_at = 0.0  # when it was last put back idle (time.monotonic)
        self.timeout: float | None = sock.gettimeout()

    def _set_timeout(self, seconds: float) -> None:
        if seconds != self.timeout:
            self.sock.settimeout(seconds)
            self.timeout = seconds

    def dropped(self) -> bool:
        """True if the server closed this idle connection (or sent something unasked)."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable) or bool(self._buf)

    def close(self) -> None:
        self.sock.close()

    def _more(self) -> bytes:
        data = self.sock.recv(_RECV)
        if not data:
            raise httpx.RemoteProtocolError("the server closed the connection mid-answer")
        return data

    def exchange(
        self, request: bytes, method: str, write_s: float, read_s: float
    ) -> tuple[int, dict[str, str], bytes, bool]:
        """Send ``request``; the answer's status, headers (lower-case names), body, and
        whether the connection may carry another request."""
        self._set_timeout(write_s if len(request) > _SMALL else read_s)
        self.sock.sendall(request)
        self.used = True
        self._set_timeout(read_s)
        while True:
            status, version, headers = self._head()
            if 100 <= status < 200 and status != 101:
                continue  # an interim answer (100 Continue): the real one follows
            break
        keep = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        if method == "HEAD" or status in _NO_BODY:
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = self._chunked()
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise httpx.RemoteProtocolError("a bad Content-Length in the answer") from None
            body = self._exactly(length)
        else:
            body = self._to_end()
            keep = False
        coding = headers.get("content-encoding", "").lower()
        if coding in ("gzip", "deflate"):
            try:
                body = zlib.decompress(body, 47 if coding == "gzip" else 15)
            except zlib.error as exc:
                # A transport failure (the connection is closed, the request tried again).
                raise httpx.RemoteProtocolError(f"a bad {coding} body: {exc}") from None
        return status, headers, body, keep

    def _head(self) -> tuple[int, str, dict[str, str]]:
        buf = self._buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end > _MAX_HEAD or (end < 0 and len(buf) > _MAX_HEAD):
                raise httpx.RemoteProtocolError("the answer's head is over 64 KiB")
            if end >= 0:
                break
            if not buf:
                try:
                    data = self.sock.recv(_RECV)
                except ConnectionResetError:
                    data = b""
                if not data:
                    raise _NoAnswer("the server closed the connection before answering")
                buf = data
            else:
                buf += self._more()
        head, self._buf = buf[:end].decode("latin-1"), buf[end + 4 :]
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        code = parts[1] if len(parts) > 1 else ""
        if not parts[0].startswith("HTTP/") or not (code.isascii() and code.isdigit()):
            raise httpx.RemoteProtocolError(f"not an HTTP answer: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise httpx.RemoteProtocolError(f"a bad header line: {line[:80]!r}")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return int(parts[1]), parts[0], headers

    def _exactly(self, n: int) -> bytes:
        buf = self._buf
        while len(buf) < n:
            buf += self._more()
        self._buf = buf[n:]
        return buf[:n]

    def _line(self) -> bytes:
        buf = self._buf
        while (end := buf.find(b"\r\n")) < 0:
            if len(buf) > _MAX_HEAD:
                raise httpx.RemoteProtocolError("a chunk line over 64 KiB")
            buf += self._more()
        self._buf = buf[end + 2 :]
        return buf[:end]

    def _chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size_text = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise httpx.RemoteProtocolError(f"a bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                while self._line():  # trailers, up to the empty line
                    pass
                return b"".join(parts)
            parts.append(self._exactly(size))
            if self._exactly(2) != b"\r\n":
                raise httpx.RemoteProtocolError("a chunk without its CRLF")

    def _to_end(self) -> bytes:
        parts = [self._buf]
        self._buf = b""
        while data := self.sock.recv(_RECV):
            parts.append(data)
        return b"".join(parts)


class _NoAnswer(httpx.RemoteProtocolError):
    """The connection ended before the first byte of an answer."""


# Every live pool, so that a forked child drops its parent's connections (one hook for all).
_POOLS: Final[weakref.WeakSet[Pool]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Pool:
    """Keep-alive connections to one ``http://`` origin, for several threads at once; at most
    ``max_connections`` open (a request waits up to its write timeout for one)."""

    def __init__(self, base_url: str, headers: Mapping[str, str], max_connections: int) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"Pool serves http:// URLs with a host, not {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.url = base_url.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        fixed = {"Host": host if self.port == 80 else f"{host}:{self.port}", **headers}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items())
        self._idle: deque[_Conn] = deque()
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)  # a slot came free
        self._max = max_connections
        self._busy = 0  # requests under way (each holds a connection, or is opening one)
        self._waiting = 0
        self._closed = False
        _POOLS.add(self)

    def _forked(self) -> None:
        """In a forked child: forget the parent's connections (a child reading from one would
        take the parent's answers) and the parent's threads' slots; the child opens its own."""
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        idle, self._idle = self._idle, deque()
        self._busy = self._waiting = 0
        for conn in idle:
            conn.close()  # the child's copy of the descriptor only: the parent's stays open

    def close(self) -> None:
        """Close the idle connections; those in use close when their request ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, deque()
        for conn in idle:
            conn.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        params: Mapping[str, object] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: httpx.Timeout,
    ) -> Reply:
        """One request and its answer (any status)."""
        target = self.prefix + path
        if params:
            target = f"{target}?{_query(tuple((k, _param(v)) for k, v in params.items()))}"
        head = f"{method} {target} HTTP/1.1\r\n{self._fixed}"
        if headers:
            head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if content is not None or method in ("POST", "PUT", "PATCH"):
            head += f"Content-Length: {len(content or b'')}\r\n"
        request = (head + "\r\n").encode("latin-1") + (content or b"")
        write_s = timeout.write if timeout.write is not None else 30.0
        read_s = timeout.read if timeout.read is not None else 1e9  # None: no limit
        idle = self._take(write_s)
        try:
            return self._send(idle, request, method, target, write_s, read_s, timeout)
        finally:
            with self._lock:
                self._busy -= 1
                if self._waiting:
                    self._freed.notify()

    def _take(self, wait_s: float) -> _Conn | None:
        """A slot for one request, and the idle connection last put back (None: open one);
        waits up to ``wait_s`` while ``max_connections`` requests are under way."""
        with self._lock:
            if self._busy >= self._max:
                self._wait_for_slot(wait_s)
            self._busy += 1
            return self._idle.pop() if self._idle else None

    def _wait_for_slot(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        self._waiting += 1
        try:
            while self._busy >= self._max:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise httpx.PoolTimeout(f"no free connection to {self.url} within {wait_s:g}s")
                self._freed.wait(left)
        finally:
            self._waiting -= 1

    def _send(
        self,
        idle: _Conn | None,
        request: bytes,
        method: str,
        target: str,
        write_s: float,
        read_s: float,
        timeout: httpx.Timeout,
    ) -> Reply:
        for fresh in (False, True):
            conn = None if fresh else self._reuse(idle)
            reused = conn is not None
            if conn is None:
                conn = self._connect(timeout)
            try:
                status, headers, body, keep = conn.exchange(request, method, write_s, read_s)
            except _NoAnswer:
                conn.close()
                if reused:
                    continue  # a stale keep-alive connection: once more on a new one
                raise
            except TimeoutError:
                conn.close()
                raise httpx.ReadTimeout(f"no answer from {self.url} in time") from None
            except (BrokenPipeError, ConnectionResetError) as exc:
                conn.close()
                if reused and not conn.used:
                    continue
                raise httpx.ReadError(f"{self.url}: {exc!r}") from None
            except OSError as exc:
                conn.close()
                raise httpx.ReadError(f"{self.url}: {exc!r}") from None
            except httpx.TransportError:
                conn.close()
                raise
            if keep:
                self._keep(conn)
            else:
                conn.close()
            return Reply(status, headers, body, f"{self.url}{target}")
        raise AssertionError("unreachable")  # pragma: no cover

    def _reuse(self, conn: _Conn | None) -> _Conn | None:
        """``conn`` (taken with the slot), or another idle one, if usable; None: open one."""
        while conn is not None:
            if not conn._buf and (
                time.monotonic() - conn.idle_at < _CHECK_IDLE_S or not conn.dropped()
            ):
                conn.used = False
                return conn
            conn.close()
            with self._lock:
                conn = self._idle.pop() if self._idle else None
        return None

    def _keep(self, conn: _Conn) -> None:
        conn.idle_at = time.monotonic()
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self, timeout: httpx.Timeout) -> _Conn:
        connect_s = timeout.connect if timeout.connect is not None else 30.0
        try:
            sock = socket.create_connection((self.host, self.port), timeout=connect_s)
        except TimeoutError:
            raise httpx.ConnectTimeout(
                f"no connection to {self.url} within {connect_s:g}s"
            ) from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {self.url}: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Conn(sock)


@functools.lru_cache(maxsize=256)
def _query(params: tuple[tuple[str, str], ...]) -> str:
    """A query string (the same few recur: ``wait=30``, a listing's filters)."""
    return urllib.parse.urlencode(params)


def _param(value: object) -> str:
    """A query value as httpx writes it (booleans in lower case)."""
    if value is True or value is False:
        return "true" if value else "false"
    return "" if value is None else str(value)


def usable(url: str) -> bool:
    """True when ``url`` can go through :class:`Pool`: plain http, no proxy set for it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    proxies = urllib.request.getproxies()
    if not ("http" in proxies or "all" in proxies):
        return True
    return bool(urllib.request.proxy_bypass(parts.hostname))
