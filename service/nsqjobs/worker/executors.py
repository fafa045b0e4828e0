"""Where tasks run: threads (:class:`ThreadExecutor`) or spawned child processes.

Both hand back an asyncio future per job. The process executor replaces its pool when a child
dies (crash, OOM kill), so one bad job does not stop the worker.
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

import msgspec

from nsqjobs.config import WorkerConfig
from nsqjobs.errors import ResultNotEncodable
from nsqjobs.registry import Task, load_task_modules, registry
from nsqjobs.worker.slots import SlotPool


class Executor(Protocol):
    """Runs a task's function on validated arguments, off the event loop."""

    async def start(self) -> None:
        """Get ready to run jobs at once (start processes, warm up)."""

    def run(self, task: Task, args: dict[str, Any]) -> asyncio.Future[Any]:
        """Run ``task`` on ``args``; the future holds the result or the exception."""

    def shutdown(self) -> None:
        """Cancel what has not started; do not wait for what runs."""


class ThreadExecutor:
    """Tasks on a :class:`SlotPool`'s threads: the cheapest way for the GIL-releasing kernels."""

    def __init__(self, size: int) -> None:
        self.pool = SlotPool(size)

    async def start(self) -> None:
        """Nothing to start: the threads are running."""

    def run(self, task: Task, args: dict[str, Any]) -> asyncio.Future[Any]:
        """Run ``task.run(args)`` on a free thread."""
        return self.pool.submit(task.run, args)

    def shutdown(self) -> None:
        """Cancel queued jobs; threads end after their current job."""
        self.pool.shutdown()


def _child_init(modules: tuple[str, ...]) -> None:
    # Children ignore Ctrl-C: the parent decides what happens to running jobs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    load_task_modules(modules)
    for task in registry:
        if task.warm_up is not None:
            task.warm_up()


def _run_in_child(name: str, args: dict[str, Any]) -> Any:
    result = registry.get(name).run(args)
    try:
        return msgspec.to_builtins(result)
    except Exception as exc:  # not plain data: it could not cross the pipe either
        raise ResultNotEncodable(f"result of type {type(result).__name__}: {exc}") from None


class ProcessExecutor:
    """Tasks in spawned child processes (``size`` of them), each with the task modules loaded."""

    def __init__(self, size: int, task_modules: tuple[str, ...]) -> None:
        self.size = size
        self.task_modules = task_modules
        self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self.size,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_child_init,
            initargs=(self.task_modules,),
        )

    async def start(self) -> None:
        """Start the children (and their warm-up) now rather than on the first job."""
        await asyncio.gather(
            *(asyncio.wrap_future(self.pool.submit(time.sleep, 0)) for _ in range(self.size))
        )

    def run(self, task: Task, args: dict[str, Any]) -> asyncio.Future[Any]:
        """Run the task in a child; only its name and the arguments cross the pipe."""
        pool = self.pool
        ran = asyncio.get_running_loop().run_in_executor(pool, _run_in_child, task.name, args)
        # Added before the job's own callback, so the pool is renewed before the job fails.
        ran.add_done_callback(functools.partial(self._check, pool))
        return ran

    def _check(self, pool: ProcessPoolExecutor, ran: asyncio.Future[Any]) -> None:
        if ran.cancelled() or pool is not self.pool:
            return
        if isinstance(ran.exception(), BrokenProcessPool):
            # A child died: every job of that pool fails with it; start a new pool, once.
            pool.shutdown(wait=False, cancel_futures=True)
            self.pool = self._new_pool()

    def shutdown(self) -> None:
        """Cancel queued jobs and terminate the children (their jobs were requeued)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        for child in multiprocessing.active_children():
            child.terminate()


def make_executor(config: WorkerConfig) -> ThreadExecutor | ProcessExecutor:
    """The executor ``config`` asks for, with ``config.concurrency`` slots."""
    if config.executor == "process":
        return ProcessExecutor(config.concurrency, config.task_module)
    return ThreadExecutor(config.concurrency)
