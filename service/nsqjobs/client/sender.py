"""Submitting jobs one at a time at the speed of batches: :class:`Sender`, made by
``Client.sender()``. ``submit`` returns the job's handle at once; one background thread sends
what has gathered as ``POST /v1/jobs/batch``, and ``flush`` says which jobs were not accepted.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import deque
from datetime import timedelta
from types import TracebackType
from typing import Any, Final, NamedTuple

import msgspec

from nsqjobs import wire
from nsqjobs.api import JobOutcome
from nsqjobs.client import core, sync
from nsqjobs.client.problems import GatewayError, PartiallyAccepted
from nsqjobs.errors import ConfigError, NsqjobsError
from nsqjobs.names import MAX_BATCH_JOBS

# A batch refused with one of these may hold good jobs beside the bad ones (the gateway refuses
# a whole batch for one invalid job, a repeated or conflicting id, or its size): it is split
# until each bad job stands alone. Any other refusal (401, 403, 404, 415...) is every job's.
_PER_JOB: Final = frozenset((409, 413, 422))
# How many refused jobs NotAccepted's message names (``failures`` holds them all).
_NAMED: Final = 5


def _after_fork_in_child() -> None:
    for sender in list(_SENDERS):
        sender._forked()


class NotAccepted(NsqjobsError):
    """Jobs of a :class:`Sender` that the gateway refused, or that could not be sent (the
    client's retries gave up): ``failures`` pairs each one's id with the error its own request
    got (``InvalidArguments``, ``UnknownTask``, ``IdConflict``, ``GatewayUnreachable``...).
    Raised by ``flush`` and ``close``, once per failure."""

    def __init__(self, failures: list[tuple[str, GatewayError]]) -> None:
        self.failures = failures
        named = "; ".join(f"{job_id}: {error}" for job_id, error in failures[:_NAMED])
        more = f"; and {len(failures) - _NAMED} more" if len(failures) > _NAMED else ""
        super().__init__(f"{len(failures)} job(s) not accepted: {named}{more}")


class SenderStopped(NsqjobsError):
    """The :class:`Sender` takes no more jobs: it was closed, or its thread failed (then
    ``__cause__`` is why, ``unsettled_ids`` the jobs whose acceptance is unknown, and
    ``failures`` the refusals not reported yet, as in :class:`NotAccepted`)."""

    def __init__(
        self,
        message: str,
        unsettled_ids: list[str] | None = None,
        failures: list[tuple[str, GatewayError]] | None = None,
    ) -> None:
        super().__init__(message)
        self.unsettled_ids = unsettled_ids or []
        self.failures = failures or []


class _Item(NamedTuple):
    """A job waiting to be sent: its id, its encoded body, and whether it must go on its own
    (a delayed job: ``delay_ms`` is not taken in a batch)."""

    id: str
    body: msgspec.Raw
    alone: bool


class Sender:
    """Submits jobs through one :class:`~nsqjobs.client.Client` in the background: ``submit``
    returns the job's handle at once, and one thread sends the jobs gathered meanwhile, up to
    ``max_batch`` per ``POST /v1/jobs/batch`` (no linger: while one request is out, the next
    batch gathers). ``submit`` blocks while ``max_pending`` jobs are not yet accepted or
    refused. Every job ends accepted or named by :meth:`flush`; ids are made here, and the
    client's retries resend the same ones. Safe to share between threads.

    A batch refused for some of its jobs is split in halves until each refused job was sent
    alone (``POST /v1/jobs``), so it fails with its own error and its neighbours are accepted.
    A delayed job is always sent alone. A job's id given twice goes in two requests (as two
    ``Client.submit`` calls: the job ledger takes it once).
    """

    def __init__(
        self, client: sync.Client, *, max_batch: int = MAX_BATCH_JOBS, max_pending: int = 10_000
    ) -> None:
        if not 1 <= max_batch <= MAX_BATCH_JOBS:
            raise ConfigError(f"max_batch must be 1 to {MAX_BATCH_JOBS}, got {max_batch}")
        if max_pending < 1:
            raise ConfigError(f"max_pending must be at least 1, got {max_pending}")
        self.client = client
        self.max_batch = max_batch
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the thread waits for jobs
        self._changed = threading.Condition(self._lock)  # submit and flush wait for settling
        self._queue: deque[_Item] = deque()
        self._in_flight: list[_Item] = []
        # Jobs settle in submission order (one thread, one batch at a time), so a count of
        # settled jobs says which are.
        self._submitted = 0
        self._settled = 0
        self._accepted = 0
        self._refused = 0
        self._failures: list[tuple[str, GatewayError]] = []  # not reported yet
        self._closing = False
        self._crash: BaseException | None = None
        self._pid = os.getpid()
        # A daemon: a sender never closed does not keep the interpreter from exiting (its
        # unsent jobs are lost, as are those of any client not flushed; close it).
        self._thread = threading.Thread(target=self._run, name="nsqjobs-sender", daemon=True)
        self._thread.start()
        _SENDERS.add(self)

    def _forked(self) -> None:
        """In a forked child: the thread is not there, and the jobs queued are the parent's to
        send. The child's sender is stopped (its calls raise SenderStopped at once)."""
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._changed = threading.Condition(self._lock)
        self._crash = RuntimeError(
            f"this sender was made in process {self._pid}, before a fork: make one in this process"
        )

    def __repr__(self) -> str:
        return (
            f"Sender(url={self.client.url!r}, accepted={self._accepted}, "
            f"refused={self._refused}, pending={self._submitted - self._settled})"
        )

    @property
    def accepted(self) -> int:
        """Jobs the gateway accepted so far."""
        return self._accepted

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet accepted or refused (at most ``max_pending``)."""
        return self._submitted - self._settled

    @property
    def refused(self) -> int:
        """Jobs that were not accepted so far (each reported once by :meth:`flush`)."""
        return self._refused

    # -- the caller's side ----------------------------------------------------------------------

    def submit(
        self,
        task: str,
        args: Any = None,
        *,
        id: str | None = None,
        delay: float | timedelta | None = None,
        expires: float | timedelta | None = None,
    ) -> sync.Job:
        """Queue one job (``delay`` and ``expires`` in seconds); its handle at once, before the
        gateway has it. Blocks while ``max_pending`` jobs are unsettled; :class:`SenderStopped`
        once closed or if the thread failed; ``TypeError`` at once for args JSON cannot hold."""
        job_id = id or wire.new_job_id()
        body = core.job_body(task, args, job_id, delay, expires)
        if body.get("delay_ms") == 0:  # no delay: batchable
            del body["delay_ms"]
        item = _Item(job_id, msgspec.Raw(msgspec.json.encode(body)), "delay_ms" in body)
        with self._lock:
            self._check_running()
            while self._submitted - self._settled >= self.max_pending:
                self._changed.wait()
                self._check_running()
            self._queue.append(item)
            self._submitted += 1
            seq = self._submitted  # settled once self._settled reaches it (in order)
            self._work.notify()
        return SentJob(self, job_id, task, seq)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every job submitted so far was accepted or refused (up to ``timeout``
        seconds; None: as long as it takes). :class:`NotAccepted` names the jobs refused since
        the last report; :class:`TimeoutError` if some are still unsettled then (reported by a
        later call); :class:`SenderStopped` if the thread failed."""
        deadline = core.deadline_of(timeout)
        with self._lock:
            target = self._submitted
            while self._settled < target:
                self._check_crash()
                left = core.left_s(deadline)
                if left is not None and left <= 0:
                    raise TimeoutError(
                        f"{target - self._settled} job(s) not yet accepted after {timeout:g}s"
                    )
                self._changed.wait(left)
            self._check_crash()
            failures, self._failures = self._failures, []
        if failures:
            raise NotAccepted(failures)

    def close(self) -> None:
        """Take no more jobs, :meth:`flush` (its errors are raised), and stop the thread."""
        with self._lock:
            self._closing = True
            self._work.notify()
            self._changed.notify_all()  # a submit waiting for room stops too
        try:
            self.flush()
        finally:
            self._thread.join()

    def __enter__(self) -> Sender:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """:meth:`close`; when the block raised, what close raises becomes a note on the
        block's exception, which goes on."""
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as error:
            exc.add_note(f"and closing the sender raised {error!r}")

    def wait_sent(self, seq: int, timeout: float | None = None) -> None:
        """Wait until the ``seq``-th job submitted here was accepted or refused (None: as long
        as it takes); :class:`TimeoutError` if not by then, :class:`SenderStopped` if the
        thread failed first. A handle's calls to the gateway wait for this, so that
        ``result()`` right after ``submit()`` asks about a job the gateway has."""
        deadline = core.deadline_of(timeout)
        with self._lock:
            while self._settled < seq:
                self._check_crash()
                left = core.left_s(deadline)
                if left is not None and left <= 0:
                    raise TimeoutError(f"job {seq} of this sender not yet sent after {timeout:g}s")
                self._changed.wait(left)

    def _check_running(self) -> None:
        """Under the lock: raise if no job may be queued now."""
        self._check_crash()
        if self._closing:
            raise SenderStopped("the sender is closed")

    def _check_crash(self) -> None:
        """Under the lock: raise if the thread failed (with the refusals not reported yet)."""
        if self._crash is None:
            return
        unsettled = [item.id for item in self._in_flight] + [item.id for item in self._queue]
        failures, self._failures = self._failures, []
        raise SenderStopped(
            f"the sender's thread failed ({self._crash!r}); {len(unsettled)} job(s) unsettled",
            unsettled,
            failures,
        ) from self._crash

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._queue:
                        if self._closing:
                            return
                        self._work.wait()
                    batch = self._in_flight = self._take()
                failures = self._send(batch)
                with self._lock:
                    self._in_flight = []
                    self._settled += len(batch)
                    self._accepted += len(batch) - len(failures)
                    self._refused += len(failures)
                    self._failures += failures
                    self._changed.notify_all()
        except BaseException as exc:  # never silent: the next submit or flush raises it
            with self._lock:
                self._crash = exc
                self._changed.notify_all()

    def _take(self) -> list[_Item]:
        """Under the lock: the next request's jobs, oldest first (a delayed job alone; a batch
        ends before an id it holds already, which the gateway would refuse as duplicate-id)."""
        queue = self._queue
        first = queue.popleft()
        batch = [first]
        if first.alone:
            return batch
        ids = {first.id}
        while queue and len(batch) < self.max_batch:
            item = queue[0]
            if item.alone or item.id in ids:
                break
            batch.append(queue.popleft())
            ids.add(item.id)
        return batch

    def _send(self, items: list[_Item]) -> list[tuple[str, GatewayError]]:
        """Send ``items`` (one job alone, else a batch); the ones not accepted, with why."""
        request = self.client.request
        while items:
            if len(items) == 1:
                try:
                    request("POST", "/v1/jobs", body=items[0].body)
                except GatewayError as exc:
                    return [(items[0].id, exc)]
                return []
            try:
                request("POST", "/v1/jobs/batch", body={"jobs": [i.body for i in items]})
                return []
            except PartiallyAccepted as exc:  # send again only what was not stored
                left = set(exc.unaccepted_ids)
                items = [i for i in items if i.id in left]
            except GatewayError as exc:
                if exc.status not in _PER_JOB:
                    return [(i.id, exc) for i in items]
                half = len(items) // 2
                return self._send(items[:half]) + self._send(items[half:])
        return []


class SentJob(sync.Job):
    """A :class:`Sender`'s handle: each call to the gateway first waits until the sender has
    sent the job (:meth:`Sender.wait_sent`); a refused job is then unknown to the gateway
    (:meth:`Sender.flush` says why)."""

    def __init__(self, sender: Sender, job_id: str, task: str, seq: int) -> None:
        super().__init__(sender.client, job_id, task)
        self._sender = sender
        self._seq = seq  # its place in the sender's order, which is the order jobs settle in

    def info(self) -> dict[str, Any]:
        self._sender.wait_sent(self._seq)
        return super().info()

    def outcome(self, timeout: float | None = None) -> JobOutcome | None:
        deadline = core.deadline_of(timeout)
        self._sender.wait_sent(self._seq, timeout)
        return super().outcome(core.left_s(deadline))

    def cancel(self) -> dict[str, Any]:
        self._sender.wait_sent(self._seq)
        return super().cancel()


# Every live sender, so that a forked child stops its copies (one hook for all).
_SENDERS: Final[weakref.WeakSet[Sender]] = weakref.WeakSet()
os.register_at_fork(after_in_child=_after_fork_in_child)
