"""The job state machine: message -> executor -> result publish -> FIN, and the other endings.

A job that succeeds is handled by plain callbacks, with no asyncio task of its own (creating one
per message was a tenth of a noop job's cost). Every other ending runs as a coroutine (see
:mod:`nsqjobs.worker.settle`), decided by :mod:`nsqjobs.worker.outcome`. Hooks hear of each
transition before the job moves on, so they see it as it was when it happened.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

from nsqjobs import wire
from nsqjobs.config import WorkerConfig
from nsqjobs.errors import (
    DecodeError,
    PublishRejected,
    ResultNotEncodable,
    TaskTimeoutError,
    UnknownTaskError,
)
from nsqjobs.names import RESULTS_TOPIC
from nsqjobs.registry import Registry
from nsqjobs.worker.executors import Executor
from nsqjobs.worker.hooks import Hooks
from nsqjobs.worker.outcome import admit
from nsqjobs.worker.settle import Publishing, Settler
from nsqjobs.worker.state import Held, Job, Message, Phase, Stray

log = logging.getLogger("nsqjobs.worker")


class Machine:
    """Moves each message this worker holds through its phases; pynsq calls :meth:`on_message`."""

    def __init__(
        self,
        config: WorkerConfig,
        worker_id: str,
        tasks: Registry,
        executor: Executor,
        publisher: Publishing,
        hooks: Hooks,
    ) -> None:
        self.worker_id = worker_id
        self.tasks = tasks
        self.max_attempts = config.max_attempts  # 0: each task's own
        self.executor = executor
        self.publisher = publisher
        self.hooks = hooks
        self.held: dict[bytes, Held] = {}
        self.accepting = False
        self.settler = Settler(
            worker_id,
            publisher,
            hooks,
            backoff_base_s=config.backoff_base_s,
            backoff_cap_s=config.backoff_cap_s,
            held=self.held,
            forget=self.forget,
        )

    def on_message(self, message: Message) -> None:
        """pynsq's message handler: take the message, or give it back when not accepting."""
        message.enable_async()  # we answer nsqd ourselves, exactly once per message
        if not self.accepting:
            message.requeue(backoff=False, time_ms=0)
            return
        try:
            self._receive(message)
        except Exception as exc:
            self.settler.internal_error(message, exc)

    def _receive(self, message: Message) -> None:
        try:
            env = wire.decode_job(message.body)
        except DecodeError as exc:
            log.warning("message %s is not a job envelope: %s", message.id.decode(), exc)
            stray = self.held[message.id] = Stray(message, None, self.hooks.for_task("-"))
            self.settler.dead_letter(
                stray,
                "undecodable",
                wire.ErrorInfo.from_exception(exc),
                raw=exc.raw.decode("utf-8", "replace"),
            )
            return
        try:
            task = self.tasks.get(env.task)
        except UnknownTaskError as exc:
            log.warning("job %s names unknown task %r", env.id, env.task)
            stray = self.held[message.id] = Stray(message, env, self.hooks.for_task("-"))
            self.settler.dead_letter(stray, "unknown_task", wire.ErrorInfo.from_exception(exc))
            return
        job = self.held[message.id] = Job(
            message,
            env,
            task,
            env.attempts + message.attempts,
            self.max_attempts or task.max_attempts,
            self.hooks.for_task(task.name),
        )
        job.hooks.received(job)
        refused = admit(env, job.attempt, job.max_attempts, job.started_at)
        if refused is not None:
            self.settler.dead_letter(job, refused.reason, refused.error)
            return
        self._run(job)

    def _run(self, job: Job) -> None:
        task, env = job.task, job.env
        log.info(
            "job %s %-14s attempt %d/%d started", env.id, task.name, job.attempt, job.max_attempts
        )
        job.hooks.started(job)
        job.phase = Phase.RUNNING  # started_at and t0: when received, a moment ago
        ran = job.pending = self.executor.run(task, env.args)
        job.timer = asyncio.get_running_loop().call_later(
            env.timeout_s or task.time_limit_s, self._expire, job
        )
        ran.add_done_callback(functools.partial(self._ran, job))

    def _expire(self, job: Job) -> None:
        if job.phase is Phase.RUNNING and job.pending is not None:
            job.phase = Phase.TIMED_OUT
            job.pending.cancel()  # the thread (or child) runs on; its outcome is ignored

    def _ran(self, job: Job, ran: asyncio.Future[Any]) -> None:
        try:
            self._after_run(job, ran)
        except Exception as exc:
            self.settler.internal_error(job.message, exc)

    def _after_run(self, job: Job, ran: asyncio.Future[Any]) -> None:
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        job.pending = None
        if job.phase is Phase.ANSWERED:  # drain() requeued it and cancelled the run
            self.forget(job)
            return
        failure: BaseException | None
        if job.phase is Phase.TIMED_OUT:
            limit = job.env.timeout_s or job.task.time_limit_s
            failure = TaskTimeoutError(f"ran past its {limit:g}s time limit")
        elif ran.cancelled():  # by the executor itself (its process pool broke)
            failure = RuntimeError("the executor dropped the job")
        else:
            failure = ran.exception()
        body = b""
        if failure is None:
            try:
                body = wire.encode(
                    wire.ResultEnvelope(
                        id=job.env.id,
                        task=job.task.name,
                        status="succeeded",
                        result=ran.result(),
                        attempts=job.attempt,
                        worker=self.worker_id,
                        started_at=job.started_at,
                        finished_at=wire.now(),
                        duration_s=time.perf_counter() - job.t0,
                    )
                )
            except Exception as exc:  # msgspec cannot encode the result (type, range...)
                kind = type(ran.result()).__name__
                failure = ResultNotEncodable(f"result of type {kind}: {exc}")
        if failure is not None:
            if not isinstance(failure, Exception):
                # sys.exit() or similar inside a task: a failed attempt, not the worker's exit.
                failure = RuntimeError(f"task raised {failure!r}")
            self.settler.attempt_failed(job, failure)
            return
        duration = time.perf_counter() - job.t0
        job.phase = Phase.PUBLISHING
        acked = self.publisher.enqueue(RESULTS_TOPIC, body)
        acked.add_done_callback(functools.partial(self._result_acked, job, duration, len(body)))

    def _result_acked(
        self, job: Job, duration: float, size: int, acked: asyncio.Future[None]
    ) -> None:
        try:
            if job.phase is not Phase.PUBLISHING:  # drain() gave it back meanwhile
                self.forget(job)
                return
            error = None if acked.cancelled() else acked.exception()
            if isinstance(error, PublishRejected):  # the result itself is refused (too big?)
                self.settler.attempt_failed(job, error)
                return
            if error is not None or acked.cancelled():
                self.settler.requeue(job, f"result not acknowledged ({error or 'cancelled'})")
                return
            job.hooks.succeeded(job, duration, size)
            job.answer(finish=True)
            log.info(
                "job %s %-14s attempt %d/%d succeeded in %.3fs",
                job.env.id,
                job.task.name,
                job.attempt,
                job.max_attempts,
                duration,
            )
            self.forget(job)
        except Exception as exc:
            self.settler.internal_error(job.message, exc)

    def forget(self, held: Held) -> None:
        """The message is answered (or handed back): stop holding it."""
        self.held.pop(held.message.id, None)
        if held.drained is not None and not held.drained.done():
            held.drained.set_result(None)

    def touch_running(self) -> None:
        """TOUCH every job still in the executor, so nsqd does not time it out."""
        for held in list(self.held.values()):
            if held.phase is Phase.RUNNING:
                held.message.touch()

    def watch(self) -> list[asyncio.Future[None]]:
        """Drain: a future per held message, done once the message is answered and forgotten."""
        loop = asyncio.get_running_loop()
        watched = []
        for held in self.held.values():
            held.drained = drained = loop.create_future()
            watched.append(drained)
        return watched

    def hand_back(self) -> int:
        """Shutdown: requeue what is not answered yet and cancel what still works on it.

        Returns how many messages were requeued (their executor work may still be running).
        """
        requeued = 0
        for held in list(self.held.values()):
            if held.phase is not Phase.ANSWERED and not held.message.has_responded():
                held.hooks.requeued(held, "shutdown", 0.0)
                held.answer(finish=False)
                requeued += 1
            if held.pending is not None:
                held.pending.cancel()
        return requeued
