"""The job state machine: message -> executor -> result publish -> FIN, and the other endings.

A job that succeeds is handled by plain callbacks, with no asyncio task of its own (creating one
per message was a tenth of a noop job's cost). Every other ending runs as a coroutine (see
:mod:`nsqjobs.worker.settle`), decided by :mod:`nsqjobs.worker.outcome`. Hooks hear of each
transition before the job moves on, so they see it as it was when it happened.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from typing import Any

import msgspec

from nsqjobs import wire
from nsqjobs.config import WorkerConfig
from nsqjobs.errors import (
    DecodeError,
    JobCancelled,
    PublishRejected,
    ResultNotEncodable,
    ResultTooLarge,
    UnknownTaskError,
)
from nsqjobs.names import MAX_DELAY_MS, RESULTS_TOPIC
from nsqjobs.registry import Registry
from nsqjobs.worker.cancels import CancelledIds
from nsqjobs.worker.executors import Executor
from nsqjobs.worker.flow import Flow
from nsqjobs.worker.hooks import Hooks
from nsqjobs.worker.outcome import admit
from nsqjobs.worker.settle import Publishing, Settler, describe
from nsqjobs.worker.started import StartedEvents
from nsqjobs.worker.state import Held, Job, Message, Phase, Stray, held_key

log = logging.getLogger("nsqjobs.worker")

# A job received less than this before its due time runs: clocks differ by that much anyway.
DUE_SLACK_S = 0.005


class Machine:
    """Moves each message this worker holds through its phases; pynsq calls :meth:`on_message`.

    It never runs more jobs than the executor has idle slots: a job that arrives without one
    (only when RDY moved between connections while a message was on its way) waits, TOUCHed,
    and its time limit starts when it does.
    """

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
        self.capacity = config.concurrency
        self.max_msg_size = config.nsqd_max_msg_size
        self.executor = executor
        self.publisher = publisher
        self.hooks = hooks
        self.held: dict[int, Held] = {}  # by held_key
        self.waiting: collections.deque[Job] = collections.deque()
        # Executor futures of timed-out jobs whose thread still runs: the job, while held.
        self.overrunning: dict[asyncio.Future[Any], Job | None] = {}
        self.orphans = 0  # slots taken by such threads after their message was answered
        self.flow: Flow | None = None
        self.accepting = False
        self.cancelled = CancelledIds()
        self.started = StartedEvents(publisher, worker_id)
        self.settler = Settler(
            worker_id,
            publisher,
            hooks,
            backoff_base_s=config.backoff_base_s,
            backoff_cap_s=config.backoff_cap_s,
            held=self.held,
            forget=self.forget,
            max_msg_size=config.nsqd_max_msg_size,
        )
        executor.on_release = self._released

    def set_max_msg_size(self, size: int) -> None:
        """nsqd's --max-msg-size, as read from nsqd at start."""
        self.max_msg_size = self.settler.max_msg_size = size

    def used(self) -> int:
        """Slots taken: messages held, and threads running on after their message was answered."""
        return len(self.held) + self.orphans

    def on_message(self, message: Message) -> None:
        """pynsq's message handler: take the message (or, when draining, give it back)."""
        message.enable_async()  # we answer nsqd ourselves, exactly once per message
        try:
            self._receive(message)
        except Exception as exc:
            self.settler.internal_error(message, exc)

    def _receive(self, message: Message) -> None:
        try:
            env = wire.decode_job(message.body)
        except Exception as exc:  # DecodeError, or anything else (RecursionError): never loops
            if not isinstance(exc, DecodeError):
                exc = DecodeError(f"not a valid job envelope: {type(exc).__name__}: {exc}", b"")
            log.warning("message %s is not a job envelope: %s", message.id.decode(), exc)
            stray = self.held[held_key(message)] = Stray(message, None, self.hooks.for_task("-"))
            self.settler.dead_letter(
                stray,
                "undecodable",
                describe(exc),
                raw=message.body.decode("utf-8", "replace"),
            )
            return
        try:
            task = self.tasks.get(env.task)
        except UnknownTaskError as exc:
            log.warning("job %s names unknown task %r", env.id, env.task)
            stray = self.held[held_key(message)] = Stray(message, env, self.hooks.for_task("-"))
            self.settler.dead_letter(stray, "unknown_task", describe(exc))
            return
        job = self.held[held_key(message)] = Job(
            message,
            env,
            task,
            env.attempts + message.attempts,
            self.max_attempts or task.max_attempts,
            self.hooks.for_task(task.name),
        )
        if len(self.held) + self.orphans > self.capacity and self.flow is not None:
            self.flow.rebalance()  # it came without room (RDY moved meanwhile): take room back
        if env.id in self.cancelled:  # one dict lookup per job; FINed even when draining
            job.hooks.received(job)
            self._skip(job, "on arrival")
            return
        if not self.accepting:  # draining: back to nsqd, this delivery not counted
            self.settler.give_back(job, 0.0, "shutdown")
            return
        job.hooks.received(job)
        refused = admit(env, job.attempt, job.max_attempts, job.started_at)
        if refused is not None:
            self.settler.dead_letter(job, refused.reason, refused.error)
            return
        if env.due_at is not None and env.due_at - job.started_at > DUE_SLACK_S:
            # Early (nsqd lost the delay in a restart): defer again for the time left.
            delay_s = min(env.due_at - job.started_at, MAX_DELAY_MS / 1000)
            log.info("job %s %-14s not due for %.3fs: deferred", env.id, task.name, delay_s)
            self.settler.give_back(job, delay_s, "not_due")
            return
        if self.executor.idle() > 0:
            self._run(job)
        else:
            job.phase = Phase.WAITING
            self.waiting.append(job)

    def _run(self, job: Job) -> None:
        task, env = job.task, job.env
        log.info(
            "job %s %-14s attempt %d/%d started", env.id, task.name, job.attempt, job.max_attempts
        )
        job.hooks.started(job)
        job.phase = Phase.RUNNING
        if task.track_started:
            self.started.announce(job.env.id)  # fire and forget
        ran = job.pending = self.executor.run(
            task,
            env.args,
            env.timeout_s or task.time_limit_s,
            job.mark_started if self.executor.reports_start else None,
        )
        ran.add_done_callback(functools.partial(self._ran, job))

    def _next(self) -> None:
        # A slot came free: start the jobs that waited for one, oldest first.
        waiting, executor = self.waiting, self.executor
        while waiting and executor.idle() > 0:
            job = waiting.popleft()
            if job.phase is Phase.WAITING:
                job.mark_started()
                self._run(job)

    def _ran(self, job: Job, ran: asyncio.Future[Any]) -> None:
        try:
            self._after_run(job, ran)
        except Exception as exc:
            self.settler.internal_error(job.message, exc)
        if self.waiting:
            self._next()

    def _after_run(self, job: Job, ran: asyncio.Future[Any]) -> None:
        if job.pending is ran:
            job.pending = None
        if ran.cancelled() and job.phase is not Phase.RUNNING:
            return  # drain() took the message over (requeued or giving it back)
        failure: BaseException | None
        if ran.cancelled():  # by the executor itself (shut down)
            failure = RuntimeError("the executor dropped the job")
        else:
            failure = ran.exception()
        body = b""
        if failure is None:
            result = wire.ResultEnvelope(
                id=job.env.id,
                task=job.task.name,
                status="succeeded",
                result=ran.result(),
                attempts=job.attempt,
                worker=self.worker_id,
                started_at=job.started_at,
                finished_at=wire.now(),
                duration_s=time.perf_counter() - job.t0,
                history=job.env.history,  # the attempts that failed before this one
            )
            try:
                body = wire.encode(result)
                if len(body) > self.max_msg_size and result.history:
                    # The history is the ledger's record, not the result: it goes first.
                    body = wire.encode(msgspec.structs.replace(result, history=()))
            except Exception as exc:  # msgspec cannot encode the result (type, range...)
                kind = type(ran.result()).__name__
                failure = ResultNotEncodable(f"result of type {kind}: {exc}")
            else:
                if len(body) > self.max_msg_size:  # nsqd would refuse it (and drop the conn)
                    failure = ResultTooLarge(
                        f"the result is {len(body)} bytes encoded, over nsqd's --max-msg-size "
                        f"of {self.max_msg_size}"
                    )
        if failure is not None:
            if not isinstance(failure, Exception):
                # sys.exit() or similar inside a task: a failed attempt, not the worker's exit.
                failure = RuntimeError(f"task raised {failure!r}")
            if self.executor.holds(ran):  # timed out, its thread runs on: the slot stays taken
                self.overrunning[ran] = job
                if self.flow is not None:
                    job.keep = self.flow.keep_slot
            if job.phase is Phase.RUNNING:
                if isinstance(failure, JobCancelled) or job.env.id in self.cancelled:
                    self._skip(job, "while running")  # no retry, no dead letter
                else:
                    self.settler.attempt_failed(job, failure)
            return
        duration = time.perf_counter() - job.t0
        job.phase = Phase.PUBLISHING
        acked = self.publisher.enqueue(RESULTS_TOPIC, body)
        acked.add_done_callback(functools.partial(self._result_acked, job, duration, len(body)))

    def on_cancel(self, message: Any) -> bool:
        """The cancel reader's handler: remember the id, and end what this worker holds of it.

        A job waiting for a slot is skipped; one running in a child process has its child
        killed (it ends without a result); one running in a thread runs on to its end, and
        the ledger, which already says cancelled, ignores its result.
        """
        try:
            job_id = wire.decode_cancel(message.body).id
        except DecodeError as exc:
            log.warning("dropping a message on the cancels topic: %s", exc)
            return True
        self.cancelled.add(job_id)  # a second cancel of the id refreshes it
        for held in list(self.held.values()):
            if not isinstance(held, Job) or held.env.id != job_id:
                continue
            if held.phase is Phase.WAITING:
                self._skip(held, "waiting for a slot")
            elif (
                held.phase is Phase.RUNNING
                and held.pending is not None
                and not self.executor.cancel(held.pending)
            ):
                log.info(
                    "job %s %-14s cancelled while running in a thread: it runs to its end",
                    job_id,
                    held.task.name,
                )
        return True

    def _skip(self, job: Job, when: str) -> None:
        """A cancelled job: FIN without a result."""
        job.hooks.cancelled(job)
        job.answer(finish=True)
        log.info("job %s %-14s cancelled %s: FINed, no result", job.env.id, job.task.name, when)
        self.forget(job)

    def _released(self, ran: asyncio.Future[Any]) -> None:
        # A timed-out job's thread returned: its slot is free again.
        if ran not in self.overrunning:
            return
        job = self.overrunning.pop(ran)
        if job is None:
            self.orphans -= 1
        else:
            job.keep = None  # not answered yet: its answer frees the slot as usual
        if self.flow is not None:
            self.flow.rebalance()
        self._next()

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
        if self.held.pop(held_key(held.message), None) is not None and held.keep is not None:
            # Answered while its thread runs on: the slot stays taken until that returns.
            held.keep = None
            for ran, job in self.overrunning.items():
                if job is held:
                    self.overrunning[ran] = None
                    self.orphans += 1
                    break
        if held.drained is not None and not held.drained.done():
            held.drained.set_result(None)

    def touch_running(self) -> None:
        """TOUCH every job still in the executor, so nsqd does not time it out."""
        for held in list(self.held.values()):
            if held.phase is Phase.RUNNING or held.phase is Phase.WAITING:
                held.message.touch()

    def watch(self) -> list[asyncio.Future[None]]:
        """Drain: a future per held message, done once the message is answered and forgotten."""
        loop = asyncio.get_running_loop()
        watched = []
        for held in self.held.values():
            held.drained = drained = loop.create_future()
            watched.append(drained)
        return watched

    async def hand_back(self, timeout_s: float = 10.0) -> int:
        """Shutdown: give back what is not answered yet, and stop what still works on it.

        A job that had not finished running goes back republished with this delivery not
        counted as an attempt (nsqd's REQ would count it); one whose attempt ended (its result
        or retry was being published) is requeued. Returns how many messages went back.
        """
        back = 0
        for held in list(self.held.values()):
            if held.phase is Phase.ANSWERED or held.message.has_responded():
                continue
            if held.phase is Phase.SETTLING:
                continue  # its coroutine publishes and answers; waited for below
            if isinstance(held, Job) and held.phase in _NOT_RUN:
                ran, held.pending = held.pending, None
                self.settler.give_back(held, 0.0, "shutdown")
                if ran is not None:
                    ran.cancel()  # a thread runs on (daemon); a child is killed at shutdown
            else:  # its attempt ended; the result was being published: nsqd's REQ
                held.hooks.requeued(held, "shutdown", 0.0)
                held.answer(finish=False)
            back += 1
        going = [h.pending for h in self.held.values() if h.pending is not None]
        if going:
            await asyncio.wait(going, timeout=timeout_s)
        return back


_NOT_RUN = frozenset({Phase.RECEIVED, Phase.WAITING, Phase.RUNNING})
