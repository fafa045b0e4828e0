"""The results subscriber that answers ``POST /v1/jobs?wait=``: one ephemeral channel per
gateway process on the results topic, and the requests waiting for each job id.

With the job ledger, a wait is also answered from the ledger: a job still unanswered after
``LEDGER_POLL_S`` is looked up there every ``LEDGER_POLL_S`` (its result may have gone by
before this replica subscribed, or while it was reconnecting; a cancelled job has no result
message at all). Fast results never cost a ledger read.

Every result that goes by is also remembered for a short while (``RECENT_RESULTS_*``), so a
wait for many ids (``POST /v1/jobs/wait``) that starts just after one of them finished still
finds it: without a ledger, that is the only memory the gateway has.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

from nsqjobs import wire
from nsqjobs.config import GatewayConfig
from nsqjobs.errors import DecodeError
from nsqjobs.ledger import UNFINISHED, JobRecord, Store
from nsqjobs.names import (
    GATEWAY_CHANNEL_PREFIX,
    READER_OUTPUT_BUFFER_BYTES,
    READER_OUTPUT_BUFFER_TIMEOUT_MS,
    RECENT_RESULTS_BYTES,
    RECENT_RESULTS_MAX,
    RECENT_RESULTS_S,
    RESULTS_TOPIC,
)
from nsqjobs.nsq.reader import Reader, close_reader, connected_count
from nsqjobs.observability.metrics import GatewayMetrics

log = logging.getLogger("nsqjobs.gateway")
# How a wait ends: the result message, or (from the ledger) the job's terminal record.
Outcome = wire.ResultEnvelope | JobRecord
# Told the outcome at once, in the turn it arrived (see ResultWaiter.listen).
Listener = Callable[[Outcome], None]
LEDGER_POLL_S: Final = 0.5
LEDGER_POLL_MAX: Final = 1000  # lookups per poll, taking turns


class ResultWaiter:
    """Listens to the results topic on its own ephemeral channel and wakes ``?wait=`` requests.

    Each gateway replica has its own channel, so each sees every result and answers its own
    waiters; results nobody waits for are dropped here (the results topic keeps its other
    channels' copies).
    """

    def __init__(
        self,
        config: GatewayConfig,
        metrics: GatewayMetrics,
        store: Store | None = None,
        poll_s: float = LEDGER_POLL_S,
    ) -> None:
        self.metrics = metrics
        self._waiting: dict[str, list[asyncio.Future[Outcome] | Listener]] = {}
        self.config = config
        self.reader: Reader | None = None
        self.store = store
        self.poll_s = poll_s
        self._since: dict[str, float] = {}  # with a store: when each id's wait began
        self._poll: asyncio.TimerHandle | None = None
        # The newest results by id, oldest first: (arrival, size of the message, result).
        self._recent: OrderedDict[str, tuple[float, int, wire.ResultEnvelope]] = OrderedDict()
        self._recent_bytes = 0

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
        self._remember(result, len(message.body))
        self._settle(result.id, result)
        return True

    def _remember(self, result: wire.ResultEnvelope, size: int) -> None:
        recent = self._recent
        now = time.monotonic()
        old = recent.pop(result.id, None)
        if old is not None:
            self._recent_bytes -= old[1]
        recent[result.id] = (now, size, result)
        self._recent_bytes += size
        too_old = now - RECENT_RESULTS_S
        while recent:
            at, oldest_size, _ = next(iter(recent.values()))
            if (
                at > too_old
                and len(recent) <= RECENT_RESULTS_MAX
                and self._recent_bytes <= RECENT_RESULTS_BYTES
            ):
                break
            recent.popitem(last=False)
            self._recent_bytes -= oldest_size

    def recent(self, job_id: str) -> wire.ResultEnvelope | None:
        """The result of ``job_id`` if it went by lately (see ``RECENT_RESULTS_S``)."""
        entry = self._recent.get(job_id)
        if entry is None or entry[0] <= time.monotonic() - RECENT_RESULTS_S:
            return None
        return entry[2]

    def _settle(self, job_id: str, outcome: Outcome) -> None:
        self._since.pop(job_id, None)
        for waiting in self._waiting.pop(job_id, ()):
            if isinstance(waiting, asyncio.Future):
                if not waiting.done():
                    waiting.set_result(outcome)
                continue
            try:
                waiting(outcome)
            except Exception:  # one waiter's bug must not keep the others waiting
                log.exception("wait: a listener of %s failed", job_id)

    def register(self, job_id: str) -> asyncio.Future[Outcome]:
        """Start listening for ``job_id`` (before publishing, so a fast result is not missed)."""
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._add(job_id, fut)
        return fut

    def listen(self, job_id: str, listener: Listener) -> None:
        """Like :meth:`register`, for callback code: ``listener`` is called with the outcome in
        the loop turn it arrives (a future's awaiter wakes a turn later). It must not raise;
        :meth:`forget` it like a future."""
        self._add(job_id, listener)

    def _add(self, job_id: str, waiting: asyncio.Future[Outcome] | Listener) -> None:
        self._waiting.setdefault(job_id, []).append(waiting)
        if self.store is not None:
            loop = asyncio.get_running_loop()
            self._since.setdefault(job_id, loop.time())
            if self._poll is None:
                self._poll = loop.call_later(self.poll_s, self._poll_ledger)

    def forget(self, job_id: str, fut: asyncio.Future[Outcome] | Listener) -> None:
        """Stop listening (timeout or error)."""
        futs = self._waiting.get(job_id)
        if futs and fut in futs:
            futs.remove(fut)
            if not futs:
                del self._waiting[job_id]
                self._since.pop(job_id, None)

    def _poll_ledger(self) -> None:
        """Look up the jobs waited for longer than a poll; runs while any wait is open."""
        self._poll = None
        if self.store is None or not self._waiting:
            return
        loop = asyncio.get_running_loop()
        due = loop.time() - self.poll_s
        for job_id in [i for i, since in self._since.items() if since <= due][:LEDGER_POLL_MAX]:
            self._since[job_id] = self._since.pop(job_id)  # to the back: others' turn next
            self.store.get(job_id).add_done_callback(functools.partial(self._looked_up, job_id))
        self._poll = loop.call_later(self.poll_s, self._poll_ledger)

    def _looked_up(self, job_id: str, lookup: asyncio.Future[JobRecord | None]) -> None:
        if lookup.cancelled() or lookup.exception() is not None:
            log.debug("wait: ledger lookup of %s failed: %s", job_id, lookup)
            return
        record = lookup.result()
        if record is not None and record.status not in UNFINISHED:
            self._settle(job_id, record)

    def connected(self) -> bool:
        """True when subscribed to the results topic on at least one nsqd."""
        return self.reader is not None and connected_count(self.reader) > 0

    def close(self) -> None:
        """Close the reader's connections."""
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        if self.reader is not None:
            close_reader(self.reader)
