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
    held,
)

log = logging.getLogger("nsqjobs.ledger")

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
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

_COLUMNS: Final = (
    "id, task, args, status, created_at, accepted_at, published_at, finished_at, attempts, "
    "worker, result, error, dead_reason, dead_at, seq, due_at, started_at, redrives, replays, "
    "history, runs"
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
        args=msgspec.json.decode(row[2]),
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

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
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
        self._thread = threading.Thread(target=self._run, name="nsqjobs-ledger", daemon=True)
        self._thread.start()

    # -- the Store interface --------------------------------------------------------------------

    def record_accepted(self, jobs: list[wire.JobEnvelope]) -> asyncio.Future[list[Accepted]]:
        """Record jobs as queued, all or none (see the protocol)."""
        now = wire.now()
        rows = [
            (
                j.id,
                j.task,
                _canonical.encode(j.args).decode(),
                wire.encode(j),
                j.created_at,
                now,
                j.due_at,
                None if held(j, now) else now,
            )
            for j in jobs
        ]
        return self._submit(lambda conn: _accept(conn, rows))

    def mark_published(self, ids: list[str]) -> asyncio.Future[None]:
        """Note nsqd's acknowledgement of these jobs."""
        now = wire.now()

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE jobs SET published_at = ? WHERE id = ? AND published_at IS NULL",
                [(now, i) for i in ids],
            )

        return self._submit(op)

    def record_result(self, result: wire.ResultEnvelope) -> asyncio.Future[OutcomeVerdict]:
        """Record a result; the first one per id wins."""
        error = None if result.error is None else _json.encode(result.error).decode()
        value = None if result.result is None else _json.encode(result.result).decode()
        params = (
            result.status,
            value,
            error,
            result.attempts,
            result.worker,
            result.finished_at,
            _history(result.history),
            result.id,
        )

        def op(conn: sqlite3.Connection) -> OutcomeVerdict:
            cur = conn.execute(
                "UPDATE jobs SET status = CASE status WHEN 'dead' THEN 'dead' ELSE ? END, "
                "result = ?, error = ?, attempts = ?, worker = ?, finished_at = ?, history = ? "
                "WHERE id = ? AND finished_at IS NULL",
                params,
            )
            return _verdict(conn, cur.rowcount, result.id)

        return self._submit(op)

    def record_dead_letter(self, letter: wire.DeadLetter) -> asyncio.Future[OutcomeVerdict]:
        """Record a dead letter; the first one per id wins. A letter without a job (its body
        was undecodable) names no id: ``unknown``."""
        loop = asyncio.get_running_loop()
        job = letter.job
        if job is None:
            fut: asyncio.Future[OutcomeVerdict] = loop.create_future()
            fut.set_result("unknown")
            return fut
        error = _json.encode(letter.error).decode()
        params = (letter.reason, letter.at, error, _history(job.history), job.id)

        def op(conn: sqlite3.Connection) -> OutcomeVerdict:
            cur = conn.execute(
                "UPDATE jobs SET status = 'dead', dead_reason = ?, dead_at = ?, "
                "error = COALESCE(error, ?), history = ? WHERE id = ? AND dead_at IS NULL",
                params,
            )
            return _verdict(conn, cur.rowcount, job.id)

        return self._submit(op)

    def get(self, job_id: str) -> asyncio.Future[JobRecord | None]:
        """The job with this id, or None."""

        def op(conn: sqlite3.Connection) -> JobRecord | None:
            row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
            return None if row is None else _record(row)

        return self._submit(op)

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

    # -- the relay (stubs: being built) -------------------------------------------------------

    def claim_unpublished(
        self, *, now: float, grace_s: float, horizon_s: float, lease_s: float, limit: int
    ) -> asyncio.Future[list[Claimed]]:
        """See the protocol."""
        raise NotImplementedError

    def redrive_sent_before(self, started_at: float) -> asyncio.Future[int]:
        """See the protocol."""
        raise NotImplementedError

    def prune_finished(self, before: float, limit: int) -> asyncio.Future[int]:
        """See the protocol."""
        raise NotImplementedError

    def stats(self) -> asyncio.Future[LedgerStats]:
        """See the protocol."""
        raise NotImplementedError

    # -- operations (stubs: being built) --------------------------------------------------------

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
        """See the protocol."""
        raise NotImplementedError

    def replay(
        self, ids: list[str] | None = None, *, task: str | None = None, limit: int = 1000
    ) -> asyncio.Future[list[JobRecord]]:
        """See the protocol."""
        raise NotImplementedError

    def purge(
        self, ids: list[str] | None = None, *, task: str | None = None, limit: int = 1000
    ) -> asyncio.Future[int]:
        """See the protocol."""
        raise NotImplementedError

    def close(self) -> None:
        """Run what was handed over, stop the writer thread, close the file."""
        if self._closed:
            return
        self._flush()
        self._closed = True
        self._queue.put(None)
        self._thread.join()
        self._conn.close()

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
            conn.execute("BEGIN IMMEDIATE")
            for _, batch in batches:
                outcomes.append([_call(op, conn) for op, _ in batch])
            conn.execute("COMMIT")
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


def _history(history: tuple[wire.Attempt, ...]) -> str | None:
    """Failed attempts as the ``history`` column holds them (NULL: none)."""
    return _json.encode(history).decode() if history else None


def _verdict(conn: sqlite3.Connection, changed: int, job_id: str) -> OutcomeVerdict:
    if changed:
        return "recorded"
    known = conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return "duplicate" if known else "unknown"


def _accept(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> Any:
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
            answers.append(Accepted("new"))
            new.append(row)
        elif old[1] == row[1] and old[2] == row[2]:
            answers.append(Accepted("same", _record(old)))
        else:
            answers.append(Accepted("conflict", _record(old)))
    if new and all(a.kind != "conflict" for a in answers):
        conn.executemany(
            "INSERT INTO jobs (id, task, args, envelope, status, created_at, accepted_at, due_at, "
            "sent_at) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
            new,
        )
    return answers
