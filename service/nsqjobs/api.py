"""The HTTP API's request and answer types (msgspec only): what clients send and get back.

The gateway validates with these types and the OpenAPI document is generated from them, so a
client built on this module and the server can never disagree about a field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Final, Literal

import msgspec

from nsqjobs.names import (
    MAX_BATCH_JOBS,
    MAX_DELAY_MS,
    MAX_EXPIRES_S,
    MAX_JOB_ID_LENGTH,
    MAX_LEDGER_DELAY_S,
    MAX_WAIT_IDS,
    MAX_WAIT_LIMIT_S,
)

# 1-128 of A-Za-z0-9._:- but not "." or "..": clients (curl, httpx, browsers) remove such dot
# segments from /v1/jobs/{id} before sending, so no URL could name that job. Written without a
# lookahead, so that JSON Schema tools on RE2 (Go's regexp) compile the served pattern.
JOB_ID_PATTERN = re.compile(r"^(?:\.{0,2}[A-Za-z0-9_:-][A-Za-z0-9._:-]*|\.{3}[A-Za-z0-9._:-]*)$")
# How deep a job's ``args`` may nest objects and arrays (``args`` itself is level 1): deeper
# JSON is refused (422) before anything is published, so no worker is handed what it cannot
# decode.
MAX_ARGS_DEPTH: Final = 32

JobId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=MAX_JOB_ID_LENGTH, pattern=JOB_ID_PATTERN.pattern)
]
# nsqd defers a message at most MAX_DELAY_MS; the job ledger holds longer delays (the gateway
# refuses them without one, naming the ledger).
DelayMs = Annotated[
    int,
    msgspec.Meta(
        ge=0,
        le=MAX_LEDGER_DELAY_S * 1000,
        description=f"milliseconds before the job may start; over {MAX_DELAY_MS} (nsqd's "
        "limit) only with the job ledger on",
    ),
]
RunAt = Annotated[
    float,
    msgspec.Meta(
        ge=0,
        description="Unix seconds at which the job may start (not with `delay_ms`; a time "
        f"past is now); more than {MAX_DELAY_MS // 1000} s ahead only with the job ledger on, "
        f"and then at most {MAX_LEDGER_DELAY_S} s ahead",
    ),
]
ExpiresS = Annotated[
    float,
    msgspec.Meta(
        gt=0,
        le=MAX_EXPIRES_S,
        description="seconds after acceptance past which the job is dead-lettered as expired "
        "instead of started; with delay_ms or run_at, longer than the delay (else 422)",
    ),
]


class SubmitRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/jobs`` and one item of a batch."""

    task: str
    args: dict[str, Any] = {}
    id: JobId | None = None
    delay_ms: DelayMs = 0
    expires_s: ExpiresS | None = None
    run_at: RunAt | None = None


class BatchJob(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One job of a batch: a job body without ``delay_ms`` (one batch shares one acceptance
    time); a ``run_at`` ahead is published on its own, with DPUB."""

    task: str
    args: dict[str, Any] = {}
    id: JobId | None = None
    expires_s: ExpiresS | None = None
    run_at: RunAt | None = None
    delay_ms: ClassVar[int] = 0


class BatchRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/jobs/batch``."""

    jobs: Annotated[list[BatchJob], msgspec.Meta(min_length=1, max_length=MAX_BATCH_JOBS)]


class Accepted(msgspec.Struct, frozen=True):
    """The 202 answer for one job; ``due_at`` (Unix seconds) only for a delayed one."""

    id: str
    task: str
    status: str = "queued"
    due_at: float | msgspec.UnsetType = msgspec.UNSET


class BatchAccepted(msgspec.Struct, frozen=True):
    """The 202 answer for a batch, ids in request order."""

    ids: list[str]
    status: str = "queued"


class WaitRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/jobs/wait``: wait up to ``timeout_s`` for the first (or all) of
    ``ids`` to finish. An id given twice counts once."""

    ids: Annotated[list[JobId], msgspec.Meta(min_length=1, max_length=MAX_WAIT_IDS)]
    timeout_s: Annotated[
        float,
        msgspec.Meta(
            ge=0,
            le=MAX_WAIT_LIMIT_S,  # the gateway holds each request to its own --max-wait-s
            description="seconds to wait at most (up to the gateway's --max-wait-s); 0 answers "
            "what is known now",
        ),
    ] = 0.0
    return_when: Literal["first", "all"] = "all"


class OutcomeError(msgspec.Struct, frozen=True):
    """Why a job ended without a result: the exception's type name and message."""

    type: str
    message: str


class JobOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """How one job ended (from its result message, or from the job ledger)."""

    id: str
    task: str
    status: Literal["succeeded", "failed", "dead", "cancelled"]
    result: Any = None
    error: OutcomeError | None = None
    attempts: int = 0
    worker: str | None = None
    finished_at: float | None = None


class WaitAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """The answer of ``POST /v1/jobs/wait``, ids in request order.

    ``done``: the jobs that finished; ``pending``: not finished (or not known to have finished)
    when the wait ended; ``unknown``: ids the job ledger does not hold (always empty without
    a ledger). ``ledger``: false when the gateway has no job ledger: then only outcomes that
    arrived during the wait, or shortly before it on this gateway, can be reported."""

    done: list[JobOutcome]
    pending: list[str]
    unknown: list[str]
    ledger: bool
