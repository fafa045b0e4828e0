"""nsqd's HTTP admin API: what daemons set up before they publish or subscribe."""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Sequence

import tornado.httpclient

log = logging.getLogger("nsqjobs.nsq")


async def create_topics(http_addresses: Sequence[str], topics: Sequence[str]) -> list[str]:
    """Create ``topics`` on each nsqd over HTTP so nsqlookupd knows them before the first publish.

    Returns the failures as readable strings; a failure is not fatal (the first publish creates
    the topic too, only discovery is slower).
    """
    client = tornado.httpclient.AsyncHTTPClient()
    failures = []
    for addr in http_addresses:
        for topic in topics:
            url = f"http://{addr}/topic/create?topic={urllib.parse.quote(topic)}"
            try:
                await client.fetch(url, method="POST", body=b"", request_timeout=2.0)
            except Exception as exc:
                failures.append(f"{addr}: create topic {topic}: {exc}")
    return failures


async def nsqd_limit(http_addresses: Sequence[str], name: str, configured: int) -> int:
    """nsqd's live value of the size limit ``name`` (``max_msg_size``, ``max_body_size``), the
    least over ``http_addresses``, so a daemon refuses what nsqd would; ``configured`` when no
    nsqd answers. Each difference from ``configured`` is logged once, as a warning."""
    client = tornado.httpclient.AsyncHTTPClient()
    flag = "--" + name.replace("_", "-")
    live = []
    for addr in http_addresses:
        try:
            answer = await client.fetch(f"http://{addr}/config/{name}", request_timeout=2.0)
            value = int(answer.body)
        except Exception as exc:
            log.warning("nsqd %s: cannot read %s (%s)", addr, flag, exc)
            continue
        if value > 0:
            live.append(value)
    if not live:
        log.warning("nsqd's %s unknown: keeping the configured %d", flag, configured)
        return configured
    if min(live) != configured:
        log.warning(
            "nsqd's %s is %d, not the configured %d: using nsqd's", flag, min(live), configured
        )
    return min(live)


async def nsqd_start_time(http_address: str, timeout_s: float = 2.0) -> int:
    """When the nsqd at ``http_address`` started (its /stats ``start_time``, Unix seconds,
    truncated); raises when it does not answer. The filter names no topic (a topic name
    cannot hold a space), so the answer stays small however many topics nsqd has."""
    client = tornado.httpclient.AsyncHTTPClient()
    url = (
        f"http://{http_address}/stats?format=json&topic=%20&include_clients=false&include_mem=false"
    )
    answer = await client.fetch(url, request_timeout=timeout_s)
    stats = json.loads(answer.body)
    start_time = stats.get("start_time") if isinstance(stats, dict) else None
    if type(start_time) is not int:
        raise ValueError(f"nsqd {http_address}: /stats has no start_time: {answer.body[:200]!r}")
    return start_time
