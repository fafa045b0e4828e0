"""pynsq's connection with two changes: frames are read in bulk, commands written once per turn;
and what every client of ours does when a connection to nsqd is lost (reconnect, say so once).

pynsq reads each frame with two ``read_bytes`` calls and writes each FIN on its own; measured in
bench/, those per-frame hops cost more than a noop job's whole handling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import nsq
from nsq import event, protocol
from tornado.ioloop import IOLoop
from tornado.iostream import StreamClosedError

from nsqjobs.nsq.frames import SIZE

log = logging.getLogger(__name__)


class BulkConn(nsq.AsyncConn):  # type: ignore[misc]
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

    def _connect_callback(self, fut: Any) -> None:
        # pynsq calls fut.result() here, so every refused connect logged a tornado traceback at
        # ERROR. The failed stream is closed already: its close callback tells the client.
        if fut.exception() is not None:
            return
        super()._connect_callback(fut)

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
            (size,) = SIZE.unpack_from(buf, pos)
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

    def send_now(self, data: bytes) -> None:
        """Write a command at once, after what this turn queued: for a caller that gathers its
        own loop turn's commands (the publisher), one more turn of waiting buys nothing."""
        if not self._plain:
            super().send(data)
            return
        unsent, self._unsent = self._unsent, None  # its scheduled write finds nothing left
        self.stream.write(data if unsent is None else b"".join([*unsent, data]))

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
def connections_of(module: ModuleType) -> Iterator[None]:
    """Make pynsq build :class:`BulkConn` connections inside the ``with`` block."""
    # pynsq's connect_to_nsqd builds ``AsyncConn`` by its module-level name; swap it for ours
    # around that synchronous call (nothing else runs meanwhile on this thread).
    saved = getattr(module, "AsyncConn")  # noqa: B009 (mypy: pynsq is untyped)
    setattr(module, "AsyncConn", BulkConn)  # noqa: B010
    try:
        yield
    finally:
        setattr(module, "AsyncConn", saved)  # noqa: B010


def silence_pynsq() -> None:
    """Quiet pynsq's logger for good: called only when a daemon closes its connections."""
    # Closing connections on purpose makes pynsq log "failed to unpack size" at ERROR a moment
    # later; closing is the last thing a daemon does, so pynsq stays quiet from then on.
    logging.getLogger("nsq").setLevel(logging.CRITICAL)


# Reconnecting: the first retry comes at once, then every second at most, so a client is back
# within about a second of nsqd listening again (pynsq waits for the next nsqlookupd poll, or
# 15 s, and refuses to dial an address twice within 10 s).
RECONNECT_FIRST_S = 0.05
RECONNECT_MAX_S = 1.0

clients_log = logging.getLogger("nsqjobs.nsq")


def unregister(client: Any, dialing: dict[str, Any], conn: Any) -> bool | None:
    """A reader's or writer's bookkeeping when ``conn`` closes: forget the dial and the registered
    connection. ``None`` when ``conn`` is a stale duplicate (the live connection of its address
    stays registered); else whether it was up (registered) before it closed."""
    addr = conn.id
    if dialing.get(addr) is conn:
        del dialing[addr]
    registered = client.conns.get(addr)
    if registered is not None and registered is not conn:
        return None
    if registered is not None:
        del client.conns[addr]
        return True
    return False


@dataclass
class _Outage:
    since: float
    delay: float
    attempts: int = 0
    said_retrying: bool = False


class Outages:
    """One client's lost nsqd addresses: when to dial each again, and one log line per change.

    ``lost`` (WARNING) when an open connection closes, ``retrying`` (INFO) at the first failed
    dial, ``back`` (INFO) when it is open again. Nothing per attempt, and no tracebacks: nsqd
    going away is an expected network event.
    """

    def __init__(self, client: str, give_up_s: float | None = None) -> None:
        self.client = client
        self.give_up_s = give_up_s
        self._outages: dict[str, _Outage] = {}

    def __contains__(self, addr: object) -> bool:
        return addr in self._outages

    def lost(self, addr: str) -> float:
        """An open connection closed: the delay before the first dial."""
        clients_log.warning("%s: lost nsqd %s; reconnecting", self.client, addr)
        self._outages[addr] = _Outage(time.monotonic(), RECONNECT_FIRST_S)
        return RECONNECT_FIRST_S

    def failed(self, addr: str, *, static: bool) -> float | None:
        """A dial failed: the delay before the next, or None to stop (``static``: never stop)."""
        now = time.monotonic()
        outage = self._outages.get(addr)
        if outage is None:  # never connected yet (nsqd not up when the daemon started)
            outage = self._outages[addr] = _Outage(now, RECONNECT_FIRST_S)
        outage.attempts += 1
        if not outage.said_retrying:
            outage.said_retrying = True
            clients_log.info(
                "%s: nsqd %s not answering; retrying every %.0fs at most",
                self.client,
                addr,
                RECONNECT_MAX_S,
            )
        if not static and self.give_up_s is not None and now - outage.since > self.give_up_s:
            del self._outages[addr]
            clients_log.warning(
                "%s: nsqd %s still down after %.0fs; leaving it to nsqlookupd to find again",
                self.client,
                addr,
                now - outage.since,
            )
            return None
        outage.delay = min(RECONNECT_MAX_S, outage.delay * 2)
        return outage.delay

    def back(self, addr: str) -> None:
        """A connection is open (again)."""
        outage = self._outages.pop(addr, None)
        if outage is not None:
            clients_log.info(
                "%s: nsqd %s back after %.1fs (%d failed attempt(s))",
                self.client,
                addr,
                time.monotonic() - outage.since,
                outage.attempts,
            )


class _QuietNetworkNoise(logging.Filter):
    """Drop pynsq's per-attempt connection lines: `Outages` says the same once per change."""

    NOISE = ("connection closed", "attempting to reconnect", "connecting to nsqd")

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        return not any(noise in msg for noise in self.NOISE)


_QUIET = _QuietNetworkNoise()


def quiet_pynsq_network_noise() -> None:
    """Install the filter on pynsq's loggers (idempotent)."""
    for name in ("nsq.reader", "nsq.writer", "nsq.client", "nsq.conn"):
        logger = logging.getLogger(name)
        if _QUIET not in logger.filters:
            logger.addFilter(_QUIET)
