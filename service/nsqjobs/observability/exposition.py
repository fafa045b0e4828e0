"""``/healthz``, ``/readyz`` and ``/metrics``: what every daemon serves for probes and scrapes.

Errors (a 405 with ``Allow``, an unknown path) are problem+json, as on every other route.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import tornado.web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from nsqjobs.http.access import AccessLog
from nsqjobs.http.handlers import NotFoundHandler, ProblemHandler


class _Base(ProblemHandler):
    def initialize(self, **kwargs: Any) -> None:
        self.opts = kwargs


class HealthHandler(_Base):
    """``/healthz``: the process is alive and its IOLoop answers."""

    route = "/healthz"

    def get(self) -> None:
        self.finish({"status": "ok"})


class ReadyHandler(_Base):
    """``/readyz``: 200 when the daemon can do its work now, else 503 with the reasons."""

    route = "/readyz"

    def get(self) -> None:
        problems: list[str] = self.opts["check"]()
        if problems:
            self.set_status(503)
        self.finish({"status": "ok" if not problems else "unavailable", "problems": problems})


class MetricsHandler(_Base):
    """``/metrics``: the Prometheus text exposition of the daemon's registry."""

    route = "/metrics"

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.opts["registry"]))


def observability_routes(
    registry: CollectorRegistry, ready_check: Callable[[], list[str]]
) -> list[tuple[str, type[tornado.web.RequestHandler], dict[str, Any]]]:
    """The three routes every daemon serves."""
    return [
        (r"/healthz", HealthHandler, {}),
        (r"/readyz", ReadyHandler, {"check": ready_check}),
        (r"/metrics", MetricsHandler, {"registry": registry}),
    ]


def observability_app(
    registry: CollectorRegistry, ready_check: Callable[[], list[str]]
) -> tornado.web.Application:
    """An application serving only the three routes, with a problem+json 404 elsewhere.

    Requests are logged like the gateway's (a 503 from /readyz while starting is a WARNING, not
    tornado's ERROR: not ready yet is no fault).
    """
    return tornado.web.Application(
        observability_routes(registry, ready_check),
        default_handler_class=NotFoundHandler,
        log_function=AccessLog(logging.getLogger("nsqjobs.http")).tornado_request_done,
    )
