"""Outcomes into the ledger: the ``results`` and ``dead_letters`` topics (and ``started``
events), read on a durable channel; a message is FINed only once its outcome is committed, so
none is lost to a crash."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from nsqjobs import wire
from nsqjobs.errors import DecodeError
from nsqjobs.ledger.store import OutcomeVerdict, Store
from nsqjobs.names import DEAD_LETTER_TOPIC, LEDGER_CHANNEL, RESULTS_TOPIC, STARTED_TOPIC
from nsqjobs.nsq.reader import Reader, close_reader, connected_count
from nsqjobs.observability.metrics import LedgerMetrics

log = logging.getLogger("nsqjobs.ledger")
# A write that failed is tried again after this long (nsqd redelivers the message).
REQUEUE_MS = 1000
MAX_IN_FLIGHT = 500
# An outcome of an id the ledger does not know yet is tried again, after 0.2 s then twice as long
# each time up to 5 s, until this long after nsqd first took the message: a gateway records a job
# with an id it made and publishes it side by side, so a fast job's outcome can come before its
# record is committed (the first retry finds it). An id still unknown after that was never
# recorded (published by something else, or by a gateway that died before its record): dropped,
# counted as ``unknown``, after about ten tries.
UNKNOWN_REQUEUE_MS = 200
UNKNOWN_REQUEUE_MAX_MS = 5000
UNKNOWN_WAIT_S = 30.0


class OutcomeRecorder:
    """Records the first terminal outcome per job id; later ones are counted and ignored.

    Started events (tasks with ``track_started``) move a queued job to running; one that comes
    after the outcome is a ``duplicate`` too, but not a duplicate outcome.
    """

    def __init__(
        self,
        store: Store,
        metrics: LedgerMetrics,
        nsqd_tcp_addresses: Sequence[str],
        lookupd_http_addresses: Sequence[str] = (),
        lookupd_poll_interval: float = 15.0,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self._reader_args: dict[str, Any] = {
            "nsqd_tcp_addresses": list(nsqd_tcp_addresses),
            "lookupd_http_addresses": list(lookupd_http_addresses) or None,
            "lookupd_poll_interval": lookupd_poll_interval,
            "max_in_flight": MAX_IN_FLIGHT,
            "max_tries": 0,
        }
        self.readers: list[Any] = []

    def start(self) -> None:
        """Subscribe to the topics (after they exist, so the first lookup finds them)."""
        self.readers = [
            Reader(
                topic=topic,
                channel=LEDGER_CHANNEL,
                message_handler=functools.partial(self._on_message, topic, record),
                **self._reader_args,
            )
            for topic, record in (
                (RESULTS_TOPIC, self._record_result),
                (DEAD_LETTER_TOPIC, self._record_dead_letter),
                (STARTED_TOPIC, self._record_started),
            )
        ]

    def _record_result(self, body: bytes) -> asyncio.Future[OutcomeVerdict]:
        return self.store.record_result(wire.decode_result(body))

    def _record_dead_letter(self, body: bytes) -> asyncio.Future[OutcomeVerdict]:
        return self.store.record_dead_letter(wire.decode_dead_letter(body))

    def _record_started(self, body: bytes) -> asyncio.Future[list[OutcomeVerdict]]:
        # One message holds the events of a worker's loop turn: one transaction for them all.
        return asyncio.gather(
            *(self.store.record_started(e.id, e.worker, e.at) for e in wire.decode_started(body))
        )

    def _on_message(
        self,
        topic: str,
        record: Callable[[bytes], asyncio.Future[Any]],
        message: Any,
    ) -> bool | None:
        try:
            written = record(message.body)
        except DecodeError as exc:
            log.warning("ledger: dropping an undecodable %s message %s: %s", topic, message.id, exc)
            self.metrics.outcomes.labels(topic, "undecodable").inc()
            return True
        message.enable_async()
        written.add_done_callback(functools.partial(self._written, topic, message))
        return None

    def _written(self, topic: str, message: Any, written: asyncio.Future[Any]) -> None:
        if written.cancelled() or written.exception() is not None:
            log.warning(
                "ledger: %s message %s not recorded (%s); nsqd redelivers it",
                topic,
                message.id,
                "cancelled" if written.cancelled() else written.exception(),
            )
            message.requeue(backoff=False, time_ms=REQUEUE_MS)
            return
        verdict: OutcomeVerdict | list[OutcomeVerdict] = written.result()
        if isinstance(verdict, list):  # started events: counted one by one, never outcomes
            for each in verdict:
                self.metrics.outcomes.labels(topic, each).inc()
        else:
            if verdict == "unknown" and time.time() - message.timestamp / 1e9 < UNKNOWN_WAIT_S:
                delay_ms = UNKNOWN_REQUEUE_MS << min(max(message.attempts - 1, 0), 5)
                message.requeue(backoff=False, time_ms=min(delay_ms, UNKNOWN_REQUEUE_MAX_MS))
                return
            self.metrics.outcomes.labels(topic, verdict).inc()
            if verdict == "duplicate":
                self.metrics.duplicate_outcomes.inc()
        message.finish()

    def connected(self) -> bool:
        """True when every topic is subscribed on at least one nsqd."""
        return bool(self.readers) and all(connected_count(r) > 0 for r in self.readers)

    def close(self) -> None:
        """Close the readers (unFINed messages go back to nsqd)."""
        for reader in self.readers:
            close_reader(reader)
