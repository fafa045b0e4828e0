"""The rare endings of a held message: failed attempts, retries, dead letters, requeues.

Each runs as a coroutine in a task of its own (the held message's ``pending``), so drain() can
cancel it. What to do after a failure is :func:`nsqjobs.worker.outcome.after_failure`'s call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import msgspec

from nsqjobs import wire
from nsqjobs.errors import PublishError, PublishRejected, PublishTimeout, Retry, TaskTimeoutError
from nsqjobs.names import DEAD_LETTER_TOPIC, RESULTS_TOPIC
from nsqjobs.worker.hooks import Hooks, RequeueReason
from nsqjobs.worker.outcome import RetryAfter, after_failure, backoff_delay
from nsqjobs.worker.state import Held, Job, Message, Phase, Stray, held_key

log = logging.getLogger("nsqjobs.worker")

# How long a dead letter or a retry waits for the publisher to (re)connect before giving up.
RECONNECT_WAIT_S = 3.0
# An error message is cut to this many characters: it travels in every later envelope.
MAX_ERROR_CHARS = 2000
MAX_TRACEBACK_CHARS = 20_000


def describe(exc: BaseException) -> wire.ErrorInfo:
    """The error as it goes on the wire: its type, and its message cut to a bounded length."""
    error = wire.ErrorInfo.from_exception(exc)
    if len(error.message) > MAX_ERROR_CHARS:
        cut = len(error.message) - MAX_ERROR_CHARS
        error = wire.ErrorInfo(
            type=error.type, message=f"{error.message[:MAX_ERROR_CHARS]}... [{cut} more chars]"
        )
    return error


def traceback_text(exc: BaseException) -> str:
    """``exc``'s traceback for the log, cut to :data:`MAX_TRACEBACK_CHARS` (a task's exception
    can carry megabytes of message, which every attempt would write to the log again)."""
    text = "".join(traceback.format_exception(exc)).rstrip()
    if len(text) > MAX_TRACEBACK_CHARS:
        cut = len(text) - MAX_TRACEBACK_CHARS
        text = f"{text[:MAX_TRACEBACK_CHARS]}... [{cut} more chars]"
    return text


def fit_dead_letter(letter: wire.DeadLetter, limit: int) -> bytes:
    """Encode a dead letter within nsqd's message size, leaving out what does not fit.

    The job's arguments go first, then its history and the raw body; what was left out is
    said in the error message, so a dead letter is always published and always readable.
    """
    body = wire.encode(letter)
    if len(body) <= limit:
        return body
    left_out = []
    job, raw = letter.job, letter.raw
    if job is not None:
        job = msgspec.structs.replace(job, args={}, history=job.history[-1:])
        left_out.append("the job's args and early history")
    if raw is not None and len(raw) > limit // 4:
        raw = raw[: limit // 4]
        left_out.append("the raw body past its first part")
    note = f" [left out to fit nsqd's {limit}-byte messages: {', '.join(left_out)}]"
    error = wire.ErrorInfo(type=letter.error.type, message=letter.error.message + note)
    body = wire.encode(msgspec.structs.replace(letter, job=job, raw=raw, error=error))
    if len(body) <= limit:
        return body
    return wire.encode(msgspec.structs.replace(letter, job=None, raw=None, error=error))


class Publishing(Protocol):
    """What the worker asks of :class:`nsqjobs.nsq.publisher.Publisher`: each waits for OK."""

    def enqueue(self, topic: str, body: bytes) -> asyncio.Future[None]:
        """Publish from callback code; the future is nsqd's OK or the error."""

    async def pub(self, topic: str, body: bytes) -> None:
        """Publish one message."""

    async def dpub(self, topic: str, delay_ms: int, body: bytes) -> None:
        """Publish one message, delivered after ``delay_ms``."""

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait until a connection is open (nsqd closes one after refusing a message)."""


class Settler:
    """Publishes what a held message came to (retry, dead letter), then answers nsqd."""

    def __init__(
        self,
        worker_id: str,
        publisher: Publishing,
        hooks: Hooks,
        *,
        backoff_base_s: float,
        backoff_cap_s: float,
        held: dict[int, Held],
        forget: Callable[[Held], None],
        max_msg_size: int = 1024 * 1024,
    ) -> None:
        self.worker_id = worker_id
        self.max_msg_size = max_msg_size  # nsqd's --max-msg-size: no larger frame is sent
        self.publisher = publisher
        self.hooks = hooks
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.held = held
        self.forget = forget

    # -- synchronous entry points (called from the state machine's callbacks) ---------------------

    def attempt_failed(self, job: Job, exc: Exception) -> None:
        """The task raised, timed out, or its result was refused: retry or dead-letter."""
        env, task = job.env, job.task
        error = describe(exc)
        job.hooks.attempt_failed(job, error, time.perf_counter() - job.t0)
        where = f"job {env.id} {task.name:<14} attempt {job.attempt}/{job.max_attempts}"
        if isinstance(exc, Retry | TaskTimeoutError):
            log.warning("%s: %s", where, error.message)
        else:
            trace = traceback_text(exc)
            log.warning("%s raised %s: %s\n%s", where, error.type, error.message, trace)
        finished = wire.now()
        history = (
            *env.history,
            wire.Attempt(
                attempt=job.attempt,
                worker=self.worker_id,
                started_at=job.started_at,
                finished_at=finished,
                error=error,
            ),
        )
        recorded = msgspec.structs.replace(env, attempts=job.attempt, history=history)
        outcome = after_failure(
            env,
            job.attempt,
            job.max_attempts,
            exc,
            task,
            now=finished,
            backoff_base_s=self.backoff_base_s,
            backoff_cap_s=self.backoff_cap_s,
        )
        if isinstance(outcome, RetryAfter):
            if outcome.delay_s > 0:
                # When it is due, in the copy itself: nsqd keeps a deferred message across a
                # clean restart but not its delay, and a worker defers one that comes early.
                recorded = msgspec.structs.replace(recorded, due_at=finished + outcome.delay_s)
            self._spawn(job, self._retry(job, recorded, outcome.delay_s))
        else:
            self._spawn(
                job, self._give_up(job, outcome.reason, error, recorded, attempts=job.attempt)
            )

    def dead_letter(
        self,
        held: Held,
        reason: wire.DeadLetterReason,
        error: wire.ErrorInfo,
        raw: str | None = None,
    ) -> None:
        """A message that will not run (undecodable, unknown task, refused at admission)."""
        # Attempts that ran: the earlier deliveries of a job; those recorded, for a stray.
        if isinstance(held, Job):
            attempts = held.attempt - 1
        else:
            attempts = held.env.attempts if held.env is not None else 0
        self._spawn(held, self._give_up(held, reason, error, held.env, attempts=attempts, raw=raw))

    def give_back(self, job: Job, delay_s: float, why: RequeueReason) -> None:
        """Back to nsqd in ``delay_s`` without counting this delivery as an attempt.

        nsqd counts every delivery, a REQ'd one included, so the envelope is republished with
        its recorded attempts set to this delivery's attempt less one, and the message FINed.
        """
        job.hooks.requeued(job, why, delay_s)  # now, while in_progress says what it was
        self._spawn(job, self._give_back(job, delay_s))

    def requeue(self, held: Held, detail: str) -> None:
        """nsqd did not acknowledge a publish: hand the message back, after a backoff."""
        self._requeue(held, "unacknowledged", detail)
        self.forget(held)

    def internal_error(self, message: Message, exc: Exception) -> None:
        """A bug of ours, not the task's: say so, count it, and give the message back."""
        held = self.held.get(held_key(message)) or Stray(message, None, self.hooks.for_task("-"))
        log.error(
            "internal error handling message %s (%s, task %s)",
            message.id.decode(),
            held.label,
            held.task_name,
            exc_info=exc,
        )
        if held.phase is not Phase.ANSWERED:
            delay_s = self.backoff_cap_s
            held.hooks.requeued(held, "internal_error", delay_s)
            held.answer(finish=False, delay_ms=int(delay_s * 1000))
        self.forget(held)

    # -- coroutines --------------------------------------------------------------------------------

    def _spawn(self, held: Held, coro: Coroutine[Any, Any, None]) -> None:
        held.phase = Phase.SETTLING
        handler = held.pending = asyncio.ensure_future(coro)
        handler.add_done_callback(functools.partial(self._settled, held))

    def _settled(self, held: Held, handler: asyncio.Future[Any]) -> None:
        exc = None if handler.cancelled() else handler.exception()
        if isinstance(exc, Exception):
            self.internal_error(held.message, exc)
            return
        self.forget(held)

    async def _give_back(self, job: Job, delay_s: float) -> None:
        delay_ms = int(delay_s * 1000)
        env = msgspec.structs.replace(job.env, attempts=job.attempt - 1)
        body = wire.encode(env)
        try:
            if len(body) > self.max_msg_size:
                raise PublishError(f"the envelope is {len(body)} bytes, over nsqd's limit")
            if delay_ms:
                await self._publish(
                    lambda: self.publisher.dpub(job.task.queue, delay_ms, body), job_copy=True
                )
            else:
                await self._publish(lambda: self.publisher.pub(job.task.queue, body), job_copy=True)
        except PublishError as exc:
            # nsqd's REQ instead: the message comes back, this delivery counted as an attempt.
            log.warning("job %s: republish failed (%s); requeueing instead", env.id, exc)
            job.answer(finish=False, delay_ms=delay_ms)
            return
        job.answer(finish=True)

    async def _retry(self, job: Job, env: wire.JobEnvelope, delay_s: float) -> None:
        delay_ms = int(delay_s * 1000)
        body = wire.encode(env)
        try:
            if len(body) > self.max_msg_size:  # nsqd would refuse it: never send it
                raise PublishError(f"the envelope with its history is {len(body)} bytes")
            await self._publish(
                lambda: self.publisher.dpub(job.task.queue, delay_ms, body), job_copy=True
            )
        except PublishError as exc:
            # Fall back to nsqd's REQ: the history of this attempt is lost, its count is not.
            log.warning("job %s: retry republish failed (%s); requeueing instead", env.id, exc)
            job.hooks.retried(job, delay_s)
            job.answer(finish=False, delay_ms=delay_ms)
        else:
            job.hooks.retried(job, delay_s)
            job.answer(finish=True)
        log.info("job %s %-14s retry %d in %.2fs", env.id, job.task.name, job.attempt + 1, delay_s)

    async def _give_up(
        self,
        held: Held,
        reason: wire.DeadLetterReason,
        error: wire.ErrorInfo,
        env: wire.JobEnvelope | None,
        *,
        attempts: int,
        raw: str | None = None,
    ) -> None:
        """Publish the dead letter and (for a job) its failed result, then FIN."""
        finished = wire.now()
        letter = wire.DeadLetter(
            reason=reason, error=error, worker=self.worker_id, at=finished, job=env, raw=raw
        )
        try:
            letter_body = fit_dead_letter(letter, self.max_msg_size)
            await self._publish(lambda: self.publisher.pub(DEAD_LETTER_TOPIC, letter_body))
            if env is not None:
                started = held.started_at if isinstance(held, Job) else finished
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
                    history=env.history,
                )
                result_body = wire.encode(result)
                if len(result_body) > self.max_msg_size:  # the dead letter keeps what fits
                    result_body = wire.encode(msgspec.structs.replace(result, history=()))
                await self._publish(lambda: self.publisher.pub(RESULTS_TOPIC, result_body))
        except PublishError as exc:
            self._requeue(held, "unacknowledged", f"dead letter not acknowledged ({exc})")
            return
        held.hooks.dead_lettered(held, reason, error)
        held.answer(finish=True)
        log.error(
            "%s %-14s failed after %d attempt(s) (%s): %s: %s; sent to %s",
            held.label,
            env.task if env is not None else "-",
            attempts,
            reason,
            error.type,
            error.message,
            DEAD_LETTER_TOPIC,
        )

    async def _publish(
        self, send: Callable[[], Awaitable[None]], *, job_copy: bool = False
    ) -> None:
        """Publish with ``send``; after a failure, wait for the publisher to reconnect and send
        once more. ``job_copy``: what is sent is a copy of the job itself (a retry, a give-back),
        which its caller replaces with nsqd's REQ if this raises: when nsqd may have stored the
        first send (it did not answer in time), sending again would make a second copy and the
        REQ a third, so this raises at once and the REQ is the only other copy. An outcome
        (dead letter, failed result) is sent again: a second copy of it is only counted."""
        # nsqd closes a connection that sent a message it refused; the publisher reconnects
        # within a second: wait for it (once) rather than requeue the job and run it again.
        await self.publisher.wait_connected(RECONNECT_WAIT_S)
        try:
            await send()
        except PublishRejected:
            raise
        except PublishError as exc:
            if job_copy and isinstance(exc, PublishTimeout):
                raise
            if not await self.publisher.wait_connected(RECONNECT_WAIT_S):
                raise
            await send()

    def _requeue(self, held: Held, why: RequeueReason, detail: str) -> None:
        delay_s = backoff_delay(held.message.attempts, self.backoff_base_s, self.backoff_cap_s)
        log.warning("%s: %s; requeueing in %.2fs", held.label, detail, delay_s)
        held.hooks.requeued(held, why, delay_s)
        held.answer(finish=False, delay_ms=int(delay_s * 1000))
