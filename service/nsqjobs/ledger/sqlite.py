"""The embedded ledger store: one SQLite file (WAL, ``synchronous=FULL``), written by one thread.

Calls made in one event-loop turn are handed to the writer thread together and run in one
transaction; batches waiting when the thread comes back are merged into the same commit (group
commit). A call's future resolves, on its own loop, once that commit is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import msgspec

from nsqjobs import wire
from nsqjobs.ledger.store import (
    STATUSES,
    Accepted,
    Claimed,
    JobRecord,
    JobStatus,
    LedgerError,
    LedgerStats,
    OutcomeVerdict,
    Page,
    RedriveReason,
    held,
)
from nsqjobs.names import MAX_DELAY_MS

log = logging.getLogger("nsqjobs.ledger")

# Unfinished and not known to be in nsqd: the relay's work (the partial index's condition, which
# a query must repeat word for word for SQLite to use the index).
_UNPUBLISHED: Final = "published_at IS NULL AND status IN ('queued', 'running')"
# A job the relay may claim (given :stale, :now): not claimed by a relay, and past the accept
# path's grace (or never sent: a long delay or a replay); or a relay's claim that expired.
_CLAIMABLE: Final = (
    f"{_UNPUBLISHED} AND ((lease_until IS NULL AND (sent_at IS NULL OR sent_at < :stale)) "
    "OR lease_until <= :now)"
)
# sent_at of a job published to an nsqd that restarted since (redrive_sent_before): the relay
# publishes it at once, and reports it as an nsqd_restart re-drive.
SENT_TO_LOST_NSQD: Final = 0.0
# sent_at of a job recorded as published by a gateway session that died (redrive_lost_sessions):
# the relay publishes it at once, and reports it as an unpublished re-drive.
SENT_BY_LOST_GATEWAY: Final = 1.0
# Ended or handled sessions are forgotten after this long.
SESSION_TTL_S: Final = 86400.0
# Finished jobs that retention prunes (dead ones stay until replayed or purged).
_PRUNABLE: Final = "('succeeded', 'failed', 'cancelled')"
# A dead letter and the failed result a worker publishes with it carry the same time (and
# worker): they are one outcome, not a duplicate. Slack for stores that round timestamps.
_SAME_OUTCOME_S: Final = 0.001

# Versioned migrations: MIGRATIONS[n] takes a database from version n to n + 1 (the version is
# SQLite's user_version). Append only; never edit one that has shipped.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            task TEXT NOT NULL,
            args TEXT NOT NULL,
            envelope BLOB NOT NULL,
            status TEXT NOT NULL,
            created_at REAL NOT NULL,
            accepted_at REAL NOT NULL,
            published_at REAL,
            finished_at REAL,
            attempts INTEGER NOT NULL DEFAULT 0,
            worker TEXT,
            result TEXT,
            error TEXT,
            dead_reason TEXT,
            dead_at REAL
        )""",
        "CREATE INDEX jobs_by_status ON jobs (status, seq)",
        "CREATE INDEX jobs_by_task ON jobs (task, seq)",
    ),
    (
        # When a delayed job is due; when its latest publish was sent (a job sent before an
        # nsqd's start_time was held by the nsqd that restarted); the relay's claim; a worker's
        # started event; re-drive and replay counts; failed attempts (JSON list of
        # wire.Attempt); earlier runs, one JSON object per replay.
        "ALTER TABLE jobs ADD COLUMN due_at REAL",
        "ALTER TABLE jobs ADD COLUMN sent_at REAL",
        "ALTER TABLE jobs ADD COLUMN lease_until REAL",
        "ALTER TABLE jobs ADD COLUMN started_at REAL",
        "ALTER TABLE jobs ADD COLUMN redrives INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN replays INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN history TEXT",
        "ALTER TABLE jobs ADD COLUMN runs TEXT",
        "UPDATE jobs SET sent_at = accepted_at",
        "CREATE INDEX jobs_unfinished ON jobs (sent_at) WHERE status IN ('queued', 'running')",
        "CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL",
    ),
    (
        # What the relay looks for every poll: unfinished jobs with no acknowledged publish
        # (a few in flight, plus long delays waiting to come due), without scanning a backlog.
        f"CREATE INDEX jobs_unpublished ON jobs (due_at, seq) WHERE {_UNPUBLISHED}",
        # Delayed unfinished jobs by when they are due: the oldest-unfinished gauge reads the
        # first without counting the rest.
        "CREATE INDEX jobs_delayed ON jobs (due_at) "
        "WHERE due_at IS NOT NULL AND status IN ('queued', 'running')",
        # Gateway sessions (Store.beat_session): a job the accept path recorded as published
        # before nsqd acknowledged it names its session (its id); a session whose
        # heartbeat stopped has its jobs sent since its ``low`` re-driven, once.
        "ALTER TABLE jobs ADD COLUMN session TEXT",
        """CREATE TABLE sessions (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL,
            low REAL NOT NULL,
            ended_at REAL,
            handled_at REAL
        )""",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

# ``args`` is '' for a job recorded since schema 3: its envelope holds them (index 21), and
# storing them twice cost every accept an encoding and the row its size.
_COLUMNS: Final = (
    "id, task, args, status, created_at, accepted_at, published_at, finished_at, attempts, "
    "worker, result, error, dead_reason, dead_at, seq, due_at, started_at, redrives, replays, "
    "history, runs, envelope"
)
# Sorted keys, so the same arguments are the same text whatever order the client wrote them in.
_canonical = msgspec.json.Encoder(order="sorted")
_json = msgspec.json.Encoder()
_error_decoder = msgspec.json.Decoder(wire.ErrorInfo)
_history_decoder = msgspec.json.Decoder(tuple[wire.Attempt, ...])
_runs_decoder = msgspec.json.Decoder(tuple[dict[str, Any], ...])
_MAX_VARIABLES: Final = 500

Op = Callable[[sqlite3.Connection], Any]
_Batch = tuple[asyncio.AbstractEventLoop, list[tuple[Op, "asyncio.Future[Any]"]]]


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations the database lacks, each in its own transaction; its version."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"the ledger's schema is version {version}, newer than this nsqjobs knows "
            f"({SCHEMA_VERSION}): run a newer nsqjobs"
        )
    for n in range(version, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[n]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {n + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("ledger: schema migrated to version %d", n + 1)
    return SCHEMA_VERSION


def _record(row: Sequence[Any]) -> JobRecord:
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


class SqliteStore:
    """The :class:`~nsqjobs.ledger.store.Store` on one SQLite file.

    Opening creates the file (and its directory) and migrates the schema, so errors show at
    start; after that the connection belongs to the writer thread alone.
    """

    def __init__(
        self, path: str | Path, *, observe_write: Callable[[float], object] | None = None
    ) -> None:
        self.path = Path(path)
        # Told each commit's duration in seconds, from the writer thread (a Prometheus
        # histogram's observe is thread-safe).
        self.observe_write = observe_write
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise LedgerError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
            # FULL: a commit is on disk before its future resolves (NORMAL, in WAL, is not).
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            migrate(conn)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the ledger at {self.path}: {exc}") from exc
        self._conn = conn
        self._pending: list[tuple[Op, asyncio.Future[Any]]] = []
        self._queue: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._closed = False
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="nsqjobs-ledger", daemon=True)
        self._thread.start()

    # -- the Store interface --------------------------------------------------------------------

    def record_accepted(
        self, jobs: list[wire.JobEnvelope], session: str | None = None
    ) -> asyncio.Future[list[Accepted]]:
        """Record jobs as queued, all or none (see the protocol); in a live ``session``, the
        ones published now are recorded as published (``published_at`` = ``sent_at``)."""
        now = wire.now()
        rows = []
        for j in jobs:
            sent = None if held(j, now) else now
            rows.append(
                (
                    j.id,
                    j.task,
                    "",  # the envelope holds them (see _COLUMNS)
                    wire.encode(j),
                    j.created_at,
                    now,
                    j.due_at,
                    sent,
                    # published_at and session, should the session be live (else dropped).
                    None if session is None else sent,
                    None if sent is None else session,
                )
            )
        return self._submit(_Accept(rows, session))

    def mark_published(self, ids: list[str]) -> asyncio.Future[None]:
        """Note nsqd's acknowledgement of these jobs."""
        now = wire.now()

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE jobs SET published_at = ? WHERE id = ? AND published_at IS NULL",
                [(now, i) for i in ids],
            )

        return self._submit(op)

    def mark_unpublished(self, ids: list[str]) -> asyncio.Future[None]:
        """See the protocol (a job a relay claimed since has its own publish under way)."""

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE jobs SET published_at = NULL, session = NULL WHERE id = ? "
                "AND published_at IS NOT NULL AND lease_until IS NULL",
                [(i,) for i in ids],
            )

        return self._submit(op)

    def beat_session(self, session: str, low: float, now: float) -> asyncio.Future[bool]:
        """See the protocol."""

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT ended_at IS NULL AND handled_at IS NULL FROM sessions WHERE id = ?",
                (session,),
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO sessions (id, started_at, heartbeat_at, low) VALUES (?, ?, ?, ?)",
                    (session, now, now, low),
                )
                return True
            if not row[0]:
                return False
            conn.execute(
                "UPDATE sessions SET heartbeat_at = ?, low = ? WHERE id = ?", (now, low, session)
            )
            return True

        return self._submit(op)

    def end_session(self, session: str, now: float) -> asyncio.Future[None]:
        """See the protocol."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE sessions SET ended_at = ? WHERE id = ? AND handled_at IS NULL",
                (now, session),
            )

        return self._submit(op)

    def redrive_lost_sessions(self, stale_before: float, now: float) -> asyncio.Future[int]:
        """See the protocol. ``sent_at`` becomes :data:`SENT_BY_LOST_GATEWAY`, so the relay
        claims these at once. One writer: the handled mark needs no compare-and-set here."""

        def op(conn: sqlite3.Connection) -> int:
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

        return self._submit(op)

    def record_result(self, result: wire.ResultEnvelope) -> asyncio.Future[OutcomeVerdict]:
        """Record a result; the first terminal outcome per id wins (see :func:`_record_result`)."""
        error = None if result.error is None else _json.encode(result.error).decode()
        # Always text ('null' for None): a non-NULL ``result`` says a result was recorded.
        value = _json.encode(result.result).decode()
        history = _history(result.history)
        return self._submit(lambda conn: _record_result(conn, result, value, error, history))

    def record_dead_letter(self, letter: wire.DeadLetter) -> asyncio.Future[OutcomeVerdict]:
        """Record a dead letter; the first terminal outcome per id wins (see
        :func:`_record_dead_letter`). A letter without a job (its body was undecodable) names
        no id: ``unknown``."""
        loop = asyncio.get_running_loop()
        job = letter.job
        if job is None:
            fut: asyncio.Future[OutcomeVerdict] = loop.create_future()
            fut.set_result("unknown")
            return fut
        error = _json.encode(letter.error).decode()
        history = _history(job.history)
        return self._submit(lambda conn: _record_dead_letter(conn, letter, job, error, history))

    def get(self, job_id: str) -> asyncio.Future[JobRecord | None]:
        """The job with this id, or None."""
        return self._submit(lambda conn: _get(conn, job_id))

    def list_jobs(
        self,
        *,
        status: JobStatus | None = None,
        task: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> asyncio.Future[Page]:
        """Jobs in acceptance order; raises :class:`LedgerError` for a bad filter or cursor."""
        if status is not None and status not in STATUSES:
            raise LedgerError(f"unknown status {status!r} (one of {', '.join(STATUSES)})")
        if not 1 <= limit <= 1000:
            raise LedgerError("limit must be 1-1000")
        if cursor is not None and not cursor.isdigit():
            raise LedgerError(f"not a cursor this ledger gave out: {cursor!r}")
        clauses, params = ["seq > ?"], [int(cursor or 0)]
        if status is not None:
            clauses.append("status = ?")
            params.append(status)  # type: ignore[arg-type]
        if task is not None:
            clauses.append("task = ?")
            params.append(task)  # type: ignore[arg-type]
        sql = f"SELECT {_COLUMNS} FROM jobs WHERE {' AND '.join(clauses)} ORDER BY seq LIMIT ?"

        def op(conn: sqlite3.Connection) -> Page:
            rows = conn.execute(sql, (*params, limit + 1)).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            return Page([_record(r) for r in rows], str(rows[-1][14]) if more else None)

        return self._submit(op)

    # -- the relay -----------------------------------------------------------------------------

    def claim_unpublished(
        self, *, now: float, grace_s: float, horizon_s: float, lease_s: float, limit: int
    ) -> asyncio.Future[list[Claimed]]:
        """See the protocol. Jobs without a delay first (oldest first), then delayed ones
        coming due (soonest first); the reason is read from ``sent_at``: 0 (a re-drive after
        an nsqd restart), NULL (never sent: ``replay`` once replayed, else ``due``), or a time
        (the accept path's publish failed or never finished: ``unpublished``)."""
        params = {"now": now, "stale": now - grace_s, "until": now + horizon_s, "limit": limit}
        columns = "seq, id, task, envelope, due_at, sent_at, replays"
        # INDEXED BY: without ANALYZE's statistics SQLite would rather walk jobs_by_status,
        # every queued job of a backlog, every poll.
        table = "jobs INDEXED BY jobs_unpublished"
        plain = f"SELECT {columns} FROM {table} WHERE due_at IS NULL AND {_CLAIMABLE} "
        plain += "ORDER BY seq LIMIT :limit"
        delayed = f"SELECT {columns} FROM {table} WHERE due_at < :until AND {_CLAIMABLE} "
        delayed += "ORDER BY due_at LIMIT :limit"

        def op(conn: sqlite3.Connection) -> list[Claimed]:
            rows = conn.execute(plain, params).fetchall()
            if len(rows) < limit:
                rows += conn.execute(delayed, {**params, "limit": limit - len(rows)}).fetchall()
            claimed = [_claimed(row, now) for row in rows]
            conn.executemany(
                "UPDATE jobs SET sent_at = ?, lease_until = ?, redrives = redrives + ? "
                "WHERE seq = ?",
                [
                    (now, now + lease_s, c.reason == "unpublished", row[0])
                    for row, c in zip(rows, claimed, strict=True)
                ],
            )
            return claimed

        return self._submit(op)

    def redrive_sent_before(self, started_at: float) -> asyncio.Future[int]:
        """See the protocol. ``sent_at`` becomes 0 (:data:`SENT_TO_LOST_NSQD`), so the relay
        claims these at once (no grace: nsqd is known to have lost them)."""

        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE jobs INDEXED BY jobs_unfinished SET published_at = NULL, sent_at = ?, "
                "redrives = redrives + 1 WHERE status IN ('queued', 'running') AND sent_at < ? "
                "AND published_at IS NOT NULL",
                (SENT_TO_LOST_NSQD, started_at),
            )
            return cur.rowcount

        return self._submit(op)

    def prune_finished(self, before: float, limit: int) -> asyncio.Future[int]:
        """See the protocol."""

        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs INDEXED BY jobs_finished "
                "WHERE finished_at IS NOT "
                f"NULL AND finished_at < ? AND status IN {_PRUNABLE} ORDER BY finished_at "
                "LIMIT ?)",
                (before, limit),
            )
            return cur.rowcount

        return self._submit(op)

    def stats(self) -> asyncio.Future[LedgerStats]:
        """See the protocol. Read on a connection of its own in a worker thread (WAL readers do
        not block the writer), so counting a large table never delays a commit.

        ``oldest_unfinished_at`` is when the oldest unfinished job became runnable: accepted,
        or due for a delayed one (a job due next month is not late, and an alert on the
        oldest unfinished age must not fire for it; one not yet due gives a time ahead). Read
        from indexes: only the count of jobs by status walks the table."""
        loop = asyncio.get_running_loop()
        if self._closed:
            fut: asyncio.Future[LedgerStats] = loop.create_future()
            fut.set_exception(LedgerError("the ledger is closed"))
            return fut
        return loop.run_in_executor(None, self._read_stats)

    def _read_stats(self) -> LedgerStats:
        with self._reader_lock:
            if self._closed:
                raise LedgerError("the ledger is closed")
            try:
                if self._reader is None:
                    self._reader = sqlite3.connect(
                        self.path, isolation_level=None, check_same_thread=False
                    )
                    self._reader.execute("PRAGMA busy_timeout=5000")
                conn = self._reader
                conn.execute("BEGIN")  # one snapshot for both queries
                try:
                    counts = dict(conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status"))
                    # Acceptance order is seq order: the first undelayed job of each status,
                    # and the delayed job due first.
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
            except sqlite3.Error as exc:
                raise LedgerError(f"the ledger could not be read: {exc}") from exc
        times = [row[0] for row in firsts if row is not None and row[0] is not None]
        return LedgerStats({s: int(counts.get(s, 0)) for s in STATUSES}, min(times, default=None))

    # -- operations ----------------------------------------------------------------------------

    def record_started(self, job_id: str, worker: str, at: float) -> asyncio.Future[OutcomeVerdict]:
        """A worker started the job: ``queued`` becomes ``running``, anything else stays."""

        def op(conn: sqlite3.Connection) -> OutcomeVerdict:
            cur = conn.execute(
                "UPDATE jobs SET status = 'running', started_at = ?, worker = ? "
                "WHERE id = ? AND status = 'queued'",
                (at, worker, job_id),
            )
            return _verdict(conn, cur.rowcount, job_id)

        return self._submit(op)

    def cancel(self, job_id: str) -> asyncio.Future[JobRecord | None]:
        """Cancel a queued or running job (see the protocol); the job as it now stands."""
        now = wire.now()

        def op(conn: sqlite3.Connection) -> JobRecord | None:
            conn.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, lease_until = NULL "
                "WHERE id = ? AND status IN ('queued', 'running') AND finished_at IS NULL",
                (now, job_id),
            )
            return _get(conn, job_id)

        return self._submit(op)

    def replay(
        self, ids: list[str] | None = None, *, task: str | None = None, limit: int = 1000
    ) -> asyncio.Future[list[JobRecord]]:
        """Replay dead jobs (see the protocol): the run so far goes to ``runs``, the job is
        queued again with a fresh history, unpublished and never sent (the relay sends it)."""
        now = wire.now()

        def op(conn: sqlite3.Connection) -> list[JobRecord]:
            rows = _dead(conn, ids, task, limit)
            updates = []
            for row in rows:
                record = _record(row)
                run = {
                    "status": record.status,
                    "attempts": record.attempts,
                    "error": msgspec.to_builtins(record.error),
                    "dead_reason": record.dead_reason,
                    "finished_at": record.finished_at,
                    "dead_at": record.dead_at,
                    "history": msgspec.to_builtins(record.history),
                    "replayed_at": now,
                }
                runs = _json.encode([*record.runs, run]).decode()
                updates.append((runs, _replayed_envelope(row[21], now), row[14]))
            conn.executemany(
                "UPDATE jobs SET status = 'queued', runs = ?, envelope = ?, "
                "replays = replays + 1, attempts = 0, worker = NULL, result = NULL, "
                "error = NULL, dead_reason = NULL, dead_at = NULL, finished_at = NULL, "
                "started_at = NULL, history = NULL, published_at = NULL, sent_at = NULL, "
                "lease_until = NULL WHERE seq = ?",
                updates,
            )
            return [r for r in (_get(conn, row[0]) for row in rows) if r is not None]

        return self._submit(op)

    def purge(
        self, ids: list[str] | None = None, *, task: str | None = None, limit: int = 1000
    ) -> asyncio.Future[int]:
        """Delete dead jobs (see the protocol). How many."""

        def op(conn: sqlite3.Connection) -> int:
            rows = _dead(conn, ids, task, limit)
            conn.executemany("DELETE FROM jobs WHERE seq = ?", [(row[14],) for row in rows])
            return len(rows)

        return self._submit(op)

    def close(self) -> None:
        """Run what was handed over, stop the writer thread, close the file."""
        if self._closed:
            return
        self._flush()
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._conn.close()
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    # -- batching -------------------------------------------------------------------------------

    def _submit(self, op: Op) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            fut.set_exception(LedgerError("the ledger is closed"))
            return fut
        pending = self._pending
        pending.append((op, fut))
        if len(pending) == 1:  # the first call of this loop turn: hand them over after it
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        if not self._pending or self._closed:
            return
        batch, self._pending = self._pending, []
        self._queue.put((asyncio.get_running_loop(), batch))

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batches = [first]
            # Group commit: whatever queued up while the last commit was syncing joins this one.
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batches.append(more)
            self._commit(batches)

    def _commit(self, batches: list[_Batch]) -> None:
        conn = self._conn
        outcomes: list[list[tuple[bool, Any]]] = []
        try:
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            results = _apply(conn, [op for _, batch in batches for op, _ in batch])
            i = 0
            for _, batch in batches:
                outcomes.append(results[i : i + len(batch)])
                i += len(batch)
            conn.execute("COMMIT")
            if self.observe_write is not None:
                self.observe_write(time.perf_counter() - started)
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.error("ledger: a write failed, %d batch(es) not recorded: %s", len(batches), exc)
            error = LedgerError(f"the ledger could not write: {exc}")
            outcomes = [[(False, error)] * len(batch) for _, batch in batches]
        for (loop, batch), results in zip(batches, outcomes, strict=True):
            # A closed loop: nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve, [f for _, f in batch], results)


def _apply(conn: sqlite3.Connection, ops: list[Op]) -> list[tuple[bool, Any]]:
    """Each operation's outcome, in order. A run of accepts is one INSERT when every id in it
    is new: each SQLite statement gives up Python's lock while it runs, and taking it back from
    a busy event loop can wait a switch interval, so the fewer statements a commit runs the
    sooner it is done."""
    out: list[tuple[bool, Any]] = []
    i = 0
    while i < len(ops):
        op = ops[i]
        if not isinstance(op, _Accept):
            out.append(_call(op, conn))
            i += 1
            continue
        j = i + 1
        while j < len(ops) and isinstance(ops[j], _Accept):
            j += 1
        run: list[_Accept] = ops[i:j]  # type: ignore[assignment]
        merged = _accept_all_new(conn, run) if len(run) > 1 else None
        if merged is None:
            out.extend(_call(a, conn) for a in run)
        else:
            out.extend((True, answers) for answers in merged)
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


def _resolve(futures: list[asyncio.Future[Any]], results: list[tuple[bool, Any]]) -> None:
    for fut, (ok, value) in zip(futures, results, strict=True):
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


def _verdict(conn: sqlite3.Connection, changed: int, job_id: str) -> OutcomeVerdict:
    if changed:
        return "recorded"
    known = conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return "duplicate" if known else "unknown"


def _get(conn: sqlite3.Connection, job_id: str) -> JobRecord | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else _record(row)


def _dead(
    conn: sqlite3.Connection, ids: list[str] | None, task: str | None, limit: int
) -> list[Any]:
    """Dead jobs' rows with their envelope (index 21), oldest first: those of ``ids`` (all of
    them), or else up to ``limit`` of ``task`` (or of every task)."""
    select = f"SELECT {_COLUMNS} FROM jobs WHERE status = 'dead'"
    task_clause, task_params = (" AND task = ?", [task]) if task is not None else ("", [])
    if ids is None:
        sql = f"{select}{task_clause} ORDER BY seq LIMIT ?"
        return conn.execute(sql, (*task_params, limit)).fetchall()
    rows: list[Any] = []
    unique = list(dict.fromkeys(ids))
    for i in range(0, len(unique), _MAX_VARIABLES):
        chunk = unique[i : i + _MAX_VARIABLES]
        marks = ",".join("?" * len(chunk))
        sql = f"{select} AND id IN ({marks}){task_clause}"
        rows.extend(conn.execute(sql, (*chunk, *task_params)))
    return sorted(rows, key=lambda row: int(row[14]))


def _replayed_envelope(envelope: bytes, now: float) -> bytes:
    """The envelope a replay publishes: as accepted, less an expiry that has passed (the job
    would only expire again)."""
    job = wire.decode_job(envelope)
    if job.deadline is not None and job.deadline <= now:
        return wire.encode(msgspec.structs.replace(job, deadline=None))
    return envelope


# Accepted rows, many per statement (each SQLite statement gives up Python's lock while it runs:
# one per row costs a handover per row, and a busy event loop can keep it a switch interval).
# A few sizes only, so the connection's statement cache keeps them all prepared.
_INSERT: Final = (
    "INSERT OR IGNORE INTO jobs (id, task, args, envelope, status, created_at, accepted_at, "
    "due_at, sent_at, published_at, session) VALUES "
)
_VALUES: Final = "(?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)"
_CHUNKS: Final = (200, 50, 10, 3, 1)
_INSERTS: Final = {n: _INSERT + ", ".join([_VALUES] * n) for n in _CHUNKS}
_NEW: Final = Accepted("new")
_NEW_PUBLISHED: Final = Accepted("new", published=True)


class _Accept:
    """The operation of one ``record_accepted`` call; runs of them are merged (:func:`_apply`)."""

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
    """INSERT OR IGNORE the rows, in order; how many went in."""
    count, i = 0, 0
    for n in _CHUNKS:
        sql = _INSERTS[n]
        while len(rows) - i >= n:
            params = [v for row in rows[i : i + n] for v in row]
            count += conn.execute(sql, params).rowcount
            i += n
    return count


def _accept_all_new(conn: sqlite3.Connection, run: list[_Accept]) -> list[list[Accepted]] | None:
    """A run of accepts inserted together; None (nothing recorded) when any id was there (or
    twice in the run): then each is recorded on its own."""
    for a in run:
        if a.session is not None and not _live(conn, a.session):
            a.rows, a.session = _unpublished(a.rows), None
    rows = [row for a in run for row in a.rows]
    conn.execute("SAVEPOINT accept")
    try:
        if _insert(conn, rows) != len(rows):
            conn.execute("ROLLBACK TO accept")
            return None
    finally:
        conn.execute("RELEASE accept")
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
    '' (see ``_COLUMNS``): the same arguments are the same text however a client wrote them."""
    return args or _canonical.encode(wire.decode_job(envelope).args).decode()


def _accept_known(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[Accepted]:
    """Some ids exist: compare each with the new job; insert the new ones unless any conflict."""
    existing: dict[str, tuple[Any, ...]] = {}
    ids = [r[0] for r in rows]
    for i in range(0, len(ids), _MAX_VARIABLES):
        chunk = ids[i : i + _MAX_VARIABLES]
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id IN ({marks})", chunk):
            existing[row[0]] = row
    answers: list[Accepted] = []
    new = []
    for row in rows:
        old = existing.get(row[0])
        if old is None:
            answers.append(_NEW if row[8] is None else _NEW_PUBLISHED)
            new.append(row)
        elif old[1] == row[1] and _args_text(old[2], old[21]) == _args_text(row[2], row[3]):
            answers.append(Accepted("same", _record(old)))
        else:
            answers.append(Accepted("conflict", _record(old)))
    if any(a.kind == "conflict" for a in answers):  # nothing recorded
        return [_NEW if a.published else a for a in answers]
    if new:
        _insert(conn, new)
    return answers


def _history(history: tuple[wire.Attempt, ...] | None) -> str | None:
    """Failed attempts as the ``history`` column holds them (None: none reported)."""
    return _json.encode(history).decode() if history else None


# An outcome of a replayed job counts only when its run started after the latest replay: a
# late result of the run before (the ledger was behind) is a duplicate, not the new run's.
_THIS_RUN: Final = "(replays = 0 OR ? >= json_extract(runs, '$[#-1].replayed_at'))"


def _record_result(
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
        "finished_at = ?, history = COALESCE(?, history) WHERE id = ? AND finished_at IS NULL "
        f"AND {_THIS_RUN}",
        (
            result.status,
            value,
            error,
            result.attempts,
            result.worker,
            result.finished_at,
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
    return _verdict(conn, cur.rowcount, result.id)


def _record_dead_letter(
    conn: sqlite3.Connection,
    letter: wire.DeadLetter,
    job: wire.JobEnvelope,
    error: str,
    history: str | None,
) -> OutcomeVerdict:
    """The first terminal outcome wins; a dead letter arriving after the failed result of the
    same final attempt (same worker and time, see :func:`_record_result`) makes it ``dead``."""
    cur = conn.execute(
        "UPDATE jobs SET status = 'dead', dead_reason = ?, dead_at = ?, finished_at = ?, "
        "error = ?, worker = ?, attempts = MAX(attempts, ?), history = COALESCE(?, history) "
        f"WHERE id = ? AND finished_at IS NULL AND {_THIS_RUN}",
        (
            letter.reason,
            letter.at,
            letter.at,
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
    return _verdict(conn, cur.rowcount, job.id)


def _claimed(row: Sequence[Any], now: float) -> Claimed:
    """A claimed row as the relay publishes it (see ``SqliteStore.claim_unpublished``)."""
    _, job_id, task, body, due_at, sent_at, replays = row
    reason: RedriveReason
    if sent_at is None:
        reason = "replay" if replays else "due"
    elif sent_at == SENT_TO_LOST_NSQD:
        reason = "nsqd_restart"
    else:  # the accept path gave up, or its gateway died (SENT_BY_LOST_GATEWAY)
        reason = "unpublished"
    return Claimed(job_id, task, bytes(body), _delay_ms(due_at, now), reason)


def _delay_ms(due_at: float | None, now: float) -> int:
    """What is left of a job's delay, within what nsqd defers."""
    if due_at is None or due_at <= now:
        return 0
    return min(MAX_DELAY_MS, int((due_at - now) * 1000))
