"""What both ledger stores share: a row as a :class:`JobRecord`, arguments as canonical JSON,
and failed attempts and earlier runs as the JSON their columns hold."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from nsqjobs import wire
from nsqjobs.ledger.store import STATUSES, JobRecord, LedgerError

# The columns :func:`record` reads, in its order (a store may select more after them).
COLUMNS: Final = (
    "id, task, args, status, created_at, accepted_at, published_at, finished_at, attempts, "
    "worker, result, error, dead_reason, dead_at, seq, due_at, started_at, redrives, replays, "
    "history, runs"
)
# Sorted keys, so the same arguments are the same text whatever order the client wrote them in.
canonical: Final = msgspec.json.Encoder(order="sorted")
encoder: Final = msgspec.json.Encoder()
_error_decoder = msgspec.json.Decoder(wire.ErrorInfo)
_history_decoder = msgspec.json.Decoder(tuple[wire.Attempt, ...])
_runs_decoder = msgspec.json.Decoder(tuple[dict[str, Any], ...])


def record(row: Sequence[Any]) -> JobRecord:
    """A row of :data:`COLUMNS` as a job. ``args`` '' (the SQLite store since schema 3) means
    the envelope, selected after them (index 21), holds the arguments."""
    error = None if row[11] is None else _error_decoder.decode(row[11])
    return JobRecord(
        id=row[0],
        task=row[1],
        args=msgspec.json.decode(row[2]) if row[2] else wire.decode_job(row[21]).args,
        status=row[3],
        created_at=row[4],
        accepted_at=row[5],
        published_at=row[6],
        finished_at=row[7],
        attempts=row[8],
        worker=row[9],
        result=None if row[10] is None else msgspec.json.decode(row[10]),
        error=error,
        dead_reason=row[12],
        dead_at=row[13],
        due_at=row[15],
        started_at=row[16],
        redrives=row[17],
        replays=row[18],
        history=() if row[19] is None else _history_decoder.decode(row[19]),
        runs=() if row[20] is None else _runs_decoder.decode(row[20]),
    )


def history_json(history: tuple[wire.Attempt, ...] | None) -> str | None:
    """Failed attempts as the ``history`` column holds them (None: none reported)."""
    return encoder.encode(history).decode() if history else None


def replayed_runs(job: JobRecord, now: float) -> str:
    """The ``runs`` column of a dead job replayed at ``now``: its earlier runs and this one."""
    run = {
        "status": job.status,
        "attempts": job.attempts,
        "error": msgspec.to_builtins(job.error),
        "dead_reason": job.dead_reason,
        "finished_at": job.finished_at,
        "dead_at": job.dead_at,
        "history": msgspec.to_builtins(job.history),
        "replayed_at": now,
    }
    return encoder.encode([*job.runs, run]).decode()


def replayed_envelope(envelope: bytes, now: float) -> bytes:
    """The envelope a replay publishes: as accepted, less an expiry that has passed (the job
    would only expire again)."""
    job = wire.decode_job(envelope)
    if job.deadline is not None and job.deadline <= now:
        return wire.encode(msgspec.structs.replace(job, deadline=None))
    return envelope


def listing_start(status: str | None, limit: int, cursor: str | None) -> int:
    """Check a listing's filter, limit and cursor (both stores' rules); the position it starts
    after. Raises :class:`LedgerError` naming what is wrong."""
    if status is not None and status not in STATUSES:
        raise LedgerError(f"unknown status {status!r} (one of {', '.join(STATUSES)})")
    if not 1 <= limit <= 1000:
        raise LedgerError("limit must be 1-1000")
    # A cursor is a position the store gave out: digits that fit a 64-bit integer.
    if cursor is not None and not (cursor.isascii() and cursor.isdigit() and len(cursor) < 19):
        raise LedgerError(f"not a cursor this ledger gave out: {cursor!r}")
    return int(cursor or 0)


def resolve(futures: list[asyncio.Future[Any]], results: list[tuple[bool, Any]]) -> None:
    """Settle a committed batch's futures on their loop: each with its value or its error (a
    future its caller gave up on is left alone)."""
    for fut, (ok, value) in zip(futures, results, strict=True):
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
