"""What every rung of the ladder shares: validation in the caller, results as the worker would
publish them, ``TaskFailed`` for every failure, and ``submit``/``map``/``shutdown``.

A rung (inline, processes, ipyparallel, nsq) subclasses :class:`TaskExecutor` and implements
``_dispatch`` (start one validated job, return its future) and ``_close`` (free what it holds).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import msgspec

from nsqjobs import wire
from nsqjobs.errors import InvalidArgumentsError, ResultNotEncodable, TaskFailed
from nsqjobs.names import BUILTIN_TASK_MODULE
from nsqjobs.registry import Registry, Task, field_error, load_task_modules, registry

DEFAULT_TASK_MODULES: tuple[str, ...] = (BUILTIN_TASK_MODULE,)


def normalise(result: Any) -> Any:
    """``result`` as the NSQ rung hands it back: JSON-encoded with the encoder the worker's
    result envelopes use, then decoded (a tuple becomes a list, a dict's int keys strings...).

    Raises :class:`ResultNotEncodable` for a value JSON cannot hold, as the worker does.
    """
    try:
        return msgspec.json.decode(wire.encode_value(result))
    except Exception as exc:  # msgspec: unsupported type, int out of range, nan...
        raise ResultNotEncodable(f"result of type {type(result).__name__}: {exc}") from None


def prepare(
    task: str | Task,
    args: Any,
    *,
    accept_unknown: bool = False,
    tasks: Registry = registry,
) -> tuple[Task | str, dict[str, Any]]:
    """Validate a job in the caller, as the gateway does: the task (by name from ``tasks``, or
    given), then its arguments. Returns the task and the arguments as plain JSON data.

    ``args`` may be plain data or the task's typed arguments (a ``msgspec.Struct``); None is
    ``{}``. Raises :class:`UnknownTaskError` / :class:`InvalidArgumentsError` before anything is
    dispatched. ``accept_unknown``: a name not registered here comes back as the name, its
    arguments unchecked (the nsq rung leaves those to the gateway).
    """
    try:
        plain = {} if args is None else msgspec.json.decode(wire.encode_value(args))
    except Exception as exc:
        raise InvalidArgumentsError([field_error(f"not JSON data: {exc}", "args")]) from None
    if not isinstance(plain, dict):
        message = f"Expected `object`, got `{type(plain).__name__}`"
        raise InvalidArgumentsError([field_error(message, "args")])
    if isinstance(task, Task):
        found = task
    elif not isinstance(task, str):
        raise TypeError(f"a task is its name or a registered Task, not {type(task).__name__}")
    elif accept_unknown and task not in tasks:
        return task, plain
    else:
        found = tasks.get(task)
    try:
        found.validate(plain)
    except InvalidArgumentsError:
        # Imported here: the gateway's module pulls tornado, which only this path needs.
        from nsqjobs.gateway.bodies import integral_floats

        # 1547.0 where the schema says integer is an integer, as the gateway takes it.
        fixed = integral_floats(plain)
        if fixed is plain:
            raise
        found.validate(fixed)
        plain = fixed
    return found, plain


def registered(task: Task | str) -> Task:
    """The task itself: a rung that runs tasks locally only ever gets registered ones."""
    return task if isinstance(task, Task) else registry.get(task)


def task_failed(
    exc: BaseException, status: str = "failed", job_id: str | None = None
) -> TaskFailed:
    """The :class:`TaskFailed` for ``exc`` (type name and message as the worker records them),
    with ``exc`` as its ``__cause__``."""
    info = wire.ErrorInfo.from_exception(exc)
    failed = TaskFailed(info.type, info.message, job_id=job_id, status=status)
    failed.__cause__ = exc
    return failed


def settle(
    fut: concurrent.futures.Future[Any],
    result: Any = None,
    exc: BaseException | None = None,
) -> None:
    """End ``fut`` with ``result`` or ``exc``, unless it already ended (cancelled by the caller:
    what the job did is dropped)."""
    try:
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)
    except concurrent.futures.InvalidStateError:
        pass


def mark_running(fut: concurrent.futures.Future[Any]) -> bool:
    """Mark ``fut`` running as its job starts (``cancel()`` then fails, as with the stdlib's
    executors); False when it was cancelled first: the job's outcome will be dropped."""
    try:
        return fut.set_running_or_notify_cancel()
    except RuntimeError:  # already notified of its cancellation, or ended
        return False


class TaskExecutor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` for registered tasks: ``submit(task, args)`` rather
    than ``submit(fn, *args)``.

    ``task_modules`` are loaded here too, so the caller validates what the workers will run.
    Every future fails with :class:`TaskFailed` when its job ends without a result.
    """

    kind: ClassVar[str] = "?"
    # ``map`` tops its window up when it has fallen to this share of ``max_in_flight`` (1.0:
    # after every result). A rung whose submissions cost less in batches (nsq: one request for
    # many jobs) tops up less often, with more jobs each time (:meth:`_submit_all`).
    refill_share: ClassVar[float] = 1.0

    def __init__(
        self, workers: int | None = None, *, task_modules: Sequence[str] = DEFAULT_TASK_MODULES
    ) -> None:
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be a whole number >= 1, got {workers!r}")
        self._workers = workers or os.cpu_count() or 1
        self.task_modules = tuple(task_modules)
        load_task_modules(self.task_modules)
        # Reentrant: a future that ends while a thread holds it runs _forget() at once. Never
        # held while a job is sent (an HTTP request, for nsq, may take its retries): a rung's
        # own thread takes it as each future ends.
        self._lock = threading.RLock()
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._shut = False
        self._sending = 0  # submits past the shutdown check, their jobs not yet tracked
        self._sent = threading.Condition(self._lock)
        self._closed = threading.Event()  # set once shutdown freed the rung's resources

    @property
    def workers(self) -> int:
        """How many jobs run at once (processes, engines, worker slots)."""
        return self._workers

    # The stdlib's submit takes (fn, *args, **kwargs); a task executor takes a task and its
    # arguments: the signatures differ on purpose.
    def submit(  # type: ignore[override]
        self, task: str | Task, args: Any = None, /
    ) -> concurrent.futures.Future[Any]:
        """Validate now (raising Unknown/InvalidArguments here), then start the job; the future
        holds its result as the worker would publish it, or :class:`TaskFailed`."""
        found, plain = self.prepare(task, args)
        return self._send_prepared(found, plain)

    def _send_prepared(self, found: Task | str, plain: Any) -> concurrent.futures.Future[Any]:
        with self.sending():
            fut = self._dispatch(found, plain)
            with self._lock:
                self._track(fut)
        return fut

    @contextlib.contextmanager
    def sending(self) -> Iterator[None]:
        """Around sending jobs: refused after shutdown, and counted so that shutdown waits
        for their futures to be tracked; the lock is not held meanwhile."""
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new jobs after shutdown")
            self._sending += 1
        try:
            yield
        finally:
            with self._lock:
                self._sending -= 1
                if not self._sending:
                    self._sent.notify_all()

    def _submit_all(
        self, task: str | Task, args: list[Any]
    ) -> list[concurrent.futures.Future[Any]]:
        """:meth:`submit` for each of ``args`` (a rung may send them together), every one
        validated before the first is sent: a bad one raises with none of them running."""
        prepared = [self.prepare(task, a) for a in args]
        return [self._send_prepared(found, plain) for found, plain in prepared]

    def _track(self, fut: concurrent.futures.Future[Any]) -> None:
        """Count ``fut`` among the futures shutdown waits for (call with the lock held)."""
        if not fut.done():
            self._pending.add(fut)
            fut.add_done_callback(self._forget)

    def prepare(self, task: str | Task, args: Any) -> tuple[Task | str, dict[str, Any]]:
        """Validate one job in the caller (:func:`prepare`); the nsq rung overrides it to leave
        a task not registered here to the gateway."""
        return prepare(task, args)

    def _forget(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending.discard(fut)
        if fut.cancelled():
            mark_running(fut)  # tells concurrent.futures.wait() and as_completed() it ended

    def map(  # type: ignore[override]
        self,
        task: str | Task,
        iterable: Iterable[Any],
        *,
        timeout: float | None = None,
        max_in_flight: int | None = None,
    ) -> Iterator[Any]:
        """Results of ``task`` over ``iterable`` (one argument object each), in input order.

        At most ``max_in_flight`` jobs (default: 2 x workers) are submitted and not yet
        yielded; the first window is submitted now. ``timeout`` counts from this call for all
        of them. The first failure raises :class:`TaskFailed` when its turn comes; jobs not
        yet yielded are then cancelled where they have not started.
        """
        limit = 2 * self.workers if max_in_flight is None else max_in_flight
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_in_flight must be a whole number >= 1, got {limit!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        items = iter(iterable)
        window = collections.deque(self._submit_all(task, list(itertools.islice(items, limit))))
        return self._ordered(task, items, window, limit, deadline)

    def _ordered(
        self,
        task: str | Task,
        items: Iterator[Any],
        window: collections.deque[concurrent.futures.Future[Any]],
        limit: int,
        deadline: float | None,
    ) -> Iterator[Any]:
        low = limit - 1 if self.refill_share >= 1 else int(limit * self.refill_share)
        try:
            while window:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                result = window[0].result(left)
                window.popleft()
                yield result
                if len(window) <= low:
                    more = list(itertools.islice(items, limit - len(window)))
                    window.extend(self._submit_all(task, more))
        finally:
            for fut in window:
                fut.cancel()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new jobs; ``cancel_futures`` cancels those not yet ended; ``wait`` waits for the
        others, then frees the rung's resources (without ``wait``, a thread does that later)."""
        with self._lock:
            first = not self._shut
            self._shut = True
            while self._sending:  # jobs being sent now: their futures are waited for too
                self._sent.wait()
            pending = list(self._pending)
        if cancel_futures:
            for fut in pending:
                fut.cancel()
            self._cancelled(pending)
        if not first:
            if wait:  # an earlier shutdown(wait=False) is freeing the resources: wait for it
                self._closed.wait()
            return
        if wait:
            self._drain_and_close(pending)
        else:
            threading.Thread(
                target=self._drain_and_close, args=(pending,), name=f"{self.kind}-shutdown"
            ).start()

    def _drain_and_close(self, pending: list[concurrent.futures.Future[Any]]) -> None:
        try:
            concurrent.futures.wait(pending)
            self._close()
        finally:
            self._closed.set()

    def _dispatch(self, task: Task | str, args: dict[str, Any]) -> concurrent.futures.Future[Any]:
        """Start one validated job; the future ends as :meth:`submit` says."""
        raise NotImplementedError

    def _cancelled(self, futures: list[concurrent.futures.Future[Any]]) -> None:
        """Called by ``shutdown(cancel_futures=True)`` after cancelling ``futures``: a rung
        that can drop the jobs behind them does it here."""

    def _close(self) -> None:
        """Free what the rung holds (processes, a cluster, a connection): every job has ended."""

    def __repr__(self) -> str:
        state = "shut down" if self._shut else "running"
        return f"<{type(self).__name__} kind={self.kind} workers={self.workers} {state}>"
