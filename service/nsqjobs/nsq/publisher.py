"""Publishing that waits for nsqd's OK, with single PUBs of one loop turn coalesced into an MPUB.

pynsq's ``Writer.pub`` returns before nsqd answers; :class:`Publisher` turns the callback into an
awaitable that succeeds only on ``OK``, so "accepted" always means "nsqd has it".
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import nsq
import nsq.writer

from nsqjobs.errors import PublishError, PublishRejected
from nsqjobs.nsq import frames
from nsqjobs.nsq.conn import connections_of, silence_pynsq


class PublishMetrics(Protocol):
    """What a publisher records (a daemon's metrics object provides it)."""

    publish_duration: Any
    publish_errors: Any


class _Writer(nsq.Writer):  # type: ignore[misc]
    """pynsq's Writer on our connections, sending our frames; once closed, it stays closed."""

    def connect_to_nsqd(self, host: str, port: int) -> Any:
        """Connect as pynsq does, with our connection class."""
        with connections_of(nsq.writer):
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
        metrics: PublishMetrics | None = None,
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
        await self._send("mpub", topic, frames.mpub(topic, bodies))

    async def dpub(self, topic: str, delay_ms: int, body: bytes) -> None:
        """DPUB: deliver ``body`` after ``delay_ms`` milliseconds."""
        await self._send("dpub", topic, frames.dpub(topic, delay_ms, body))

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
                await self._send("pub", topic, frames.pub(topic, group[0][0]))
            else:
                await self._send("mpub", topic, frames.mpub(topic, [body for body, _ in group]))
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

    async def _send(self, command: str, topic: str, frame: bytes) -> None:
        # A connection can die between our check and the write; try each open one in turn.
        tries = max(1, self.connected())
        for attempt in range(1, tries + 1):
            start = time.perf_counter()
            try:
                await self._send_once(command, topic, frame)
            except PublishError:
                if self.metrics is not None:
                    self.metrics.publish_errors.labels(command).inc()
                if attempt == tries:
                    raise
                continue
            if self.metrics is not None:
                self.metrics.publish_duration.labels(command).observe(time.perf_counter() - start)
            return

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
        silence_pynsq()
        for conn in list(self._writer.conns.values()):
            conn.close()
