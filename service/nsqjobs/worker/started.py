"""Started events of tasks with ``track_started``, published fire and forget in batches.

A job never waits for its event. The events of one event-loop turn travel as one message (a
JSON array), so nsqd and the ledger handle one message per turn, not one per job, and the
worker keeps no future or callback per event (``python -m bench.started`` measures what is
left). A lost message only leaves those jobs reported ``queued`` until their outcomes arrive.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from nsqjobs import wire
from nsqjobs.names import STARTED_TOPIC
from nsqjobs.worker.settle import Publishing

log = logging.getLogger("nsqjobs.worker")

# Events per message: each is ~100 bytes, so a message stays far under nsqd's --max-msg-size.
MAX_EVENTS_PER_MESSAGE = 1000


class StartedEvents:
    """Collects the started events of one loop turn and publishes them as one message."""

    def __init__(self, publisher: Publishing, worker_id: str) -> None:
        self.publisher = publisher
        self.worker_id = worker_id
        self.lost = 0  # events nsqd did not acknowledge (logged at debug level)
        self._pending: list[wire.Started] = []

    def announce(self, job_id: str) -> None:
        """Job ``job_id`` starts now on this worker."""
        pending = self._pending
        pending.append(wire.Started(id=job_id, worker=self.worker_id, at=wire.now()))
        if len(pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        events, self._pending = self._pending, []
        for i in range(0, len(events), MAX_EVENTS_PER_MESSAGE):
            chunk = events[i : i + MAX_EVENTS_PER_MESSAGE]
            sent = self.publisher.enqueue(STARTED_TOPIC, wire.encode_started(chunk))
            sent.add_done_callback(functools.partial(self._sent, len(chunk)))

    def _sent(self, count: int, sent: asyncio.Future[None]) -> None:
        error = None if sent.cancelled() else sent.exception()
        if error is not None:
            self.lost += count
            log.debug(
                "%d started event(s) not published (%s): those jobs show queued", count, error
            )
