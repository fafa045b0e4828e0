"""The worker's thread executor: a fixed set of threads that hand results back in batches.

``loop.run_in_executor`` on a ``ThreadPoolExecutor`` costs a concurrent future, an asyncio
future chained to it, and one cross-thread wake-up per job: measured in bench/, about 15 us a
job, more than a noop job's whole handling. Here a job is an asyncio future and a queue entry;
finished jobs are collected in a deque and the event loop is woken once per batch.

Threads are daemons: when a worker exits after its grace period, a kernel still running in a
thread does not hold the process up (its job has been requeued to nsqd already).
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
from collections.abc import Callable
from typing import Any

from nsqjobs.errors import TaskTimeoutError

_Outcome = tuple[asyncio.Future[Any], bool, Any, asyncio.TimerHandle | None]
_Entry = tuple[asyncio.Future[Any], Callable[..., Any], tuple[Any, ...], asyncio.TimerHandle | None]


def _overrun(fut: asyncio.Future[Any], limit_s: float) -> None:
    if not fut.done():
        fut.set_exception(TaskTimeoutError(f"ran past its {limit_s:g}s time limit"))


def future_exception(exc: BaseException) -> BaseException:
    """What a job's future can hold for ``exc``: asyncio futures refuse StopIteration (a task
    raising it would leave its future, and its slot, pending for ever), so it is wrapped."""
    return RuntimeError(f"task raised {exc!r}") if isinstance(exc, StopIteration) else exc


class SlotPool:
    """``size`` threads running submitted callables; results come back as asyncio futures."""

    def __init__(self, size: int, name: str = "nsqjobs-task") -> None:
        self.size = size
        # Jobs submitted whose callable has not returned yet (a timed-out one included): a slot
        # is free again only when its thread is.
        self.busy = 0
        # Called on the loop with the future of a job that had already ended (cancelled, or
        # failed by its time limit) when its thread finally returns: its slot is free again.
        self.on_release: Callable[[asyncio.Future[Any]], None] | None = None
        self._jobs: queue.SimpleQueue[_Entry | None] = queue.SimpleQueue()
        self._done: collections.deque[_Outcome] = collections.deque()
        self._lock = threading.Lock()
        self._wake_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # Futures whose callable has not returned (or been dropped unstarted): what occupies a
        # thread, whatever the future says (one failed by its time limit runs on).
        self._unreturned: set[asyncio.Future[Any]] = set()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def submit(
        self, fn: Callable[..., Any], *args: Any, limit_s: float | None = None
    ) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` on a free thread; call from the event loop's thread.

        With ``limit_s``, the future fails with :class:`TaskTimeoutError` that many seconds
        after the call (the callable runs on: its thread stays busy until it returns).
        """
        if self._closed:
            raise RuntimeError("SlotPool is shut down")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        timer = None if limit_s is None else loop.call_later(limit_s, _overrun, fut, limit_s)
        self.busy += 1
        self._unreturned.add(fut)
        self._jobs.put((fut, fn, args, timer))
        return fut

    def idle(self) -> int:
        """Threads free to start a job at once."""
        return self.size - self.busy

    def occupies(self, fut: asyncio.Future[Any]) -> bool:
        """Whether the job of ``fut`` still takes a thread (its callable has not returned, even
        if ``fut`` ended: failed by its time limit). False once :attr:`on_release` was called
        for it, whatever order the loop ran the two in."""
        return fut in self._unreturned

    def _work(self) -> None:
        jobs, done = self._jobs, self._done
        while True:
            entry = jobs.get()
            if entry is None:
                return
            fut, fn, args, timer = entry
            outcome: _Outcome
            if fut.done():  # read-only peek; the loop owns the future
                outcome = (fut, False, None, timer)  # ended before it started: nothing to run
            else:
                try:
                    outcome = (fut, True, fn(*args), timer)
                except BaseException as exc:
                    outcome = (fut, False, exc, timer)
            done.append(outcome)
            del entry, fut, fn, args, outcome, timer  # no reference to a job's data while idle
            if not self._wake_scheduled:
                with self._lock:
                    if not self._wake_scheduled:
                        self._wake_scheduled = True
                        loop = self._loop
                        if loop is None:  # unreachable: submit() sets it before queueing
                            raise RuntimeError("SlotPool ran a job submitted off a loop")
                        try:
                            loop.call_soon_threadsafe(self._deliver)
                        except RuntimeError:  # the loop is closed: nobody is waiting
                            return

    def _deliver(self) -> None:
        # Reset before draining: a thread that finishes after this line schedules a new call.
        with self._lock:
            self._wake_scheduled = False
        done = self._done
        while done:
            fut, ok, value, timer = done.popleft()
            self.busy -= 1
            self._unreturned.discard(fut)
            if timer is not None:
                timer.cancel()
            if fut.done():  # it ended without us: timed out, or the worker is draining
                if self.on_release is not None:
                    self.on_release(fut)
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(future_exception(value))

    def shutdown(self) -> None:
        """Cancel jobs not started yet and let the threads end after their current job."""
        self._closed = True
        while True:
            try:
                entry = self._jobs.get_nowait()
            except queue.Empty:
                break
            if entry is not None:
                self.busy -= 1
                self._unreturned.discard(entry[0])
                entry[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)
