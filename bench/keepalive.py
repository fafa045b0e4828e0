"""A minimal HTTP/1.1 client on persistent connections, for latency measurements.

tornado's simple client opens a connection per request: on this machine that alone costs about
1.5 ms, more than the job's whole path through nsqjobs, and no real client works that way (the
peer benchmarks' clients keep their broker connections). Here each connection carries one request
at a time and goes back to a pool; a request that finds the pool empty opens another.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from bench.procs import BenchError


class KeepAlive:
    """POSTs to one ``http://host:port`` over a pool of kept-alive connections."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._all: list[asyncio.StreamWriter] = []

    async def post(self, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        """One request; returns the status and the body (the answer must carry a length)."""
        if self._idle:
            reader, writer = self._idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self._all.append(writer)
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise BenchError(f"answer without Content-Length: {head!r}")
        answer = await reader.readexactly(length)
        self._idle.append((reader, writer))
        return status, answer

    def close(self) -> None:
        """Close every connection."""
        for writer in self._all:
            writer.close()
        self._all.clear()
        self._idle.clear()
