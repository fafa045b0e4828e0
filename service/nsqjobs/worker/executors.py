"""Where tasks run: threads (:class:`ThreadExecutor`) or child processes (:class:`ProcessExecutor`).

Both hand back an asyncio future per job, which fails with :class:`TaskTimeoutError` when the job
runs past its time limit, counted from the moment it starts. They differ in what happens then:
a thread cannot be stopped, so it keeps its slot until the call returns (``on_release`` says when);
a child process is killed and replaced at once, so the limit is hard, also for native code.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Final, Protocol

import msgspec

from nsqjobs import wire
from nsqjobs.config import WorkerConfig
from nsqjobs.errors import JobCancelled, ResultNotEncodable, TaskTimeoutError
from nsqjobs.registry import Task, load_task_modules, registry, task_modules
from nsqjobs.worker.slots import SlotPool, future_exception

log = logging.getLogger("nsqjobs.worker")

Release = Callable[[asyncio.Future[Any]], None]


class Executor(Protocol):
    """Runs a task's function on validated arguments, off the event loop."""

    # Called with a job's future when a slot held past that future's end frees (a timed-out
    # thread returning); None: no slot ever outlives its job's future.
    on_release: Release | None
    reports_start: bool

    async def start(self) -> None:
        """Get ready to run jobs at once (start processes, warm up)."""

    def run(
        self,
        task: Task,
        args: dict[str, Any],
        limit_s: float,
        started: Callable[[], None] | None = None,
    ) -> asyncio.Future[Any]:
        """Run ``task`` on ``args``; the future holds the result or the exception.

        ``started`` is called when the job really starts, if the executor ever makes it wait
        (``reports_start``); the time limit counts from then.
        """

    def idle(self) -> int:
        """Slots free to take a job now (the worker submits no more than this)."""

    def holds(self, ran: asyncio.Future[Any]) -> bool:
        """Whether the job of ``ran`` (already ended) still occupies a slot."""

    def cancel(self, ran: asyncio.Future[Any]) -> bool:
        """Stop the job of ``ran`` now, failing it with :class:`JobCancelled`; False when the
        executor cannot stop a running job (a thread runs on to its end)."""

    def shutdown(self) -> None:
        """Cancel what has not started; do not wait for what runs."""


class ThreadExecutor:
    """Tasks on a :class:`SlotPool`'s threads: the cheapest way for the GIL-releasing kernels.

    A job past its time limit fails at once, but its thread runs on until the call returns, and
    its slot is busy until then (:meth:`idle` does not count it).
    """

    def __init__(self, size: int) -> None:
        self.pool = SlotPool(size)
        self.on_release: Release | None = None
        self.pool.on_release = self._released

    async def start(self) -> None:
        """Nothing to start: the threads are running."""

    reports_start = False  # the worker submits only when a thread is free: it starts at once

    def run(
        self,
        task: Task,
        args: dict[str, Any],
        limit_s: float,
        started: Callable[[], None] | None = None,
    ) -> asyncio.Future[Any]:
        """Run ``task.run(args)`` on a free thread (the worker submits only when one is)."""
        return self.pool.submit(task.run, args, limit_s=limit_s)

    def idle(self) -> int:
        """Threads not running anything, a timed-out job's included."""
        return self.pool.idle()

    def holds(self, ran: asyncio.Future[Any]) -> bool:
        """A timed-out job's thread is busy until its call returns: asked of the pool, which
        knows. (Judged from the future's error instead, a thread that returned in the same
        loop turn as its time limit fired, its release handled first, was counted as running
        for ever: one slot lost for good.)"""
        return self.pool.occupies(ran)

    def cancel(self, ran: asyncio.Future[Any]) -> bool:
        """A thread cannot be stopped: the job runs on to its end."""
        return False

    def _released(self, ran: asyncio.Future[Any]) -> None:
        if self.on_release is not None:
            self.on_release(ran)

    def shutdown(self) -> None:
        """Cancel queued jobs; threads end after their current job."""
        self.pool.shutdown()


# -- child processes ---------------------------------------------------------------------------


_PR_SET_PDEATHSIG: Final = 1  # linux/prctl.h


def _die_with(parent: int) -> None:
    """Linux: SIGKILL this process when the worker that started it dies, however it dies
    (SIGKILL, the OOM killer, a second SIGTERM's immediate exit): no child outlives it."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        except (OSError, AttributeError) as exc:  # not glibc or musl as expected: go on
            log.warning("child: cannot ask to die with the worker: %s", exc)
    if os.getppid() != parent:  # the worker died before the line above took effect
        os._exit(0)


def _kill(process: Any) -> None:
    """SIGKILL a child and its process group: the subprocesses its task started end too. A
    child that has not made its group yet (it does first thing) is killed alone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.kill()


def _exit_status(code: int | None) -> str:
    """A child's exit as a log says it: ``exit code 70``, ``killed by SIGSEGV``."""
    if code is None:
        return "its pipe closed, the process still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


def _forget_exit(loop: asyncio.AbstractEventLoop, child: _Child) -> None:
    if child.exited is not None:
        loop.remove_reader(child.exited)
        os.close(child.exited)
        child.exited = None


def _child_main(
    conn: multiprocessing.connection.Connection, modules: tuple[str, ...], parent: int
) -> None:
    # A process group of its own, which the worker kills at a time limit or a cancel (a
    # task's subprocesses end with its child), and death with the worker.
    os.setsid()
    _die_with(parent)
    # Children ignore Ctrl-C: the parent decides what happens to running jobs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    load_task_modules(modules)
    for task in registry:
        if task.warm_up is not None:
            task.warm_up()
    conn.send(("ready", None))
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        name, args = item
        reply: tuple[str, Any]
        try:
            reply = ("ok", _run_in_child(name, args))
        except Exception as exc:
            reply = ("error", exc)
        except BaseException as exc:  # sys.exit() in a task: a failed job, not the child's end
            reply = ("error", RuntimeError(f"task raised {exc!r}"))
        try:
            conn.send(reply)
        except Exception as exc:  # the exception does not pickle: describe it
            error = wire.ErrorInfo.from_exception(reply[1])
            conn.send(("error", RuntimeError(f"{error.type}: {error.message} ({exc})")))


def _run_in_child(name: str, args: dict[str, Any]) -> Any:
    result = registry.get(name).run(args)
    try:
        return msgspec.to_builtins(result)
    except Exception as exc:  # not plain data: it could not cross the pipe either
        raise ResultNotEncodable(f"result of type {type(result).__name__}: {exc}") from None


class _Queued:
    __slots__ = ("args", "fut", "limit_s", "name", "started")

    def __init__(
        self,
        name: str,
        args: dict[str, Any],
        limit_s: float,
        fut: asyncio.Future[Any],
        started: Callable[[], None] | None,
    ) -> None:
        self.name, self.args, self.limit_s, self.fut, self.started = (
            name,
            args,
            limit_s,
            fut,
            started,
        )


class _Child:
    """One child process, its end of the pipe, the job it runs, and (Linux) a pidfd that turns
    readable when it exits."""

    __slots__ = ("conn", "exited", "job", "process", "ready", "timer")

    def __init__(
        self, process: Any, conn: multiprocessing.connection.Connection, ready: asyncio.Future[None]
    ) -> None:
        self.process = process
        self.conn = conn
        self.ready = ready
        self.job: _Queued | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.exited: int | None = None


class ProcessExecutor:
    """Tasks in ``size`` spawned child processes, one job each at a time.

    A job past its time limit gets its child killed (SIGKILL: native code that never returns to
    Python stops too) and a new child started; a child that dies fails its job with
    :class:`BrokenProcessPool` and is replaced. Only a task name and the arguments cross the pipe.
    """

    on_release: Release | None = None  # a slot never outlives its job: the child is killed
    reports_start = True  # a job may wait for a replacement child to start

    def __init__(self, size: int, task_modules: tuple[str, ...]) -> None:
        self.size = size
        self.task_modules = task_modules
        self.busy = 0
        self.children: list[_Child] = []
        self.queue: collections.deque[_Queued] = collections.deque()
        self._closed = False
        self._started = False
        self._ctx = multiprocessing.get_context("spawn")

    async def start(self) -> None:
        """Start the children (and their warm-up) now rather than on the first job."""
        for _ in range(self.size):
            self._spawn()
        await asyncio.gather(*(child.ready for child in self.children))
        self._started = True

    def _spawn(self) -> _Child:
        loop = asyncio.get_running_loop()
        ours, theirs = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_child_main, args=(theirs, self.task_modules, os.getpid()), daemon=True
        )
        process.start()
        theirs.close()
        child = _Child(process, ours, loop.create_future())
        self.children.append(child)
        loop.add_reader(ours.fileno(), self._readable, child)
        # uvloop (libuv) makes a watched fd non-blocking; Connection.recv() and send() expect a
        # blocking one: a frame larger than the socket's buffer would fail half-read or
        # half-written (EAGAIN), read as a dead child and a corrupted pipe.
        os.set_blocking(ours.fileno(), True)
        # Its death, seen even while a process its task forked keeps the pipe open (no EOF).
        with contextlib.suppress(AttributeError, OSError):  # no pidfd here: the pipe's EOF
            child.exited = os.pidfd_open(process.pid or 0)  # a started process has a pid
            loop.add_reader(child.exited, self._died, child)
        return child

    def _died(self, child: _Child) -> None:
        if child in self.children:
            self._replace(child, None)

    def run(
        self,
        task: Task,
        args: dict[str, Any],
        limit_s: float,
        started: Callable[[], None] | None = None,
    ) -> asyncio.Future[Any]:
        """Run the task in a child; its time limit starts when a child takes it."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.busy += 1
        self.queue.append(_Queued(task.name, args, limit_s, fut, started))
        self._dispatch()
        return fut

    def idle(self) -> int:
        """Slots free: a child being replaced counts, since a job waits only for its start."""
        return self.size - self.busy

    def holds(self, ran: asyncio.Future[Any]) -> bool:
        """Never: an overrunning child is killed with its job."""
        return False

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        for child in self.children:
            if not self.queue:
                return
            if child.job is not None or not child.ready.done() or child.ready.exception():
                continue
            job = self.queue.popleft()
            if job.fut.done():  # cancelled while queued (drain)
                self.busy -= 1
                continue
            child.job = job
            try:
                child.conn.send((job.name, job.args))
            except Exception as exc:  # a dead child (its EOF comes next) or unpicklable args
                child.job = None
                self._end(job, exc=RuntimeError(f"could not hand the job to a child: {exc}"))
                continue
            child.timer = loop.call_later(job.limit_s, self._overrun, child)
            if job.started is not None:
                job.started()

    def cancel(self, ran: asyncio.Future[Any]) -> bool:
        """Kill the child running the job of ``ran`` (SIGKILL, as at the time limit) and start
        another; a job still queued for a child is dropped. The future fails with
        :class:`JobCancelled`."""
        cancelled = JobCancelled("cancelled while running: its child process was killed")
        for child in self.children:
            job = child.job
            if job is not None and job.fut is ran:
                log.info("a running job was cancelled: killing its child process")
                _kill(child.process)
                child.job = None
                self._end(job, exc=cancelled)
                self._replace(child, "killed: its job was cancelled")
                return True
        for job in self.queue:
            if job.fut is ran:
                self.queue.remove(job)
                self._end(job, exc=cancelled)
                return True
        return False

    def _readable(self, child: _Child) -> None:
        if child not in self.children:  # replaced in this loop turn (its exit was seen first)
            return
        try:
            kind, value = child.conn.recv()
        except (EOFError, OSError):
            self._replace(child, None)  # its exit status, once joined
            return
        except Exception as exc:  # the child's answer does not unpickle here
            kind, value = "error", RuntimeError(f"could not read the task's outcome: {exc}")
        if kind == "ready":
            if not child.ready.done():
                child.ready.set_result(None)
            self._dispatch()
            return
        job, child.job = child.job, None
        if child.timer is not None:
            child.timer.cancel()
            child.timer = None
        if job is not None:
            if kind == "ok":
                self._end(job, result=value)
            else:
                self._end(job, exc=value)
        self._dispatch()

    def _end(self, job: _Queued, *, result: Any = None, exc: BaseException | None = None) -> None:
        self.busy -= 1
        if job.fut.done():
            return
        if exc is None:
            job.fut.set_result(result)
        else:
            job.fut.set_exception(future_exception(exc))

    def _overrun(self, child: _Child) -> None:
        job = child.job
        child.timer = None
        if job is None:
            return
        log.warning("a job ran past its %gs time limit: killing its child process", job.limit_s)
        _kill(child.process)
        child.job = None
        self._end(job, exc=TaskTimeoutError(f"ran past its {job.limit_s:g}s time limit"))
        self._replace(child, "killed at the time limit")

    def _replace(self, child: _Child, why: str | None) -> None:
        """Forget a child that died or was killed (``why``; None: say its exit status) and
        start another; its job, if any, fails with :class:`BrokenProcessPool`."""
        loop = asyncio.get_running_loop()
        loop.remove_reader(child.conn.fileno())
        child.conn.close()
        _forget_exit(loop, child)
        if child.timer is not None:
            child.timer.cancel()
            child.timer = None
        self.children.remove(child)
        child.process.join(timeout=1)
        if why is None:
            why = _exit_status(child.process.exitcode)
        # What its task started dies with it (a dead child's group may live on).
        _kill(child.process)
        job, child.job = child.job, None
        if job is not None:
            self._end(job, exc=BrokenProcessPool(f"the child process running the job died ({why})"))
        if not child.ready.done():  # it died starting: start() reports it, or we try again
            child.ready.set_exception(RuntimeError(f"a task child process died starting ({why})"))
            child.ready.exception()  # retrieved
            if self._started and not self._closed:
                log.error("a task child process died starting (%s); another in 1s", why)
                loop.call_later(1.0, self._respawn)
            return
        if not self._closed:
            self._spawn()

    def _respawn(self) -> None:
        if not self._closed:
            self._spawn()

    def shutdown(self) -> None:
        """Fail queued jobs and kill the children (their jobs were requeued)."""
        self._closed = True
        while self.queue:
            job = self.queue.popleft()
            job.fut.cancel()
        loop = asyncio.get_event_loop()
        for child in list(self.children):
            loop.remove_reader(child.conn.fileno())
            _forget_exit(loop, child)
            if child.timer is not None:
                child.timer.cancel()
            _kill(child.process)
            child.conn.close()
        for child in self.children:
            child.process.join(timeout=2)
        self.children.clear()


def make_executor(config: WorkerConfig) -> ThreadExecutor | ProcessExecutor:
    """The executor ``config`` asks for, with ``config.concurrency`` slots."""
    if config.executor == "process":
        modules = task_modules(config.task_module, debug=config.debug_tasks)
        return ProcessExecutor(config.concurrency, tuple(modules))
    return ThreadExecutor(config.concurrency)
