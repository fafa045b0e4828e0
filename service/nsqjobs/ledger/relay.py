"""The ledger's relay, run by the gateway: publishes what the ledger holds and nsqd may not.

Every poll it (1) reads each nsqd's ``start_time``: an nsqd that restarted lost what it held in
memory, so the unfinished jobs published before that are re-driven; (2) claims and publishes
jobs with no acknowledged publish: re-driven ones, ones the accept path gave up on (after a
grace), long delays coming due, and replays; (3) prunes finished jobs past the retention; (4)
refreshes the ledger gauges. A deep backlog with no restart re-drives nothing: the decision
rests on evidence of loss, never on a job's age.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, get_args

from nsqjobs import wire
from nsqjobs.errors import NsqjobsError, UnknownTaskError
from nsqjobs.ledger.session import Session
from nsqjobs.ledger.store import Claimed, RedriveReason, Store
from nsqjobs.nsq.admin import nsqd_start_time
from nsqjobs.observability.metrics import LedgerMetrics
from nsqjobs.registry import Registry

log = logging.getLogger("nsqjobs.ledger")

Clock = Callable[[], float]


class Publishing(Protocol):
    """What the relay asks of :class:`nsqjobs.nsq.publisher.Publisher`."""

    def connected(self) -> int:
        """How many nsqd connections can take a publish now."""
        ...

    def enqueue(self, topic: str, body: bytes) -> asyncio.Future[None]:
        """PUB (coalesced with others of this loop turn); the future is nsqd's OK."""
        ...

    def dpub(self, topic: str, delay_ms: int, body: bytes) -> Awaitable[None]:
        """DPUB; done at nsqd's OK."""
        ...


class Relay:
    """Re-drives lost jobs and publishes held ones; see the module docstring.

    ``grace_s``: how long a recorded job is left to the accept path before the relay publishes
    it; ``lease_s``: how long a claim keeps other gateways' relays off a job (a publish that
    failed is tried again when it ends); ``horizon_s``: how close to due a held delayed job is
    published (with DPUB of the rest); ``result_ttl_s``: finished jobs older than this are
    pruned (0: never), every ``prune_every_s``; the gauges are read every ``stats_every_s``
    (counting a large ledger takes a while). ``clock`` gives Unix seconds and
    ``read_start_time`` an nsqd's start_time (tests replace both).
    """

    # Jobs claimed per store call; a tick claims until a call comes back short.
    BATCH = 1000
    # Retention deletes at most this many batches per prune, so it never hogs the writer.
    PRUNE_BATCHES = 10

    def __init__(
        self,
        store: Store,
        publisher: Publishing,
        registry: Registry,
        metrics: LedgerMetrics,
        nsqd_http_addresses: Sequence[str],
        *,
        poll_s: float = 1.0,
        grace_s: float = 30.0,
        lease_s: float = 15.0,
        horizon_s: float = 60.0,
        result_ttl_s: float = 7 * 86400.0,
        prune_every_s: float = 60.0,
        stats_every_s: float = 0.0,
        clock: Clock = wire.now,
        read_start_time: Callable[[str, float], Awaitable[int]] = nsqd_start_time,
        session: Session | None = None,
        session_stale_s: float = 10.0,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.registry = registry
        self.metrics = metrics
        self.addresses = list(nsqd_http_addresses)
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.lease_s = lease_s
        self.horizon_s = horizon_s
        self.result_ttl_s = result_ttl_s
        self.prune_every_s = prune_every_s
        self.stats_every_s = stats_every_s
        self.clock = clock
        self.read_start_time = read_start_time
        # This gateway's session (its heartbeat, every tick); a session of any gateway whose
        # heartbeat is older than session_stale_s is taken for dead and its jobs re-driven.
        self.session = session
        self.session_stale_s = session_stale_s
        # Per nsqd: the start_time last read, and the re-drive cutoff it implies.
        self.start_times: dict[str, int] = {}
        self.cutoffs: dict[str, float] = {}
        # Why the ledger cannot be written, from the last tick (None: it can); readiness.
        self.problem: str | None = None
        self.ticks = 0  # passes completed
        self._last_prune = self._last_stats = float("-inf")
        self._unknown_tasks: set[str] = set()
        self._unreachable: set[str] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        for reason in get_args(RedriveReason):
            metrics.redrives.labels(reason)  # every reason shows, at 0, from the start

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Tick now, then every ``poll_s`` (or at once after :meth:`kick`)."""
        self._task = asyncio.ensure_future(self._run())

    def kick(self) -> None:
        """Tick now: jobs were made ready to publish (a replay)."""
        self._wake.set()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Let the tick under way finish (its publishes and marks), then stop."""
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(task, timeout_s)
        except TimeoutError:
            log.warning("relay: stopped in the middle of a tick (claims expire by themselves)")
        if self.session is not None:
            try:
                await self.session.end()
            except NsqjobsError as exc:
                log.warning("relay: the session could not be ended (re-driven later): %s", exc)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.tick()
            except Exception:
                log.exception("relay: a tick failed")
            if self._stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            self._wake.clear()

    # -- one tick -------------------------------------------------------------------------------

    async def tick(self) -> None:
        """One pass: restart evidence, re-drive, publish, prune, gauges."""
        try:
            await self.redrive_sessions()
            await self.redrive()
            await self.publish_claimed()
            now = self.clock()
            if self.result_ttl_s > 0 and now - self._last_prune >= self.prune_every_s:
                self._last_prune = now
                await self.prune(now - self.result_ttl_s)
            if now - self._last_stats >= self.stats_every_s:
                self._last_stats = now
                await self.update_gauges()
        except NsqjobsError as exc:  # LedgerError: storage failed, or closed
            if self.problem is None:
                log.error("relay: the ledger cannot be written: %s", exc)
            self.problem = f"the ledger cannot be written: {exc}"
            return
        if self.problem is not None:
            log.info("relay: the ledger can be written again")
        self.problem = None
        self.ticks += 1

    async def redrive_sessions(self) -> int:
        """Beat this gateway's session; re-drive what the sessions of dead gateways may not
        have published (those whose heartbeat went stale)."""
        if self.session is not None:
            await self.session.beat()
        now = self.clock()
        count = await self.store.redrive_lost_sessions(now - self.session_stale_s, now)
        if count:
            log.warning(
                "relay: %d job(s) of a gateway that stopped beating were maybe never published",
                count,
            )
        return count

    async def redrive(self) -> int:
        """Read every nsqd's start_time; re-drive what was sent before the latest restart."""
        now = self.clock()
        times = await asyncio.gather(
            *(self.read_start_time(a, min(2.0, max(0.5, self.poll_s))) for a in self.addresses),
            return_exceptions=True,
        )
        for address, start_time in zip(self.addresses, times, strict=True):
            if isinstance(start_time, BaseException):
                if address not in self._unreachable:
                    log.warning("relay: nsqd %s: no start_time (%s)", address, start_time)
                    self._unreachable.add(address)
                continue
            self._unreachable.discard(address)
            self.note_start_time(address, start_time, now)
        if not self.cutoffs:
            return 0
        # Every poll, not only at the restart: a publish acknowledged by the old nsqd but
        # noted after the first re-drive is caught by the next one.
        count = await self.store.redrive_sent_before(max(self.cutoffs.values()))
        if count:
            log.warning("relay: %d job(s) were published to an nsqd that restarted since", count)
            self.metrics.redrives.labels("nsqd_restart").inc(count)
        return count

    def note_start_time(self, address: str, start_time: int, now: float) -> None:
        """Take one nsqd's ``start_time``: jobs sent before it were held by a process that is
        gone. It is truncated to the second, so its second ends at ``start_time + 1``, but
        never past ``now`` (what this relay publishes from now on must not be re-driven
        again). A change seen while running means a restart since the last poll: everything
        sent before ``now`` by this gateway's clock, so a skew between nsqd's clock and ours
        cannot hide a job sent just before the restart."""
        before = self.start_times.get(address)
        if before == start_time:
            return  # no news: the cutoff stands
        self.start_times[address] = start_time
        cutoff = min(start_time + 1.0, now)
        if before is not None and before != start_time:
            log.warning(
                "relay: nsqd %s restarted (start_time %d, was %d): re-driving the unfinished "
                "jobs published before",
                address,
                start_time,
                before,
            )
            cutoff = now
        self.cutoffs[address] = max(self.cutoffs.get(address, 0.0), cutoff)

    async def publish_claimed(self) -> int:
        """Claim and publish every job the ledger says is due for a publish; how many nsqd
        acknowledged."""
        if not self.publisher.connected():
            return 0  # nothing could be published: leave the jobs unclaimed
        published = 0
        while not self._stopping:
            claimed = await self.store.claim_unpublished(
                now=self.clock(),
                grace_s=self.grace_s,
                horizon_s=self.horizon_s,
                lease_s=self.lease_s,
                limit=self.BATCH,
            )
            published += await self._publish(claimed)
            if len(claimed) < self.BATCH:
                break
        return published

    async def _publish(self, claimed: list[Claimed]) -> int:
        if not claimed:
            return 0
        sends: list[Awaitable[None]] = []
        jobs: list[Claimed] = []
        for job in claimed:
            try:
                queue = self.registry.get(job.task).queue
            except UnknownTaskError:
                if job.task not in self._unknown_tasks:
                    self._unknown_tasks.add(job.task)
                    log.error(
                        "relay: job %s is for task %r, which this gateway does not know: left "
                        "in the ledger (a gateway with that task publishes it)",
                        job.id,
                        job.task,
                    )
                continue
            if job.delay_ms:
                sends.append(self.publisher.dpub(queue, job.delay_ms, job.body))
            else:
                sends.append(self.publisher.enqueue(queue, job.body))
            jobs.append(job)
        answers = await asyncio.gather(*sends, return_exceptions=True)
        acked = [job for job, answer in zip(jobs, answers, strict=True) if answer is None]
        failed = len(jobs) - len(acked)
        if failed:
            first = next(a for a in answers if a is not None)
            log.warning(
                "relay: %d of %d publish(es) failed (%s); tried again when their claim expires",
                failed,
                len(jobs),
                first,
            )
        if acked:
            await self.store.mark_published([job.id for job in acked])
            reasons = Counter(job.reason for job in acked)
            for reason, count in reasons.items():
                if reason != "nsqd_restart":  # counted when the restart was found
                    self.metrics.redrives.labels(reason).inc(count)
            log.info(
                "relay: published %d job(s) (%s)",
                len(acked),
                ", ".join(f"{r}: {n}" for r, n in sorted(reasons.items())),
            )
        return len(acked)

    async def prune(self, before: float) -> int:
        """Delete finished jobs (not dead ones) finished before ``before``; how many."""
        pruned = 0
        for _ in range(self.PRUNE_BATCHES):
            count = await self.store.prune_finished(before, self.BATCH)
            pruned += count
            if count < self.BATCH:
                break
        if pruned:
            log.info("relay: pruned %d finished job(s) past the retention", pruned)
        return pruned

    async def update_gauges(self) -> None:
        """Jobs by status and the oldest unfinished job's age, from the ledger."""
        stats = await self.store.stats()
        for status, count in stats.by_status.items():
            self.metrics.jobs.labels(status).set(count)
        oldest = stats.oldest_unfinished_at
        age = 0.0 if oldest is None else max(0.0, self.clock() - oldest)
        self.metrics.oldest_unfinished_age.set(age)
