"""Publishing that waits for nsqd's OK, with single PUBs of one loop turn coalesced into an MPUB.

pynsq's ``Writer.pub`` returns before nsqd answers; :class:`Publisher` turns the callback into an
awaitable that succeeds only on ``OK``, so "accepted" always means "nsqd has it".
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import nsq

from nsqjobs.errors import (
    PublishConnectionLost,
    PublishError,
    PublishRejected,
    PublishTimeout,
)
from nsqjobs.nsq import frames
from nsqjobs.nsq.conn import (
    BulkConn,
    Outages,
    quiet_pynsq_network_noise,
    silence_pynsq,
    unregister,
)

log = logging.getLogger("nsqjobs.nsq")


# A frame written already: when, and the future of nsqd's answer to it.
_Sent = tuple[float, "asyncio.Future[Any]"]


class PublishMetrics(Protocol):
    """What a publisher records (a daemon's metrics object provides it)."""

    publish_duration: Any
    publish_errors: Any


class _NotSent(PublishError):
    """The frame never reached nsqd, or nsqd closed the connection before reading it: safe to
    send again (nothing can have been stored)."""


# nsq 1.3.0's E_PUB_FAILED, E_MPUB_FAILED, E_DPUB_FAILED: nsqd could not store the message
# (the topic is exiting, its disk queue failed). Nothing was stored: the frame is sent again
# (after a reconnect), as one that never arrived, and never taken for a refusal of the message.
_STORE_FAILED = (b"E_PUB_FAILED", b"E_MPUB_FAILED", b"E_DPUB_FAILED")
# nsqd's fatal client errors (protocol_v2.go's FatalClientErr): it answers the frame that caused
# one, then closes the connection without reading anything after it.
_FATAL = (b"E_INVALID", b"E_BAD_BODY", b"E_BAD_TOPIC", b"E_BAD_MESSAGE", *_STORE_FAILED)


class _Writer(nsq.Writer):  # type: ignore[misc]
    """pynsq's Writer on our connections, sending our frames; once closed, it stays closed.

    Every connection keeps its unanswered frames in order (``conn.waiting``: callback and send
    time): nsqd answers in order, so an error frame answers the oldest one alone (pynsq failed
    every waiting frame with it). A lost connection is dialled again at once, then every
    second at most (``Outages``).
    """

    def __init__(
        self, nsqd_tcp_addresses: list[str], client_id: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(nsqd_tcp_addresses, **kwargs)
        quiet_pynsq_network_noise()
        self.client_id = client_id
        self.closing = False
        self.lost_at = 0.0
        self.outages = Outages("publisher")
        self._dialing: dict[str, Any] = {}
        # A connection whose oldest answer is overdue by this much is passed over while
        # another is healthy (the publisher sets its publish timeout).
        self.stall_s: float | None = None

    def connect_to_nsqd(self, host: str, port: int) -> Any:
        """Connect as pynsq does, with our connection class; one dial per address at a time."""
        addr = f"{host}:{port}"
        dialing = self._dialing.get(addr)
        if self.closing or addr in self.conns or (dialing is not None and dialing.connecting()):
            return None
        conn = BulkConn(host, port, **self.conn_kwargs)
        conn.on("identify", self._on_connection_identify)
        conn.on("identify_response", self._on_connection_identify_response)
        conn.on("auth", self._on_connection_auth)
        conn.on("auth_response", self._on_connection_auth_response)
        conn.on("error", self._on_connection_error)
        conn.on("response", self._on_connection_response)
        conn.on("close", self._on_connection_close)
        conn.on("ready", self._on_connection_ready)
        conn.on("heartbeat", self.heartbeat)
        if self.client_id:
            conn.short_hostname = self.client_id  # pynsq's IDENTIFY sends it as client_id
        conn.waiting = deque()
        conn.refused = False
        self._dialing[addr] = conn
        conn.connect()
        return conn

    def send_frame(self, frame: bytes, callback: Callable[[Any, Any], None]) -> None:
        """Send a ready-made publish frame on an open connection; ``callback`` gets the answer.

        Connections nsqd is about to close (after a fatal error) are skipped, and so are
        stalled ones (an answer overdue) while another is healthy.
        """
        conns = self.open_conns(self.stall_s) or self.open_conns()
        if not conns:
            callback(None, _NotSent("no open connection to nsqd"))
            return
        conn = random.choice(conns)
        conn.waiting.append((callback, time.monotonic()))
        try:
            conn.send_now(frame)
        except Exception as exc:
            conn.waiting.pop()
            callback(conn, _NotSent(f"send error: {exc}"))
            conn.close()

    def open_conns(self, stall_s: float | None = None) -> list[Any]:
        """Connections a frame can go to (without overdue answers, when ``stall_s`` is given)."""
        conns = [c for c in self.conns.values() if c.connected() and not c.refused]
        if stall_s is None:
            return conns
        now = time.monotonic()
        return [c for c in conns if not c.waiting or now - c.waiting[0][1] <= stall_s]

    def _on_connection_ready(self, conn: Any, **kwargs: Any) -> None:
        if self._dialing.get(addr := conn.id) is conn:
            del self._dialing[addr]
        if self.closing or conn.id in self.conns:
            conn.close()
            return
        self.conns[conn.id] = conn
        self.outages.back(conn.id)

    def _on_connection_response(self, conn: Any, data: Any = None, **kwargs: Any) -> None:
        if conn.waiting:
            callback, _ = conn.waiting.popleft()
            callback(conn, data)

    def _on_connection_error(self, conn: Any, error: Any, **kwargs: Any) -> None:
        if type(error) is nsq.protocol.Error:
            # An error frame: the answer to the oldest waiting frame.
            data = error.args[0] if error.args else b""
            if conn.waiting:
                callback, _ = conn.waiting.popleft()
                failed = isinstance(data, bytes) and data.startswith(_STORE_FAILED)
                callback(conn, _NotSent(f"nsqd could not store it: {data!r}") if failed else error)
            if isinstance(data, bytes) and data.startswith(_FATAL):
                # nsqd closes the connection now and reads nothing after the refused frame:
                # stop sending on it, and let the close hand the rest back as not sent.
                conn.refused = True
                conn.close()
            return
        # The connection broke (a send failed, a garbled frame): it closes, and the close
        # answers the waiting frames.
        log.warning("publisher: nsqd %s: %s", conn.id, error)
        conn.close()

    def _on_connection_close(self, conn: Any, **kwargs: Any) -> None:
        addr = conn.id
        was_up = unregister(self, self._dialing, conn)
        if was_up is None:
            return
        if was_up:
            self.lost_at = time.monotonic()
        waiting = getattr(conn, "waiting", None) or ()
        if waiting:
            if conn.refused:
                error: Exception = _NotSent(
                    "nsqd closed the connection after refusing an earlier frame"
                )
            else:
                error = nsq.protocol.ConnectionClosedError(
                    "connection to nsqd closed before it answered (the message may be stored)"
                )
            for callback, _ in waiting:
                callback(conn, error)
            waiting.clear()
        if self.closing:
            return
        if was_up:
            delay: float | None = self.outages.lost(addr)
        else:
            delay = self.outages.failed(addr, static=True)
        if delay is not None:
            self.io_loop.call_later(delay, self.connect_to_nsqd, conn.host, conn.port)

    def close(self) -> None:
        """Close every connection and dial in progress; never reconnect."""
        self.closing = True
        for conn in [*self.conns.values(), *self._dialing.values()]:
            conn.close()


def _too_big(command: str, topic: str, code: str, size: int, limit: int) -> PublishRejected:
    flag = "--max-msg-size" if code == "E_BAD_MESSAGE" else "--max-body-size"
    return PublishRejected(
        f"{command} {topic}: {code} (refused unsent): {size} bytes is over nsqd's {flag} of {limit}"
    )


class Publisher:
    """Publishes to one or more nsqd and waits for each acknowledgement.

    Single PUBs issued in the same event-loop turn are coalesced into one MPUB (a group commit):
    each caller still returns only once nsqd acknowledged the frame holding its message.
    """

    # nsqd's defaults: --max-body-size 5 MiB per MPUB; stay well under it.
    GROUP_BYTES = 4 * 1024 * 1024
    GROUP_MESSAGES = 1000

    # Tries of a frame that never reached nsqd (no connection, or nsqd closed the connection
    # unread after refusing an earlier frame); a frame that may be stored is never sent again.
    SEND_TRIES = 3
    # A connection lost this recently is probably being re-dialled: wait that long for it.
    RECONNECT_WAIT_S = 2.0

    def __init__(
        self,
        nsqd_tcp_addresses: Sequence[str],
        *,
        timeout_s: float = 5.0,
        metrics: PublishMetrics | None = None,
        client_id: str | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._writer = _Writer(list(nsqd_tcp_addresses), client_id=client_id)
        self._writer.stall_s = timeout_s  # an answer older than this: the connection is stalled
        self._pending: dict[str, list[tuple[bytes, asyncio.Future[None]]]] = {}
        self._flush_scheduled = False
        self._groups: set[asyncio.Task[None]] = set()
        self.group_bytes = self.GROUP_BYTES
        # nsqd's --max-msg-size and --max-body-size, once a daemon read them from nsqd: what
        # exceeds them is refused here, unsent. nsqd would refuse it too, then close the
        # connection, and the frames written behind it on that connection would be cut off
        # (its reset can even drop the refusal, leaving every one of them "outcome unknown").
        self.max_msg_size: int | None = None
        self.max_body_size: int | None = None

    def set_limits(self, max_msg_size: int, max_body_size: int | None = None) -> None:
        """nsqd's size limits: larger messages (and MPUBs) are refused without being sent, and
        coalesced MPUBs stay under ``max_body_size`` (when below our 4 MiB)."""
        self.max_msg_size, self.max_body_size = max_msg_size, max_body_size
        if max_body_size is not None:
            # An MPUB body is a 4-byte count, then each message with its 4-byte size.
            self.group_bytes = max(1, min(self.GROUP_BYTES, max_body_size - 4))

    def _refuse_oversized(self, command: str, topic: str, bodies: Sequence[bytes]) -> None:
        """Raise :class:`PublishRejected`, as nsqd's E_BAD_MESSAGE or E_BAD_BODY would, for
        bodies over nsqd's limits; nothing is sent."""
        error = None
        if self.max_msg_size is not None:
            size = max(map(len, bodies), default=0)
            if size > self.max_msg_size:
                error = _too_big(command, topic, "E_BAD_MESSAGE", size, self.max_msg_size)
        if error is None and self.max_body_size is not None and command == "mpub":
            size = 4 + sum(4 + len(body) for body in bodies)
            if size > self.max_body_size:
                error = _too_big(command, topic, "E_BAD_BODY", size, self.max_body_size)
        if error is not None:
            self._count_error(command)
            raise error

    def connected(self) -> int:
        """How many nsqd connections can take a publish now.

        A connection whose oldest unanswered publish is older than the publish timeout (nsqd
        paused, or the network) does not count: readiness says what is true.
        """
        return len(self._writer.open_conns(stall_s=self.timeout_s))

    async def wait_connected(self, timeout_s: float) -> bool:
        """Poll until at least one connection is open, or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while not self._writer.open_conns():
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
        if self.max_msg_size is not None and len(body) > self.max_msg_size:
            self._count_error("pub")
            fut.set_exception(_too_big("pub", topic, "E_BAD_MESSAGE", len(body), self.max_msg_size))
            return fut
        if not self._flush_scheduled and not self._groups:
            # Idle (nothing gathered, nothing awaiting nsqd's answer): nothing would join it in
            # this turn's MPUB, so it goes now; what follows in this turn is gathered as usual.
            self._spawn(topic, [(body, fut)])
            return fut
        self._pending.setdefault(topic, []).append((body, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    async def mpub(self, topic: str, bodies: list[bytes]) -> None:
        """MPUB: all of ``bodies`` or none of them (nsqd applies one MPUB atomically)."""
        self._refuse_oversized("mpub", topic, bodies)
        await self._send("mpub", topic, frames.mpub(topic, bodies))

    async def dpub(self, topic: str, delay_ms: int, body: bytes) -> None:
        """DPUB: deliver ``body`` after ``delay_ms`` milliseconds."""
        self._refuse_oversized("dpub", topic, (body,))
        await self._send("dpub", topic, frames.dpub(topic, delay_ms, body))

    def _flush(self) -> None:
        self._flush_scheduled = False
        pending, self._pending = self._pending, {}
        for topic, items in pending.items():
            group: list[tuple[bytes, asyncio.Future[None]]] = []
            size = 0
            for item in items:
                if group and (
                    size + len(item[0]) + 4 > self.group_bytes or len(group) >= self.GROUP_MESSAGES
                ):
                    self._spawn(topic, group)
                    group, size = [], 0
                group.append(item)
                size += len(item[0]) + 4
            self._spawn(topic, group)

    def _spawn(self, topic: str, group: list[tuple[bytes, asyncio.Future[None]]]) -> None:
        # Written now, in the turn that gathered it; a task awaits the answer (and retries).
        if len(group) == 1:
            command, frame = "pub", frames.pub(topic, group[0][0])
        else:
            command, frame = "mpub", frames.mpub(topic, [body for body, _ in group])
        sent = (time.perf_counter(), self._transmit(frame))
        task = asyncio.ensure_future(self._publish_group(topic, group, command, frame, sent))
        self._groups.add(task)
        task.add_done_callback(self._groups.discard)

    async def _publish_group(
        self,
        topic: str,
        group: list[tuple[bytes, asyncio.Future[None]]],
        command: str,
        frame: bytes,
        sent: _Sent | None = None,
    ) -> None:
        error: PublishError | None = None
        try:
            await self._send(command, topic, frame, sent)
        except PublishRejected as exc:
            if len(group) > 1:
                # nsqd refused the whole MPUB (one message too big?): each one on its own, so
                # one bad message does not fail its neighbours.
                for item in group:
                    await self._publish_group(topic, [item], "pub", frames.pub(topic, item[0]))
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
        self, command: str, topic: str, frame: bytes, sent: _Sent | None = None
    ) -> None:
        """Publish ``frame``, or, with ``sent``, await the answer to its copy written already.

        Only a frame nsqd cannot have stored is sent again: after a timeout or a connection
        closed while waiting for the answer, nsqd may have it, and a second copy on another
        connection would be a silent duplicate.
        """
        for attempt in range(1, self.SEND_TRIES + 1):
            start, answer = sent or (time.perf_counter(), self._transmit(frame))
            sent = None
            try:
                await self._answered(command, topic, answer)
            except _NotSent as exc:
                self._count_error(command)
                if attempt == self.SEND_TRIES or not await self._reconnected():
                    raise PublishError(f"{command} {topic}: {exc}") from None
                continue
            except PublishError:
                self._count_error(command)
                raise
            if self.metrics is not None:
                self.metrics.publish_duration.labels(command).observe(time.perf_counter() - start)
            return

    def _count_error(self, command: str) -> None:
        if self.metrics is not None:
            self.metrics.publish_errors.labels(command).inc()

    async def _reconnected(self) -> bool:
        """Wait for an open connection if one was lost moments ago (it is being re-dialled)."""
        if self._writer.open_conns():
            return True
        left = self._writer.lost_at + self.RECONNECT_WAIT_S - time.monotonic()
        return left > 0 and await self.wait_connected(left)

    def _transmit(self, frame: bytes) -> asyncio.Future[Any]:
        """Write ``frame`` now; the future gets nsqd's answer (or why it was not sent)."""
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def done(_conn: Any, data: Any) -> None:
            if not answer.done():
                answer.set_result(data)

        self._writer.send_frame(frame, done)
        return answer

    async def _answered(self, command: str, topic: str, answer: asyncio.Future[Any]) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                data = await answer
        except TimeoutError:
            raise PublishTimeout(
                f"{command} {topic}: no answer from nsqd in {self.timeout_s}s"
            ) from None
        if isinstance(data, _NotSent):
            raise data
        if type(data) is nsq.protocol.Error:  # an error frame: nsqd refused this one
            raise PublishRejected(f"{command} {topic}: {data}")
        if isinstance(data, nsq.protocol.ConnectionClosedError):
            raise PublishConnectionLost(f"{command} {topic}: {data}")
        if isinstance(data, nsq.Error):
            raise PublishError(f"{command} {topic}: {data}")
        if data != b"OK":
            raise PublishError(f"{command} {topic}: unexpected answer {data!r}")

    def close(self) -> None:
        """Close every connection and stop reconnecting."""
        silence_pynsq()
        self._writer.close()
