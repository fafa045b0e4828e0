"""The shared ledger store: one PostgreSQL database that several gateways write together.

Like the SQLite store, calls made in one event-loop turn go to a writer thread together and run
in one transaction, and batches waiting when it comes back join the next commit (group commit);
a call's future resolves, on its own loop, once that commit is durable (``synchronous_commit``
on). The writer thread runs its own event loop with one asyncpg connection (the driver was
chosen by measurement: bench/results/ledger_drivers.md). The hot calls of a transaction are
merged: its accepts are one INSERT, its publish notes one UPDATE, its results one UPDATE.

When the database goes away, the calls of that transaction fail with :class:`LedgerError`
(the gateway answers 503; the outcome reader requeues) and the next transaction reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import asyncpg

from nsqjobs import wire
from nsqjobs.ledger.pgsql import (
    BY_IDS,
    CLAIM,
    MIGRATIONS,
    RECORD_DEAD_LETTER,
    SCHEMA_VERSION,
    TERMINAL_DB_ERRORS,
    Call,
    Conn,
    apply_calls,
    apply_fast,
    verdict,
)
from nsqjobs.ledger.rows import (
    COLUMNS,
    canonical,
    encoder,
    history_json,
    listing_start,
    record,
    replayed_envelope,
    replayed_runs,
    resolve,
)
from nsqjobs.ledger.store import (
    SESSION_TTL_S,
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
    remaining_delay_ms,
)

log = logging.getLogger("nsqjobs.ledger")

# Any key will do, as long as nothing else in the database takes advisory locks with it.
_MIGRATION_LOCK: Final = 0x6E73_716A_6F62  # "nsqjob"
# A transaction that met another gateway's in a deadlock, or a serialization failure, is tried
# again this many times in all (it was rolled back whole, so nothing is done twice).
_TRIES: Final = 3
_Batch = tuple[asyncio.AbstractEventLoop, list[Call]]
_SERVER_SETTINGS: Final = {
    "application_name": "nsqjobs",
    "synchronous_commit": "on",  # durable before a future resolves, whatever the server's default
    # Plan every statement for its arguments: a generic plan cached while the table was small
    # (a sequential scan) is kept as the table grows, until the next ANALYZE (measured: half
    # the accepts per second of a fresh ledger).
    "plan_cache_mode": "force_custom_plan",
}


async def migrate(conn: Conn) -> int:
    """Apply the migrations the database lacks, in one transaction under an advisory lock (two
    gateways starting together: the second waits, then finds nothing to do); its version."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        version = await conn.fetchval("SELECT max(version) FROM schema_version") or 0
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"the ledger's schema is version {version}, newer than this nsqjobs knows "
                f"({SCHEMA_VERSION}): run a newer nsqjobs"
            )
        for n in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[n]:
                await conn.execute(statement)
            log.info("ledger: schema migrated to version %d", n + 1)
        if version < SCHEMA_VERSION:
            await conn.execute("DELETE FROM schema_version")
            await conn.execute("INSERT INTO schema_version VALUES ($1)", SCHEMA_VERSION)
    return SCHEMA_VERSION


class PostgresStore:
    """The :class:`~nsqjobs.ledger.store.Store` on a PostgreSQL database (``postgresql://`` or
    ``postgres://`` URL, as libpq reads it).

    Opening connects and migrates the schema, so errors show at start.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = 5.0,
        command_timeout_s: float = 30.0,
        observe_write: Callable[[float], object] | None = None,
    ) -> None:
        self.url = url
        # Told each commit's duration in seconds, from the writer thread (as the SQLite store).
        self.observe_write = observe_write
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self._conn: Conn = None
        self._waiting: list[_Batch] = []  # the writer loop's alone
        self._draining: asyncio.Task[None] | None = None
        self._pending: list[Call] = []
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="nsqjobs-ledger", daemon=True
        )
        self._thread.start()
        try:
            self._in_writer(self._open(), connect_timeout_s + command_timeout_s)
        except BaseException:
            with contextlib.suppress(Exception):
                self._in_writer(self._shutdown(), 10.0)
            self._stop_thread()
            raise

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
            later = held(j)
            rows.append(
                (
                    j.id,
                    j.task,
                    canonical.encode(j.args).decode(),
                    envelope,
                    j.created_at,
                    now,
                    j.due_at,
                    None if later else now,
                    "due" if later else None,
                    session,
                )
            )
        return self._submit("accept", rows)

    def mark_published(self, ids: list[str]) -> asyncio.Future[None]:
        """Note nsqd's acknowledgement of these jobs."""
        return self._submit("mark", (ids, wire.now()))

    def mark_unpublished(self, ids: list[str]) -> asyncio.Future[None]:
        """See the protocol (a job a relay claimed since has its own publish under way)."""

        async def op(conn: Conn) -> None:
            await conn.execute(
                f"UPDATE jobs SET published_at = NULL, session = NULL WHERE {BY_IDS} "
                "AND published_at IS NOT NULL AND lease_until IS NULL",
                ids,
            )

        return self._submit("op", op)

    def beat_session(self, session: str, low: float, now: float) -> asyncio.Future[bool]:
        """See the protocol."""

        async def op(conn: Conn) -> bool:
            live = await conn.fetchval(
                "SELECT ended_at IS NULL AND handled_at IS NULL FROM sessions WHERE id = $1",
                session,
            )
            if live is None:
                await conn.execute(
                    "INSERT INTO sessions (id, started_at, heartbeat_at, low) "
                    "VALUES ($1, $2, $2, $3)",
                    session,
                    now,
                    low,
                )
                return True
            if not live:
                return False
            await conn.execute(
                "UPDATE sessions SET heartbeat_at = $2, low = $3 WHERE id = $1 "
                "AND handled_at IS NULL",
                session,
                now,
                low,
            )
            return True

        return self._submit("op", op)

    def end_session(self, session: str, now: float) -> asyncio.Future[None]:
        """See the protocol."""

        async def op(conn: Conn) -> None:
            await conn.execute(
                "UPDATE sessions SET ended_at = $2 WHERE id = $1 AND handled_at IS NULL",
                session,
                now,
            )

        return self._submit("op", op)

    def redrive_lost_sessions(self, stale_before: float, now: float) -> asyncio.Future[int]:
        """See the protocol. The handled mark is a compare-and-set (another relay's update of
        the same session waits, then finds it handled); the jobs' update, a later statement of
        the same transaction, sees every accept of the session that committed before it. They
        lose ``sent_at`` too, with the reason ``unpublished``: claimed at once."""

        async def op(conn: Conn) -> int:
            await conn.execute(
                "DELETE FROM sessions WHERE ended_at < $1 OR handled_at < $1",
                now - SESSION_TTL_S,
            )
            lost = await conn.fetch(
                "UPDATE sessions SET handled_at = $2 WHERE ended_at IS NULL "
                "AND handled_at IS NULL AND heartbeat_at < $1 RETURNING seq, low",
                stale_before,
                now,
            )
            count = 0
            for row in lost:
                status = await conn.execute(
                    "UPDATE jobs SET published_at = NULL, sent_at = NULL, session = NULL, "
                    "redrive_reason = 'unpublished' WHERE status IN ('queued', 'running') "
                    "AND sent_at >= $2 AND session = $1 AND published_at IS NOT NULL",
                    row["seq"],
                    row["low"],
                )
                count += int(status.split()[-1])
            return count

        return self._submit("op", op)

    def record_result(self, result: wire.ResultEnvelope) -> asyncio.Future[OutcomeVerdict]:
        """Record a result; the first terminal outcome per id wins (the failed result that
        goes with a dead letter is part of that outcome: pgsql.SAME_OUTCOME_S)."""
        error = None if result.error is None else encoder.encode(result.error).decode()
        row = (
            result.id,
            result.status,
            encoder.encode(result.result).decode(),  # 'null' too: a result is in
            error,
            result.attempts,
            result.worker,
            result.finished_at,
            history_json(result.history),
            result.started_at,
        )
        return self._submit("result", row)

    def record_dead_letter(self, letter: wire.DeadLetter) -> asyncio.Future[OutcomeVerdict]:
        """Record a dead letter; the first terminal outcome per id wins, or it completes the
        failed result of the same final attempt. A letter without a job names no id:
        ``unknown``."""
        job = letter.job
        if job is None:
            return self._done("unknown")
        params = (
            job.id,
            letter.reason,
            letter.at,
            encoder.encode(letter.error).decode(),
            letter.worker,
            job.attempts,
            history_json(job.history),
        )

        async def op(conn: Conn) -> OutcomeVerdict:
            recorded = await conn.fetchval(RECORD_DEAD_LETTER, *params, wire.now())
            return await verdict(conn, recorded, job.id)

        return self._submit("op", op)

    def get(self, job_id: str) -> asyncio.Future[JobRecord | None]:
        """The job with this id, or None."""

        async def op(conn: Conn) -> JobRecord | None:
            row = await conn.fetchrow(f"SELECT {COLUMNS} FROM jobs WHERE id = $1", job_id)
            return None if row is None else record(row)

        return self._submit("op", op)

    def list_jobs(
        self,
        *,
        status: JobStatus | None = None,
        task: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> asyncio.Future[Page]:
        """Jobs in acceptance order; raises :class:`LedgerError` for a bad filter or cursor."""
        clauses, params = ["seq > $1"], [listing_start(status, limit, cursor)]
        for column, value in (("status", status), ("task", task)):
            if value is not None:
                params.append(value)  # type: ignore[arg-type]
                clauses.append(f"{column} = ${len(params)}")
        sql = (
            f"SELECT {COLUMNS} FROM jobs WHERE {' AND '.join(clauses)} "
            f"ORDER BY seq LIMIT ${len(params) + 1}"
        )

        async def op(conn: Conn) -> Page:
            rows = await conn.fetch(sql, *params, limit + 1)
            more = len(rows) > limit
            rows = rows[:limit]
            return Page([record(r) for r in rows], str(rows[-1]["seq"]) if more else None)

        return self._submit("op", op)

    # -- the relay ------------------------------------------------------------------------------

    def claim_unpublished(
        self, *, now: float, grace_s: float, horizon_s: float, lease_s: float, limit: int
    ) -> asyncio.Future[list[Claimed]]:
        """See the protocol; rows another gateway holds are skipped (FOR UPDATE SKIP LOCKED)."""

        async def op(conn: Conn) -> list[Claimed]:
            rows = await conn.fetch(CLAIM, now, grace_s, horizon_s, lease_s, limit)
            rows = sorted(rows, key=lambda r: r["seq"])
            return [
                Claimed(
                    id=r["id"],
                    task=r["task"],
                    body=r["envelope"],
                    delay_ms=remaining_delay_ms(r["due_at"], now),
                    reason=r["reason"],
                )
                for r in rows
            ]

        return self._submit("op", op)

    def redrive_sent_before(self, started_at: float) -> asyncio.Future[int]:
        """See the protocol: the publish is forgotten (``sent_at`` NULL too), so the relay
        publishes the job at once, with reason ``nsqd_restart``. Only acknowledged publishes,
        as in the SQLite store: a publish still awaiting nsqd's answer (a relay's claim, its
        lease left alone) is that relay's to finish or to give up."""

        async def op(conn: Conn) -> int:
            status = await conn.execute(
                "UPDATE jobs SET published_at = NULL, sent_at = NULL, "
                "redrives = redrives + 1, redrive_reason = 'nsqd_restart' "
                "WHERE status IN ('queued', 'running') AND sent_at < $1 "
                "AND published_at IS NOT NULL",
                started_at,
            )
            return _count(status)

        return self._submit("op", op)

    def prune_finished(self, before: float, limit: int) -> asyncio.Future[int]:
        """See the protocol."""

        async def op(conn: Conn) -> int:
            status = await conn.execute(
                "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE status IN "
                "('succeeded', 'failed', 'cancelled') AND recorded_at < $1 ORDER BY recorded_at "
                "LIMIT $2 FOR UPDATE SKIP LOCKED)",
                before,
                limit,
            )
            return _count(status)

        return self._submit("op", op)

    def stats(self) -> asyncio.Future[LedgerStats]:
        """See the protocol; every status is there, 0 when no job has it.
        ``oldest_unfinished_at`` is when the oldest unfinished job became runnable: accepted,
        or due for a delayed one (one due next month is not late), read from indexes."""

        async def op(conn: Conn) -> LedgerStats:
            rows = await conn.fetch("SELECT status, count(*) AS n FROM jobs GROUP BY status")
            oldest = await conn.fetchval(
                "SELECT LEAST("
                "(SELECT accepted_at FROM jobs WHERE status = 'queued' AND due_at IS NULL "
                "ORDER BY seq LIMIT 1), "
                "(SELECT accepted_at FROM jobs WHERE status = 'running' AND due_at IS NULL "
                "ORDER BY seq LIMIT 1), "
                "(SELECT min(due_at) FROM jobs WHERE due_at IS NOT NULL "
                "AND status IN ('queued', 'running')))"
            )
            counts = dict.fromkeys(STATUSES, 0) | {r["status"]: r["n"] for r in rows}
            return LedgerStats(counts, oldest)

        return self._submit("op", op)

    # -- operations -----------------------------------------------------------------------------

    def record_started(self, job_id: str, worker: str, at: float) -> asyncio.Future[OutcomeVerdict]:
        """See the protocol."""

        async def op(conn: Conn) -> OutcomeVerdict:
            changed = await conn.fetchval(
                "UPDATE jobs SET status = 'running', started_at = $2, worker = $3 "
                "WHERE id = $1 AND status = 'queued' RETURNING 1",
                job_id,
                at,
                worker,
            )
            return await verdict(conn, changed, job_id)

        return self._submit("op", op)

    def cancel(self, job_id: str) -> asyncio.Future[JobRecord | None]:
        """See the protocol."""
        now = wire.now()

        async def op(conn: Conn) -> JobRecord | None:
            await conn.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = $2, recorded_at = $2, "
                "lease_until = NULL WHERE id = $1 AND status IN ('queued', 'running')",
                job_id,
                now,
            )
            row = await conn.fetchrow(f"SELECT {COLUMNS} FROM jobs WHERE id = $1", job_id)
            return None if row is None else record(row)

        return self._submit("op", op)

    def replay(
        self, ids: list[str] | None = None, *, task: str | None = None, limit: int = 1000
    ) -> asyncio.Future[list[JobRecord]]:
        """See the protocol: the run so far goes to ``runs``; the job is queued again with a
        fresh history, never sent (the relay sends it), its envelope less an expiry that has
        passed (it would only expire again)."""
        where, params = _dead_filter(ids, task, limit)
        now = wire.now()

        async def op(conn: Conn) -> list[JobRecord]:
            rows = await conn.fetch(
                f"SELECT {COLUMNS}, envelope FROM jobs WHERE {where} ORDER BY seq LIMIT $2 "
                "FOR UPDATE",
                *params,
            )
            if not rows:
                return []
            runs = [replayed_runs(record(r), now) for r in rows]
            replayed = await conn.fetch(
                "UPDATE jobs AS j SET status = 'queued', runs = u.runs, envelope = u.envelope, "
                "replays = j.replays + 1, attempts = 0, worker = NULL, result = NULL, "
                "error = NULL, dead_reason = NULL, dead_at = NULL, finished_at = NULL, "
                "recorded_at = NULL, started_at = NULL, published_at = NULL, sent_at = NULL, "
                "lease_until = NULL, "
                "history = NULL, redrive_reason = 'replay' FROM unnest($1::text[], $2::text[], "
                "$3::bytea[]) AS u(id, runs, envelope) "
                f"WHERE j.id = u.id RETURNING {_qualified('j')}",
                [r["id"] for r in rows],
                runs,
                [replayed_envelope(r["envelope"], now) for r in rows],
            )
            return [record(r) for r in sorted(replayed, key=lambda r: r["seq"])]

        return self._submit("op", op)

    def purge(
        self, ids: list[str] | None = None, *, task: str | None = None, limit: int = 1000
    ) -> asyncio.Future[int]:
        """See the protocol."""
        where, params = _dead_filter(ids, task, limit)

        async def op(conn: Conn) -> int:
            status = await conn.execute(
                f"DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE {where} "
                "ORDER BY seq LIMIT $2 FOR UPDATE)",
                *params,
            )
            return _count(status)

        return self._submit("op", op)

    def close(self) -> None:
        """Commit what was handed over, close the connection, stop the writer thread."""
        if self._closed:
            return
        self._flush()
        self._closed = True
        try:
            self._in_writer(self._shutdown(), self.command_timeout_s + 10)
        except (LedgerError, TimeoutError) as exc:
            log.warning("ledger: closing: %s", exc)
        finally:
            self._stop_thread()

    # -- the caller's side ------------------------------------------------------------------------

    def _done(self, value: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(value)
        return fut

    def _submit(self, kind: str, payload: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            fut.set_exception(LedgerError("the ledger is closed"))
            return fut
        pending = self._pending
        pending.append(Call(kind, payload, fut))
        if len(pending) == 1:  # the first call of this loop turn: hand them over after it
            loop.call_soon(self._flush)
        return fut

    def _flush(self) -> None:
        if not self._pending or self._closed:
            return
        calls, self._pending = self._pending, []
        by_loop: dict[asyncio.AbstractEventLoop, list[Call]] = {}
        for call in calls:
            by_loop.setdefault(call.fut.get_loop(), []).append(call)
        for loop, batch in by_loop.items():
            self._loop.call_soon_threadsafe(self._receive, loop, batch)

    def _in_writer(self, coro: Awaitable[Any], timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    def _stop_thread(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    # -- the writer's side (its own thread and loop) ----------------------------------------------

    async def _open(self) -> None:
        conn = await self._connection()
        try:
            await migrate(conn)
        except asyncpg.PostgresError as exc:
            raise LedgerError(f"cannot migrate the ledger at {_safe(self.url)}: {exc}") from exc

    async def _shutdown(self) -> None:
        if self._draining is not None:
            await self._draining
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 5.0)
            self._conn = None

    async def _connection(self) -> Conn:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        self._conn = None
        try:
            self._conn = await asyncpg.connect(
                self.url,
                timeout=self.connect_timeout_s,
                command_timeout=self.command_timeout_s,
                server_settings=_SERVER_SETTINGS,
            )
        except (asyncpg.PostgresError, *TERMINAL_DB_ERRORS) as exc:
            raise LedgerError(f"cannot connect to the ledger at {_safe(self.url)}: {exc}") from exc
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None

    def _receive(self, loop: asyncio.AbstractEventLoop, batch: list[Call]) -> None:
        self._waiting.append((loop, batch))
        if self._draining is None or self._draining.done():
            self._draining = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        while self._waiting:
            # Group commit: whatever queued up while the last commit ran joins this one.
            batches, self._waiting = self._waiting, []
            calls = [c for _, batch in batches for c in batch]
            try:
                outcomes = await self._run(calls)
            except LedgerError as exc:
                log.error("ledger: %d call(s) not recorded: %s", len(calls), exc)
                outcomes = [(False, exc)] * len(calls)
            except Exception as exc:  # a bug of ours: fail the calls, never leave them waiting
                log.exception("ledger: %d call(s) not recorded", len(calls))
                outcomes = [(False, LedgerError(f"the ledger failed: {exc!r}"))] * len(calls)
            i = 0
            for loop, batch in batches:
                results = outcomes[i : i + len(batch)]
                i += len(batch)
                with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                    loop.call_soon_threadsafe(resolve, [c.fut for c in batch], results)

    async def _run(self, calls: list[Call]) -> list[tuple[bool, Any]]:
        """Run ``calls`` in one transaction (one statement when it can: ``apply_fast``); a
        database error that is one call's fault (not the connection's) fails that call alone:
        the others are run again without it."""
        for attempt in range(1, _TRIES + 1):
            conn = await self._connection()
            try:
                started = time.perf_counter()
                out = await apply_fast(conn, calls)
                if out is None:
                    async with conn.transaction():
                        out = await apply_calls(conn, calls)
                if self.observe_write is not None:
                    self.observe_write(time.perf_counter() - started)
                return out
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError):
                if attempt == _TRIES:
                    raise LedgerError("the ledger kept deadlocking with another writer") from None
            except Exception as exc:
                if conn.is_closed() or isinstance(exc, TERMINAL_DB_ERRORS):
                    self._drop()
                    raise LedgerError(f"the ledger could not write: {exc}") from exc
                if not isinstance(exc, asyncpg.PostgresError):
                    raise
                if len(calls) == 1:
                    return [(False, LedgerError(f"the ledger could not write: {exc}"))]
                return [(await self._run([c]))[0] for c in calls]
        raise LedgerError("unreachable")  # the loop returns or raises


def _dead_filter(
    ids: list[str] | None, task: str | None, limit: int
) -> tuple[str, tuple[Any, Any]]:
    """The WHERE clause and parameters ($1, $2: the limit) choosing dead jobs to replay or
    purge: all of ``ids``, else up to ``limit`` of ``task``, else of any task."""
    if not 1 <= limit <= 100_000:
        raise LedgerError("limit must be 1-100000")
    if ids is not None:
        return f"status = 'dead' AND {BY_IDS}", (ids, max(len(ids), 1))
    if task is not None:
        return "status = 'dead' AND task = $1", (task, limit)
    return "status = 'dead' AND $1::text IS NULL", (None, limit)


def _qualified(table: str) -> str:
    return ", ".join(f"{table}.{c.strip()}" for c in COLUMNS.split(","))


def _count(status: str) -> int:
    """The row count of a command status such as ``UPDATE 3`` or ``DELETE 0``."""
    return int(status.rpartition(" ")[2] or 0)


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.partition(':')[0]}:***@{host}"
