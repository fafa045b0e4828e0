"""The NSQ layer shared by gateway and worker: publishes that wait for nsqd's OK, topic set-up.

pynsq's ``Writer.pub`` returns before nsqd answers; :class:`Publisher` turns the callback into an
awaitable that succeeds only on ``OK``, so "accepted" always means "nsqd has it".

Every connection is pynsq's ``AsyncConn`` with two changes (:class:`_Conn`): frames are read in
bulk, and commands are written once per event-loop turn. pynsq reads each frame with two
``read_bytes`` calls and writes each FIN on its own; measured in bench/, those per-frame hops
cost more than a noop job's whole handling.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Protocol

import nsq
import nsq.reader
import nsq.writer
import tornado.httpclient
from nsq import event, protocol
from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError

from service.errors import PublishError, PublishRejected

log = logging.getLogger(__name__)


class _PublishMetrics(Protocol):
    publish_duration: Any
    publish_errors: Any


# Frames built here rather than by pynsq: its MPUB appends bytes in a loop (quadratic in the
# batch size: 37% of gateway time on 1000-job batches).
_SIZE = struct.Struct(">l")


def _frame(command: str, topic: str, payload: bytes | list[bytes], delay_ms: int) -> bytes:
    if command == "mpub":
        assert isinstance(payload, list)
        parts = [_SIZE.pack(len(payload))]
        for body in payload:
            parts += (_SIZE.pack(len(body)), body)
        data = b"".join(parts)
        head = f"MPUB {topic}\n"
    else:
        assert isinstance(payload, bytes)
        data = payload
        head = f"DPUB {topic} {delay_ms}\n" if command == "dpub" else f"PUB {topic}\n"
    return b"".join((head.encode(), _SIZE.pack(len(data)), data))


class _Conn(nsq.AsyncConn):  # type: ignore[misc]
    """pynsq's connection, reading many frames per read and writing once per loop turn.

    TLS, snappy and deflate swap the stream after IDENTIFY; with any of them enabled the
    connection keeps pynsq's own frame-by-frame path.
    """

    READ_CHUNK = 256 * 1024
    # nsqd's largest frame: --max-msg-size (1 MiB by default) plus headers; far above is garbage.
    MAX_FRAME = 64 * 1024 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plain = not (self.tls_v1 or self.snappy or self.deflate)
        self._unread = b""
        self._unsent: list[bytes] | None = None

    def _start_read(self) -> None:
        if not self._plain:
            super()._start_read()
            return
        if self.stream is None or self.stream.closed():
            return
        try:
            chunk = self.stream.read_bytes(self.READ_CHUNK, partial=True)
        except StreamClosedError:
            self.close()
            return
        chunk.add_done_callback(self._on_chunk)

    def _on_chunk(self, fut: Any) -> None:
        try:
            data = fut.result()
        except Exception:
            # The stream closed; its close callback tells pynsq (CLOSE), nothing more to say.
            self.close()
            return
        buf = self._unread + data if self._unread else data
        pos, end = 0, len(buf)
        while end - pos >= 4:
            (size,) = _SIZE.unpack_from(buf, pos)
            if not 4 <= size <= self.MAX_FRAME:
                self.close()
                self.trigger(
                    event.ERROR,
                    conn=self,
                    error=protocol.IntegrityError(f"bad frame size {size}"),
                )
                return
            if end - pos - 4 < size:
                break
            frame = buf[pos + 4 : pos + 4 + size]
            pos += 4 + size
            try:
                self.trigger(event.DATA, conn=self, data=frame)
            except Exception:
                log.exception("[%s] uncaught exception handling a frame", self.id)
            if self.stream is None or self.stream.closed():
                return
        self._unread = buf[pos:]
        self._start_read()

    def send(self, data: bytes) -> None:
        """Queue a command; everything queued in one loop turn goes out in one write."""
        if not self._plain:
            super().send(data)
            return
        if self._unsent is None:
            self._unsent = [data]
            IOLoop.current().add_callback(self._write_unsent)
        else:
            self._unsent.append(data)

    def _write_unsent(self) -> None:
        unsent, self._unsent = self._unsent, None
        if not unsent or self.stream is None or self.stream.closed():
            return
        try:
            self.stream.write(b"".join(unsent))
        except Exception:
            self.close()

    def flushed(self) -> bool:
        """True when nothing is waiting to be written to nsqd."""
        stream = self.stream
        return self._unsent is None and (stream is None or stream.closed() or not stream.writing())


@contextmanager
def _connections_of(module: ModuleType) -> Iterator[None]:
    # pynsq's connect_to_nsqd builds ``AsyncConn`` by its module-level name; swap it for ours
    # around that synchronous call (nothing else runs meanwhile on this thread).
    saved = getattr(module, "AsyncConn")  # noqa: B009 (mypy: pynsq is untyped)
    setattr(module, "AsyncConn", _Conn)  # noqa: B010
    try:
        yield
    finally:
        setattr(module, "AsyncConn", saved)  # noqa: B010


class Reader(nsq.Reader):  # type: ignore[misc]
    """pynsq's Reader on :class:`_Conn` connections."""

    def connect_to_nsqd(self, host: str, port: int) -> Any:
        """Connect as pynsq does, with our connection class."""
        with _connections_of(nsq.reader):
            return super().connect_to_nsqd(host, port)


class _Writer(nsq.Writer):  # type: ignore[misc]
    """pynsq's Writer on our connections, sending our frames; once closed, it stays closed."""

    def connect_to_nsqd(self, host: str, port: int) -> Any:
        """Connect as pynsq does, with our connection class."""
        with _connections_of(nsq.writer):
            return super().connect_to_nsqd(host, port)

    closing = False

    def send_frame(self, frame: bytes, callback: Callable[[Any, Any], None]) -> None:
        """Send a ready-made publish frame on a random open connection; ``callback`` gets OK."""
        conns = [conn for conn in self.conns.values() if conn.connected()]
        if not conns:
            callback(None, nsq.protocol.SendError("no open connections"))
            return
        conn = random.choice(conns)
        conn.callback_queue.append(callback)
        try:
            conn.send(frame)
        except Exception as exc:
            conn.callback_queue.remove(callback)
            callback(conn, nsq.protocol.SendError("send error", exc))
            conn.close()

    def _on_connection_close(self, conn: Any, **kwargs: Any) -> None:
        if self.closing:
            self.conns.pop(conn.id, None)
            return
        super()._on_connection_close(conn, **kwargs)


class Publisher:
    """Publishes to one or more nsqd and waits for each acknowledgement.

    Single PUBs issued in the same event-loop turn are coalesced into one MPUB (a group commit):
    each caller still returns only once nsqd acknowledged the frame holding its message.
    """

    # nsqd's defaults: --max-body-size 5 MiB per MPUB; stay well under it.
    GROUP_BYTES = 4 * 1024 * 1024
    GROUP_MESSAGES = 1000

    def __init__(
        self,
        nsqd_tcp_addresses: Sequence[str],
        *,
        timeout_s: float = 5.0,
        metrics: _PublishMetrics | None = None,
        reconnect_interval: float = 1.0,
    ) -> None:
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._writer = _Writer(list(nsqd_tcp_addresses), reconnect_interval=reconnect_interval)
        self._pending: dict[str, list[tuple[bytes, asyncio.Future[None]]]] = {}
        self._flush_scheduled = False
        self._groups: set[asyncio.Task[None]] = set()

    def connected(self) -> int:
        """How many nsqd connections are open."""
        return sum(1 for conn in self._writer.conns.values() if conn.connected())

    async def wait_connected(self, timeout_s: float) -> bool:
        """Poll until at least one connection is open, or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while not self.connected():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def pub(self, topic: str, body: bytes) -> None:
        """Publish one message (coalesced with others of this loop turn into one MPUB)."""
        await self.enqueue(topic, body)

    def enqueue(self, topic: str, body: bytes) -> asyncio.Future[None]:
        """Like :meth:`pub`, for callback code: the future's result is nsqd's OK, or the error."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.setdefault(topic, []).append((body, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    async def mpub(self, topic: str, bodies: list[bytes]) -> None:
        """MPUB: all of ``bodies`` or none of them (nsqd applies one MPUB atomically)."""
        await self._send("mpub", topic, bodies)

    async def dpub(self, topic: str, delay_ms: int, body: bytes) -> None:
        """DPUB: deliver ``body`` after ``delay_ms`` milliseconds."""
        await self._send("dpub", topic, body, delay_ms)

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for topic, items in pending.items():
            group: list[tuple[bytes, asyncio.Future[None]]] = []
            size = 0
            for item in items:
                if group and (
                    size + len(item[0]) > self.GROUP_BYTES or len(group) >= self.GROUP_MESSAGES
                ):
                    self._spawn(topic, group)
                    group, size = [], 0
                group.append(item)
                size += len(item[0]) + 4
            self._spawn(topic, group)

    def _spawn(self, topic: str, group: list[tuple[bytes, asyncio.Future[None]]]) -> None:
        task = asyncio.ensure_future(self._publish_group(topic, group))
        self._groups.add(task)
        task.add_done_callback(self._groups.discard)

    async def _publish_group(
        self, topic: str, group: list[tuple[bytes, asyncio.Future[None]]]
    ) -> None:
        error: PublishError | None = None
        try:
            if len(group) == 1:
                await self._send("pub", topic, group[0][0])
            else:
                await self._send("mpub", topic, [body for body, _ in group])
        except PublishRejected as exc:
            if len(group) > 1:
                # nsqd refused the whole MPUB (one message too big?): each one on its own, so
                # one bad message does not fail its neighbours.
                for item in group:
                    await self._publish_group(topic, [item])
                return
            error = exc
        except PublishError as exc:
            error = exc
        for _, fut in group:
            if fut.done():  # the caller was cancelled
                continue
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

    async def _send(
        self, command: str, topic: str, payload: bytes | list[bytes], delay_ms: int = 0
    ) -> None:
        # A connection can die between our check and the write; try each open one in turn.
        frame = _frame(command, topic, payload, delay_ms)
        tries = max(1, self.connected())
        last: BaseException | None = None
        for _ in range(tries):
            start = time.perf_counter()
            try:
                await self._send_once(command, topic, frame)
            except PublishError as exc:
                last = exc
                if self.metrics is not None:
                    self.metrics.publish_errors.labels(command).inc()
                continue
            if self.metrics is not None:
                self.metrics.publish_duration.labels(command).observe(time.perf_counter() - start)
            return
        assert last is not None
        raise last

    async def _send_once(self, command: str, topic: str, frame: bytes) -> None:
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(_conn: Any, data: Any) -> None:
            if not answer.done():
                answer.set_result(data)

        self._writer.send_frame(frame, done)
        try:
            async with asyncio.timeout(self.timeout_s):
                data = await answer
        except TimeoutError:
            raise PublishError(
                f"{command} {topic}: no answer from nsqd in {self.timeout_s}s"
            ) from None
        if isinstance(data, nsq.protocol.ConnectionClosedError | nsq.protocol.SendError):
            raise PublishError(f"{command} {topic}: {data}")
        if isinstance(data, nsq.Error):
            raise PublishRejected(f"{command} {topic}: {data}")
        if data != b"OK":
            raise PublishError(f"{command} {topic}: unexpected answer {data!r}")

    def close(self) -> None:
        """Close every connection and stop reconnecting."""
        self._writer.closing = True
        _silence_pynsq()
        for conn in list(self._writer.conns.values()):
            conn.close()


def _silence_pynsq() -> None:
    # Closing connections on purpose makes pynsq log "failed to unpack size" at ERROR a moment
    # later; closing is the last thing a daemon does, so pynsq stays quiet from then on.
    logging.getLogger("nsq").setLevel(logging.CRITICAL)


def close_reader(reader: Any) -> None:
    """Close a pynsq Reader's connections and timers without error noise."""
    _silence_pynsq()
    reader.close()


async def create_topics(http_addresses: Sequence[str], topics: Sequence[str]) -> list[str]:
    """Create ``topics`` on each nsqd over HTTP so nsqlookupd knows them before the first publish.

    Returns the failures as readable strings; a failure is not fatal (the first publish creates
    the topic too, only discovery is slower).
    """
    client = tornado.httpclient.AsyncHTTPClient()
    failures = []
    for addr in http_addresses:
        for topic in topics:
            url = f"http://{addr}/topic/create?topic={urllib.parse.quote(topic)}"
            try:
                await client.fetch(url, method="POST", body=b"", request_timeout=2.0)
            except Exception as exc:
                failures.append(f"{addr}: create topic {topic}: {exc}")
    return failures


def connected_count(reader: Any) -> int:
    """Open connections of a pynsq Reader."""
    return sum(1 for conn in reader.conns.values() if conn.connected())


def unflushed(readers: Sequence[Any]) -> int:
    """How many of the readers' connections still have commands (FIN, REQ) to write."""
    return sum(
        1
        for reader in readers
        for conn in reader.conns.values()
        if isinstance(conn, _Conn) and not conn.flushed()
    )
