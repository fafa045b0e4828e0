"""The NSQ layer shared by gateway and worker: publishes that wait for nsqd's OK, topic set-up.

pynsq's ``Writer.pub`` returns before nsqd answers; :class:`Publisher` turns the callback into an
awaitable that succeeds only on ``OK``, so "accepted" always means "nsqd has it".
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any, Protocol

import nsq
import tornado.httpclient

from service.errors import PublishError, PublishRejected

log = logging.getLogger(__name__)


class _PublishMetrics(Protocol):
    publish_duration: Any
    publish_errors: Any


class _Writer(nsq.Writer):  # type: ignore[misc]
    """pynsq's Writer, but one that stops reconnecting once closed."""

    closing = False

    def _on_connection_close(self, conn: Any, **kwargs: Any) -> None:
        if self.closing:
            self.conns.pop(conn.id, None)
            return
        super()._on_connection_close(conn, **kwargs)


class Publisher:
    """Publishes to one or more nsqd and waits for each acknowledgement."""

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
        """PUB one message."""
        await self._send("pub", topic, body)

    async def mpub(self, topic: str, bodies: list[bytes]) -> None:
        """MPUB: all of ``bodies`` or none of them (nsqd applies one MPUB atomically)."""
        await self._send("mpub", topic, bodies)

    async def dpub(self, topic: str, delay_ms: int, body: bytes) -> None:
        """DPUB: deliver ``body`` after ``delay_ms`` milliseconds."""
        await self._send("dpub", topic, body, delay_ms)

    async def _send(
        self, command: str, topic: str, payload: bytes | list[bytes], delay_ms: int = 0
    ) -> None:
        # A connection can die between our check and the write; try each open one in turn.
        tries = max(1, self.connected())
        last: BaseException | None = None
        for _ in range(tries):
            start = time.perf_counter()
            try:
                await self._send_once(command, topic, payload, delay_ms)
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

    async def _send_once(
        self, command: str, topic: str, payload: bytes | list[bytes], delay_ms: int
    ) -> None:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()

        def done(_conn: Any, data: Any) -> None:
            if not answer.done():
                answer.set_result(data)

        if command == "dpub":
            self._writer.dpub(topic, delay_ms, payload, callback=done)
        else:
            getattr(self._writer, command)(topic, payload, callback=done)
        try:
            data = await asyncio.wait_for(answer, self.timeout_s)
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
