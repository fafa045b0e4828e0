"""HTTP/1.1 on asyncio and httptools (llhttp), serving tornado applications.

Tornado stays the web framework (routing, handlers, errors); this package replaces only its
connection layer, ``HTTP1Connection`` on an ``IOStream``, which costs more per request than the
gateway's own code. Any ``HTTPServerConnectionDelegate`` can be served: a
``tornado.web.Application`` or a ``tornado.routing.Router``.

The layers, each importing only the one below: this module listens and tracks connections;
``nsqjobs.http.connection`` parses and dispatches one connection's requests;
``nsqjobs.http.exchange`` frames one request's response.
"""

from __future__ import annotations

import asyncio
import functools
import socket

import tornado.netutil
from tornado.httputil import HTTPServerConnectionDelegate

from nsqjobs.http.connection import Connection, ServerSettings


class HTTPServer:
    """HTTP/1.1 on asyncio + httptools, serving a tornado HTTPServerConnectionDelegate."""

    def __init__(
        self,
        delegate: HTTPServerConnectionDelegate,
        *,
        max_body_size: int = 100 * 1024 * 1024,
        xheaders: bool = False,
        idle_timeout_s: float = 65.0,
        header_timeout_s: float = 10.0,
        body_timeout_s: float = 30.0,
        max_incomplete_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        if max_body_size < 0:
            raise ValueError(f"max_body_size must be >= 0, not {max_body_size}")
        for name, value in (
            ("idle_timeout_s", idle_timeout_s),
            ("header_timeout_s", header_timeout_s),
            ("body_timeout_s", body_timeout_s),
            ("max_incomplete_bytes", max_incomplete_bytes),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, not {value}")
        self._settings = ServerSettings(
            delegate,
            max_body_size,
            xheaders,
            idle_timeout_s,
            header_timeout_s,
            body_timeout_s,
            max_incomplete_bytes,
        )
        # Body bytes of requests still arriving, all connections together (the connections
        # keep it; past max_incomplete_bytes a request is refused).
        self.incomplete_bytes = 0
        self._connections: set[Connection] = set()
        self._shutting_down = False
        self._servers: list[asyncio.Server] = []
        self._port: int | None = None
        self._all_closed: asyncio.Future[None] | None = None

    async def listen(self, port: int, host: str = "") -> None:
        """Bind ``host:port`` (every interface when ``host`` is empty) and start serving."""
        loop = asyncio.get_running_loop()
        # tornado's bind_sockets: SO_REUSEADDR, and one port for IPv4 and IPv6 when port is 0.
        sockets = tornado.netutil.bind_sockets(port, host or None, backlog=socket.SOMAXCONN)
        factory = functools.partial(Connection, self._settings, self)
        servers: list[asyncio.Server] = []
        try:
            for sock in sockets:
                server = await loop.create_server(factory, sock=sock, backlog=socket.SOMAXCONN)
                servers.append(server)
        except BaseException:
            for server in servers:
                server.close()
            for sock in sockets:
                sock.close()
            raise
        self._servers.extend(servers)
        if self._port is None:
            self._port = sockets[0].getsockname()[1]

    @property
    def port(self) -> int:
        """The bound port (useful after ``listen(0)``)."""
        if self._port is None:
            raise RuntimeError("HTTPServer.port read before listen()")
        return self._port

    def stop(self) -> None:
        """Stop accepting connections; open ones go on."""
        for server in self._servers:
            server.close()
        self._servers.clear()

    async def close_all_connections(self) -> None:
        """Close idle connections now, busy ones after their response; return when all are.

        Connections accepted from now on are closed at once. If the wait is cancelled (the
        caller's timeout), the connections still open are aborted.
        """
        self._shutting_down = True
        for conn in list(self._connections):
            conn.shutdown()
        try:
            while self._connections:
                self._all_closed = asyncio.get_running_loop().create_future()
                await self._all_closed
        except asyncio.CancelledError:
            for conn in list(self._connections):
                conn.abort()
            raise
        finally:
            self._all_closed = None

    def connection_opened(self, conn: Connection) -> bool:
        """Called by a new connection: False when it must close at once (shutting down)."""
        self._connections.add(conn)
        return not self._shutting_down

    def connection_closed(self, conn: Connection) -> None:
        """Called by a connection once it is closed."""
        self._connections.discard(conn)
        if not self._connections and self._all_closed is not None and not self._all_closed.done():
            self._all_closed.set_result(None)
