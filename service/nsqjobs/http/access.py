"""One log line and one metrics sample per answered request, whichever HTTP stack answered it."""

from __future__ import annotations

import logging
from typing import Protocol

import tornado.web


class RequestMetrics(Protocol):
    """Where request metrics go (``GatewayMetrics``): route templates only, bounded labels."""

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request."""


class AccessLog:
    """Logs and counts answered requests: the raw delegates call :meth:`request_done`, tornado
    applications get :meth:`tornado_request_done` as their ``log_function``."""

    __slots__ = ("log", "metrics")

    def __init__(self, log: logging.Logger, metrics: RequestMetrics | None = None) -> None:
        self.log = log
        self.metrics = metrics

    def request_done(self, route: str, method: str, uri: str, status: int, seconds: float) -> None:
        """Count the request by route, then log it (successes at DEBUG, so a benchmark does not
        measure the logger)."""
        if self.metrics is not None:
            self.metrics.request_done(route, method, status, seconds)
        level = logging.DEBUG if status < 400 else logging.INFO if status < 500 else logging.WARNING
        if self.log.isEnabledFor(level):
            self.log.log(level, "%d %s %s %.1fms", status, method, uri, 1000.0 * seconds)

    def tornado_request_done(self, handler: tornado.web.RequestHandler) -> None:
        """``tornado.web.Application(log_function=...)``: the handler's ``route`` is its label."""
        request = handler.request
        self.request_done(
            getattr(handler, "route", "unmatched"),
            request.method or "-",
            request.uri or "",
            handler.get_status(),
            request.request_time(),
        )
