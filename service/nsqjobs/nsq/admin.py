"""nsqd's HTTP admin API: what daemons set up before they publish or subscribe."""

from __future__ import annotations

import urllib.parse
from collections.abc import Sequence

import tornado.httpclient


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
