"""The one wire contract: job, result and dead-letter envelopes, cancels and started events, as
frozen, versioned structs.

JSON via msgspec (typed, validating, fast). Never pickle: any process in any language can read
a topic with a JSON parser.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

import msgspec

from nsqjobs.errors import DecodeError
from nsqjobs.names import WIRE_VERSION


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What went wrong: the exception type name and its message."""

    type: str
    message: str

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        """Describe an exception without its traceback (tracebacks go to the log); one whose
        ``str()`` raises is described as unprintable, as the traceback module does."""
        try:
            message = str(exc)
        except Exception:
            message = f"<unprintable {type(exc).__name__} object>"
        return cls(type=type(exc).__name__, message=message or type(exc).__name__)


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """One failed execution of a job, carried forward in the envelope across retries."""

    attempt: int
    worker: str
    started_at: float
    finished_at: float
    error: ErrorInfo


class JobEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    """A job as it travels on a queue topic.

    ``attempt`` is the number of executions already recorded in ``history``; nsqd's own
    delivery counter is added by the worker, so crashes (which record nothing) still count.
    """

    v: int = WIRE_VERSION
    id: str
    task: str
    args: dict[str, Any]
    created_at: float
    timeout_s: float | None = None
    deadline: float | None = None
    # When a delayed job is due (Unix seconds); a worker receiving it earlier defers it again
    # (nsqd keeps a deferred message across a clean restart, but not its delay).
    due_at: float | None = None
    attempts: int = 0
    history: tuple[Attempt, ...] = ()


class ResultEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of a job, published once to the results topic."""

    v: int = WIRE_VERSION
    id: str
    task: str
    status: Literal["succeeded", "failed"]
    result: Any = None
    error: ErrorInfo | None = None
    attempts: int
    worker: str
    started_at: float
    finished_at: float
    duration_s: float
    # The attempts that failed before this outcome (a success adds none; a failed result
    # includes its last attempt). Empty in results from before this field existed.
    history: tuple[Attempt, ...] = ()


DeadLetterReason = Literal[
    "max_attempts", "undecodable", "unknown_task", "expired", "not_retryable"
]


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A job that will not be retried, with why and everything needed to replay it."""

    v: int = WIRE_VERSION
    reason: DeadLetterReason
    error: ErrorInfo
    worker: str
    at: float
    job: JobEnvelope | None = None
    raw: str | None = None  # the undecodable body, as text with replacement characters


class Cancel(msgspec.Struct, frozen=True, kw_only=True):
    """A job cancelled through the API: workers skip it, and end it if it runs in a child."""

    v: int = WIRE_VERSION
    id: str
    at: float = 0.0  # when it was cancelled (Unix seconds; 0 if the sender did not say)


class Started(msgspec.Struct, frozen=True, kw_only=True):
    """A worker started a job of a task with ``track_started``: the ledger reports it running.

    A message on the started topic is a JSON array of these (the events of one worker's event
    loop turn: one message for many jobs), or a single one.
    """

    v: int = WIRE_VERSION
    id: str
    worker: str
    at: float


_encoder = msgspec.json.Encoder()
_job_decoder = msgspec.json.Decoder(JobEnvelope)
_result_decoder = msgspec.json.Decoder(ResultEnvelope)
_dead_decoder = msgspec.json.Decoder(DeadLetter)
_cancel_decoder = msgspec.json.Decoder(Cancel)
_started_decoder = msgspec.json.Decoder(Started | list[Started])

Envelope = JobEnvelope | ResultEnvelope | DeadLetter | Cancel | Started
E = TypeVar("E", JobEnvelope, ResultEnvelope, DeadLetter, Cancel)


def encode(envelope: Envelope) -> bytes:
    """Serialise an envelope to JSON bytes."""
    return _encoder.encode(envelope)


def encode_value(value: Any) -> bytes:
    """Any value as an envelope would carry it (a task's result, its arguments): JSON bytes,
    with the encoder the envelopes use. Raises what msgspec raises for a value JSON cannot hold."""
    return _encoder.encode(value)


def _too_deep(exc: RecursionError) -> str:
    return f"nested too deep to decode (RecursionError: {exc})"


def _decode(decoder: msgspec.json.Decoder[E], raw: bytes, what: str) -> E:
    try:
        envelope = decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"not a valid {what} envelope: {exc}", raw) from exc
    except RecursionError as exc:
        # JSON nested deeper than the decoder's stack allows. Undecodable like any other bad
        # message (a consumer that let it through would requeue it for ever).
        raise DecodeError(f"not a valid {what} envelope: {_too_deep(exc)}", raw) from exc
    if envelope.v != WIRE_VERSION:
        raise DecodeError(f"unsupported {what} envelope version {envelope.v}", raw)
    return envelope


def decode_job(raw: bytes) -> JobEnvelope:
    """Parse a job envelope; raises :class:`DecodeError` (keeping ``raw``) if it is not one."""
    return _decode(_job_decoder, raw, "job")


def decode_result(raw: bytes) -> ResultEnvelope:
    """Parse a result envelope; raises :class:`DecodeError` if it is not one."""
    return _decode(_result_decoder, raw, "result")


def decode_dead_letter(raw: bytes) -> DeadLetter:
    """Parse a dead-letter envelope; raises :class:`DecodeError` if it is not one."""
    return _decode(_dead_decoder, raw, "dead-letter")


def decode_cancel(raw: bytes) -> Cancel:
    """Parse a cancel message; raises :class:`DecodeError` if it is not one."""
    return _decode(_cancel_decoder, raw, "cancel")


def encode_started(events: Sequence[Started]) -> bytes:
    """Started events as one message: a JSON array."""
    return _encoder.encode(events)


def decode_started(raw: bytes) -> list[Started]:
    """Parse a started message (an array of events, or one); raises :class:`DecodeError`."""
    try:
        decoded = _started_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise DecodeError(f"not a valid started event: {exc}", raw) from exc
    except RecursionError as exc:
        raise DecodeError(f"not a valid started event: {_too_deep(exc)}", raw) from exc
    events = decoded if isinstance(decoded, list) else [decoded]
    for event in events:
        if event.v != WIRE_VERSION:
            raise DecodeError(f"unsupported started event version {event.v}", raw)
    return events


class _RandomHex:
    """Hex digits from the OS's random source, read 4 KiB at a time: ``os.urandom`` gives up the
    GIL around its system call, and a gateway's event loop that gives it up for every job
    waits to take it back from its ledger's writer thread. Thread-safe; a forked child starts
    with none of its parent's digits (they would repeat its ids)."""

    CHUNK = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._digits = ""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._digits, self._at = "", 0

    def take(self, n: int) -> str:
        """``n`` hex digits never handed out before (``n`` <= 2 * CHUNK)."""
        with self._lock:
            at = self._at
            if at + n > len(self._digits):
                self._digits, at = os.urandom(self.CHUNK).hex(), 0
            self._at = at + n
            return self._digits[at : at + n]


_random_hex = _RandomHex()


def new_job_id() -> str:
    """A fresh job id: 32 hex characters, the time in milliseconds (12) then 80 random bits
    (20): unique without coordination, and in about the order they were made, so the ledger's
    id index grows at its end (random ids scatter every insert over the whole index: 3-5x the
    ledger's write cost on a large table, bench/results/ledger_ingest.md)."""
    return f"{time.time_ns() // 1_000_000:012x}{_random_hex.take(20)}"


def new_job_ids(n: int) -> list[str]:
    """``n`` fresh job ids (as :func:`new_job_id`) from one read of the random source."""
    prefix = f"{time.time_ns() // 1_000_000:012x}"
    raw = os.urandom(10 * n).hex()
    return [prefix + raw[i : i + 20] for i in range(0, 20 * n, 20)]


def now() -> float:
    """Wall-clock time in Unix seconds, the unit of every timestamp on the wire."""
    return time.time()
