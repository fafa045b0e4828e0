"""The accept path's side of the ledger: a gateway session, so that a job can be recorded as
published in the same write that records it, and nothing more is written when nsqd acknowledges.

The evidence for a crash between that write and nsqd's acknowledgement is the session itself:
the relay beats its heartbeat every poll with a lower bound (``low``) on when the jobs whose
publish is not settled yet were sent. A session whose heartbeat stops has those jobs re-driven
by any relay (:meth:`nsqjobs.ledger.store.Store.redrive_lost_sessions`). The bound is kept by
counting unsettled jobs per heartbeat interval ("epoch"): a dict update per job, no timers.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Sequence

from nsqjobs import wire
from nsqjobs.errors import NsqjobsError
from nsqjobs.ledger.store import Accepted, Store

log = logging.getLogger("nsqjobs.ledger")

# Slack under the bound, for a wall clock that steps back a little between two readings.
_CLOCK_SLACK_S = 1.0


class Session:
    """One gateway's publishing session: its id, and per epoch how many jobs recorded as
    published are not settled (acknowledged by nsqd, or their unpublished mark written)."""

    def __init__(self, store: Store, clock: Callable[[], float] = wire.now) -> None:
        self.store = store
        self.clock = clock
        self.id = uuid.uuid4().hex
        self.epoch = 0
        self._starts: dict[int, float] = {0: clock()}
        self._open: dict[int, int] = {}
        # Unpublished marks that could not be written: (epoch, ids), tried again every beat.
        self._unmarked: list[tuple[int, list[str]]] = []

    # -- the accept path ------------------------------------------------------------------------

    def record(
        self, jobs: list[wire.JobEnvelope], bodies: Sequence[bytes] | None = None
    ) -> tuple[int, asyncio.Future[list[Accepted]]]:
        """Record jobs in this session (``bodies``: their encoded envelopes, see
        :meth:`Store.record_accepted`); the epoch to settle them with. Every job counts as
        unsettled until :meth:`settle` (or :meth:`unpublished`) says otherwise."""
        epoch = self.epoch
        self._open[epoch] = self._open.get(epoch, 0) + len(jobs)
        try:
            return epoch, self.store.record_accepted(jobs, self.id, bodies)
        except BaseException:
            self.settle(epoch, len(jobs))
            raise

    def settle(self, epoch: int, n: int) -> None:
        """``n`` jobs of ``epoch`` need no re-drive if this gateway dies now."""
        if not n:
            return
        left = self._open[epoch] - n
        if left > 0:
            self._open[epoch] = left
        else:
            del self._open[epoch]

    def unpublished(self, epoch: int, ids: list[str]) -> asyncio.Future[None]:
        """Jobs recorded as published whose publish failed (or is unknown): mark them
        unpublished; they are settled once that is written (else tried again each beat)."""
        fut = self.store.mark_unpublished(ids)
        fut.add_done_callback(lambda f: self._marked(f, epoch, ids))
        return fut

    def _marked(self, fut: asyncio.Future[None], epoch: int, ids: list[str]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            log.warning("ledger: could not note a failed publish (tried again): %s", fut)
            self._unmarked.append((epoch, ids))
        else:
            self.settle(epoch, len(ids))

    @property
    def settled(self) -> bool:
        """Nothing recorded as published awaits its outcome."""
        return not self._open

    # -- the relay ------------------------------------------------------------------------------

    async def beat(self) -> None:
        """Write what failed to be written, then the heartbeat with a new epoch's bound; a
        session that another relay handled (this gateway stalled) is replaced by a new one.
        Raises :class:`NsqjobsError` (LedgerError) when the ledger cannot be written."""
        unmarked, self._unmarked = self._unmarked, []
        for n, (epoch, ids) in enumerate(unmarked):
            try:
                await self.store.mark_unpublished(ids)
            except NsqjobsError:
                self._unmarked.extend(unmarked[n:])
                raise
            self.settle(epoch, len(ids))
        now = self.clock()
        # Every unsettled job was sent at or after its epoch's start; every later one will be
        # sent at or after ``now``, when the next epoch starts.
        low = min([self._starts[e] for e in self._open] + [now]) - _CLOCK_SLACK_S
        self.epoch += 1
        self._starts[self.epoch] = now
        for e in [e for e in self._starts if e < self.epoch and e not in self._open]:
            del self._starts[e]
        if not await self.store.beat_session(self.id, low, now):
            old, self.id = self.id, uuid.uuid4().hex
            log.warning(
                "ledger: session %s was handled by another relay (this gateway stalled): its "
                "unsettled jobs were re-driven; now session %s",
                old,
                self.id,
            )
            await self.store.beat_session(self.id, low, now)

    async def end(self) -> None:
        """A clean stop: end the session when every publish is settled (else leave it, and
        another relay re-drives its unsettled jobs when its heartbeat goes stale)."""
        if self.settled and not self._unmarked:
            await self.store.end_session(self.id, self.clock())
