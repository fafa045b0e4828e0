"""The outcome policy, branch by branch: admission, then what follows a failed attempt."""

from __future__ import annotations

from typing import Any

import pytest
from nsqjobs import wire
from nsqjobs.errors import (
    FieldError,
    InvalidArgumentsError,
    PublishError,
    PublishRejected,
    ResultNotEncodable,
    Retry,
    TaskTimeoutError,
)
from nsqjobs.names import MAX_DELAY_MS
from nsqjobs.registry import Task
from nsqjobs.worker.outcome import (
    MAX_DELAY_S,
    DeadLetter,
    Refused,
    RetryAfter,
    admit,
    after_failure,
    backoff_delay,
)

NOW = 1_700_000_000.0


class Permanent(Exception):
    """What the test task declares in ``throws``."""


class MorePermanent(Permanent):
    """A subclass of a declared type counts too."""


def run(args: dict[str, Any]) -> None:
    """The tasks' function (never called here)."""


PLAIN = Task(name="t.plain", fn=run, args_type=dict[str, Any])
THROWS = Task(name="t.throws", fn=run, args_type=dict[str, Any], throws=(Permanent,))


def envelope(deadline: float | None = None) -> wire.JobEnvelope:
    return wire.JobEnvelope(id="j1", task="t.plain", args={}, created_at=NOW, deadline=deadline)


def decide(
    exc: BaseException,
    *,
    attempt: int = 1,
    max_attempts: int = 5,
    task: Task = PLAIN,
    deadline: float | None = None,
    jitter: float = 0.0,
) -> DeadLetter | RetryAfter:
    """The policy with base 1 s, cap 60 s, and a fixed share of the random half."""
    return after_failure(
        envelope(deadline),
        attempt,
        max_attempts,
        exc,
        task,
        now=NOW,
        backoff_base_s=1.0,
        backoff_cap_s=60.0,
        jitter=lambda low, high: low + (high - low) * jitter,
    )


# -- admission -----------------------------------------------------------------------------------


def test_a_fresh_job_is_admitted() -> None:
    assert admit(envelope(), 1, 5, NOW) is None
    assert admit(envelope(deadline=NOW + 1), 5, 5, NOW) is None
    assert admit(envelope(deadline=NOW), 1, 5, NOW) is None  # at the deadline, not past it


def test_deliveries_past_max_attempts_are_refused() -> None:
    refused = admit(envelope(), 6, 5, NOW)
    assert isinstance(refused, Refused) and refused.reason == "max_attempts"
    assert refused.error.type == "AttemptsExhausted"
    assert "delivered 6 times" in refused.error.message


def test_a_job_past_its_deadline_is_refused_as_expired() -> None:
    assert admit(envelope(deadline=NOW - 0.001), 1, 5, NOW) == Refused(
        "expired",
        wire.ErrorInfo(type="Expired", message="job deadline passed before it could start"),
    )


def test_exhausted_attempts_win_over_expiry() -> None:
    refused = admit(envelope(deadline=NOW - 1), 6, 5, NOW)
    assert refused is not None and refused.reason == "max_attempts"


# -- after a failure -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        InvalidArgumentsError([FieldError("args.n", "expected int")]),
        ResultNotEncodable("result of type complex"),
        PublishRejected("pub results: E_BAD_MESSAGE"),
    ],
    ids=["invalid_arguments", "unencodable_result", "result_refused"],
)
def test_failures_retrying_cannot_fix_are_dead_lettered_at_once(exc: Exception) -> None:
    assert decide(exc, attempt=1) == DeadLetter("not_retryable")


def test_types_the_task_throws_are_not_retried_subclasses_included() -> None:
    assert decide(Permanent("no"), task=THROWS) == DeadLetter("not_retryable")
    assert decide(MorePermanent("no"), task=THROWS) == DeadLetter("not_retryable")
    # Another task does not declare it: an ordinary failure, retried.
    assert isinstance(decide(Permanent("no"), task=PLAIN), RetryAfter)
    # And the declaring task retries what it does not declare.
    assert isinstance(decide(ValueError("flaky"), task=THROWS), RetryAfter)


def test_not_retryable_is_the_reason_even_on_the_last_attempt() -> None:
    assert decide(Permanent("no"), attempt=5, task=THROWS) == DeadLetter("not_retryable")


def test_the_last_attempt_goes_to_dead_letters() -> None:
    assert decide(ValueError("x"), attempt=5, max_attempts=5) == DeadLetter("max_attempts")
    assert decide(Retry(delay=1), attempt=5, max_attempts=5) == DeadLetter("max_attempts")
    assert decide(ValueError("x"), attempt=7, max_attempts=5) == DeadLetter("max_attempts")


def test_ordinary_failures_back_off_exponentially_with_equal_jitter() -> None:
    # attempt n: step = min(60, 2 ** (n - 1)); delay = step / 2 + jitter in [0, step / 2].
    assert decide(ValueError("x"), attempt=1, jitter=0.0) == RetryAfter(0.5)
    assert decide(ValueError("x"), attempt=1, jitter=1.0) == RetryAfter(1.0)
    assert decide(TaskTimeoutError("slow"), attempt=3, jitter=0.5) == RetryAfter(3.0)
    assert decide(PublishError("away"), attempt=4, jitter=0.0) == RetryAfter(4.0)
    assert decide(ValueError("x"), attempt=30, max_attempts=99, jitter=1.0) == RetryAfter(60.0)


def test_retry_without_a_delay_backs_off_like_any_failure() -> None:
    assert decide(Retry(), attempt=2, jitter=0.0) == RetryAfter(1.0)


def test_retry_with_a_delay_is_honoured_and_capped_by_nsqd() -> None:
    assert decide(Retry(delay=7.5), attempt=1) == RetryAfter(7.5)
    assert decide(Retry(delay=0), attempt=1) == RetryAfter(0.0)
    assert decide(Retry(delay=-3), attempt=1) == RetryAfter(0.0)
    assert decide(Retry(delay=10 * MAX_DELAY_S), attempt=1) == RetryAfter(MAX_DELAY_S)


def test_a_retry_delay_that_is_not_a_number_is_the_tasks_error() -> None:
    # Raised where the task builds it (a failed attempt that says why), never in the worker.
    for bad in ("5", True, [1]):
        with pytest.raises(TypeError, match="Retry delay must be a number of seconds"):
            Retry(delay=bad)  # type: ignore[arg-type]


def test_an_exception_that_cannot_be_printed_is_described_as_such() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise ValueError("no")

    error = wire.ErrorInfo.from_exception(Unprintable())
    assert (error.type, error.message) == ("Unprintable", "<unprintable Unprintable object>")
    assert MAX_DELAY_S * 1000 == MAX_DELAY_MS


def test_a_retry_that_would_start_past_the_deadline_expires_instead() -> None:
    assert decide(Retry(delay=5), deadline=NOW + 4) == DeadLetter("expired")
    assert decide(Retry(delay=5), deadline=NOW + 5) == RetryAfter(5.0)
    assert decide(ValueError("x"), attempt=1, jitter=1.0, deadline=NOW + 0.5) == DeadLetter(
        "expired"
    )


def test_backoff_delay_stays_within_its_step_and_cap() -> None:
    assert backoff_delay(1, 1.0, 60.0, lambda low, high: low) == 0.5
    assert backoff_delay(1, 1.0, 60.0, lambda low, high: high) == 1.0
    assert backoff_delay(0, 1.0, 60.0, lambda low, high: high) == 1.0  # never below attempt 1
    assert backoff_delay(10_000, 1.0, 60.0, lambda low, high: high) == 60.0  # no overflow
    for attempt in range(1, 12):
        delay = backoff_delay(attempt, 0.2, 2.0)
        step = min(2.0, 0.2 * 2 ** (attempt - 1))
        assert step / 2 <= delay <= step
