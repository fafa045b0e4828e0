"""The embedded ledger store: one SQLite file (WAL, ``synchronous=FULL``), written by one thread.

Calls made in one event-loop turn are handed to the writer thread together and run in one
transaction; batches waiting when the thread comes back are merged into the same commit (group
commit). A call's future resolves, on its own loop, once that commit is on disk. What a
transaction runs is in :mod:`~nsqjobs.ledger.litesql`, the schema in
:mod:`~nsqjobs.ledger.liteschema`.
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
from typing import Any

from nsqjobs import wire
from nsqjobs.ledger.liteschema import PRUNABLE, ROW_COLUMNS, SENT_TO_LOST_NSQD, migrate
from nsqjobs.ledger.litesql import (
    Accept,
    KnownIds,
    Op,
    accept_at_once,
    apply_ops,
    claim,
    dead_rows,
    get_job,
    read_stats,
    record_dead_letter,
    record_result,
    redrive_lost_sessions,
    replay,
    verdict,
)
from nsqjobs.ledger.rows import encoder, history_json, listing_start, record, resolve
from nsqjobs.ledger.store import (
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

_Batch = tuple[asyncio.AbstractEventLoop, list[tuple[Op, "asyncio.Future[Any]"]]]


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
        # Sessions a commit found live (the writer thread's: see _apply); the operations that
        # end or hand over a session forget it.
        self._live_sessions: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="nsqjobs-ledger", daemon=True)
        self._thread.start()

    # -- the Store interface --------------------------------------------------------------------

    def record_accepted(
        self,
        jobs: list[wire.JobEnvelope],
        session: str | None = None,
        bodies: Sequence[bytes] | None = None,
    ) -> asyncio.Future[list[Accepted]]:
        """Record jobs as queued, all or none (see the protocol); in a live ``session``, the
        ones published now are recorded as published (``published_at`` = ``sent_at``)."""
        now = wire.now()
        rows = []
        envelopes = map(wire.encode, jobs) if bodies is None else bodies
        for j, envelope in zip(jobs, envelopes, strict=True):
            sent = None if held(j) else now
            rows.append(
                (
                    j.id,
                    j.task,
                    "",  # the envelope holds them (see ROW_COLUMNS)
                    envelope,
                    j.created_at,
                    now,
                    j.due_at,
                    sent,
                    # published_at and session, should the session be live (else dropped).
                    None if session is None else sent,
                    None if sent is None else session,
                )
            )
        return self._submit(Accept(rows, session))

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
                self._live_sessions.discard(session)
                return False
            conn.execute(
                "UPDATE sessions SET heartbeat_at = ?, low = ? WHERE id = ?", (now, low, session)
            )
            return True

        return self._submit(op)

    def end_session(self, session: str, now: float) -> asyncio.Future[None]:
        """See the protocol."""

        def op(conn: sqlite3.Connection) -> None:
            self._live_sessions.discard(session)
            conn.execute(
                "UPDATE sessions SET ended_at = ? WHERE id = ? AND handled_at IS NULL",
                (now, session),
            )

        return self._submit(op)

    def redrive_lost_sessions(self, stale_before: float, now: float) -> asyncio.Future[int]:
        """See the protocol. ``sent_at`` becomes :data:`SENT_BY_LOST_GATEWAY`, so the relay
        claims these at once. One writer: the handled mark needs no compare-and-set here."""

        def op(conn: sqlite3.Connection) -> int:
            self._live_sessions.clear()
            return redrive_lost_sessions(conn, stale_before, now)

        return self._submit(op)

    def record_result(self, result: wire.ResultEnvelope) -> asyncio.Future[OutcomeVerdict]:
        """Record a result; the first terminal outcome per id wins (see :func:`record_result`)."""
        error = None if result.error is None else encoder.encode(result.error).decode()
        # Always text ('null' for None): a non-NULL ``result`` says a result was recorded.
        value = encoder.encode(result.result).decode()
        history = history_json(result.history)
        return self._submit(lambda conn: record_result(conn, result, value, error, history))

    def record_dead_letter(self, letter: wire.DeadLetter) -> asyncio.Future[OutcomeVerdict]:
        """Record a dead letter; the first terminal outcome per id wins (see
        :func:`record_dead_letter`). A letter without a job (its body was undecodable) names
        no id: ``unknown``."""
        loop = asyncio.get_running_loop()
        job = letter.job
        if job is None:
            fut: asyncio.Future[OutcomeVerdict] = loop.create_future()
            fut.set_result("unknown")
            return fut
        error = encoder.encode(letter.error).decode()
        history = history_json(job.history)
        return self._submit(lambda conn: record_dead_letter(conn, letter, job, error, history))

    def get(self, job_id: str) -> asyncio.Future[JobRecord | None]:
        """The job with this id, or None."""
        return self._submit(lambda conn: get_job(conn, job_id))

    def list_jobs(
        self,
        *,
        status: JobStatus | None = None,
        task: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> asyncio.Future[Page]:
        """Jobs in acceptance order; raises :class:`LedgerError` for a bad filter or cursor."""
        clauses, params = ["seq > ?"], [listing_start(status, limit, cursor)]
        if status is not None:
            clauses.append("status = ?")
            params.append(status)  # type: ignore[arg-type]
        if task is not None:
            clauses.append("task = ?")
            params.append(task)  # type: ignore[arg-type]
        sql = f"SELECT {ROW_COLUMNS} FROM jobs WHERE {' AND '.join(clauses)} ORDER BY seq LIMIT ?"

        def op(conn: sqlite3.Connection) -> Page:
            rows = conn.execute(sql, (*params, limit + 1)).fetchall()
            more = len(rows) > limit
            rows = rows[:limit]
            return Page([record(r) for r in rows], str(rows[-1][14]) if more else None)

        return self._submit(op)

    # -- the relay -----------------------------------------------------------------------------

    def claim_unpublished(
        self, *, now: float, grace_s: float, horizon_s: float, lease_s: float, limit: int
    ) -> asyncio.Future[list[Claimed]]:
        """See the protocol. Jobs without a delay first (oldest first), then delayed ones
        coming due (soonest first); the reason is read from ``sent_at``: 0 (a re-drive after
        an nsqd restart), NULL (never sent: ``replay`` once replayed, else ``due``), or a time
        (the accept path's publish failed or never finished: ``unpublished``)."""
        return self._submit(lambda conn: claim(conn, now, grace_s, horizon_s, lease_s, limit))

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
                "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs INDEXED BY jobs_recorded "
                "WHERE recorded_at IS NOT "
                f"NULL AND recorded_at < ? AND status IN {PRUNABLE} ORDER BY recorded_at "
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
                return read_stats(self._reader)
            except sqlite3.Error as exc:
                raise LedgerError(f"the ledger could not be read: {exc}") from exc

    # -- operations ----------------------------------------------------------------------------

    def record_started(self, job_id: str, worker: str, at: float) -> asyncio.Future[OutcomeVerdict]:
        """A worker started the job: ``queued`` becomes ``running``, anything else stays."""

        def op(conn: sqlite3.Connection) -> OutcomeVerdict:
            cur = conn.execute(
                "UPDATE jobs SET status = 'running', started_at = ?, worker = ? "
                "WHERE id = ? AND status = 'queued'",
                (at, worker, job_id),
            )
            return verdict(conn, cur.rowcount, job_id)

        return self._submit(op)

    def cancel(self, job_id: str) -> asyncio.Future[JobRecord | None]:
        """Cancel a queued or running job (see the protocol); the job as it now stands."""
        now = wire.now()

        def op(conn: sqlite3.Connection) -> JobRecord | None:
            conn.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ?, recorded_at = ?, "
                "lease_until = NULL "
                "WHERE id = ? AND status IN ('queued', 'running') AND finished_at IS NULL",
                (now, now, job_id),
            )
            return get_job(conn, job_id)

        return self._submit(op)

    def replay(
        self, ids: list[str] | None = None, *, task: str | None = None, limit: int = 1000
    ) -> asyncio.Future[list[JobRecord]]:
        """Replay dead jobs (see the protocol): the run so far goes to ``runs``, the job is
        queued again with a fresh history, unpublished and never sent (the relay sends it)."""
        now = wire.now()

        return self._submit(lambda conn: replay(conn, ids, task, limit, now))

    def purge(
        self, ids: list[str] | None = None, *, task: str | None = None, limit: int = 1000
    ) -> asyncio.Future[int]:
        """Delete dead jobs (see the protocol). How many."""

        def op(conn: sqlite3.Connection) -> int:
            rows = dead_rows(conn, ids, task, limit)
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

    def _apply(self, ops: list[Op]) -> list[tuple[bool, Any]]:
        """Run one commit's operations: as one statement when they are only accepts of new
        jobs in a session known live (the ingest path's usual commit: see accept_at_once),
        else in a transaction (its COMMIT left to the caller)."""
        conn, live = self._conn, self._live_sessions
        if all(type(op) is Accept for op in ops):
            at_once = accept_at_once(conn, ops, live)  # type: ignore[arg-type]
            if at_once is not None:
                return [(True, answers) for answers in at_once]
        conn.execute("BEGIN IMMEDIATE")
        try:
            return apply_ops(conn, ops, live=live)
        except KnownIds:  # an id was there: again, each accept on its own
            conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            return apply_ops(conn, ops, merge=False)

    def _commit(self, batches: list[_Batch]) -> None:
        conn = self._conn
        outcomes: list[list[tuple[bool, Any]]] = []
        try:
            started = time.perf_counter()
            ops = [op for _, batch in batches for op, _ in batch]
            results = self._apply(ops)
            i = 0
            for _, batch in batches:
                outcomes.append(results[i : i + len(batch)])
                i += len(batch)
            if conn.in_transaction:
                conn.execute("COMMIT")
            if self.observe_write is not None:
                self.observe_write(time.perf_counter() - started)
        except sqlite3.Error as exc:
            self._live_sessions.clear()  # what this commit read may not stand
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.error("ledger: a write failed, %d batch(es) not recorded: %s", len(batches), exc)
            error = LedgerError(f"the ledger could not write: {exc}")
            outcomes = [[(False, error)] * len(batch) for _, batch in batches]
        for (loop, batch), results in zip(batches, outcomes, strict=True):
            # A closed loop: nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(resolve, [f for _, f in batch], results)
