"""Consuming: pynsq's Reader on bulk connections, and what daemons ask of a reader."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nsq
import nsq.reader

from nsqjobs.nsq.conn import (
    BulkConn,
    Outages,
    connections_of,
    quiet_pynsq_network_noise,
    silence_pynsq,
    unregister,
)

# A lost nsqd that nsqlookupd found (not one given with --nsqd-tcp-address) is dialled for this
# long; after that only a lookup brings it back (it may have been retired on purpose).
GIVE_UP_S = 120.0


class Reader(nsq.Reader):  # type: ignore[misc]
    """pynsq's Reader on :class:`BulkConn` connections, reconnecting at once to a lost nsqd.

    pynsq dials a lost nsqd again only when the next nsqlookupd poll lists it (and never twice
    within 10 s), so after an nsqd restart a worker sat idle for up to a poll interval plus
    10 s. Here a closed connection is dialled again after 50 ms, then every second at most.
    """

    total_rdy: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        quiet_pynsq_network_noise()
        self.outages = Outages(f"reader {self.topic}/{self.channel}", give_up_s=GIVE_UP_S)
        self._dialing: dict[str, Any] = {}
        self._static = set(self.nsqd_tcp_addresses or ())
        self._closing = False

    def connect_to_nsqd(self, host: str, port: int) -> Any:
        """Connect as pynsq does, with our connection class; one dial per address at a time."""
        addr = f"{host}:{port}"
        dialing = self._dialing.get(addr)
        if self._closing or addr in self.conns or (dialing is not None and dialing.connecting()):
            return None
        with connections_of(nsq.reader):
            conn = super().connect_to_nsqd(host, port)
        if conn is not None:
            self._dialing[addr] = conn
        return conn

    def _redial(self, host: str, port: int) -> None:
        if self._closing:
            return
        # pynsq's throttle (one dial per address per 10 s) is for lookups, not for this.
        self.connection_attempts.pop(f"{host}:{port}", None)
        self.connect_to_nsqd(host, port)

    def _on_connection_ready(self, conn: Any, **kwargs: Any) -> None:
        if self._dialing.get(addr := conn.id) is conn:
            del self._dialing[addr]
        if self._closing:
            conn.close()
            return
        super()._on_connection_ready(conn, **kwargs)
        if self.conns.get(conn.id) is conn:
            self.outages.back(conn.id)

    def _on_connection_close(self, conn: Any, **kwargs: Any) -> None:
        # pynsq's bookkeeping, without its log line and its reconnect in 15 s; and a duplicate
        # connection closing no longer unregisters the live one of the same address.
        addr = conn.id
        was_up = unregister(self, self._dialing, conn)
        if was_up is None:
            return
        self.total_rdy = max(self.total_rdy - conn.rdy, 0)
        if (conn.rdy_timeout or conn.rdy) and (
            len(self.conns) == self.max_in_flight or self.backoff_timer.get_interval()
        ):
            self.need_rdy_redistributed = True
        if conn.rdy_timeout:
            self.io_loop.remove_timeout(conn.rdy_timeout)
            conn.rdy_timeout = None
        if self._closing:
            return
        if was_up:
            delay: float | None = self.outages.lost(addr)
        else:
            delay = self.outages.failed(addr, static=addr in self._static)
        if delay is not None:
            self.io_loop.call_later(delay, self._redial, conn.host, conn.port)

    def _run(self) -> None:
        # pynsq starts a reader on the loop turn after its construction; one closed before
        # that (a SIGTERM while the daemon starts) must not start dialling afterwards.
        if not self._closing:
            super()._run()

    def close(self) -> None:
        """Close every connection (and dials in progress); stop polling and reconnecting.
        Safe before the reader has started (pynsq's own close is not: no timers yet)."""
        self._closing = True
        for conn in list(self._dialing.values()):
            conn.close()
        if self.redist_periodic is None:  # not started: nothing polls yet
            for conn in list(self.conns.values()):
                conn.close()
            return
        super().close()


def close_reader(reader: Any) -> None:
    """Close a pynsq Reader's connections and timers without error noise."""
    silence_pynsq()
    reader.close()


def connected_count(reader: Any) -> int:
    """Open connections of a pynsq Reader."""
    return sum(1 for conn in reader.conns.values() if conn.connected())


def unflushed(readers: Sequence[Any]) -> int:
    """How many of the readers' connections still have commands (FIN, REQ) to write."""
    return sum(
        1
        for reader in readers
        for conn in reader.conns.values()
        if isinstance(conn, BulkConn) and not conn.flushed()
    )
