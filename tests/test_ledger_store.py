"""The SQLite ledger store on its own: durability, schema, idempotent accepts, first outcome
wins, listing."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from nsqjobs import wire
from nsqjobs.ledger import LedgerError, SqliteStore, litesql
from nsqjobs.ledger import sqlite as sqlite_store
from nsqjobs.ledger.liteschema import MIGRATIONS, SCHEMA_VERSION

T = TypeVar("T")
pytestmark = pytest.mark.timeout(30)


def run(path: Path, body: Callable[[SqliteStore], Awaitable[T]]) -> T:
    """Open a store on ``path``, run ``body`` in an event loop, close the store."""

    async def main() -> T:
        store = SqliteStore(path)
        try:
            return await asyncio.wait_for(body(store), 10)
        finally:
            store.close()

    return asyncio.run(main())


def job(job_id: str, task: str = "noop", **args: Any) -> wire.JobEnvelope:
    return wire.JobEnvelope(id=job_id, task=task, args=args, created_at=1000.0)


def result(job_id: str, status: str = "succeeded", value: Any = 1, attempts: int = 1) -> Any:
    error = None if status == "succeeded" else wire.ErrorInfo(type="ValueError", message="bad")
    return wire.ResultEnvelope(
        id=job_id,
        task="noop",
        status=status,  # type: ignore[arg-type]
        result=value if status == "succeeded" else None,
        error=error,
        attempts=attempts,
        worker="w1",
        started_at=1001.0,
        finished_at=1002.0,
        duration_s=1.0,
    )


def test_schema_is_migrated_wal_and_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "data" / "ledger.sqlite3"
    run(path, lambda store: store.get("nothing"))
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    # Opening again migrates nothing and keeps what is there.
    run(path, lambda store: store.get("nothing"))


def test_schema_4_counts_retention_from_when_an_outcome_was_recorded(tmp_path: Path) -> None:
    # A ledger of schema 3 with a finished job: the migration takes its finished_at as when it
    # was recorded, so retention goes on as before for what is there.
    path = tmp_path / "ledger.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    for n in range(3):
        for statement in MIGRATIONS[n]:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 3")
    conn.execute(
        "INSERT INTO jobs (id, task, args, envelope, status, created_at, accepted_at, "
        "finished_at) VALUES ('old', 'noop', '{}', x'', 'succeeded', 1.0, 1.0, 1000.0)"
    )
    conn.close()

    async def body(store: SqliteStore) -> int:
        return await store.prune_finished(1001.0, 10)

    assert run(path, body) == 1
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "jobs_recorded" in indexes and "jobs_finished" not in indexes
    finally:
        conn.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(LedgerError, match="newer"):
        SqliteStore(path)


def test_accepted_jobs_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"

    async def accept(store: SqliteStore) -> list[str]:
        answers = await store.record_accepted([job("a", n=1), job("b", n=2)])
        return [a.kind for a in answers]

    assert run(path, accept) == ["new", "new"]
    got = run(path, lambda store: store.get("b"))
    assert got is not None
    assert (got.id, got.task, got.args, got.status, got.attempts) == (
        "b",
        "noop",
        {"n": 2},
        "queued",
        0,
    )
    assert got.published_at is None and got.finished_at is None


def test_same_id_same_job_is_same_and_other_args_conflict_all_or_none(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        await store.record_accepted([job("a", x=1, y=[1, 2])])
        # The same arguments in another key order are the same job.
        same = await store.record_accepted(
            [wire.JobEnvelope(id="a", task="noop", args={"y": [1, 2], "x": 1}, created_at=5.0)]
        )
        assert same[0].kind == "same" and same[0].existing is not None
        assert same[0].existing.args == {"x": 1, "y": [1, 2]}
        answers = await store.record_accepted([job("new1"), job("a", x=2), job("new2")])
        assert [a.kind for a in answers] == ["new", "conflict", "new"]
        # A conflict records nothing of its batch.
        assert await store.get("new1") is None and await store.get("new2") is None
        other_task = await store.record_accepted([job("a", task="sleep", x=1, y=[1, 2])])
        assert other_task[0].kind == "conflict"

    run(tmp_path / "l.sqlite3", body)


def test_a_known_id_in_a_merged_commit_is_redone_one_accept_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    merges: list[bool] = []
    real = litesql.apply_ops

    def spy(conn: sqlite3.Connection, ops: list[Any], *, merge: bool = True, **kw: Any) -> Any:
        merges.append(merge)
        return real(conn, ops, merge=merge, **kw)

    monkeypatch.setattr(sqlite_store, "apply_ops", spy)

    # Accepts of one loop turn share one INSERT with no savepoint; a known id rolls the whole
    # commit back and applies it again, each accept on its own: every other operation of the
    # commit must still count once, and every answer be the one it gets alone.
    async def body(store: SqliteStore) -> None:
        await store.record_accepted([job("old", x=1), job("r")])
        await store.mark_published(["r"])
        merges.clear()
        # No await in between: one commit.
        recorded = store.record_result(result("r", value=7))
        accepts = [
            store.record_accepted([job("n1")]),
            store.record_accepted([job("old", x=1), job("n2")]),
            store.record_accepted([job("old", x=2), job("n3")]),
            store.record_accepted([job("n4"), job("n5")]),
        ]
        outcome = await recorded
        n1, same, conflict, fresh = await asyncio.gather(*accepts)
        assert merges == [True, False]  # merged, then redone
        assert outcome == "recorded"
        assert [a.kind for a in n1] == ["new"]
        assert [a.kind for a in same] == ["same", "new"]
        assert [a.kind for a in conflict] == ["conflict", "new"]
        assert [a.kind for a in fresh] == ["new", "new"]
        for job_id in ("n1", "n2", "n4", "n5"):
            assert await store.get(job_id) is not None, job_id
        assert await store.get("n3") is None  # its batch had a conflict: none of it is in
        old = await store.get("old")
        assert old is not None and old.args == {"x": 1}
        r = await store.get("r")
        assert r is not None and (r.status, r.result) == ("succeeded", 7)
        assert await store.record_result(result("r", value=8)) == "duplicate"
        # And the next commit, with no known id, is not redone.
        assert [a.kind for a in await store.record_accepted([job("n6"), job("n7")])] == ["new"] * 2
        assert merges.count(False) == 1

    run(tmp_path / "l.sqlite3", body)


def test_first_result_wins_and_duplicates_are_counted(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        await store.record_accepted([job("a"), job("b")])
        await store.mark_published(["a"])
        assert await store.record_result(result("a", value=42)) == "recorded"
        assert await store.record_result(result("a", "failed", attempts=3)) == "duplicate"
        assert await store.record_result(result("zzz")) == "unknown"
        a = await store.get("a")
        assert a is not None
        assert (a.status, a.result, a.error, a.attempts, a.worker) == (
            "succeeded",
            42,
            None,
            1,
            "w1",
        )
        assert a.published_at is not None and a.finished_at == 1002.0
        # A worker that dead-letters a job publishes the letter and the failed result of the
        # same final attempt (same worker, same time): one outcome, in either order.
        letter = wire.DeadLetter(
            reason="max_attempts",
            error=wire.ErrorInfo(type="ValueError", message="bad"),
            worker="w1",
            at=1002.0,
            job=job("b"),
        )
        assert await store.record_dead_letter(letter) == "recorded"
        assert await store.record_dead_letter(letter) == "duplicate"
        assert await store.record_result(result("b", "failed", attempts=3)) == "recorded"
        assert await store.record_result(result("b", "failed", attempts=3)) == "duplicate"
        b = await store.get("b")
        assert b is not None
        assert (b.status, b.dead_reason, b.attempts) == ("dead", "max_attempts", 3)
        assert b.error == wire.ErrorInfo(type="ValueError", message="bad")
        assert b.finished_at == 1002.0
        no_job = wire.DeadLetter(
            reason="undecodable", error=letter.error, worker="w", at=1.0, raw="x"
        )
        assert await store.record_dead_letter(no_job) == "unknown"

    run(tmp_path / "l.sqlite3", body)


def test_listing_by_status_and_task_with_a_cursor(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        await store.record_accepted(
            [job(f"j{i}", task="noop" if i % 2 else "sleep") for i in range(7)]
        )
        for i in (1, 3, 4):
            await store.record_result(result(f"j{i}"))
        page = await store.list_jobs(limit=3)
        assert [j.id for j in page.jobs] == ["j0", "j1", "j2"] and page.cursor is not None
        page = await store.list_jobs(limit=3, cursor=page.cursor)
        assert [j.id for j in page.jobs] == ["j3", "j4", "j5"]
        page = await store.list_jobs(limit=3, cursor=page.cursor)
        assert [j.id for j in page.jobs] == ["j6"] and page.cursor is None
        done = await store.list_jobs(status="succeeded")
        assert [j.id for j in done.jobs] == ["j1", "j3", "j4"]
        assert [j.id for j in (await store.list_jobs(status="queued", task="noop")).jobs] == ["j5"]
        for bad in ({"cursor": "x"}, {"limit": 0}, {"status": "nope"}):
            with pytest.raises(LedgerError):
                store.list_jobs(**bad)

    run(tmp_path / "l.sqlite3", body)


def test_one_loop_turn_is_one_transaction_on_one_thread(tmp_path: Path) -> None:
    threads: set[str] = set()
    commits: list[int] = []

    async def body(store: SqliteStore) -> None:
        conn = store._conn

        def trace(sql: str) -> None:
            if sql == "COMMIT":
                threads.add(threading.current_thread().name)
                commits.append(1)

        conn.set_trace_callback(trace)
        futs = [store.record_accepted([job(f"j{i}")]) for i in range(200)]
        answers = await asyncio.gather(*futs)
        assert all(a[0].kind == "new" for a in answers)

    run(tmp_path / "l.sqlite3", body)
    assert threads == {"nsqjobs-ledger"}
    assert len(commits) == 1


def test_a_small_commit_of_new_jobs_in_a_live_session_is_one_statement(tmp_path: Path) -> None:
    statements: list[str] = []

    async def turn(store: SqliteStore, ids: list[str], session: str | None = "s1") -> list[Any]:
        """Accept each id on its own, all in one loop turn (one commit); their answers."""
        statements.clear()
        futs = [store.record_accepted([job(i)], session) for i in ids]
        return [(a.kind, a.published) for answers in await asyncio.gather(*futs) for a in answers]

    async def body(store: SqliteStore) -> None:
        store._conn.set_trace_callback(statements.append)
        now = wire.now()
        assert await store.beat_session("s1", now - 1, now)
        # The session's liveness is not known yet: a transaction reads it.
        assert await turn(store, ["a", "b"]) == [("new", True)] * 2
        assert statements[0] == "BEGIN IMMEDIATE" and statements[-1] == "COMMIT"
        # Known now: the next commit is one INSERT, committed as it ends.
        assert await turn(store, [f"c{i}" for i in range(20)]) == [("new", True)] * 20
        assert len(statements) == 1 and statements[0].startswith("INSERT INTO jobs")
        c = await store.get("c19")
        assert c is not None and c.published_at is not None and c.status == "queued"
        # A known id: the statement wrote nothing, the commit runs as a transaction.
        assert await turn(store, ["d", "a", "e"]) == [("new", True), ("same", False), ("new", True)]
        assert "BEGIN IMMEDIATE" in statements and "ROLLBACK" in statements
        assert [j.id for j in (await store.list_jobs(limit=100)).jobs].count("a") == 1
        # Another gateway's relay handles the session (this one stalled): the statement reads
        # the session itself, so its jobs are recorded unpublished and the relay sends them
        # (the answer still says published: a duplicate run at worst, never a lost job).
        other = sqlite3.connect(store.path)
        other.execute("UPDATE sessions SET handled_at = ? WHERE id = 's1'", (now,))
        other.commit()
        other.close()
        assert await turn(store, ["f"]) == [("new", True)]
        assert len(statements) == 1
        f = await store.get("f")
        assert f is not None and f.published_at is None
        claimed = await store.claim_unpublished(
            now=wire.now() + 60, grace_s=30, horizon_s=3600, lease_s=60, limit=10
        )
        assert [c.id for c in claimed] == ["f"]
        # Its heartbeat learns the session is over: liveness is read again.
        assert not await store.beat_session("s1", now, now)
        assert await turn(store, ["f2"]) == [("new", False)]
        assert statements[0] == "BEGIN IMMEDIATE"
        # A session this store ends is not known live any more: it is read again.
        assert await store.beat_session("s2", now - 1, now)
        assert await turn(store, ["g1"], "s2") == [("new", True)]
        assert await turn(store, ["g2"], "s2") == [("new", True)]
        assert len(statements) == 1
        await store.end_session("s2", now)
        assert await turn(store, ["g3"], "s2") == [("new", False)]
        assert statements[0] == "BEGIN IMMEDIATE"
        # No session: one statement too (nothing to know), never recorded as published.
        assert await turn(store, ["h"], None) == [("new", False)]
        assert len(statements) == 1
        h = await store.get("h")
        assert h is not None and h.published_at is None

    run(tmp_path / "l.sqlite3", body)


def test_a_closed_store_refuses_work(tmp_path: Path) -> None:
    async def body() -> None:
        store = SqliteStore(tmp_path / "l.sqlite3")
        store.close()
        with pytest.raises(LedgerError, match="closed"):
            await store.get("a")

    asyncio.run(body())
