"""Consuming: pynsq's Reader on bulk connections, and what daemons ask of a reader."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nsq
import nsq.reader

from nsqjobs.nsq.conn import BulkConn, connections_of, silence_pynsq


class Reader(nsq.Reader):  # type: ignore[misc]
    """pynsq's Reader on :class:`_Conn` connections."""

    def connect_to_nsqd(self, host: str, port: int) -> Any:
        """Connect as pynsq does, with our connection class."""
        with connections_of(nsq.reader):
            return super().connect_to_nsqd(host, port)


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
