"""The outcome policy: whether a job may run, and what follows a failed attempt.

Pure functions of their arguments (the clock and the jitter come in as parameters), so every
rule is unit-tested without NSQ. The state machine in :mod:`nsqjobs.worker.jobs` carries out
what they decide.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from nsqjobs import wire
from nsqjobs.errors import InvalidArgumentsError, PublishRejected, ResultNotEncodable, Retry
from nsqjobs.names import MAX_DELAY_MS
from nsqjobs.registry import Task

MAX_DELAY_S = MAX_DELAY_MS / 1000  # above it nsqd drops the connection


# Failures no later attempt can turn into a success, whatever the task.
NOT_RETRYABLE: tuple[type[Exception], ...] = (
    InvalidArgumentsError,
    ResultNotEncodable,
    PublishRejected,
)


@dataclass(frozen=True, slots=True)
class RetryAfter:
    """Publish the job again, to be delivered after ``delay_s`` seconds."""

    delay_s: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Give up: publish a failed result and a dead letter saying why."""

    reason: wire.DeadLetterReason


@dataclass(frozen=True, slots=True)
class Refused:
    """The job may not start: it goes to dead letters for ``reason``, described by ``error``."""

    reason: wire.DeadLetterReason
    error: wire.ErrorInfo


Outcome = RetryAfter | DeadLetter

Jitter = Callable[[float, float], float]


def backoff_delay(
    attempt: int, base_s: float, cap_s: float, jitter: Jitter = random.uniform
) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, capped."""
    step: float = min(cap_s, base_s * 2.0 ** min(max(0, attempt - 1), 64))
    return step / 2 + jitter(0, step / 2)


def admit(env: wire.JobEnvelope, attempt: int, max_attempts: int, now: float) -> Refused | None:
    """Before running: ``None`` if the job may run, or why it goes to dead letters instead.

    ``attempt`` counts this delivery: the envelope's recorded attempts plus nsqd's deliveries.
    """
    if attempt > max_attempts:
        # Earlier deliveries died without recording anything (worker crash or msg timeout).
        return Refused(
            "max_attempts",
            wire.ErrorInfo(
                type="AttemptsExhausted",
                message=(
                    f"delivered {attempt} times; earlier attempts ended without an outcome "
                    "(worker crashed or the message timed out)"
                ),
            ),
        )
    if env.deadline is not None and now > env.deadline:
        return Refused(
            "expired",
            wire.ErrorInfo(type="Expired", message="job deadline passed before it could start"),
        )
    return None


def after_failure(
    env: wire.JobEnvelope,
    attempt: int,
    max_attempts: int,
    exc: BaseException,
    task: Task,
    *,
    now: float,
    backoff_base_s: float,
    backoff_cap_s: float,
    jitter: Jitter = random.uniform,
) -> Outcome:
    """What follows attempt ``attempt`` of ``max_attempts`` failing with ``exc``.

    Dead letter at once when retrying cannot help (``not_retryable``: bad arguments, a result
    that cannot be encoded or that nsqd refuses, a type listed in the task's ``throws``); when
    the attempts are spent (``max_attempts``); or when the retry would start after the job's
    deadline (``expired``). Otherwise retry after the delay the task asked for with
    :class:`Retry`, or after exponential backoff with jitter; never past nsqd's longest delay.
    """
    if isinstance(exc, NOT_RETRYABLE) or (task.throws and isinstance(exc, task.throws)):
        return DeadLetter("not_retryable")
    if attempt >= max_attempts:
        return DeadLetter("max_attempts")
    if isinstance(exc, Retry) and exc.delay is not None:
        delay = max(0.0, exc.delay)
    else:
        delay = backoff_delay(attempt, backoff_base_s, backoff_cap_s, jitter)
    delay = min(delay, MAX_DELAY_S)
    if env.deadline is not None and now + delay > env.deadline:
        return DeadLetter("expired")
    return RetryAfter(delay)
