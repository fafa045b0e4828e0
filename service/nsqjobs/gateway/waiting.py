"""The results subscriber that answers ``POST /v1/jobs?wait=``: one ephemeral channel per
gateway process on the results topic, and the requests waiting for each job id."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
from typing import Any

from nsqjobs import wire
from nsqjobs.config import GatewayConfig
from nsqjobs.errors import DecodeError
from nsqjobs.names import (
    GATEWAY_CHANNEL_PREFIX,
    READER_OUTPUT_BUFFER_BYTES,
    READER_OUTPUT_BUFFER_TIMEOUT_MS,
    RESULTS_TOPIC,
)
from nsqjobs.nsq.reader import Reader, close_reader, connected_count
from nsqjobs.observability.metrics import GatewayMetrics

log = logging.getLogger("nsqjobs.gateway")


class ResultWaiter:
    """Listens to the results topic on its own ephemeral channel and wakes ``?wait=`` requests.

    Each gateway replica has its own channel, so each sees every result and answers its own
    waiters; results nobody waits for are dropped here (the results topic keeps its other
    channels' copies).
    """

    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self._waiting: dict[str, list[asyncio.Future[wire.ResultEnvelope]]] = {}
        self.config = config
        self.reader: Reader | None = None

    def start(self) -> None:
        """Subscribe (after the results topic exists, so the first lookup finds it)."""
        config = self.config
        host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:24]
        channel = f"{GATEWAY_CHANNEL_PREFIX}_{host}_{os.getpid()}_{secrets.token_hex(3)}#ephemeral"
        self.reader = Reader(
            topic=RESULTS_TOPIC,
            channel=channel,
            message_handler=self._on_message,
            nsqd_tcp_addresses=list(config.nsqd_tcp_address),
            lookupd_http_addresses=list(config.lookupd_http_address) or None,
            lookupd_poll_interval=config.lookupd_poll_interval,
            max_in_flight=500,
            max_tries=0,
            output_buffer_size=READER_OUTPUT_BUFFER_BYTES,
            output_buffer_timeout=READER_OUTPUT_BUFFER_TIMEOUT_MS,
        )

    def _on_message(self, message: Any) -> bool:
        self.metrics.results_seen.inc()
        try:
            result = wire.decode_result(message.body)
        except DecodeError as exc:
            log.warning("results: dropping undecodable message %s: %s", message.id, exc)
            return True
        for fut in self._waiting.pop(result.id, ()):
            if not fut.done():
                fut.set_result(result)
        return True

    def register(self, job_id: str) -> asyncio.Future[wire.ResultEnvelope]:
        """Start listening for ``job_id`` (before publishing, so a fast result is not missed)."""
        fut: asyncio.Future[wire.ResultEnvelope] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(job_id, []).append(fut)
        return fut

    def forget(self, job_id: str, fut: asyncio.Future[wire.ResultEnvelope]) -> None:
        """Stop listening (timeout or error)."""
        futs = self._waiting.get(job_id)
        if futs and fut in futs:
            futs.remove(fut)
            if not futs:
                del self._waiting[job_id]

    def connected(self) -> bool:
        """True when subscribed to the results topic on at least one nsqd."""
        return self.reader is not None and connected_count(self.reader) > 0

    def close(self) -> None:
        """Close the reader's connections."""
        if self.reader is not None:
            close_reader(self.reader)
