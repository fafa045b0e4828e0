"""The worker: pynsq Readers -> executor -> result publish -> FIN.

The handler owns every response to nsqd itself (``enable_async``), so pynsq never requeues
silently or pauses the whole reader with backoff. A job is FINed only after nsqd acknowledged
its result; a retry republishes the envelope (with the attempt history) after a backoff delay.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import random
import signal
import time
from collections.abc import Coroutine
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import msgspec
import tornado.httpserver
import tornado.web
from prometheus_client import CollectorRegistry

from nsqjobs import wire
from nsqjobs.config import WorkerConfig, default_worker_id
from nsqjobs.errors import (
    DecodeError,
    PublishError,
    PublishRejected,
    Retry,
    TaskTimeoutError,
    UnknownTaskError,
)
from nsqjobs.names import (
    DEAD_LETTER_TOPIC,
    MAX_DELAY_MS,
    READER_OUTPUT_BUFFER_BYTES,
    READER_OUTPUT_BUFFER_TIMEOUT_MS,
    RESULTS_TOPIC,
    WORKER_OUTPUT_BUFFER_BYTES,
)
from nsqjobs.nsq.admin import create_topics
from nsqjobs.nsq.publisher import Publisher
from nsqjobs.nsq.reader import Reader, close_reader, connected_count, unflushed
from nsqjobs.observability.exposition import observability_routes
from nsqjobs.observability.metrics import WorkerMetrics
from nsqjobs.registry import Registry, Task, load_task_modules, registry
from nsqjobs.worker.slots import SlotPool

log = logging.getLogger("nsqjobs.worker")


def backoff_delay(attempt: int, base_s: float, cap_s: float) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, capped."""
    step = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    delay: float = step / 2 + random.uniform(0, step / 2)
    return delay


def _child_init(modules: tuple[str, ...]) -> None:
    # Children ignore Ctrl-C: the parent decides what happens to running jobs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    load_task_modules(modules)
    for task in registry:
        if task.warm_up is not None:
            task.warm_up()


def _run_in_child(name: str, args: dict[str, Any]) -> Any:
    return msgspec.to_builtins(registry.get(name).run(args))


class _Job:
    """A message this worker holds, and what is handling it now."""

    __slots__ = (
        "attempt",
        "done",
        "env",
        "executor",
        "handler",
        "max_attempts",
        "message",
        "ran",
        "running",
        "started",
        "t0",
        "task",
        "task_name",
        "timed_out",
        "timer",
    )

    def __init__(self, message: Any) -> None:
        self.message = message
        self.task_name = "-"
        self.task: Task | None = None
        self.env: wire.JobEnvelope | None = None
        self.attempt = 0
        self.max_attempts = 0
        self.started = 0.0
        self.t0 = 0.0
        self.executor: ProcessPoolExecutor | SlotPool | None = None
        # A coroutine for the rare paths (failures, retries, dead letters); None on success.
        self.handler: asyncio.Task[None] | None = None
        self.ran: asyncio.Future[Any] | None = None  # the executor's future while running
        self.timer: asyncio.TimerHandle | None = None
        self.timed_out = False
        self.running = False  # in the executor now (touched while so)
        self.done: asyncio.Future[None] | None = None  # made by drain() to wait for the end


class Worker:
    """Consumes every queue topic of its tasks and runs the jobs in an executor."""

    def __init__(
        self,
        config: WorkerConfig,
        tasks: Registry,
        metrics_registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.tasks = tasks
        self.worker_id = config.worker_id or default_worker_id()
        self.metrics = WorkerMetrics(metrics_registry or CollectorRegistry())
        self.publisher = Publisher(config.nsqd_tcp_address, metrics=self.metrics)
        self.executor = self._make_executor()
        self.readers: list[Any] = []
        self.held: dict[bytes, _Job] = {}
        self.accepting = False
        self.server: tornado.httpserver.HTTPServer | None = None
        self._toucher: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def _make_executor(self) -> ProcessPoolExecutor | SlotPool:
        if self.config.executor == "process":
            return ProcessPoolExecutor(
                self.config.concurrency,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_child_init,
                initargs=(self.config.task_module,),
            )
        return SlotPool(self.config.concurrency)

    def queues(self) -> list[str]:
        """The queue topics this worker consumes."""
        return list(self.config.queues) or self.tasks.queues()

    async def start(self) -> None:
        """Create topics, serve metrics, and subscribe (call :func:`warm_up` first)."""
        if isinstance(self.executor, ProcessPoolExecutor):
            # Start the children (and their warm-up) now rather than on the first job.
            await asyncio.gather(
                *(
                    asyncio.wrap_future(self.executor.submit(time.sleep, 0))
                    for _ in range(self.config.concurrency)
                )
            )
        queues = self.queues()
        for failure in await create_topics(
            self.config.nsqd_http_address, [*queues, RESULTS_TOPIC, DEAD_LETTER_TOPIC]
        ):
            log.warning("%s (continuing)", failure)
        app = tornado.web.Application(
            observability_routes(self.metrics.registry, self.ready_problems)
        )
        self.server = tornado.httpserver.HTTPServer(app)
        self.server.listen(self.config.port, self.config.host)
        lookupd = list(self.config.lookupd_http_address)
        self.accepting = True
        # One reader per queue; their RDY counts add up to the executor slots (at least 1 each).
        per_reader = max(1, self.config.concurrency // len(queues))
        buffering = self.config.delivery_buffer_ms
        for queue in queues:
            self.readers.append(
                Reader(
                    topic=queue,
                    channel=self.config.channel,
                    message_handler=self._on_message,
                    nsqd_tcp_addresses=None if lookupd else list(self.config.nsqd_tcp_address),
                    lookupd_http_addresses=lookupd or None,
                    lookupd_poll_interval=self.config.lookupd_poll_interval,
                    max_in_flight=per_reader,
                    max_tries=0,  # attempts are counted here, per task, not by pynsq
                    msg_timeout=self.config.msg_timeout_s,
                    # 0: nsqd sends each message at once (lowest latency); otherwise it batches
                    # deliveries for up to that long (more jobs per second).
                    output_buffer_size=(
                        WORKER_OUTPUT_BUFFER_BYTES if buffering else READER_OUTPUT_BUFFER_BYTES
                    ),
                    output_buffer_timeout=buffering or READER_OUTPUT_BUFFER_TIMEOUT_MS,
                )
            )
        self._toucher = asyncio.ensure_future(self._touch_running())
        log.info(
            "worker %s consuming %s on channel %s with %d %s slot(s); metrics on :%d",
            self.worker_id,
            ",".join(queues),
            self.config.channel,
            self.config.concurrency,
            self.config.executor,
            self.config.port,
        )

    def ready_problems(self) -> list[str]:
        """Empty when the worker can take and finish jobs."""
        problems = []
        if not self.publisher.connected():
            problems.append("no nsqd connection for publishing results")
        for reader in self.readers:
            if not connected_count(reader):
                problems.append(f"not connected to any nsqd for topic {reader.topic}")
        if not self.accepting:
            problems.append("not accepting jobs (starting or draining)")
        return problems

    async def drain(self) -> int:
        """SIGTERM: RDY 0, let running jobs finish within the grace period, requeue the rest.

        Returns the number of jobs abandoned to nsqd (their executor work may still be running).
        """
        self.accepting = False
        for reader in self.readers:
            reader.set_max_in_flight(0)
        loop = asyncio.get_running_loop()
        for job in self.held.values():
            job.done = loop.create_future()
        running = [job.done for job in self.held.values() if job.done is not None]
        log.info(
            "draining: RDY 0 sent, %d job(s) running, grace %.1fs",
            len(running),
            self.config.grace_s,
        )
        if running:
            await asyncio.wait(running, timeout=self.config.grace_s)
        abandoned = 0
        for job in list(self.held.values()):
            if not job.message.has_responded():
                job.message.requeue(backoff=False, time_ms=0)
                self.metrics.requeued_on_shutdown.labels(job.task_name).inc()
                abandoned += 1
            if job.handler is not None:
                job.handler.cancel()
            if job.ran is not None:
                job.ran.cancel()
        if abandoned:
            log.warning("requeued %d unfinished job(s) for another worker", abandoned)
        if self._toucher is not None:
            self._toucher.cancel()
        await self._flush()
        for reader in self.readers:
            close_reader(reader)
        self.publisher.close()
        if self.server is not None:
            self.server.stop()
        if isinstance(self.executor, ProcessPoolExecutor):
            self.executor.shutdown(wait=False, cancel_futures=True)
            for child in multiprocessing.active_children():
                child.terminate()
        else:
            self.executor.shutdown()
        return abandoned

    async def _flush(self, timeout_s: float = 2.0) -> None:
        # FIN/REQ are buffered in the IOStream; closing before they are written would drop them.
        deadline = time.monotonic() + timeout_s
        while unflushed(self.readers) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    # -- per message ---------------------------------------------------------------------------
    #
    # A job that succeeds is handled by plain callbacks: message -> executor -> result publish
    # -> FIN, with no asyncio task of its own (creating one per message was a tenth of a noop
    # job's cost). Every other outcome runs as a coroutine in a task (see _spawn).

    def _on_message(self, message: Any) -> None:
        message.enable_async()  # we answer nsqd ourselves, exactly once per message
        if not self.accepting:
            message.requeue(backoff=False, time_ms=0)
            return
        job = _Job(message)
        self.held[message.id] = job
        try:
            self._start(job)
        except Exception as exc:
            self._internal_error(job, exc)

    def _start(self, job: _Job) -> None:
        message = job.message
        try:
            env = wire.decode_job(message.body)
        except DecodeError as exc:
            log.warning("message %s is not a job envelope: %s", message.id.decode(), exc)
            self._spawn(
                job,
                self._dead_letter(
                    message,
                    None,
                    "undecodable",
                    wire.ErrorInfo.from_exception(exc),
                    raw=exc.raw.decode("utf-8", "replace"),
                ),
            )
            return
        job.env = env
        try:
            task = self.tasks.get(env.task)
        except UnknownTaskError as exc:
            log.warning("job %s names unknown task %r", env.id, env.task)
            self._spawn(
                job,
                self._finish_failed(
                    message,
                    env,
                    None,
                    "unknown_task",
                    wire.ErrorInfo.from_exception(exc),
                    wire.now(),
                    env.attempts + 1,
                ),
            )
            return
        job.task, job.task_name = task, task.name
        m = self.metrics.for_task(task.name)
        m.received.inc()
        attempt = env.attempts + message.attempts
        max_attempts = self.config.max_attempts or task.max_attempts
        if attempt > max_attempts:
            # Earlier deliveries died without recording anything (worker crash or msg timeout).
            error = wire.ErrorInfo(
                type="AttemptsExhausted",
                message=(
                    f"delivered {attempt} times; earlier attempts ended without an outcome "
                    "(worker crashed or the message timed out)"
                ),
            )
            self._spawn(
                job,
                self._finish_failed(
                    message, env, task, "max_attempts", error, wire.now(), attempt - 1
                ),
            )
            return
        if env.deadline is not None and wire.now() > env.deadline:
            error = wire.ErrorInfo(
                type="Expired", message="job deadline passed before it could start"
            )
            self._spawn(
                job,
                self._finish_failed(message, env, task, "expired", error, wire.now(), env.attempts),
            )
            return
        job.attempt, job.max_attempts = attempt, max_attempts
        job.started, job.t0 = wire.now(), time.perf_counter()
        log.info("job %s %-14s attempt %d/%d started", env.id, task.name, attempt, max_attempts)
        m.in_progress.inc()
        job.running = True
        job.executor = self.executor
        ran = job.ran = self._submit(task, env.args)
        job.timer = asyncio.get_running_loop().call_later(
            env.timeout_s or task.time_limit_s, self._expire, job
        )
        ran.add_done_callback(functools.partial(self._ran, job))

    def _submit(self, task: Task, args: dict[str, Any]) -> asyncio.Future[Any]:
        executor = self.executor
        if isinstance(executor, ProcessPoolExecutor):
            loop = asyncio.get_running_loop()
            return loop.run_in_executor(executor, _run_in_child, task.name, args)
        return executor.submit(task.run, args)

    def _expire(self, job: _Job) -> None:
        if job.ran is not None and not job.ran.done():
            job.timed_out = True
            job.ran.cancel()  # the thread (or child) runs on; its outcome is ignored

    def _ran(self, job: _Job, ran: asyncio.Future[Any]) -> None:
        try:
            self._after_run(job, ran)
        except Exception as exc:
            self._internal_error(job, exc)

    def _after_run(self, job: _Job, ran: asyncio.Future[Any]) -> None:
        task, env = job.task, job.env
        assert task is not None and env is not None
        job.ran = None
        job.running = False
        if job.timer is not None:
            job.timer.cancel()
        m = self.metrics.for_task(task.name)
        m.in_progress.dec()
        failure: BaseException | None = None
        if ran.cancelled():
            if not job.timed_out:  # cancelled by drain(): the message is requeued already
                self._forget(job)
                return
            limit = env.timeout_s or task.time_limit_s
            failure = TaskTimeoutError(f"ran past its {limit:g}s time limit")
        else:
            failure = ran.exception()
        if isinstance(failure, BrokenProcessPool) and self.executor is job.executor:
            # A child died (crash, OOM kill): start a new pool so other jobs go on (once,
            # though every job of the broken pool fails with it).
            assert isinstance(self.executor, ProcessPoolExecutor)
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = self._make_executor()
        if failure is None:
            try:
                body = wire.encode(
                    wire.ResultEnvelope(
                        id=env.id,
                        task=task.name,
                        status="succeeded",
                        result=ran.result(),
                        attempts=job.attempt,
                        worker=self.worker_id,
                        started_at=job.started,
                        finished_at=wire.now(),
                        duration_s=time.perf_counter() - job.t0,
                    )
                )
            except Exception as exc:  # a result msgspec cannot encode
                failure = exc
        if failure is not None:
            if not isinstance(failure, Exception):
                # sys.exit() or similar inside a task: a failed attempt, not the worker's exit.
                failure = RuntimeError(f"task raised {failure!r}")
            self._spawn(job, self._failed_attempt(job, failure))
            return
        duration = time.perf_counter() - job.t0
        m.duration_succeeded.observe(duration)
        acked = self.publisher.enqueue(RESULTS_TOPIC, body)
        acked.add_done_callback(functools.partial(self._result_acked, job, duration))

    def _result_acked(self, job: _Job, duration: float, acked: asyncio.Future[None]) -> None:
        try:
            task, env, message = job.task, job.env, job.message
            assert task is not None and env is not None
            if message.has_responded():  # drain() gave it back while the result was in flight
                self._forget(job)
                return
            error = None if acked.cancelled() else acked.exception()
            if isinstance(error, PublishRejected):
                self._spawn(job, self._failed_attempt(job, error, final=True))
                return
            if error is not None or acked.cancelled():
                self._requeue(message, env, f"result not acknowledged ({error or 'cancelled'})")
                self._forget(job)
                return
            self._respond(message, "finish")
            self.metrics.for_task(task.name).succeeded.inc()
            log.info(
                "job %s %-14s attempt %d/%d succeeded in %.3fs",
                env.id,
                task.name,
                job.attempt,
                job.max_attempts,
                duration,
            )
            self._forget(job)
        except Exception as exc:
            self._internal_error(job, exc)

    def _spawn(self, job: _Job, coro: Coroutine[Any, Any, None]) -> None:
        job.handler = asyncio.ensure_future(coro)
        job.handler.add_done_callback(functools.partial(self._handled, job))

    def _handled(self, job: _Job, handler: asyncio.Task[None]) -> None:
        if handler.cancelled() or handler.exception() is None:
            self._forget(job)
            return
        exc = handler.exception()
        assert isinstance(exc, Exception)
        self._internal_error(job, exc)

    def _internal_error(self, job: _Job, exc: BaseException) -> None:
        # A bug of ours, not the task's: say so, count it, and give the message back.
        log.error("internal error handling message %s", job.message.id.decode(), exc_info=exc)
        self.metrics.errors.labels(job.task_name, "InternalError").inc()
        self._respond(job.message, "requeue", time_ms=int(self.config.backoff_cap_s * 1000))
        self._forget(job)

    def _forget(self, job: _Job) -> None:
        """The message is answered (or handed back): stop holding it."""
        self.held.pop(job.message.id, None)
        if job.done is not None and not job.done.done():
            job.done.set_result(None)

    async def _touch_running(self) -> None:
        # One loop for all jobs: every third of the message timeout, TOUCH what is still running.
        while True:
            await asyncio.sleep(self.config.msg_timeout_s / 3)
            for job in list(self.held.values()):
                if job.running and not job.message.has_responded():
                    job.message.touch()

    async def _failed_attempt(self, job: _Job, exc: Exception, *, final: bool = False) -> None:
        """The task raised (or its result could not be published): retry or dead-letter.

        ``final``: no retry whatever the attempt count (nsqd refused the result itself).
        """
        message, env, task, started = job.message, job.env, job.task, job.started
        assert env is not None and task is not None
        max_attempts = job.max_attempts
        attempt = max_attempts if final else job.attempt
        error = wire.ErrorInfo.from_exception(exc)
        self.metrics.errors.labels(task.name, error.type).inc()
        self.metrics.duration.labels(task.name, "failed").observe(time.perf_counter() - job.t0)
        if isinstance(exc, Retry | TaskTimeoutError):
            log.warning(
                "job %s %-14s attempt %d/%d: %s", env.id, task.name, attempt, max_attempts, exc
            )
        else:
            log.warning(
                "job %s %-14s attempt %d/%d raised %s: %s",
                env.id,
                task.name,
                attempt,
                max_attempts,
                error.type,
                error.message,
                exc_info=exc,
            )
        history = (
            *env.history,
            wire.Attempt(
                attempt=attempt,
                worker=self.worker_id,
                started_at=started,
                finished_at=wire.now(),
                error=error,
            ),
        )
        env = msgspec.structs.replace(env, attempts=attempt, history=history)
        if attempt >= max_attempts:
            await self._finish_failed(message, env, task, "max_attempts", error, started, attempt)
            return
        delay = (
            exc.delay
            if isinstance(exc, Retry) and exc.delay is not None
            else backoff_delay(attempt, self.config.backoff_base_s, self.config.backoff_cap_s)
        )
        delay_ms = min(int(delay * 1000), MAX_DELAY_MS)  # above it nsqd drops the connection
        try:
            await self.publisher.dpub(task.queue, delay_ms, wire.encode(env))
        except PublishError as pub_exc:
            # Fall back to nsqd's REQ: the history of this attempt is lost, its count is not.
            log.warning("job %s: retry republish failed (%s); requeueing instead", env.id, pub_exc)
            self._respond(message, "requeue", time_ms=delay_ms)
        else:
            self._respond(message, "finish")
        self.metrics.retried.labels(task.name).inc()
        log.info("job %s %-14s retry %d in %.2fs", env.id, task.name, attempt + 1, delay)

    async def _finish_failed(
        self,
        message: Any,
        env: wire.JobEnvelope,
        task: Task | None,
        reason: wire.DeadLetterReason,
        error: wire.ErrorInfo,
        started: float,
        attempts: int,
    ) -> None:
        """Publish a failed result and a dead letter, then FIN (or requeue if nsqd is away)."""
        name = task.name if task is not None else "-"  # never the unknown name: bounded labels
        finished = wire.now()
        result = wire.ResultEnvelope(
            id=env.id,
            task=env.task,
            status="failed",
            error=error,
            attempts=attempts,
            worker=self.worker_id,
            started_at=started,
            finished_at=finished,
            duration_s=max(0.0, finished - started),
        )
        try:
            await self.publisher.pub(
                DEAD_LETTER_TOPIC,
                wire.encode(
                    wire.DeadLetter(
                        reason=reason, error=error, worker=self.worker_id, at=finished, job=env
                    )
                ),
            )
            await self.publisher.pub(RESULTS_TOPIC, wire.encode(result))
        except PublishError as exc:
            self._requeue(message, env, f"dead letter not acknowledged ({exc})")
            return
        self._respond(message, "finish")
        self.metrics.failed.labels(name).inc()
        self.metrics.dead_lettered.labels(name, reason).inc()
        log.error(
            "job %s %-14s failed after %d attempt(s) (%s): %s: %s; sent to %s",
            env.id,
            env.task,
            attempts,
            reason,
            error.type,
            error.message,
            DEAD_LETTER_TOPIC,
        )

    async def _dead_letter(
        self,
        message: Any,
        env: wire.JobEnvelope | None,
        reason: wire.DeadLetterReason,
        error: wire.ErrorInfo,
        raw: str | None = None,
    ) -> None:
        try:
            await self.publisher.pub(
                DEAD_LETTER_TOPIC,
                wire.encode(
                    wire.DeadLetter(
                        reason=reason,
                        error=error,
                        worker=self.worker_id,
                        at=wire.now(),
                        job=env,
                        raw=raw,
                    )
                ),
            )
        except PublishError as exc:
            log.warning(
                "message %s: dead letter not acknowledged (%s); requeueing",
                message.id.decode(),
                exc,
            )
            self._respond(message, "requeue", time_ms=int(self.config.backoff_cap_s * 1000))
            return
        self._respond(message, "finish")
        self.metrics.dead_lettered.labels("-", reason).inc()

    def _requeue(self, message: Any, env: wire.JobEnvelope, why: str) -> None:
        delay = backoff_delay(
            message.attempts, self.config.backoff_base_s, self.config.backoff_cap_s
        )
        log.warning("job %s: %s; requeueing in %.2fs", env.id, why, delay)
        self._respond(message, "requeue", time_ms=int(delay * 1000))

    def _respond(self, message: Any, how: str, time_ms: int = 0) -> None:
        # After a drain requeued a message, a late outcome must not answer it twice.
        if message.has_responded():
            return
        if how == "finish":
            message.finish()
        else:
            message.requeue(backoff=False, time_ms=time_ms)


def warm_up(tasks: Registry) -> None:
    """Compile kernels now (Numba caches to disk), so the first job is not the slow one.

    Runs before any connection is made, so a bad kernel choice stops the worker cleanly.
    """
    for task in tasks:
        if task.warm_up is not None:
            started = time.perf_counter()
            task.warm_up()
            log.info("warmed up %s in %.2fs", task.name, time.perf_counter() - started)


async def serve(config: WorkerConfig, tasks: Registry, stop: asyncio.Event) -> int:
    """Run a worker until ``stop`` is set; returns the number of jobs abandoned at shutdown."""
    warm_up(tasks)
    worker = Worker(config, tasks)
    await worker.start()
    await stop.wait()
    started = time.monotonic()
    abandoned = await worker.drain()
    log.info("worker stopped in %.2fs", time.monotonic() - started)
    return abandoned
