"""The error tree: one root, small subtrees, and ``Retry`` for control flow."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


class NsqjobsError(Exception):
    """Root of every error nsqjobs raises on purpose.

    Every one survives pickling (a task run by the process executor that raises one, the
    client's errors included): rebuilt from its message and attributes without calling its
    ``__init__``, whose arguments differ from class to class.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (type(self), self.args, dict(self.__dict__)))


def _restore(cls: type[NsqjobsError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls, *args)
    error.__dict__.update(state)
    return error


class ConfigError(NsqjobsError):
    """A setting is missing or out of range; the message names the flag and variable."""


class ListenError(NsqjobsError):
    """A daemon could not listen on its HTTP port; the message names the address and the
    setting that chose it."""


@contextmanager
def listening(host: str, port: int, settings: str) -> Iterator[None]:
    """Turn an OSError raised while binding ``host:port`` into one :class:`ListenError` line
    naming the address and ``settings`` (the flags and variables that chose it)."""
    try:
        yield
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise ListenError(f"cannot listen on {host or '*'}:{port} ({settings}): {reason}") from None


class TaskDefinitionError(NsqjobsError, ValueError):
    """A task is declared wrongly, or a task module does not import; the message says where."""


class DecodeError(NsqjobsError):
    """Bytes that are not a valid envelope. Keeps the raw bytes for the dead-letter topic."""

    def __init__(self, message: str, raw: bytes) -> None:
        super().__init__(message)
        self.raw = raw


class UnknownTaskError(NsqjobsError):
    """A job names a task that is not registered."""

    def __init__(self, task: str) -> None:
        shown = task if len(task) <= 100 else f"{task[:100]}..."  # a 10 KB name is not echoed
        super().__init__(f"unknown task {shown!r}")
        self.task = task


@dataclass(frozen=True)
class FieldError:
    """One invalid field: a JSON-path-like location and why it is wrong."""

    field: str
    message: str


@dataclass
class InvalidArgumentsError(NsqjobsError):
    """Arguments (or another part of a request) failed validation."""

    errors: list[FieldError] = field(default_factory=list)

    def __str__(self) -> str:
        return "; ".join(f"{e.field}: {e.message}" for e in self.errors)


class JobTooLarge(NsqjobsError):
    """A job's envelope (or one queue's MPUB of a batch) is over nsqd's size limit, so nsqd would
    refuse it: answered 413 before anything is published."""

    def __init__(self, message: str, limit: int, field: str = "body") -> None:
        super().__init__(message)
        self.limit = limit
        self.field = field


class PublishError(NsqjobsError):
    """No nsqd accepted a publish (not connected, no answer in time, or an error answer)."""


class PublishTimeout(PublishError):
    """nsqd did not answer a publish in time: it may or may not have stored the message."""


class PublishConnectionLost(PublishTimeout):
    """The connection closed after the publish was sent and before nsqd answered: as with a
    timeout, nsqd may or may not have stored the message."""


class PublishRejected(PublishError):
    """nsqd answered the publish with an error (``E_BAD_MESSAGE``...): retrying will not help."""


class ResultNotEncodable(NsqjobsError):
    """A task returned a value the JSON wire format cannot hold; running it again cannot help."""


class ResultTooLarge(ResultNotEncodable):
    """A task's encoded result is over nsqd's ``--max-msg-size``: nsqd would refuse it."""


class TaskTimeoutError(NsqjobsError):
    """A task ran past its time limit."""


class JobCancelled(NsqjobsError):
    """A running job was cancelled and its child process ended: no result, no retry."""


class TaskFailed(NsqjobsError):
    """A job ran and ended without a result: the task raised (its attempts spent, or a
    permanent error), timed out, or was cancelled or dead-lettered. Every executor rung and the
    client raise this one type, carrying the task's error type name and message (the local
    rungs chain the original exception as ``__cause__``)."""

    def __init__(
        self, error_type: str, message: str, *, job_id: str | None = None, status: str = "failed"
    ) -> None:
        where = f"job {job_id} " if job_id else ""
        super().__init__(f"{where}{status}: {error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.job_id = job_id
        self.status = status


class Retry(NsqjobsError):
    """Raised by a task to ask for another attempt, optionally after ``delay`` seconds."""

    def __init__(self, message: str = "retry requested", delay: float | None = None) -> None:
        # Checked here, in the task: a bad delay is the task's error (a failed attempt that
        # says so), not one of the worker's when it schedules the retry.
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int | float)):
            raise TypeError(f"Retry delay must be a number of seconds or None, got {delay!r}")
        super().__init__(message)
        self.delay = delay
