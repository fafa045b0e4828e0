"""What one transaction of the PostgreSQL store runs: the schema, the hot statements, and the
calls of a transaction in order with neighbours of a kind merged into one statement."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from nsqjobs import wire
from nsqjobs.ledger.rows import COLUMNS, record
from nsqjobs.ledger.store import Accepted, OutcomeVerdict

# Versioned migrations: MIGRATIONS[n] takes the schema from version n to n + 1 (the row of
# schema_version). Append only; never edit one that has shipped. The columns are the SQLite
# store's (times are Unix seconds; ``result`` is JSON text once a result is in, 'null' for
# none), plus ``redrive_reason``: why the relay is to publish the job next (NULL: nsqd's
# acknowledgement never recorded, "unpublished").
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE jobs (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            task TEXT NOT NULL,
            args TEXT NOT NULL,
            envelope BYTEA NOT NULL,
            status TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            accepted_at DOUBLE PRECISION NOT NULL,
            published_at DOUBLE PRECISION,
            finished_at DOUBLE PRECISION,
            attempts INTEGER NOT NULL DEFAULT 0,
            worker TEXT,
            result TEXT,
            error TEXT,
            dead_reason TEXT,
            dead_at DOUBLE PRECISION,
            due_at DOUBLE PRECISION,
            sent_at DOUBLE PRECISION,
            lease_until DOUBLE PRECISION,
            started_at DOUBLE PRECISION,
            redrives INTEGER NOT NULL DEFAULT 0,
            replays INTEGER NOT NULL DEFAULT 0,
            history TEXT,
            runs TEXT,
            redrive_reason TEXT,
            session BIGINT
        ) WITH (fillfactor = 85)""",
        # Gateway sessions (Store.beat_session): a job the accept path recorded as published
        # before nsqd acknowledged it names its session (``jobs.session``, the sessions' seq).
        """CREATE TABLE sessions (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            started_at DOUBLE PRECISION NOT NULL,
            heartbeat_at DOUBLE PRECISION NOT NULL,
            low DOUBLE PRECISION NOT NULL,
            ended_at DOUBLE PRECISION,
            handled_at DOUBLE PRECISION
        )""",
        "CREATE INDEX jobs_by_status ON jobs (status, seq)",
        "CREATE INDEX jobs_by_task ON jobs (task, seq)",
        "CREATE INDEX jobs_unfinished ON jobs (sent_at) WHERE status IN ('queued', 'running')",
        # Never sent (held, replayed, re-driven): the relay's claims find them here. No index
        # names published_at, so noting a publish is a HOT update (room left by fillfactor).
        "CREATE INDEX jobs_unsent ON jobs (seq) "
        "WHERE sent_at IS NULL AND status IN ('queued', 'running')",
        "CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL",
        # Delayed unfinished jobs by when they are due (the oldest-unfinished gauge).
        "CREATE INDEX jobs_delayed ON jobs (due_at) "
        "WHERE due_at IS NOT NULL AND status IN ('queued', 'running')",
    ),
    (
        # When the ledger recorded a job's outcome (the gateway's clock; finished_at is the
        # worker's): retention counts from it (see the SQLite store's schema 4).
        "ALTER TABLE jobs ADD COLUMN recorded_at DOUBLE PRECISION",
        "UPDATE jobs SET recorded_at = finished_at WHERE finished_at IS NOT NULL",
        "CREATE INDEX jobs_recorded ON jobs (recorded_at) WHERE recorded_at IS NOT NULL",
        "DROP INDEX jobs_finished",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

# Rows by an array of ids ($1), looked up one by one in the id index: ``id = ANY($1)`` with
# many ids is planned as a scan of the whole table (measured: 18 ms a lookup at 200k jobs).
BY_IDS: Final = "id IN (SELECT unnest($1::text[]))"

# The sessions of the accepted rows ($10, one per row, NULL for none) that are live, locked
# for the statement (FOR SHARE): a relay handling a session (redrive_lost_sessions) waits for
# the insert to commit, and re-drives its rows; an insert after that finds it handled.
_LIVE: Final = (
    "live AS (SELECT seq, id FROM sessions WHERE id IN (SELECT unnest($10::text[])) "
    "AND ended_at IS NULL AND handled_at IS NULL FOR SHARE)"
)
# A row is recorded as published (published_at = sent_at) when it is sent now (not held) in a
# live session.
#
# Inserts take a transaction-level advisory lock first (before the identity column hands out
# any ``seq``), held to their commit: gateways sharing the ledger then commit new jobs in
# ``seq`` order. Without it, one gateway's seq 10 could commit after another's 11, and a
# listing page that ended at 11 (its cursor) would never show job 10. Uncontended (one
# gateway) it costs a lock call per statement; between gateways, inserts take turns.
SEQ_LOCK_KEY: Final = 0x6E73716A6F6273  # "nsqjobs"
_INSERT_ROWS: Final = (
    "INSERT INTO jobs (id, task, args, envelope, status, created_at, accepted_at, due_at, "
    "sent_at, redrive_reason, published_at, session) SELECT u.id, u.task, u.args, u.envelope, "
    "'queued', u.created_at, u.accepted_at, u.due_at, u.sent_at, u.reason, "
    "CASE WHEN u.sent_at IS NOT NULL AND l.seq IS NOT NULL THEN u.sent_at END, "
    "CASE WHEN u.sent_at IS NOT NULL THEN l.seq END FROM u "
    f"CROSS JOIN (SELECT pg_advisory_xact_lock({SEQ_LOCK_KEY})) AS in_seq_order "
    "LEFT JOIN live AS l ON l.id = u.session"
)
_ROWS: Final = (
    "u AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], "
    "$5::float8[], $6::float8[], $7::float8[], $8::float8[], $9::text[], $10::text[]) "
    "AS u(id, task, args, envelope, created_at, accepted_at, due_at, sent_at, reason, session))"
)

# Accepted jobs, one array per column: the ids that were new, and whether each was recorded
# as published (ON CONFLICT waits for another gateway's uncommitted insert of the same id,
# then skips it).
ACCEPT: Final = (
    f"WITH {_ROWS}, {_LIVE} {_INSERT_ROWS} ON CONFLICT (id) DO NOTHING "
    "RETURNING id, published_at IS NOT NULL AS published"
)

# The common transaction in one statement, one round trip (apply_fast): accepts of ids that
# are all new ($1-$10, as ACCEPT: nothing is inserted when any exists) and publish notes
# ($11 ids, $12 times; never of the same jobs: a publish is noted after its accept committed).
ACCEPT_AND_MARK: Final = (
    f"WITH {_ROWS}, {_LIVE}, "
    f"ins AS ({_INSERT_ROWS} WHERE NOT EXISTS (SELECT 1 FROM u JOIN jobs AS j ON j.id = u.id) "
    "ON CONFLICT (id) DO NOTHING RETURNING id, published_at IS NOT NULL AS published), "
    "marked AS (UPDATE jobs AS j SET published_at = m.at FROM unnest($11::text[], "
    "$12::float8[]) AS m(id, at) WHERE j.id = m.id AND j.published_at IS NULL RETURNING 1) "
    "SELECT id, published FROM ins"
)

# nsqd's acknowledgements: (ids, times).
MARK_PUBLISHED: Final = (
    "UPDATE jobs AS j SET published_at = u.at FROM unnest($1::text[], $2::float8[]) AS u(id, at) "
    "WHERE j.id = u.id AND j.published_at IS NULL"
)

# A worker that gives a job up publishes a dead letter and then the failed result of the same
# final attempt, with the same worker and time: that pair is one outcome, whichever comes first
# (the job is dead, the result adds its attempts). Slack for rounded timestamps.
SAME_OUTCOME_S: Final = 0.001

# An outcome of a replayed job counts only when its run started after the run before ended
# (its dead letter's time; or the replay, if sooner): as the SQLite store's _THIS_RUN says why.
THIS_RUN: Final = (
    "(replays = 0 OR {at} > LEAST("
    "((runs::jsonb -> (jsonb_array_length(runs::jsonb) - 1)) ->> 'replayed_at')::float8, "
    "COALESCE(((runs::jsonb -> (jsonb_array_length(runs::jsonb) - 1)) ->> 'dead_at')::float8, "
    "((runs::jsonb -> (jsonb_array_length(runs::jsonb) - 1)) ->> 'replayed_at')::float8)))"
)

# Results, one array per field (ids unique), $10 the time now: the first terminal outcome wins;
# a failed result may still complete a dead letter recorded first (see SAME_OUTCOME_S).
# RETURNING: recorded.
RECORD_RESULT: Final = (
    "UPDATE jobs AS j SET "
    "status = CASE WHEN j.finished_at IS NULL THEN u.status ELSE j.status END, "
    "error = CASE WHEN j.finished_at IS NULL THEN u.error ELSE j.error END, "
    "worker = CASE WHEN j.finished_at IS NULL THEN u.worker ELSE j.worker END, "
    "finished_at = COALESCE(j.finished_at, u.finished_at), "
    "recorded_at = COALESCE(j.recorded_at, $10::float8), result = u.result, "
    "attempts = u.attempts, history = COALESCE(u.history, j.history), lease_until = NULL "
    "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[], "
    "$7::float8[], $8::text[], $9::float8[]) AS u(id, status, result, error, attempts, worker, "
    "finished_at, history, started_at) WHERE j.id = u.id "
    f"AND {THIS_RUN.format(at='u.started_at')} AND (j.finished_at IS NULL OR (u.status = 'failed' "
    f"AND j.status = 'dead' AND j.result IS NULL AND j.worker = u.worker "
    f"AND abs(j.dead_at - u.finished_at) < {SAME_OUTCOME_S})) RETURNING j.id"
)

# A dead letter ($1 id, $2 reason, $3 at, $4 error, $5 worker, $6 attempts, $7 history, $8 the
# time now): the first terminal outcome, or the letter of a failed result recorded first
# (SAME_OUTCOME_S).
RECORD_DEAD_LETTER: Final = (
    "UPDATE jobs SET status = 'dead', dead_reason = $2, dead_at = $3, "
    "finished_at = COALESCE(finished_at, $3), recorded_at = COALESCE(recorded_at, $8::float8), "
    "error = CASE WHEN finished_at IS NULL THEN $4 ELSE error END, "
    "worker = CASE WHEN finished_at IS NULL THEN $5 ELSE worker END, "
    "attempts = CASE WHEN finished_at IS NULL THEN GREATEST(attempts, $6) ELSE attempts END, "
    "history = COALESCE($7, history), lease_until = NULL "
    f"WHERE id = $1 AND {THIS_RUN.format(at='$3::float8')} "
    "AND (finished_at IS NULL OR (status = 'failed' AND dead_at IS NULL "
    f"AND worker = $5 AND abs(finished_at - $3::float8) < {SAME_OUTCOME_S})) RETURNING 1"
)

# The relay's claim ($1 now, $2 grace, $3 horizon, $4 lease, $5 limit): rows another
# gateway's relay holds are skipped; the reason is read before it is cleared.
CLAIM: Final = (
    "WITH c AS (SELECT seq, COALESCE(redrive_reason, 'unpublished') AS reason FROM jobs "
    "WHERE published_at IS NULL AND status IN ('queued', 'running') "
    "AND (sent_at IS NULL OR sent_at < $1::float8 - $2::float8) "
    "AND (due_at IS NULL OR due_at < $1::float8 + $3::float8) "
    "AND (lease_until IS NULL OR lease_until <= $1::float8) "
    "ORDER BY seq LIMIT $5::int FOR UPDATE SKIP LOCKED) "
    "UPDATE jobs AS j SET sent_at = $1::float8, lease_until = $1::float8 + $4::float8, "
    "redrive_reason = NULL, "
    "redrives = j.redrives + CASE WHEN c.reason = 'unpublished' THEN 1 ELSE 0 END "
    "FROM c WHERE j.seq = c.seq "
    "RETURNING j.seq, j.id, j.task, j.envelope, j.due_at, c.reason"
)

TERMINAL_DB_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,  # admin or crash shutdown, cannot connect now
)

Conn = Any  # asyncpg.Connection: the driver has no type hints
Op = Callable[[Conn], Awaitable[Any]]


@dataclass(slots=True)
class Call:
    """One call of the Store interface: ``kind`` says how it is run (``op``: ``payload`` is an
    :data:`Op`; ``accept``, ``mark``, ``result``: merged with their neighbours)."""

    kind: str
    payload: Any
    fut: asyncio.Future[Any]


# -- one transaction: the calls in order, neighbours of a kind merged ------------------------------


async def apply_calls(conn: Conn, calls: list[Call]) -> list[tuple[bool, Any]]:
    """Each call's outcome, in order. Runs of accepts and publish notes are merged (accepts
    first: a publish is noted only after its accept committed), runs of results too."""
    out: list[tuple[bool, Any]] = []
    i = 0
    while i < len(calls):
        kind = calls[i].kind
        if kind == "op":
            out.append(await _call(calls[i].payload, conn))
            i += 1
            continue
        group = ("accept", "mark") if kind in ("accept", "mark") else ("result",)
        j = i
        while j < len(calls) and calls[j].kind in group:
            j += 1
        run = calls[i:j]
        answers: dict[int, Any] = {}
        accepts = [n for n, c in enumerate(run) if c.kind == "accept"]
        if accepts:
            answered = await _accept(conn, [run[n].payload for n in accepts])
            answers.update(zip(accepts, answered, strict=True))
        marks = [n for n, c in enumerate(run) if c.kind == "mark"]
        if marks:
            await _mark(conn, [run[n].payload for n in marks])
            answers.update(dict.fromkeys(marks))
        results = [n for n, c in enumerate(run) if c.kind == "result"]
        if results:
            verdicts = await _results(conn, [run[n].payload for n in results])
            answers.update(zip(results, verdicts, strict=True))
        out.extend((True, answers[n]) for n in range(len(run)))
        i = j
    return out


async def apply_fast(conn: Conn, calls: list[Call]) -> list[tuple[bool, Any]] | None:
    """Accepts and publish notes alone, in one autocommitted statement (one round trip, not
    three): the outcomes, or None when the transaction must run the long way (an id exists
    already, or another gateway inserted one meanwhile: what this statement inserted is
    deleted first, and the publish notes it applied are applied again, as no-ops)."""
    if not all(c.kind in ("accept", "mark") for c in calls):
        return None
    rows = [row for c in calls if c.kind == "accept" for row in c.payload]
    ids = [row[0] for row in rows]
    marks = [c.payload for c in calls if c.kind == "mark"]
    marked = [i for call_ids, _ in marks for i in call_ids]
    at = [now for call_ids, now in marks for _ in call_ids]
    arrays = _arrays(rows) if rows else [[] for _ in range(10)]
    inserted = {
        r["id"]: r["published"] for r in await conn.fetch(ACCEPT_AND_MARK, *arrays, marked, at)
    }
    if len(inserted) == len(ids) == len(set(ids)):
        return [
            (
                True,
                [_NEW_PUBLISHED if inserted[row[0]] else _NEW for row in c.payload]
                if c.kind == "accept"
                else None,
            )
            for c in calls
        ]
    if inserted:
        await conn.execute(f"DELETE FROM jobs WHERE {BY_IDS}", list(inserted))
    return None


async def _call(op: Op, conn: Conn) -> tuple[bool, Any]:
    """One operation's outcome; database errors abort the whole transaction, others are the
    caller's alone."""
    try:
        return True, await op(conn)
    except (asyncpg.PostgresError, *TERMINAL_DB_ERRORS):
        raise
    except Exception as exc:
        return False, exc


_NEW: Final = Accepted("new")
_NEW_PUBLISHED: Final = Accepted("new", published=True)


async def _accept(conn: Conn, calls: list[list[tuple[Any, ...]]]) -> list[list[Accepted]]:
    """Insert every call's rows in one statement; an id that exists already is ``same`` or
    ``conflict``; a call with a conflict has none of its rows recorded (all or none)."""
    rows = [r for rows in calls for r in rows]
    inserted = {r["id"]: r["published"] for r in await conn.fetch(ACCEPT, *_arrays(rows))}
    fresh: list[bool] = []
    published: list[bool] = []
    for row in rows:  # an id twice in one transaction: the first one is new
        fresh.append(row[0] in inserted)
        published.append(inserted.pop(row[0], False))
    others = [row[0] for row, new in zip(rows, fresh, strict=True) if not new]
    existing: dict[str, Any] = {}
    if others:
        for r in await conn.fetch(f"SELECT {COLUMNS} FROM jobs WHERE {BY_IDS}", others):
            existing[r["id"]] = r
    answers: list[list[Accepted]] = []
    conflicted = False
    i = 0
    for call in calls:
        mine: list[Accepted] = []
        for row in call:
            if fresh[i]:
                mine.append(_NEW_PUBLISHED if published[i] else _NEW)
            else:
                old = existing[row[0]]
                same = old["task"] == row[1] and old["args"] == row[2]
                mine.append(Accepted("same" if same else "conflict", record(old)))
            i += 1
        conflicted = conflicted or any(a.kind == "conflict" for a in mine)
        answers.append(mine)
    if conflicted:
        new_ids = [row[0] for row, new in zip(rows, fresh, strict=True) if new]
        await conn.execute(f"DELETE FROM jobs WHERE {BY_IDS}", new_ids)
        if len(calls) > 1:  # undo all, then each call on its own: the others still count
            return [(await _accept(conn, [call]))[0] for call in calls]
        return [[_NEW if a.published else a for a in mine] for mine in answers]
    return answers


async def _mark(conn: Conn, calls: list[tuple[list[str], float]]) -> None:
    ids = [i for call_ids, _ in calls for i in call_ids]
    at = [now for call_ids, now in calls for _ in call_ids]
    await conn.execute(MARK_PUBLISHED, ids, at)


async def _results(conn: Conn, rows: list[tuple[Any, ...]]) -> list[OutcomeVerdict]:
    """Record results in one statement; the first of an id within the transaction goes in."""
    first: dict[str, int] = {}
    for n, row in enumerate(rows):
        first.setdefault(row[0], n)
    unique = [rows[n] for n in first.values()]
    recorded = {r["id"] for r in await conn.fetch(RECORD_RESULT, *_arrays(unique), wire.now())}
    missing = [row[0] for row in unique if row[0] not in recorded]
    known = set()
    if missing:
        found = await conn.fetch(f"SELECT id FROM jobs WHERE {BY_IDS}", missing)
        known = {r["id"] for r in found}
    verdicts: list[OutcomeVerdict] = []
    for n, row in enumerate(rows):
        job_id = row[0]
        if job_id in recorded:
            verdicts.append("recorded" if first[job_id] == n else "duplicate")
        else:
            verdicts.append("duplicate" if job_id in known else "unknown")
    return verdicts


async def verdict(conn: Conn, changed: Any, job_id: str) -> OutcomeVerdict:
    if changed:
        return "recorded"
    known = await conn.fetchval("SELECT 1 FROM jobs WHERE id = $1", job_id)
    return "duplicate" if known else "unknown"


def _arrays(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows as one list per column: the arguments of an ``unnest`` statement."""
    return [list(column) for column in zip(*rows, strict=True)]
