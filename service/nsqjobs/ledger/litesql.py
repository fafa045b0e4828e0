"""What one transaction of the SQLite store runs: its statements, and the operations a commit
applies in order, with a run of accepts merged into one INSERT (the schema: liteschema)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, Final

from nsqjobs import wire
from nsqjobs.ledger.liteschema import (
    CLAIMABLE,
    ROW_COLUMNS,
    SENT_BY_LOST_GATEWAY,
    SENT_TO_LOST_NSQD,
)
from nsqjobs.ledger.rows import canonical, record, replayed_envelope, replayed_runs
from nsqjobs.ledger.store import (
    SESSION_TTL_S,
    STATUSES,
    Accepted,
    Claimed,
    JobRecord,
    LedgerStats,
    OutcomeVerdict,
    RedriveReason,
    remaining_delay_ms,
)

# A dead letter and the failed result a worker publishes with it carry the same time (and
# worker): they are one outcome, not a duplicate. Slack for stores that round timestamps.
_SAME_OUTCOME_S: Final = 0.001

MAX_VARIABLES: Final = 500

Op = Callable[[sqlite3.Connection], Any]


class KnownIds(Exception):
    """A merged run of accepts met an id the ledger holds (or one id twice): the transaction
    must be rolled back and applied again with ``merge=False``."""


def apply_ops(
    conn: sqlite3.Connection, ops: list[Op], *, merge: bool = True, live: set[str] | None = None
) -> list[tuple[bool, Any]]:
    """Each operation's outcome, in order. A run of accepts is one INSERT when every id in it
    is new: each SQLite statement gives up Python's lock while it runs, and taking it back from
    a busy event loop can wait a switch interval, so the fewer statements a commit runs the
    sooner it is done. That INSERT has no savepoint around it: when an id was there it raises
    :class:`KnownIds`, and the caller rolls the transaction back and applies the operations
    again with ``merge=False`` (each accept then on its own, with its savepoint). Sessions a
    merged run finds live are added to ``live``."""
    out: list[tuple[bool, Any]] = []
    i = 0
    while i < len(ops):
        op = ops[i]
        if not merge or not isinstance(op, Accept):
            out.append(_call(op, conn))
            i += 1
            continue
        j = i + 1
        while j < len(ops) and isinstance(ops[j], Accept):
            j += 1
        run: list[Accept] = ops[i:j]  # type: ignore[assignment]
        out.extend((True, answers) for answers in _accept_all_new(conn, run, live))
        i = j
    return out


def _call(op: Op, conn: sqlite3.Connection) -> tuple[bool, Any]:
    """One operation's outcome; storage errors abort the whole transaction, others are the
    caller's alone."""
    try:
        return True, op(conn)
    except sqlite3.Error:
        raise
    except Exception as exc:
        return False, exc


def verdict(conn: sqlite3.Connection, changed: int, job_id: str) -> OutcomeVerdict:
    if changed:
        return "recorded"
    known = conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return "duplicate" if known else "unknown"


def get_job(conn: sqlite3.Connection, job_id: str) -> JobRecord | None:
    row = conn.execute(f"SELECT {ROW_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else record(row)


def dead_rows(
    conn: sqlite3.Connection, ids: list[str] | None, task: str | None, limit: int
) -> list[Any]:
    """Dead jobs' rows with their envelope (index 21), oldest first: those of ``ids`` (all of
    them), or else up to ``limit`` of ``task`` (or of every task)."""
    select = f"SELECT {ROW_COLUMNS} FROM jobs WHERE status = 'dead'"
    task_clause, task_params = (" AND task = ?", [task]) if task is not None else ("", [])
    if ids is None:
        sql = f"{select}{task_clause} ORDER BY seq LIMIT ?"
        return conn.execute(sql, (*task_params, limit)).fetchall()
    rows: list[Any] = []
    unique = list(dict.fromkeys(ids))
    for i in range(0, len(unique), MAX_VARIABLES):
        chunk = unique[i : i + MAX_VARIABLES]
        marks = ",".join("?" * len(chunk))
        sql = f"{select} AND id IN ({marks}){task_clause}"
        rows.extend(conn.execute(sql, (*chunk, *task_params)))
    return sorted(rows, key=lambda row: int(row[14]))


# Accepted rows, many per statement (each SQLite statement gives up Python's lock while it runs:
# one per row costs a handover per row, and a busy event loop can keep it a switch interval).
# Powers of two only, so the connection's statement cache keeps them all prepared; a commit's
# accepts up to the largest are one statement (:func:`_insert` pads the last one).
_ACCEPT_COLUMNS: Final = (
    "id, task, args, envelope, status, created_at, accepted_at, due_at, sent_at, published_at, "
    "session"
)
_INSERT: Final = f"INSERT OR IGNORE INTO jobs ({_ACCEPT_COLUMNS}) VALUES "
_VALUES: Final = "(?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)"
_CHUNKS: Final = tuple(2**k for k in range(10, -1, -1))  # 1024 rows: 10,240 variables
_INSERTS: Final = {n: _INSERT + ", ".join([_VALUES] * n) for n in _CHUNKS}
_NEW: Final = Accepted("new")
_NEW_PUBLISHED: Final = Accepted("new", published=True)

# A small commit of accepts (single jobs under load: 10-20 a commit) as one statement outside
# any transaction, which SQLite commits as the statement ends: one GIL handover for the whole
# commit instead of one per statement (4); paired runs measured 3-15 % more single-job ingest
# (medians of 5-12 rounds on a noisy machine), the mean commit 1.44 -> 1.07 ms. Plain
# INSERT, so a known id aborts all of it; padding rows are all NULL and filtered out; the
# session's liveness is read by the statement itself (its first variable). Large commits
# (batches) gain nothing from it: the INSERT of a transaction inserts rows a little faster.
AT_ONCE_MAX_ROWS: Final = 64
_AT_ONCE: Final = {
    n: f"INSERT INTO jobs ({_ACCEPT_COLUMNS}) SELECT column1, column2, column3, column4, 'queued', "
    "column5, column6, column7, column8, CASE WHEN live.ok THEN column9 END, "
    "CASE WHEN live.ok THEN column10 END FROM (SELECT EXISTS (SELECT 1 FROM sessions WHERE "
    "id = ? AND ended_at IS NULL AND handled_at IS NULL) AS ok) AS live, (VALUES "
    + ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * n)
    + ") WHERE column1 IS NOT NULL"
    for n in _CHUNKS
    if n <= AT_ONCE_MAX_ROWS
}
_PAD: Final = (None,) * 10


class Accept:
    """The operation of one ``record_accepted`` call (a run of them merges: :func:`apply_ops`)."""

    __slots__ = ("rows", "session")

    def __init__(self, rows: list[tuple[Any, ...]], session: str | None) -> None:
        self.rows = rows
        self.session = session

    def __call__(self, conn: sqlite3.Connection) -> list[Accepted]:
        return _accept(conn, self.rows, self.session)


def _live(conn: sqlite3.Connection, session: str | None) -> bool:
    if session is None:
        return False
    found = conn.execute(
        "SELECT 1 FROM sessions WHERE id = ? AND ended_at IS NULL AND handled_at IS NULL",
        (session,),
    ).fetchone()
    return found is not None


def _unpublished(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows of a session that is not live: recorded unpublished, in no session."""
    return [(*row[:8], None, None) for row in rows]


def _answers(rows: list[tuple[Any, ...]]) -> list[Accepted]:
    return [_NEW if row[8] is None else _NEW_PUBLISHED for row in rows]


def _insert(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
    """INSERT OR IGNORE the rows, in order; how many went in. The last statement is padded
    to its size with copies of its last row, which never go in: the row before them either
    went in or was ignored for its id, and so are they."""
    count, i, largest = 0, 0, _CHUNKS[0]
    while i < len(rows):
        left = len(rows) - i
        n = largest if left >= largest else 1 << (left - 1).bit_length()
        chunk = rows[i : i + n]
        chunk += [chunk[-1]] * (n - len(chunk))
        count += conn.execute(_INSERTS[n], [v for row in chunk for v in row]).rowcount
        i += n
    return count


def _accept_all_new(
    conn: sqlite3.Connection, run: list[Accept], known_live: set[str] | None
) -> list[list[Accepted]]:
    """A run of accepts inserted together; :class:`KnownIds` (some rows may be in: the caller
    rolls back) when any id was there or came twice in the run. Live sessions are added to
    ``known_live``."""
    live = {s: _live(conn, s) for s in {a.session for a in run} if s is not None}
    if known_live is not None:
        known_live.update(s for s, ok in live.items() if ok)
    for a in run:
        if a.session is not None and not live[a.session]:
            a.rows, a.session = _unpublished(a.rows), None
    rows = [row for a in run for row in a.rows]
    if _insert(conn, rows) != len(rows):
        raise KnownIds
    return [_answers(a.rows) for a in run]


def accept_at_once(
    conn: sqlite3.Connection, run: list[Accept], live: set[str]
) -> list[list[Accepted]] | None:
    """A commit that is only accepts, all new, as one statement in autocommit (durable when it
    returns); None, with nothing written, when it cannot be: more than
    :data:`AT_ONCE_MAX_ROWS` rows, several sessions, a session not known to be ``live`` (as
    read by an earlier commit), or an id the ledger holds (the caller then runs the commit as
    a transaction).

    The statement records the rows published in the session only if the session is live in
    the database; the answers say published from ``live``. Should another gateway's relay
    have handled the session since (this gateway stalled), the rows are recorded unpublished
    while the answers say published: the relay publishes them again after its grace, a
    duplicate run at worst, never a lost job."""
    count = sum(len(a.rows) for a in run)
    session = run[0].session
    if not 0 < count <= AT_ONCE_MAX_ROWS or any(a.session != session for a in run):
        return None
    if session is not None and session not in live:
        return None
    rows = [row for a in run for row in a.rows]
    n = 1 << (count - 1).bit_length()
    params = [session, *(v for row in rows for v in row), *(_PAD * (n - len(rows)))]
    try:
        conn.execute(_AT_ONCE[n], params)
    except sqlite3.IntegrityError:  # a known id (or one twice): the statement wrote nothing
        return None
    return [_answers(a.rows) for a in run]


def _accept(
    conn: sqlite3.Connection, rows: list[tuple[Any, ...]], session: str | None
) -> list[Accepted]:
    """Insert the jobs, all or none. The common case (every id new) is INSERT OR IGNORE alone;
    when any id was there, it is undone and :func:`_accept_known` answers."""
    if session is not None and not _live(conn, session):
        rows = _unpublished(rows)
    conn.execute("SAVEPOINT accept")
    try:
        if _insert(conn, rows) == len(rows):
            return _answers(rows)
        conn.execute("ROLLBACK TO accept")
    finally:
        conn.execute("RELEASE accept")
    return _accept_known(conn, rows)


def _args_text(args: str, envelope: bytes) -> str:
    """A job's arguments as canonical JSON (sorted keys), from the envelope when ``args`` is
    '' (see ``ROW_COLUMNS``): the same arguments are the same text however a client wrote them."""
    return args or canonical.encode(wire.decode_job(envelope).args).decode()


def _accept_known(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[Accepted]:
    """Some ids exist: compare each with the new job; insert the new ones unless any conflict."""
    existing: dict[str, tuple[Any, ...]] = {}
    ids = [r[0] for r in rows]
    for i in range(0, len(ids), MAX_VARIABLES):
        chunk = ids[i : i + MAX_VARIABLES]
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(f"SELECT {ROW_COLUMNS} FROM jobs WHERE id IN ({marks})", chunk):
            existing[row[0]] = row
    answers: list[Accepted] = []
    new = []
    for row in rows:
        old = existing.get(row[0])
        if old is None:
            answers.append(_NEW if row[8] is None else _NEW_PUBLISHED)
            new.append(row)
        elif old[1] == row[1] and _args_text(old[2], old[21]) == _args_text(row[2], row[3]):
            answers.append(Accepted("same", record(old)))
        else:
            answers.append(Accepted("conflict", record(old)))
    if any(a.kind == "conflict" for a in answers):  # nothing recorded
        return [_NEW if a.published else a for a in answers]
    if new:
        _insert(conn, new)
    return answers


# An outcome of a replayed job counts only when its run started after the run before ended (its
# dead letter's time, a worker's clock; or the replay, the gateway's clock, if that is sooner):
# a late outcome of the run before (the ledger was behind) is a duplicate, not the new run's.
# Judged from the run before's end, not from the replay alone: a new run starts milliseconds
# after the replay, so a worker's clock a little behind the gateway's would have its outcome
# taken for a late one (the job then queued for good), while the run before ended well before.
_THIS_RUN: Final = (
    "(replays = 0 OR ? > MIN(json_extract(runs, '$[#-1].replayed_at'), "
    "COALESCE(json_extract(runs, '$[#-1].dead_at'), json_extract(runs, '$[#-1].replayed_at'))))"
)


def record_result(
    conn: sqlite3.Connection,
    result: wire.ResultEnvelope,
    value: str,
    error: str | None,
    history: str | None,
) -> OutcomeVerdict:
    """The first terminal outcome wins. A failed result may still complete a dead letter
    recorded first: a worker that dead-letters a job publishes the letter and then a failed
    result of the same final attempt, with the same worker and time, so that pair is one
    outcome (the job stays ``dead``, the result adds its attempts); anything else for a
    finished job is a ``duplicate``."""
    cur = conn.execute(
        "UPDATE jobs SET status = ?, result = ?, error = ?, attempts = ?, worker = ?, "
        "finished_at = ?, recorded_at = ?, history = COALESCE(?, history) WHERE id = ? "
        f"AND finished_at IS NULL AND {_THIS_RUN}",
        (
            result.status,
            value,
            error,
            result.attempts,
            result.worker,
            result.finished_at,
            wire.now(),
            history,
            result.id,
            result.started_at,
        ),
    )
    if not cur.rowcount and result.status == "failed":
        cur = conn.execute(
            "UPDATE jobs SET result = ?, attempts = ?, history = COALESCE(?, history) "
            "WHERE id = ? AND status = 'dead' AND result IS NULL AND worker = ? "
            "AND ABS(dead_at - ?) < ?",
            (
                value,
                result.attempts,
                history,
                result.id,
                result.worker,
                result.finished_at,
                _SAME_OUTCOME_S,
            ),
        )
    return verdict(conn, cur.rowcount, result.id)


def record_dead_letter(
    conn: sqlite3.Connection,
    letter: wire.DeadLetter,
    job: wire.JobEnvelope,
    error: str,
    history: str | None,
) -> OutcomeVerdict:
    """The first terminal outcome wins; a dead letter arriving after the failed result of the
    same final attempt (same worker and time, see :func:`record_result`) makes it ``dead``."""
    cur = conn.execute(
        "UPDATE jobs SET status = 'dead', dead_reason = ?, dead_at = ?, finished_at = ?, "
        "recorded_at = ?, error = ?, worker = ?, attempts = MAX(attempts, ?), "
        f"history = COALESCE(?, history) WHERE id = ? AND finished_at IS NULL AND {_THIS_RUN}",
        (
            letter.reason,
            letter.at,
            letter.at,
            wire.now(),
            error,
            letter.worker,
            job.attempts,
            history,
            job.id,
            letter.at,
        ),
    )
    if not cur.rowcount:
        cur = conn.execute(
            "UPDATE jobs SET status = 'dead', dead_reason = ?, dead_at = ?, "
            "history = COALESCE(?, history) WHERE id = ? AND status = 'failed' "
            "AND dead_at IS NULL AND worker = ? AND ABS(finished_at - ?) < ?",
            (letter.reason, letter.at, history, job.id, letter.worker, letter.at, _SAME_OUTCOME_S),
        )
    return verdict(conn, cur.rowcount, job.id)


def as_claimed(row: Sequence[Any], now: float) -> Claimed:
    """A claimed row as the relay publishes it (see ``SqliteStore.claim_unpublished``)."""
    _, job_id, task, body, due_at, sent_at, replays = row
    reason: RedriveReason
    if sent_at is None:
        reason = "replay" if replays else "due"
    elif sent_at == SENT_TO_LOST_NSQD:
        reason = "nsqd_restart"
    else:  # the accept path gave up, or its gateway died (SENT_BY_LOST_GATEWAY)
        reason = "unpublished"
    return Claimed(job_id, task, bytes(body), remaining_delay_ms(due_at, now), reason)


def redrive_lost_sessions(conn: sqlite3.Connection, stale_before: float, now: float) -> int:
    """Forget old sessions; re-drive the jobs of those whose heartbeat stopped before
    ``stale_before``, once. How many."""
    conn.execute(
        "DELETE FROM sessions WHERE ended_at < ? OR handled_at < ?",
        (now - SESSION_TTL_S, now - SESSION_TTL_S),
    )
    lost = conn.execute(
        "SELECT seq, id, low FROM sessions WHERE ended_at IS NULL AND handled_at IS NULL "
        "AND heartbeat_at < ?",
        (stale_before,),
    ).fetchall()
    count = 0
    for seq, session, low in lost:
        conn.execute("UPDATE sessions SET handled_at = ? WHERE seq = ?", (now, seq))
        cur = conn.execute(
            "UPDATE jobs INDEXED BY jobs_unfinished SET published_at = NULL, "
            "sent_at = ?, session = NULL WHERE status IN ('queued', 'running') "
            "AND sent_at >= ? AND session = ? AND published_at IS NOT NULL",
            (SENT_BY_LOST_GATEWAY, low, session),
        )
        count += cur.rowcount
    return count


# The relay's claims: jobs without a delay (oldest first), then delayed ones coming due (soonest
# first). INDEXED BY: without ANALYZE's statistics SQLite would rather walk jobs_by_status,
# every queued job of a backlog, every poll.
_CLAIM_FROM: Final = (
    "SELECT seq, id, task, envelope, due_at, sent_at, replays FROM jobs INDEXED BY "
    "jobs_unpublished WHERE"
)
_CLAIM_PLAIN: Final = f"{_CLAIM_FROM} due_at IS NULL AND {CLAIMABLE} ORDER BY seq LIMIT :limit"
_CLAIM_DELAYED: Final = (
    f"{_CLAIM_FROM} due_at < :until AND {CLAIMABLE} ORDER BY due_at LIMIT :limit"
)


def claim(
    conn: sqlite3.Connection,
    now: float,
    grace_s: float,
    horizon_s: float,
    lease_s: float,
    limit: int,
) -> list[Claimed]:
    """Up to ``limit`` jobs for the relay to publish, leased for ``lease_s`` (see
    ``SqliteStore.claim_unpublished``)."""
    params = {"now": now, "stale": now - grace_s, "until": now + horizon_s, "limit": limit}
    rows = conn.execute(_CLAIM_PLAIN, params).fetchall()
    if len(rows) < limit:
        rows += conn.execute(_CLAIM_DELAYED, {**params, "limit": limit - len(rows)}).fetchall()
    claimed = [as_claimed(row, now) for row in rows]
    conn.executemany(
        "UPDATE jobs SET sent_at = ?, lease_until = ?, redrives = redrives + ? WHERE seq = ?",
        [
            (now, now + lease_s, c.reason == "unpublished", row[0])
            for row, c in zip(rows, claimed, strict=True)
        ],
    )
    return claimed


def read_stats(conn: sqlite3.Connection) -> LedgerStats:
    """Jobs by status, and when the oldest unfinished one became runnable (see
    ``SqliteStore.stats``), in one read snapshot."""
    conn.execute("BEGIN")  # one snapshot for both queries
    try:
        counts = dict(conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status"))
        # Acceptance order is seq order: the first undelayed job of each status, and the
        # delayed job due first.
        firsts = [
            conn.execute(
                "SELECT accepted_at FROM jobs WHERE status = ? AND due_at IS NULL "
                "ORDER BY seq LIMIT 1",
                (status,),
            ).fetchone()
            for status in ("queued", "running")
        ]
        firsts.append(
            conn.execute(
                "SELECT MIN(due_at) FROM jobs INDEXED BY jobs_delayed WHERE due_at "
                "IS NOT NULL AND status IN ('queued', 'running')"
            ).fetchone()
        )
    finally:
        conn.execute("COMMIT")
    times = [row[0] for row in firsts if row is not None and row[0] is not None]
    return LedgerStats({s: int(counts.get(s, 0)) for s in STATUSES}, min(times, default=None))


def replay(
    conn: sqlite3.Connection, ids: list[str] | None, task: str | None, limit: int, now: float
) -> list[JobRecord]:
    """Queue dead jobs again (see ``SqliteStore.replay``); the jobs as they now stand."""
    rows = dead_rows(conn, ids, task, limit)
    updates = [
        (replayed_runs(record(row), now), replayed_envelope(row[21], now), row[14]) for row in rows
    ]
    conn.executemany(
        "UPDATE jobs SET status = 'queued', runs = ?, envelope = ?, "
        "replays = replays + 1, attempts = 0, worker = NULL, result = NULL, "
        "error = NULL, dead_reason = NULL, dead_at = NULL, finished_at = NULL, "
        "recorded_at = NULL, started_at = NULL, history = NULL, published_at = NULL, "
        "sent_at = NULL, lease_until = NULL WHERE seq = ?",
        updates,
    )
    return [r for r in (get_job(conn, row[0]) for row in rows) if r is not None]
