"""One behavioural suite for every ledger store: SQLite (a file in tmp_path) and PostgreSQL (a
real server from nsqjobs.testing.start_postgres, one per module, a fresh database per test).

Each test follows the Store protocol's docstrings (nsqjobs.ledger.store) and the status rules
the README's "Job ledger" section states. At the end, PostgreSQL alone: two gateways' stores
claiming together, migrating together, and the database restarting under a store.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import msgspec
import pytest
from nsqjobs import wire
from nsqjobs.config import GatewayConfig
from nsqjobs.errors import ConfigError
from nsqjobs.ledger import LedgerError, SqliteStore, Store, open_store, pgsql
from nsqjobs.ledger.postgres import PostgresStore
from nsqjobs.names import MAX_DELAY_MS
from nsqjobs.testing import Postgres, start_postgres, wait_for

T = TypeVar("T")
pytestmark = pytest.mark.timeout(90)
GRACE_S = 30.0
HORIZON_S = MAX_DELAY_MS / 1000
LEASE_S = 60.0


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """One PostgreSQL server for the module."""
    with ExitStack() as stack:
        yield start_postgres(tmp_path_factory.mktemp("pg"), stack)


@dataclass(frozen=True)
class Ledger:
    """How a test opens the store under test (twice: it reopens the same storage)."""

    kind: str
    open: Callable[[], Store]


@pytest.fixture(params=["sqlite", "postgres"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Ledger:
    """Each store kind, on empty storage of its own."""
    if request.param == "sqlite":
        path = tmp_path / "ledger.sqlite3"
        return Ledger("sqlite", lambda: SqliteStore(path))
    pg: Postgres = request.getfixturevalue("postgres")
    url = pg.create_database(f"t_{uuid.uuid4().hex}")
    return Ledger("postgres", lambda: PostgresStore(url))


def run(ledger: Ledger, body: Callable[[Store], Awaitable[T]]) -> T:
    """Open the store, run ``body`` in an event loop, close the store. A SQLite method not
    built yet on this branch skips the case."""

    async def main() -> T:
        store = ledger.open()
        try:
            return await asyncio.wait_for(body(store), 30)
        finally:
            store.close()

    return asyncio.run(main())


def job(job_id: str, task: str = "noop", due_at: float | None = None, **args: Any) -> Any:
    return wire.JobEnvelope(id=job_id, task=task, args=args, created_at=1000.0, due_at=due_at)


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


def letter(job_id: str, task: str = "noop", at: float = 1002.0) -> wire.DeadLetter:
    """A dead letter; with the default time it goes with ``result(job_id, "failed")`` (a worker
    publishes both, with the same worker and time, when it gives a job up)."""
    return wire.DeadLetter(
        reason="max_attempts",
        error=wire.ErrorInfo(type="ValueError", message="bad"),
        worker="w1",
        at=at,
        job=job(job_id, task),
    )


async def dead(store: Store, *ids: str, task: str = "noop") -> None:
    """Jobs given up by a worker: a dead letter and its failed result."""
    await store.record_accepted([job(i, task) for i in ids])
    for i in ids:
        assert await store.record_dead_letter(letter(i, task)) == "recorded"
        assert await store.record_result(result(i, "failed", attempts=3)) == "recorded"


async def claim(store: Store, now: float, limit: int = 100) -> dict[str, Any]:
    claimed = await store.claim_unpublished(
        now=now, grace_s=GRACE_S, horizon_s=HORIZON_S, lease_s=LEASE_S, limit=limit
    )
    return {c.id: c for c in claimed}


# -- accepting ------------------------------------------------------------------------------------


def test_accepted_jobs_are_there_after_a_reopen(ledger: Ledger) -> None:
    async def accept(store: Store) -> list[str]:
        return [a.kind for a in await store.record_accepted([job("a", n=1), job("b", n=2)])]

    assert run(ledger, accept) == ["new", "new"]
    got = run(ledger, lambda store: store.get("b"))
    assert got is not None
    assert (got.id, got.task, got.args, got.status, got.attempts) == (
        "b",
        "noop",
        {"n": 2},
        "queued",
        0,
    )
    assert got.published_at is None and got.finished_at is None and got.created_at == 1000.0
    assert run(ledger, lambda store: store.get("nothing")) is None


def test_same_id_same_job_is_same_other_args_conflict_all_or_none(ledger: Ledger) -> None:
    async def body(store: Store) -> None:
        await store.record_accepted([job("a", x=1, y=[1, 2])])
        same = await store.record_accepted(
            [wire.JobEnvelope(id="a", task="noop", args={"y": [1, 2], "x": 1}, created_at=5.0)]
        )
        assert same[0].kind == "same" and same[0].existing is not None
        assert same[0].existing.args == {"x": 1, "y": [1, 2]}
        answers = await store.record_accepted([job("new1"), job("a", x=2), job("new2")])
        assert [a.kind for a in answers] == ["new", "conflict", "new"]
        assert await store.get("new1") is None and await store.get("new2") is None
        other_task = await store.record_accepted([job("a", task="sleep", x=1, y=[1, 2])])
        assert other_task[0].kind == "conflict"

    run(ledger, body)


def test_calls_of_one_loop_turn_are_answered_each_on_its_own(ledger: Ledger) -> None:
    async def body(store: Store) -> None:
        await store.record_accepted([job("taken", x=1)])
        futs = [store.record_accepted([job(f"j{i}")]) for i in range(150)]
        clash = store.record_accepted([job("fresh"), job("taken", x=2)])
        twice = store.record_accepted([job("j7")])
        answers = await asyncio.gather(*futs)
        assert all(a[0].kind == "new" for a in answers)
        assert [a.kind for a in await clash] == ["new", "conflict"]
        assert (await twice)[0].kind == "same"
        assert await store.get("fresh") is None and await store.get("j149") is not None

    run(ledger, body)


# -- outcomes -------------------------------------------------------------------------------------


def test_first_result_wins_and_later_ones_are_duplicates(ledger: Ledger) -> None:
    async def body(store: Store) -> None:
        await store.record_accepted([job("a")])
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
        # A later dead letter (another execution of the same job) changes nothing.
        assert await store.record_dead_letter(letter("a")) == "duplicate"
        assert (await store.get("a")).status == "succeeded"  # type: ignore[union-attr]

    run(ledger, body)


def test_a_dead_letter_and_its_failed_result_make_the_job_dead_either_way(ledger: Ledger) -> None:
    async def body(store: Store) -> None:
        await store.record_accepted([job("b"), job("c")])
        # The dead letter first, then the failed result that goes with it.
        assert await store.record_dead_letter(letter("b")) == "recorded"
        assert await store.record_dead_letter(letter("b")) == "duplicate"
        assert await store.record_result(result("b", "failed", attempts=3)) == "recorded"
        b = await store.get("b")
        assert b is not None
        assert (b.status, b.dead_reason, b.attempts) == ("dead", "max_attempts", 3)
        assert b.error == wire.ErrorInfo(type="ValueError", message="bad")
        assert b.finished_at == 1002.0 and b.dead_at == 1002.0
        # The failed result first, then the dead letter.
        assert await store.record_result(result("c", "failed", attempts=2)) == "recorded"
        assert await store.record_dead_letter(letter("c")) == "recorded"
        c = await store.get("c")
        assert c is not None and (c.status, c.attempts) == ("dead", 2)
        # Another execution's outcomes (another time) come after the first terminal one.
        assert await store.record_result(result("b", "failed", attempts=4)) == "duplicate"
        assert await store.record_dead_letter(letter("c", at=1500.0)) == "duplicate"
        await store.record_accepted([job("d")])
        assert await store.record_result(result("d", "failed")) == "recorded"
        assert await store.record_dead_letter(letter("d", at=1500.0)) == "duplicate"
        assert (await store.get("d")).status == "failed"  # type: ignore[union-attr]
        no_job = wire.DeadLetter(
            reason="undecodable", error=letter("x").error, worker="w", at=1.0, raw="x"
        )
        assert await store.record_dead_letter(no_job) == "unknown"
        assert await store.record_dead_letter(letter("zzz")) == "unknown"

    run(ledger, body)


def test_publishing_is_noted_once(ledger: Ledger) -> None:
    async def body(store: Store) -> None:
        await store.record_accepted([job("a"), job("b")])
        await store.mark_published(["a"])
        first = (await store.get("a")).published_at  # type: ignore[union-attr]
        await asyncio.sleep(0.01)  # the clock moves: a second note would show
        await store.mark_published(["a", "b", "unknown"])
        assert (await store.get("a")).published_at == first  # type: ignore[union-attr]
        assert (await store.get("b")).published_at is not None  # type: ignore[union-attr]

    run(ledger, body)


# -- gateway sessions -----------------------------------------------------------------------------


def test_a_live_session_records_new_jobs_as_published_and_a_failure_unmarks_them(
    ledger: Ledger,
) -> None:
    async def body(store: Store) -> None:
        now = wire.now()
        assert [a.published for a in await store.record_accepted([job("plain")])] == [False]
        await store.record_accepted([job("gone")], "never-registered")
        assert (await store.get("gone")).published_at is None  # type: ignore[union-attr]
        assert await store.beat_session("s1", now - 1, now)
        far = job("far", due_at=now + 2 * HORIZON_S)
        answers = await store.record_accepted([job("a"), job("b"), far], "s1")
        assert [(a.kind, a.published) for a in answers] == [
            ("new", True),
            ("new", True),
            ("new", False),  # held: the relay publishes it when due
        ]
        a = await store.get("a")
        assert a is not None and a.published_at is not None and a.published_at >= now
        # Known ids, or a conflict that records nothing: nothing says published.
        again = await store.record_accepted([job("a"), job("c")], "s1")
        assert [(x.kind, x.published) for x in again] == [("same", False), ("new", True)]
        clash = await store.record_accepted([job("d"), job("a", x=1)], "s1")
        assert [(x.kind, x.published) for x in clash] == [("new", False), ("conflict", False)]
        assert await store.get("d") is None
        # The publish of b failed: the relay takes it after the grace, a retry sees it unsent.
        await store.mark_unpublished(["b", "unknown"])
        b = await store.get("b")
        assert b is not None and b.published_at is None
        got = await claim(store, now + GRACE_S + 1)
        assert sorted(got) == ["b", "gone", "plain"] and got["b"].reason == "unpublished"
        await store.mark_unpublished(["b"])  # claimed since: the relay's publish stands
        assert await claim(store, now + GRACE_S + 2) == {}

    run(ledger, body)


def test_a_lost_session_has_its_unsettled_jobs_redriven_once(ledger: Ledger) -> None:
    async def body(store: Store) -> None:
        now = wire.now()
        assert await store.beat_session("dead", now - 5, now - 100)
        assert await store.beat_session("settled", now + 60, now - 100)  # all sent before low
        assert await store.beat_session("alive", now - 5, now)
        assert await store.beat_session("ended", now - 5, now - 100)
        await store.record_accepted([job("d1"), job("d2"), job("d-done")], "dead")
        await store.record_result(result("d-done"))
        await store.record_accepted([job("s1")], "settled")
        await store.record_accepted([job("a1")], "alive")
        await store.record_accepted([job("e1")], "ended")
        await store.end_session("ended", now)
        await store.record_accepted([job("plain")])
        await store.mark_published(["plain"])
        assert await store.redrive_lost_sessions(now - 200, now) == 0  # none stale yet
        assert await store.redrive_lost_sessions(now - 50, now) == 2
        assert await store.redrive_lost_sessions(now - 50, now) == 0  # handled once
        for i in ("d1", "d2"):
            d = await store.get(i)
            assert d is not None and d.published_at is None
        for i in ("s1", "a1", "e1", "plain", "d-done"):
            assert (await store.get(i)).published_at is not None  # type: ignore[union-attr]
        got = await claim(store, now)  # at once: no grace, the gateway is gone
        assert sorted(got) == ["d1", "d2"]
        assert {c.reason for c in got.values()} == {"unpublished"}
        await store.mark_published(["d1", "d2"])
        assert (await store.get("d1")).redrives == 1  # type: ignore[union-attr]
        # The handled session is over: its gateway (it was only stalled) starts another.
        assert not await store.beat_session("dead", now, now)
        assert [a.published for a in await store.record_accepted([job("d3")], "dead")] == [False]

    run(ledger, body)


# -- listing --------------------------------------------------------------------------------------


def test_listing_by_status_and_task_with_a_cursor(ledger: Ledger) -> None:
    async def body(store: Store) -> None:
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
        assert [j.id for j in done.jobs] == ["j1", "j3", "j4"] and done.cursor is None
        assert [j.id for j in (await store.list_jobs(status="queued", task="noop")).jobs] == ["j5"]
        assert (await store.list_jobs(task="nothing")).jobs == []
        # Superscript two, Arabic-Indic one, fullwidth one: str.isdigit(), but no position
        # this ledger gave out.
        cursors = ("x", "\u00b2", "\u0661", "\uff11")
        bads: list[dict[str, Any]] = [{"cursor": c} for c in cursors]
        bads += [{"limit": 0}, {"limit": 1001}, {"status": "nope"}]
        for bad in bads:
            with pytest.raises(LedgerError):
                store.list_jobs(**bad)

    run(ledger, body)


# -- the relay ------------------------------------------------------------------------------------


def test_claim_takes_unacknowledged_jobs_after_the_grace_once(ledger: Ledger) -> None:
    async def body(store: Store) -> None:
        now = wire.now()
        await store.record_accepted([job("acked"), job("lost"), job("done")])
        await store.mark_published(["acked"])
        await store.record_result(result("done"))
        assert await claim(store, now) == {}  # the accept path may still be publishing
        later = now + GRACE_S + 1
        got = await claim(store, later)
        assert list(got) == ["lost"]
        lost = got["lost"]
        assert (lost.task, lost.delay_ms, lost.reason) == ("noop", 0, "unpublished")
        assert wire.decode_job(lost.body).id == "lost"
        assert await claim(store, later + 1) == {}  # claimed: leased, and sent just now
        await store.mark_published(["lost"])
        assert await claim(store, later + LEASE_S + GRACE_S + 10) == {}

    run(ledger, body)


def test_claim_takes_long_delays_as_they_come_due(ledger: Ledger) -> None:
    async def body(store: Store) -> None:
        now = wire.now()
        due = now + 2 * HORIZON_S
        await store.record_accepted([job("far", due_at=due)])
        far = await store.get("far")
        assert far is not None and far.due_at == due and far.published_at is None
        assert await claim(store, now) == {}  # beyond what nsqd can defer
        at = due - HORIZON_S / 2 - 0.0004
        got = await claim(store, at)
        assert list(got) == ["far"] and got["far"].reason == "due"
        # What is left, rounded up to a whole millisecond (never published before it is due).
        assert got["far"].delay_ms == HORIZON_S / 2 * 1000 + 1
        assert await claim(store, at + 1) == {}

    run(ledger, body)


def test_claim_limit_and_order(ledger: Ledger) -> None:
    async def body(store: Store) -> None:
        await store.record_accepted([job(f"j{i}") for i in range(5)])
        later = wire.now() + GRACE_S + 1
        first = await store.claim_unpublished(
            now=later, grace_s=GRACE_S, horizon_s=HORIZON_S, lease_s=LEASE_S, limit=3
        )
        assert [c.id for c in first] == ["j0", "j1", "j2"]
        assert list(await claim(store, later)) == ["j3", "j4"]

    run(ledger, body)


def test_an_nsqd_restart_redrives_unfinished_jobs_sent_before_it_once(ledger: Ledger) -> None:
    async def body(store: Store) -> None:
        await store.record_accepted([job("a"), job("b"), job("done"), job("unacked")])
        await store.mark_published(["a", "b", "done"])  # "unacked": nsqd has not answered yet
        await store.record_result(result("done"))
        restart = wire.now() + 0.001
        await asyncio.sleep(0.01)
        await store.record_accepted([job("after")])
        await store.mark_published(["after"])
        assert await store.redrive_sent_before(restart) == 2
        assert await store.redrive_sent_before(restart) == 0  # polled again: nothing new
        a = await store.get("a")
        assert a is not None and a.published_at is None and a.redrives == 1
        assert (await store.get("after")).published_at is not None  # type: ignore[union-attr]
        assert (await store.get("unacked")).redrives == 0  # type: ignore[union-attr]
        got = await claim(store, wire.now() + GRACE_S + 1)
        assert sorted(got) == ["a", "b", "unacked"]  # unacked: after its grace, as unpublished
        assert {i: c.reason for i, c in got.items()} == {
            "a": "nsqd_restart",
            "b": "nsqd_restart",
            "unacked": "unpublished",
        }
        # Republished after the restart: a later poll of the same start time leaves them.
        await store.mark_published(["a", "b"])
        assert await store.redrive_sent_before(restart) == 0

    run(ledger, body)


def test_prune_deletes_old_finished_jobs_but_not_dead_or_unfinished(ledger: Ledger) -> None:
    async def body(store: Store) -> None:
        await store.record_accepted([job(i) for i in ("ok", "bad", "gone", "waiting")])
        await store.record_result(result("ok"))
        await store.record_result(result("bad", "failed"))
        await store.cancel("gone")
        await dead(store, "rip")
        assert await store.prune_finished(999.0, 100) == 0  # all finished after that
        # Retention counts from when the ledger recorded the outcome, not from the worker's
        # finished_at (1002, long ago): an outcome taken in late keeps its full retention.
        assert await store.prune_finished(wire.now() - 3600, 100) == 0
        assert await store.prune_finished(wire.now() + 1, 1) == 1
        assert await store.prune_finished(wire.now() + 1, 100) == 2
        left = [j.id for j in (await store.list_jobs()).jobs]
        assert left == ["waiting", "rip"]

    run(ledger, body)


def test_stats_count_by_status_and_the_oldest_unfinished(ledger: Ledger) -> None:
    async def body(store: Store) -> None:
        empty = await store.stats()
        assert sum(empty.by_status.values()) == 0 and empty.oldest_unfinished_at is None
        await store.record_accepted([job("q1")])
        first = (await store.get("q1")).accepted_at  # type: ignore[union-attr]
        await store.record_accepted([job("q2"), job("ok"), job("run")])
        await store.record_result(result("ok"))
        await store.record_started("run", "w1", 1001.0)
        await dead(store, "rip")
        stats = await store.stats()
        counts = {k: v for k, v in stats.by_status.items() if v}
        assert counts == {"queued": 2, "succeeded": 1, "running": 1, "dead": 1}
        assert stats.oldest_unfinished_at == first

    run(ledger, body)


# -- operations -----------------------------------------------------------------------------------


def test_started_makes_a_queued_job_running_and_nothing_else(ledger: Ledger) -> None:
    async def body(store: Store) -> None:
        await store.record_accepted([job("a"), job("done")])
        await store.record_result(result("done"))
        assert await store.record_started("a", "w7", 1000.5) == "recorded"
        assert await store.record_started("a", "w8", 1000.6) == "duplicate"
        assert await store.record_started("done", "w8", 1000.6) == "duplicate"
        assert await store.record_started("zzz", "w8", 1000.6) == "unknown"
        a = await store.get("a")
        assert a is not None and (a.status, a.started_at, a.worker) == ("running", 1000.5, "w7")
        assert (await store.get("done")).status == "succeeded"  # type: ignore[union-attr]
        assert await store.record_result(result("a")) == "recorded"

    run(ledger, body)


def test_cancel_finishes_an_unfinished_job_first(ledger: Ledger) -> None:
    async def body(store: Store) -> None:
        await store.record_accepted([job("a"), job("b"), job("done")])
        await store.record_result(result("done"))
        await store.record_started("b", "w1", 1000.5)
        a = await store.cancel("a")
        assert a is not None and a.status == "cancelled" and a.finished_at is not None
        b = await store.cancel("b")
        assert b is not None and b.status == "cancelled"
        again = await store.cancel("a")
        assert again is not None and again.status == "cancelled"
        assert again.finished_at == a.finished_at
        done = await store.cancel("done")
        assert done is not None and done.status == "succeeded"  # too late: it says so
        assert await store.cancel("zzz") is None
        assert await store.record_result(result("a")) == "duplicate"
        assert await store.record_dead_letter(letter("b")) == "duplicate"
        assert (await store.get("a")).status == "cancelled"  # type: ignore[union-attr]
        # A cancelled job is neither published nor re-driven.
        assert await claim(store, wire.now() + GRACE_S + 1) == {}
        assert await store.redrive_sent_before(wire.now() + 1) == 0

    run(ledger, body)


def test_replay_requeues_dead_jobs_with_their_runs_kept(ledger: Ledger) -> None:
    async def body(store: Store) -> None:
        await dead(store, "d1", "d2")
        await dead(store, "s1", task="sleep")
        await store.record_accepted([job("alive")])
        expired = wire.JobEnvelope(id="exp", task="noop", args={}, created_at=1.0, deadline=2.0)
        await store.record_accepted([expired])
        await store.record_dead_letter(
            wire.DeadLetter(
                reason="expired", error=letter("x").error, worker="w", at=3.0, job=expired
            )
        )
        replayed = await store.replay(["d1", "alive", "zzz"])
        assert [j.id for j in replayed] == ["d1"]
        d1 = replayed[0]
        assert (d1.status, d1.replays, d1.attempts, d1.error, d1.published_at) == (
            "queued",
            1,
            0,
            None,
            None,
        )
        assert d1.finished_at is None and d1.dead_reason is None and d1.history == ()
        assert len(d1.runs) == 1
        run0 = d1.runs[0]
        assert run0["status"] == "dead" and run0["attempts"] == 3
        assert run0["dead_reason"] == "max_attempts"
        assert await store.get("d1") == d1
        got = await claim(store, wire.now())  # never sent since: published at once
        assert list(got) == ["d1"] and got["d1"].reason == "replay"
        assert wire.decode_job(got["d1"].body).id == "d1"
        # A replay of an expired job publishes it without the expiry (it would only expire).
        assert [j.id for j in await store.replay(["exp"])] == ["exp"]
        (again,) = (await claim(store, wire.now())).values()
        assert again.id == "exp" and wire.decode_job(again.body).deadline is None
        # A late outcome of the run before the replay is a duplicate; the new run's counts.
        assert await store.record_result(result("d1", "failed")) == "duplicate"
        assert await store.record_dead_letter(letter("d1")) == "duplicate"
        # The new run's worker's clock 50 ms behind the gateway's (it started before the
        # replay, by its clock), well after the run before ended: the new run's outcome.
        new_run = msgspec.structs.replace(result("d1"), started_at=run0["replayed_at"] - 0.05)
        assert await store.record_result(new_run) == "recorded"
        assert (await store.get("d1")).status == "succeeded"  # type: ignore[union-attr]
        by_task = await store.replay(task="sleep")
        assert [j.id for j in by_task] == ["s1"]
        assert [j.id for j in await store.replay(limit=5)] == ["d2"]
        assert await store.replay(["d1"]) == []  # not dead any more
        assert await store.replay() == []

    run(ledger, body)


def test_replaying_twice_keeps_every_run(ledger: Ledger) -> None:
    async def body(store: Store) -> None:
        await dead(store, "d")
        (first,) = await store.replay(["d"])
        # The second run's dead letter and failed result (same worker and time: one outcome).
        at = first.runs[-1]["replayed_at"] + 2
        assert await store.record_dead_letter(letter("d", at=at)) == "recorded"
        failed = result("d", "failed", attempts=2)
        failed = msgspec.structs.replace(failed, started_at=at - 1, finished_at=at)
        assert await store.record_result(failed) == "recorded"
        (d,) = await store.replay(["d"])
        assert d.replays == 2 and [r["attempts"] for r in d.runs] == [3, 2]

    run(ledger, body)


def test_purge_deletes_dead_jobs_only(ledger: Ledger) -> None:
    async def body(store: Store) -> None:
        await dead(store, "d1", "d2", "d3")
        await dead(store, "s1", "s2", task="sleep")
        await store.record_accepted([job("alive")])
        assert await store.purge(["d1", "alive", "zzz"]) == 1
        assert await store.purge(["d2", "d3"], limit=1) == 2  # the ids given, all of them
        await dead(store, "d4", "d5")
        assert await store.get("d1") is None and await store.get("alive") is not None
        assert await store.purge(task="sleep", limit=1) == 1
        assert await store.purge(task="sleep") == 1
        assert await store.purge() == 2
        assert [j.id for j in (await store.list_jobs()).jobs] == ["alive"]

    run(ledger, body)


def test_a_closed_store_refuses_work(ledger: Ledger) -> None:
    async def body() -> None:
        store = ledger.open()
        store.close()
        store.close()  # twice is fine
        with pytest.raises(LedgerError, match="closed"):
            await store.get("a")

    asyncio.run(body())


# -- PostgreSQL alone: several gateways, a restarting server ---------------------------------


def test_postgres_urls_are_accepted_by_config_and_open_store(postgres: Postgres) -> None:
    for url in ("postgresql://u@db:5432/ledger", "postgres://u:secret@db/ledger", postgres.url()):
        GatewayConfig(ledger_url=url).check()
    for bad in ("postgresql://", "postgresql://h:notaport/db", "mysql://h/db"):
        with pytest.raises(ConfigError, match="ledger"):
            GatewayConfig(ledger_url=bad).check()

    async def body() -> None:
        store = open_store(postgres.create_database(f"t_{uuid.uuid4().hex}"))
        try:
            assert isinstance(store, PostgresStore)
            assert await store.get("x") is None
        finally:
            store.close()

    asyncio.run(body())


def test_two_gateways_migrate_together_and_never_claim_a_job_twice(postgres: Postgres) -> None:
    url = postgres.create_database(f"t_{uuid.uuid4().hex}")
    stores: list[PostgresStore] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            stores.append(PostgresStore(url))
        except BaseException as exc:
            errors.append(exc)

    openers = [threading.Thread(target=open_one) for _ in range(3)]
    for t in openers:
        t.start()
    for t in openers:
        t.join(30)
    try:
        assert errors == [] and len(stores) == 3
        version = postgres.psql("SELECT version FROM schema_version", url.rpartition("/")[2])
        assert version == f"{pgsql.SCHEMA_VERSION}\n"

        async def body() -> list[str]:
            n = 600
            await stores[0].record_accepted([job(f"j{i}") for i in range(n)])
            later = wire.now() + GRACE_S + 1
            claimed: list[str] = []
            for _ in range(50):
                rounds = await asyncio.gather(
                    *(
                        s.claim_unpublished(
                            now=later, grace_s=GRACE_S, horizon_s=HORIZON_S, lease_s=600, limit=37
                        )
                        for s in stores
                        for _ in range(2)
                    )
                )
                got = [c.id for r in rounds for c in r]
                if not got:
                    break
                claimed += got
            return claimed

        claimed = asyncio.run(asyncio.wait_for(body(), 60))
        assert len(claimed) == len(set(claimed)) == 600
    finally:
        for s in stores:
            s.close()


def test_a_database_restart_fails_writes_cleanly_then_they_work_again(tmp_path: Path) -> None:
    with ExitStack() as stack:
        pg = start_postgres(tmp_path, stack)
        url = pg.create_database("ledger")

        async def body() -> None:
            store = PostgresStore(url, connect_timeout_s=2.0, command_timeout_s=5.0)
            try:
                assert (await store.record_accepted([job("before")]))[0].kind == "new"
                for immediate in (False, True):
                    pg.stop(immediate=immediate)
                    with pytest.raises(LedgerError):
                        await store.record_accepted([job(f"while-{immediate}")])
                    with pytest.raises(LedgerError):
                        await store.get("before")
                    pg.start()
                    answers = await store.record_accepted([job(f"after-{immediate}")])
                    assert answers[0].kind == "new"
                assert await store.get(f"while-{True}") is None
                assert (await store.get("before")) is not None
                assert await store.record_result(result("after-True")) == "recorded"
            finally:
                store.close()

        asyncio.run(asyncio.wait_for(body(), 60))
        wait_for(lambda: not pg.alive() or pg.psql("SELECT 1") == "1\n", 10, "postgres")


def test_a_newer_schema_is_refused(postgres: Postgres) -> None:
    name = f"t_{uuid.uuid4().hex}"
    url = postgres.create_database(name)

    async def touch() -> None:
        store = PostgresStore(url)
        store.close()

    asyncio.run(touch())
    postgres.psql("UPDATE schema_version SET version = 99", name)
    with pytest.raises(LedgerError, match="newer"):
        PostgresStore(url)


def test_an_unreachable_database_is_an_error_at_start(postgres: Postgres) -> None:
    with pytest.raises(LedgerError, match="cannot connect"):
        PostgresStore(postgres.url("no_such_database"), connect_timeout_s=2.0)


def test_each_commit_is_timed(postgres: Postgres) -> None:
    timed: list[float] = []

    async def body() -> None:
        url = postgres.create_database(f"t_{uuid.uuid4().hex}")
        store = PostgresStore(url, observe_write=timed.append)
        try:
            await asyncio.gather(*(store.record_accepted([job(f"j{i}")]) for i in range(20)))
            await store.get("j1")
        finally:
            store.close()

    asyncio.run(body())
    # Calls of one loop turn share a transaction: the 20 accepts are one commit, or a few.
    assert 2 <= len(timed) <= 5 and all(0 < t < 30 for t in timed)


def test_an_unexpected_error_fails_the_calls_and_the_store_goes_on(
    postgres: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(conn: Any, calls: Any) -> Any:
        raise RuntimeError("a bug")

    async def body() -> None:
        store = PostgresStore(postgres.create_database(f"t_{uuid.uuid4().hex}"))
        try:
            with monkeypatch.context() as patch:
                patch.setattr("nsqjobs.ledger.postgres.apply_fast", broken)
                with pytest.raises(LedgerError, match="a bug"):
                    await store.record_accepted([job("a")])
            assert (await store.record_accepted([job("a")]))[0].kind == "new"
        finally:
            store.close()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_postgres_gateways_commit_new_jobs_in_listing_order(
    postgres: Postgres, tmp_path: Path
) -> None:
    # Two gateways on one PostgreSQL ledger: while one's insert is not committed, another's
    # waits, so that no listing page (and its cursor) can pass a job that commits later.
    url = postgres.create_database(f"t_{uuid.uuid4().hex}")
    PostgresStore(url).close()  # the schema

    def row(job_id: str) -> tuple[Any, ...]:
        now = wire.now()
        body = wire.encode(job(job_id))
        return (job_id, "noop", "{}", body, 1000.0, now, None, now, None, None)

    async def scenario() -> None:
        first, second, reader = [await asyncpg.connect(url) for _ in range(3)]
        try:
            open_insert = first.transaction()
            await open_insert.start()
            await first.fetch(pgsql.ACCEPT, *pgsql._arrays([row("first")]))
            later = asyncio.ensure_future(
                second.fetch(pgsql.ACCEPT_AND_MARK, *pgsql._arrays([row("second")]), [], [])
            )
            with pytest.raises(TimeoutError):  # waits for the first gateway's commit
                await asyncio.wait_for(asyncio.shield(later), 0.5)
            assert await reader.fetch("SELECT id FROM jobs") == []
            await open_insert.commit()
            await asyncio.wait_for(later, 10)
            listed = await reader.fetch("SELECT id FROM jobs ORDER BY seq")
            assert [r["id"] for r in listed] == ["first", "second"]
        finally:
            for conn in (first, second, reader):
                await conn.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
