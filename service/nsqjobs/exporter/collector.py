"""A prometheus_client custom collector over nsqd's ``/stats``: every scrape reads nsqd afresh.

Nodes come from nsqlookupd's ``/nodes`` (or the configured nsqd HTTP addresses when no lookupd is
set), so a new nsqd is exported as soon as it registers. Labels stay bounded: ``node`` (an nsqd's
broadcast HTTP address), ``topic`` and ``channel``; never client or message ids.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nsqjobs.names import EPHEMERAL_SUFFIX, METRIC_PREFIX

log = logging.getLogger("nsqjobs.exporter")
P = f"{METRIC_PREFIX}_nsqd"

# (stats field, metric suffix, help, counter?) per topic and per channel.
TOPIC_FIELDS = (
    ("depth", "topic_depth", "messages queued in the topic (memory and disk)", False),
    ("backend_depth", "topic_backend_depth", "messages of the topic queued on disk", False),
    ("message_count", "topic_messages", "messages published to the topic", True),
    ("message_bytes", "topic_message_bytes", "bytes published to the topic", True),
    ("paused", "topic_paused", "1 when the topic is paused", False),
)
CHANNEL_FIELDS = (
    ("depth", "channel_depth", "messages waiting in the channel (memory and disk)", False),
    ("backend_depth", "channel_backend_depth", "messages of the channel queued on disk", False),
    ("in_flight_count", "channel_in_flight", "messages sent to a client, not yet finished", False),
    ("deferred_count", "channel_deferred", "messages deferred (requeued with a delay)", False),
    ("message_count", "channel_messages", "messages delivered to the channel", True),
    ("requeue_count", "channel_requeued", "messages requeued by clients", True),
    ("timeout_count", "channel_timed_out", "in-flight messages that timed out", True),
    ("client_count", "channel_clients", "clients subscribed to the channel", False),
    ("paused", "channel_paused", "1 when the channel is paused", False),
)


@dataclass(frozen=True)
class Source:
    """Where the collector finds nsqd nodes, and how long each request may take."""

    lookupd_http: Sequence[str]
    nsqd_http: Sequence[str]
    timeout_s: float = 2.0


def get_json(url: str, timeout_s: float) -> Any:
    """GET ``url`` and parse its JSON body (``OSError`` or ``ValueError`` on failure)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.load(resp)


def discover(source: Source) -> tuple[list[str], list[str]]:
    """The nsqd HTTP addresses to read, and the lookupd failures met finding them."""
    if not source.lookupd_http:
        return list(source.nsqd_http), []
    nodes: set[str] = set()
    failures = []
    for addr in source.lookupd_http:
        try:
            answer = get_json(f"http://{addr}/nodes", source.timeout_s)
        except (OSError, ValueError) as exc:
            failures.append(addr)
            log.warning("nsqlookupd %s: /nodes failed: %s", addr, exc)
            continue
        for producer in answer.get("producers") or []:
            nodes.add(f"{producer['broadcast_address']}:{producer['http_port']}")
    return sorted(nodes), failures


def _number(value: Any) -> float:
    return float(value) if not isinstance(value, bool) else float(int(value))


class NsqdCollector(Collector):
    """Collects every node's topic and channel stats when Prometheus scrapes."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def describe(self) -> list[Metric]:
        """Nothing up front: describing would otherwise scrape nsqd at registration."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Read lookupd and each nsqd now and yield one family per statistic."""
        started = time.perf_counter()
        nodes, lookupd_failures = discover(self.source)
        up = GaugeMetricFamily(f"{P}_up", "1 when the nsqd node answered /stats", labels=["node"])
        lookupd_up = GaugeMetricFamily(
            f"{P}_lookupd_up", "1 when the nsqlookupd answered /nodes", labels=["lookupd"]
        )
        for addr in self.source.lookupd_http:
            lookupd_up.add_metric([addr], 0.0 if addr in lookupd_failures else 1.0)
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for _, name, doc, counter in TOPIC_FIELDS:
            families[name] = _family(name, doc, counter, ["node", "topic"])
        for _, name, doc, counter in CHANNEL_FIELDS:
            families[name] = _family(name, doc, counter, ["node", "topic", "channel"])
        for node in nodes:
            query = urllib.parse.urlencode({"format": "json", "include_clients": "false"})
            try:
                stats = get_json(f"http://{node}/stats?{query}", self.source.timeout_s)
            except (OSError, ValueError) as exc:
                log.warning("nsqd %s: /stats failed: %s", node, exc)
                up.add_metric([node], 0.0)
                continue
            up.add_metric([node], 1.0)
            for topic in stats.get("topics") or []:
                tname = str(topic["topic_name"])
                for key, name, _, _ in TOPIC_FIELDS:
                    families[name].add_metric([node, tname], _number(topic.get(key, 0)))
                for cname, values in _channels(topic.get("channels") or []).items():
                    for (_, name, _, _), value in zip(CHANNEL_FIELDS, values, strict=True):
                        families[name].add_metric([node, tname, cname], value)
        nodes_found = GaugeMetricFamily(f"{P}_nodes", "nsqd nodes discovered")
        nodes_found.add_metric([], float(len(nodes)))
        duration = GaugeMetricFamily(
            f"{P}_scrape_duration_seconds", "time this scrape spent reading nsqlookupd and nsqd"
        )
        duration.add_metric([], time.perf_counter() - started)
        yield from (up, lookupd_up, nodes_found, *families.values(), duration)


# Ephemeral channels (each gateway's results channel, each worker's cancels channel, named
# after their process and a random part) are one label value per topic, their figures summed:
# every restart or new replica would otherwise add series for good.
EPHEMERAL: Final = EPHEMERAL_SUFFIX


def _channels(channels: list[Any]) -> dict[str, list[float]]:
    """A topic's channels as label value -> CHANNEL_FIELDS values, ephemeral ones summed under
    :data:`EPHEMERAL` (``paused``: 1 when any is)."""
    out: dict[str, list[float]] = {}
    for channel in channels:
        name = str(channel["channel_name"])
        values = [_number(channel.get(key, 0)) for key, _, _, _ in CHANNEL_FIELDS]
        if not name.endswith(EPHEMERAL):
            out[name] = values
            continue
        total = out.get(EPHEMERAL)
        if total is None:
            out[EPHEMERAL] = values
            continue
        for i, (key, _, _, _) in enumerate(CHANNEL_FIELDS):
            total[i] = max(total[i], values[i]) if key == "paused" else total[i] + values[i]
    return out


def _family(
    name: str, doc: str, counter: bool, labels: list[str]
) -> GaugeMetricFamily | CounterMetricFamily:
    if counter:
        # CounterMetricFamily adds the _total suffix to the samples.
        return CounterMetricFamily(f"{P}_{name}", doc, labels=labels)
    return GaugeMetricFamily(f"{P}_{name}", doc, labels=labels)
