"""What the worker holds of each message: its typed state, and the pynsq message behind it.

A held message is a :class:`Job` (a registered task) or a :class:`Stray` (nothing to run: not a
job envelope, or an unknown task), and is always in one :class:`Phase`.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from typing import Any, Protocol

from nsqjobs import wire
from nsqjobs.registry import Task
from nsqjobs.worker.hooks import TaskHooks


class Message(Protocol):
    """What the worker uses of a pynsq message (``enable_async``: it answers nsqd itself)."""

    @property
    def id(self) -> bytes:
        """nsqd's 16-byte message id."""

    @property
    def body(self) -> bytes:
        """The message body: a job envelope, normally."""

    @property
    def attempts(self) -> int:
        """nsqd's delivery count of this message, from 1."""

    def enable_async(self) -> None:
        """Tell pynsq the handler answers (FIN, REQ) on its own, later."""

    def finish(self) -> None:
        """FIN: done with the message."""

    def requeue(self, *, backoff: bool = ..., time_ms: int = ...) -> None:
        """REQ: deliver the message again after ``time_ms``."""

    def touch(self) -> None:
        """TOUCH: reset nsqd's message timeout."""

    def has_responded(self) -> bool:
        """Whether FIN or REQ was sent."""


def held_key(message: Message) -> int:
    """The key of a held message: the delivery itself, not nsqd's message id. A message nsqd
    delivers again while its first copy still runs here (its connection closed, the copy timed
    out) has the same id: keyed by id, whichever copy ended first would forget the other,
    which would then run unseen by the slots, TOUCHes, cancels and the drain."""
    return id(message)


class Phase(enum.Enum):
    """Where a held message is. A message is answered (FIN or REQ) once, on entering ANSWERED."""

    RECEIVED = "received"  # decoded (or not), being admitted
    WAITING = "waiting"  # admitted; no slot free yet (a message nsqd sent as RDY moved); TOUCHed
    RUNNING = "running"  # in the executor; TOUCHed while so
    PUBLISHING = "publishing"  # result sent; FIN once nsqd acknowledges it
    SETTLING = "settling"  # a coroutine publishes its retry or dead letter
    ANSWERED = "answered"  # FIN or REQ sent (a requeue at shutdown included)


_IN_PROGRESS = frozenset({Phase.RUNNING, Phase.PUBLISHING})


class _Held:
    """A message this worker holds: its phase, and what drain() may cancel or wait for."""

    __slots__ = ("drained", "hooks", "keep", "message", "pending", "phase")

    def __init__(self, message: Message, hooks: TaskHooks) -> None:
        self.message = message
        self.hooks = hooks
        self.phase = Phase.RECEIVED
        # Set while the job's slot outlives it (a timed-out thread runs on): called before the
        # answer, so that nsqd's room for this connection does not grow by the freed message.
        self.keep: Callable[[Message], None] | None = None
        # The executor's future while RUNNING, the settling coroutine's task while SETTLING.
        self.pending: asyncio.Future[Any] | None = None
        self.drained: asyncio.Future[None] | None = None  # made by drain() to wait for the end

    @property
    def message_id(self) -> str:
        """nsqd's id of the message."""
        return self.message.id.decode()

    @property
    def in_progress(self) -> bool:
        """An attempt is under way (running, or its result being published)."""
        return self.phase in _IN_PROGRESS

    def answer(self, *, finish: bool, delay_ms: int = 0) -> None:
        """FIN or REQ, once: after a drain requeued a message, a late outcome is dropped."""
        if self.phase is Phase.ANSWERED or self.message.has_responded():
            return
        self.phase = Phase.ANSWERED
        if self.keep is not None:
            self.keep(self.message)
        if finish:
            self.message.finish()
        else:
            self.message.requeue(backoff=False, time_ms=delay_ms)


class Stray(_Held):
    """A message with no task to run: not a job envelope (``env`` None), or an unknown task."""

    __slots__ = ("env",)

    task_name = "-"  # never the unknown name: metric labels stay bounded
    attempt = 0
    max_attempts = 0

    def __init__(self, message: Message, env: wire.JobEnvelope | None, hooks: TaskHooks) -> None:
        super().__init__(message, hooks)
        self.env = env

    @property
    def job_id(self) -> str | None:
        """The envelope's id, if the message is one."""
        return None if self.env is None else self.env.id

    @property
    def label(self) -> str:
        """How logs name it."""
        return f"job {self.env.id}" if self.env is not None else f"message {self.message_id}"


class Job(_Held):
    """A job of a registered task, admitted or being admitted."""

    __slots__ = ("attempt", "env", "max_attempts", "started_at", "t0", "task")

    def __init__(
        self,
        message: Message,
        env: wire.JobEnvelope,
        task: Task,
        attempt: int,
        max_attempts: int,
        hooks: TaskHooks,
    ) -> None:
        # The base's fields set here, not through super(): this runs once per job (hot path).
        self.message = message
        self.hooks = hooks
        self.phase = Phase.RECEIVED
        self.pending: asyncio.Future[Any] | None = None
        self.drained: asyncio.Future[None] | None = None
        self.keep: Callable[[Message], None] | None = None
        self.env = env
        self.task = task
        self.attempt = attempt  # the envelope's recorded attempts plus nsqd's deliveries
        self.max_attempts = max_attempts
        self.started_at = wire.now()  # received, then started (wall clock, for the wire)
        self.t0 = time.perf_counter()  # for durations

    def mark_started(self) -> None:
        """The executor started it only now (it waited for a slot or a child process)."""
        self.started_at = wire.now()
        self.t0 = time.perf_counter()

    @property
    def job_id(self) -> str:
        """The envelope's id."""
        return self.env.id

    @property
    def task_name(self) -> str:
        """The task's registered name."""
        return self.task.name

    @property
    def label(self) -> str:
        """How logs name it."""
        return f"job {self.env.id}"


Held = Job | Stray
