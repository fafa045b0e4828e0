"""The ``nsq`` rung: the same tasks, run by the service's workers through the gateway.

Jobs are submitted with the sync :class:`~nsqjobs.client.Client` in the caller (so a task or
argument the gateway refuses raises there, as on every rung); their futures are resolved by one
background thread that long-polls ``POST /v1/jobs/wait`` for many ids at once, never a request
per job.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

from nsqjobs.api import JobOutcome
from nsqjobs.client import AsyncClient, Client, GatewayError
from nsqjobs.client.core import LONG_POLL_S, outcome_value, unknown_job
from nsqjobs.errors import TaskFailed
from nsqjobs.ladder.base import TaskExecutor, mark_running, prepare, settle
from nsqjobs.names import BUILTIN_TASK_MODULE, MAX_WAIT_IDS
from nsqjobs.registry import Task

log = logging.getLogger("nsqjobs.ladder")

# Long polls open at once: a job submitted while they are all open waits for one to end.
MAX_OPEN_WAITS: Final = 4
# After a long poll that the gateway did not answer (past the client's retries), its ids are
# asked about again this much later.
RETRY_AFTER_S: Final = 1.0
# A job submitted while a long poll is open waits this long at most for it to end (and take the
# new ids with it) before another poll opens: jobs submitted in a burst share polls.
COALESCE_S: Final = 0.02


class _Waiter:
    """The background thread: an event loop whose long polls resolve the futures."""

    def __init__(self, client: Client, long_poll_s: float) -> None:
        self._long_poll_s = long_poll_s
        self._loop = asyncio.new_event_loop()
        self._async = AsyncClient(
            client.url,
            client.token,
            timeout_s=client.timeout_s,
            retry=client.retry,
            max_connections=MAX_OPEN_WAITS,
            long_poll_s=long_poll_s,
        )
        self._stop = asyncio.Event()
        # The loop's own: futures by job id, ids in no open long poll, the open long polls.
        self._futures: dict[str, concurrent.futures.Future[Any]] = {}
        self._fresh: list[str] = []
        self._open: set[asyncio.Task[None]] = set()
        self._opened_at = 0.0  # loop time of the latest long poll
        self._later: asyncio.TimerHandle | None = None
        self._thread = threading.Thread(target=self._run, name="nsqjobs-nsq-waiter", daemon=True)
        self._thread.start()

    def add(self, job_id: str, future: concurrent.futures.Future[Any]) -> None:
        """Resolve ``future`` with the outcome of ``job_id``."""
        self._loop.call_soon_threadsafe(self._add, job_id, future)
        future.add_done_callback(functools.partial(self._done, job_id))

    def stop_soon(self) -> None:
        """Ask the thread to stop, without waiting (from any thread, the collector's too)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed already
            self._loop.call_soon_threadsafe(self._stop.set)

    def close(self) -> None:
        """Stop the thread (a future still open stays unresolved: cancel it first)."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()

    def _done(self, job_id: str, future: concurrent.futures.Future[Any]) -> None:
        if future.cancelled():  # by its owner, or by shutdown: stop waiting for it
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing waits
                self._loop.call_soon_threadsafe(self._resolve, job_id, None, None)

    # -- on the background thread ----------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        await self._stop.wait()
        for task in list(self._open):
            task.cancel()
        await asyncio.gather(*self._open, return_exceptions=True)
        await self._async.aclose()

    def _add(self, job_id: str, future: concurrent.futures.Future[Any]) -> None:
        self._futures[job_id] = future
        self._fresh.append(job_id)
        self._kick()

    def _kick(self) -> None:
        """Open a long poll for the ids in none: at once when none is open, else once the
        newest is ``COALESCE_S`` old (if it has not ended by then, taking them along)."""
        if not self._fresh or self._stop.is_set():
            return
        now = self._loop.time()
        due = self._opened_at + COALESCE_S
        if self._open and (now < due or len(self._open) >= MAX_OPEN_WAITS):
            if self._later is None and len(self._open) < MAX_OPEN_WAITS:
                self._later = self._loop.call_at(due, self._kick_later)
            return
        ids = self._fresh[:MAX_WAIT_IDS]
        del self._fresh[: len(ids)]
        self._opened_at = now
        self._open.add(self._loop.create_task(self._wait(ids)))
        self._kick()  # more than one poll's worth of ids

    def _kick_later(self) -> None:
        self._later = None
        self._kick()

    async def _wait(self, ids: list[str]) -> None:
        try:
            answer = await self._async.wait(ids, timeout=self._long_poll_s, return_when="first")
        except GatewayError as exc:
            if exc.retryable and not self._stop.is_set():
                # The gateway is away (or busy) for longer than one poll's retries: the jobs
                # run on, so their futures wait on; these ids are asked about again shortly.
                log.warning("nsq executor: cannot ask about %d job(s) now: %s", len(ids), exc)
                await asyncio.sleep(RETRY_AFTER_S)
                self._fresh += [i for i in ids if i in self._futures]
            else:  # refused for good (401, 403...): these jobs cannot be told
                for job_id in ids:
                    self._resolve(job_id, None, exc)
        except Exception as exc:  # a bug, not the gateway: no future may hang for ever
            for job_id in ids:
                self._resolve(job_id, None, exc)
        else:
            for outcome in answer.done:
                self._resolve(outcome.id, outcome, None)
            for job_id in answer.unknown:
                self._resolve(job_id, None, unknown_job(job_id))
            self._fresh += [i for i in answer.pending if i in self._futures]
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._open.discard(task)
            self._kick()

    def _resolve(
        self, job_id: str, outcome: JobOutcome | None, error: BaseException | None
    ) -> None:
        """Settle the future of ``job_id`` (a cancelled one is only forgotten)."""
        future = self._futures.pop(job_id, None)
        if future is None or future.done():  # a cancelled one was notified when cancelled
            return
        if mark_running(future):  # else cancelled by the caller (and notified already)
            if outcome is not None:
                try:
                    settle(future, outcome_value(outcome))
                except TaskFailed as exc:
                    settle(future, exc=exc)
            else:
                settle(future, exc=error or RuntimeError(f"job {job_id}: no outcome"))


def _abandon(waiter: _Waiter, client: Client | None) -> None:
    waiter.stop_soon()
    if client is not None:
        client.close()


class NsqExecutor(TaskExecutor):
    """Tasks run by the service: submitted to the gateway at ``url`` (or ``client``'s), their
    outcomes awaited in long polls of many ids by one background thread.

    ``workers``: how many jobs the service runs at once (sets the default ``max_in_flight`` of
    :meth:`map`, twice that); ``timeout_s``: how long each HTTP request may take (plus its long
    poll). A task registered in this process is validated here before it is sent; any other is
    validated by the gateway, whose refusals raise the client's ``UnknownTask`` and
    ``InvalidArguments`` (subclasses of ``UnknownTaskError`` and ``InvalidArgumentsError``).
    """

    kind = "nsq"
    # map's window is topped up in batches (one POST /v1/jobs/batch each) once half of it
    # has been yielded, rather than a request per job.
    refill_share = 0.5

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        client: Client | None = None,
        max_in_flight: int | None = None,
        timeout_s: float = 30.0,
        workers: int | None = None,
        task_modules: Sequence[str] = (BUILTIN_TASK_MODULE,),
        long_poll_s: float = LONG_POLL_S,
    ) -> None:
        default = os.cpu_count() or 2
        super().__init__(workers=default if workers is None else workers, task_modules=task_modules)
        self._own_client = client is None
        self.client = client or Client(url, token, timeout_s=timeout_s)
        self.max_in_flight = max_in_flight
        self._waiter = _Waiter(self.client, long_poll_s)
        # Dropped without shutdown (garbage-collected): its thread, loop and connections end.
        self._finalizer = weakref.finalize(
            self, _abandon, self._waiter, self.client if self._own_client else None
        )

    def prepare(self, task: str | Task, args: Any) -> tuple[Task | str, Any]:
        """Validate locally when the task is registered here; else the gateway validates the
        arguments (a JSON object is checked here: the same errors as on every rung)."""
        return prepare(task, args, accept_unknown=True)

    def _dispatch(self, task: Task | str, plain_args: Any) -> concurrent.futures.Future[Any]:
        name = task if isinstance(task, str) else task.name
        job = self.client.submit(name, plain_args)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._waiter.add(job.id, future)
        return future

    def _submit_all(
        self, task: str | Task, args: list[Any]
    ) -> list[concurrent.futures.Future[Any]]:
        """Validate every job here, then submit them in one batch request (a few, past the
        batch route's 1000); their futures, in order."""
        if not args:
            return []
        prepared = [self.prepare(task, a) for a in args]
        name = task if isinstance(task, str) else task.name
        futures: list[concurrent.futures.Future[Any]] = []
        with self.sending():  # as submit(): no job is sent after shutdown
            jobs = self.client.submit_many(name, [plain for _, plain in prepared])
            for job in jobs:
                future: concurrent.futures.Future[Any] = concurrent.futures.Future()
                self._waiter.add(job.id, future)
                with self._lock:
                    self._track(future)
                futures.append(future)
        return futures

    def map(  # type: ignore[override]
        self,
        task: str | Task,
        iterable_of_args: Iterable[Any],
        *,
        timeout: float | None = None,
        max_in_flight: int | None = None,
    ) -> Iterator[Any]:
        """Results in input order (see :meth:`TaskExecutor.map`)."""
        window = max_in_flight if max_in_flight is not None else self.max_in_flight
        if window is None:
            window = 2 * self.workers
        return super().map(task, iterable_of_args, timeout=timeout, max_in_flight=window)

    def _close(self) -> None:
        """Every future has ended (resolved, or cancelled by ``shutdown(cancel_futures=True)``:
        their jobs still run; ``Job.cancel`` cancels a job): stop the waiting thread."""
        self._finalizer.detach()
        self._waiter.close()
        if self._own_client:
            self.client.close()
