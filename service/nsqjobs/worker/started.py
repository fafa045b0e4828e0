"""Started events of tasks with ``track_started``, published fire and forget in batches.

A job never waits for its event: the events of one event-loop turn go out as one MPUB, with
no future or callback per event (per-event futures cost a noop job a quarter of its time, as
measured by ``python -m bench.started``). A lost event only leaves the ledger saying
``queued`` until the job's outcome arrives.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from nsqjobs import wire
from nsqjobs.names import STARTED_TOPIC

log = logging.getLogger("nsqjobs.worker")

# Events per MPUB: each is ~100 bytes, far under nsqd's --max-body-size.
MAX_EVENTS_PER_MPUB = 1000


class Multipublishing(Protocol):
    """What the events need of :class:`nsqjobs.nsq.publisher.Publisher`."""

    async def mpub(self, topic: str, bodies: list[bytes]) -> None:
        """Publish ``bodies`` in one MPUB."""


class StartedEvents:
    """Collects the started events of one loop turn and publishes them together."""

    def __init__(self, publisher: Multipublishing, worker_id: str) -> None:
        self.publisher = publisher
        self.worker_id = worker_id
        self.lost = 0  # events nsqd did not acknowledge (logged at debug level)
        self._pending: list[bytes] = []
        self._sending: set[asyncio.Future[None]] = set()

    def announce(self, job_id: str) -> None:
        """Job ``job_id`` starts now on this worker."""
        pending = self._pending
        pending.append(wire.encode(wire.Started(id=job_id, worker=self.worker_id, at=wire.now())))
        if len(pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        bodies, self._pending = self._pending, []
        for i in range(0, len(bodies), MAX_EVENTS_PER_MPUB):
            sent = asyncio.ensure_future(
                self.publisher.mpub(STARTED_TOPIC, bodies[i : i + MAX_EVENTS_PER_MPUB])
            )
            self._sending.add(sent)  # a reference, so the task is not collected mid-flight
            sent.add_done_callback(self._sent)

    def _sent(self, sent: asyncio.Future[None]) -> None:
        self._sending.discard(sent)
        error = None if sent.cancelled() else sent.exception()
        if error is not None:
            self.lost += 1
            log.debug("started events not published (%s): those jobs show queued", error)
