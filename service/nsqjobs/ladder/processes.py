"""The second rung: a pool of local processes, the worker's own process executor.

Each child process loads the task modules and warms the kernels once, then runs one job at a
time; a job past its task's time limit has its child killed and replaced, and so has a child
that dies (its job fails with status ``lost``). The pool is the one ``nsqjobs worker
--executor process`` runs (``nsqjobs.worker.executors.ProcessExecutor``), driven from an event
loop on a thread of ours, so both behave the same.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from nsqjobs.errors import JobCancelled, TaskTimeoutError
from nsqjobs.ladder.base import (
    DEFAULT_TASK_MODULES,
    TaskExecutor,
    mark_running,
    normalise,
    registered,
    settle,
    task_failed,
)
from nsqjobs.registry import Task
from nsqjobs.worker.executors import ProcessExecutor


def _status(exc: BaseException) -> str:
    if isinstance(exc, TaskTimeoutError):
        return "timeout"
    if isinstance(exc, BrokenProcessPool):
        return "lost"  # the child running it died
    if isinstance(exc, JobCancelled):
        return "cancelled"
    return "failed"


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    """The loop's thread: run it until stopped, then close it (its sockets with it)."""
    try:
        loop.run_forever()
    finally:
        loop.close()


def _abandon(loop: asyncio.AbstractEventLoop, pool: ProcessExecutor) -> None:
    """An executor garbage-collected unclosed: kill its children, stop its loop's thread (from
    whatever thread the collector runs in: nothing here waits)."""
    for child in list(pool.children):
        with contextlib.suppress(Exception):
            child.process.kill()
    with contextlib.suppress(RuntimeError):  # the loop is closed already
        loop.call_soon_threadsafe(loop.stop)


def _started(fut: concurrent.futures.Future[Any]) -> None:
    # A child took the job: it can no longer be cancelled (if it was, its outcome is dropped,
    # and it was notified of its cancellation then: told twice, concurrent.futures logs it).
    if not fut.done():
        mark_running(fut)


class ProcessPoolExecutor(TaskExecutor):
    """Jobs on ``workers`` child processes (default: one per core), started and warmed up
    before the constructor returns (``start_timeout_s`` at most)."""

    kind = "processes"

    def __init__(
        self,
        workers: int | None = None,
        *,
        task_modules: Sequence[str] = DEFAULT_TASK_MODULES,
        start_timeout_s: float = 120.0,
    ) -> None:
        super().__init__(workers, task_modules=task_modules)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=_serve, args=(self._loop,), name="nsqjobs-processes", daemon=True
        )
        self._thread.start()
        self._pool = ProcessExecutor(self.workers, self.task_modules)
        # Dropped without shutdown (garbage-collected): its children and thread end too, as
        # a concurrent.futures pool's do.
        self._finalizer = weakref.finalize(self, _abandon, self._loop, self._pool)
        try:
            asyncio.run_coroutine_threadsafe(self._pool.start(), self._loop).result(start_timeout_s)
        except BaseException:
            self._close()
            raise

    def child_pids(self) -> list[int]:
        """The process ids of the children now running (for monitoring, and the tests)."""
        return [child.process.pid for child in list(self._pool.children)]

    def _dispatch(self, task: Task | str, args: dict[str, Any]) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._loop.call_soon_threadsafe(self._start, registered(task), args, fut)
        return fut

    def _start(self, task: Task, args: dict[str, Any], fut: concurrent.futures.Future[Any]) -> None:
        # On the loop's thread.
        if fut.done():  # cancelled before it got here
            return
        ran = self._pool.run(
            task, args, task.time_limit_s, started=functools.partial(_started, fut)
        )
        ran.add_done_callback(functools.partial(self._ran, fut))
        fut.add_done_callback(functools.partial(self._dropped, ran))

    def _dropped(self, ran: asyncio.Future[Any], fut: concurrent.futures.Future[Any]) -> None:
        # Cancelled while it waits for a child: the pool skips it (a running job runs on).
        if fut.cancelled():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing waits
                self._loop.call_soon_threadsafe(ran.cancel)

    def _ran(self, fut: concurrent.futures.Future[Any], ran: asyncio.Future[Any]) -> None:
        if ran.cancelled():
            fut.cancel()
            return
        exc = ran.exception()
        if exc is not None:
            settle(fut, exc=task_failed(exc, _status(exc)))
            return
        try:
            settle(fut, normalise(ran.result()))
        except Exception as encode_error:
            settle(fut, exc=task_failed(encode_error))

    def _close(self) -> None:
        self._finalizer.detach()
        if self._loop.is_closed():
            return
        if self._thread.is_alive():

            async def stop() -> None:
                self._pool.shutdown()

            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
        self._loop.close()
