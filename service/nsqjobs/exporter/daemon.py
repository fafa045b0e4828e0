"""The ``nsqjobs exporter`` daemon: /metrics (nsqd stats read on scrape), /healthz, /readyz.

A scrape blocks the IOLoop while it reads nsqd (a few milliseconds per node, at most the
scrape timeout): the exporter serves nothing else, and no background polling means the numbers
are never older than the scrape.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request

import tornado.httpserver
from prometheus_client import CollectorRegistry, Gauge

from nsqjobs.config import ExporterConfig, spelled
from nsqjobs.errors import listening
from nsqjobs.exporter.collector import NsqdCollector, Source
from nsqjobs.names import METRIC_PREFIX
from nsqjobs.observability.exposition import observability_app
from nsqjobs.version import __version__

log = logging.getLogger("nsqjobs.exporter")


def exporter_registry(source: Source) -> CollectorRegistry:
    """A registry holding the nsqd collector and the exporter's build info."""
    registry = CollectorRegistry()
    Gauge(
        f"{METRIC_PREFIX}_build_info",
        "nsqjobs version and daemon kind",
        ["version", "daemon"],
        registry=registry,
    ).labels(__version__, "exporter").set(1)
    registry.register(NsqdCollector(source))
    return registry


def _answers(url: str, timeout_s: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def ready_problems(source: Source) -> list[str]:
    """Empty when a scrape can find nsqd: a lookupd (or, without one, every nsqd) answers."""
    if source.lookupd_http:
        if any(_answers(f"http://{a}/ping", source.timeout_s) for a in source.lookupd_http):
            return []
        return [f"no nsqlookupd answers at {', '.join(source.lookupd_http)}"]
    return [
        f"nsqd {a} does not answer /ping"
        for a in source.nsqd_http
        if not _answers(f"http://{a}/ping", source.timeout_s)
    ]


async def serve(config: ExporterConfig, stop: asyncio.Event) -> int:
    """Serve the exporter until ``stop`` is set."""
    source = Source(config.lookupd_http_address, config.nsqd_http_address, config.scrape_timeout_s)
    app = observability_app(exporter_registry(source), lambda: ready_problems(source))
    server = tornado.httpserver.HTTPServer(app)
    with listening(config.host, config.port, spelled(ExporterConfig, "host", "port")):
        server.listen(config.port, config.host)
    where = ", ".join(source.lookupd_http) or ", ".join(source.nsqd_http)
    how = "nsqlookupd" if source.lookupd_http else "nsqd"
    log.info("exporter on %s:%d reading %s at %s", config.host, config.port, how, where)
    await stop.wait()
    server.stop()
    return 0
