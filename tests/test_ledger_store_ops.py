"""The SQLite ledger's operations on their own: cancel, replay and purge."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from nsqjobs import wire
from nsqjobs.ledger import SqliteStore
from nsqjobs.ledger.litesql import MAX_VARIABLES

T = TypeVar("T")
pytestmark = pytest.mark.timeout(30)


def run(path: Path, body: Callable[[SqliteStore], Awaitable[T]]) -> T:
    async def main() -> T:
        store = SqliteStore(path)
        try:
            return await asyncio.wait_for(body(store), 20)
        finally:
            store.close()

    return asyncio.run(main())


def job(job_id: str, task: str = "noop", **fields: Any) -> wire.JobEnvelope:
    return wire.JobEnvelope(id=job_id, task=task, args={"n": 1}, created_at=1000.0, **fields)


def dead_letter(env: wire.JobEnvelope, reason: Any = "max_attempts") -> wire.DeadLetter:
    return wire.DeadLetter(
        reason=reason,
        error=wire.ErrorInfo(type="Boom", message=f"{env.id} failed"),
        worker="w1",
        at=2000.0,
        job=env,
    )


def result(job_id: str, status: Any = "succeeded") -> wire.ResultEnvelope:
    error = None if status == "succeeded" else wire.ErrorInfo(type="Boom", message="failed")
    return wire.ResultEnvelope(
        id=job_id,
        task="noop",
        status=status,
        result=1 if status == "succeeded" else None,
        error=error,
        attempts=2,
        worker="w1",
        started_at=1500.0,
        finished_at=2000.0,
        duration_s=500.0,
    )


def test_cancel_takes_only_for_unfinished_jobs(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        await store.record_accepted([job("q"), job("done"), job("gone")])
        await store.record_result(result("done"))
        await store.record_dead_letter(dead_letter(job("gone")))
        cancelled = await store.cancel("q")
        assert cancelled is not None and cancelled.status == "cancelled"
        assert cancelled.finished_at is not None
        # A later outcome is a duplicate: the cancel was the first terminal outcome.
        assert await store.record_result(result("q")) == "duplicate"
        assert (await store.get("q")) == cancelled
        again = await store.cancel("q")
        assert again is not None and again.finished_at == cancelled.finished_at
        done, gone = await store.cancel("done"), await store.cancel("gone")
        assert done is not None and done.status == "succeeded"
        assert gone is not None and gone.status == "dead"
        assert await store.cancel("nobody") is None

    run(tmp_path / "l.sqlite3", body)


def test_replay_keeps_the_run_and_queues_the_job_afresh(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        expired = job("old", deadline=1500.0)
        await store.record_accepted([job("d1"), expired, job("ok"), job("d2", task="other")])
        await store.mark_published(["d1", "old", "ok", "d2"])
        for env in (job("d1"), expired, job("d2", task="other")):
            await store.record_dead_letter(dead_letter(env))
        await store.record_result(result("ok"))
        await store.record_result(result("d1", "failed"))  # a dead job's failed result

        (replayed,) = await store.replay(["d1", "ok", "nobody"])
        assert replayed.id == "d1" and replayed.status == "queued" and replayed.replays == 1
        assert replayed.attempts == 0 and replayed.history == () and replayed.error is None
        assert replayed.published_at is None and replayed.finished_at is None
        assert replayed.dead_at is None and replayed.result is None and replayed.worker is None
        (run,) = replayed.runs
        assert run["status"] == "dead" and run["attempts"] == 2
        assert run["error"]["type"] == "Boom"
        assert run["dead_reason"] == "max_attempts" and run["dead_at"] == 2000.0
        assert run["finished_at"] == 2000.0 and run["replayed_at"] >= 2000.0
        assert run["history"] == []
        # Queued again: its next outcome is recorded; a second replay appends a second run.
        again = dead_letter(job("d1"), "not_retryable")
        again = msgspec.structs.replace(again, at=run["replayed_at"] + 1)
        assert await store.record_dead_letter(again) == "recorded"
        (twice,) = await store.replay(["d1"])
        assert twice.replays == 2 and [r["dead_reason"] for r in twice.runs] == [
            "max_attempts",
            "not_retryable",
        ]
        # By filter, oldest first, up to the limit; only dead jobs.
        assert [r.id for r in await store.replay(limit=1)] == ["old"]
        assert [r.id for r in await store.replay(task="other")] == ["d2"]
        assert await store.replay() == []
        assert await store.replay(["d1"]) == []

    run(tmp_path / "l.sqlite3", body)


def test_a_replayed_job_loses_an_expiry_that_has_passed(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite3"
    far = wire.now() + 3600

    async def body(store: SqliteStore) -> None:
        envs = [job("past", deadline=1500.0), job("future", deadline=far)]
        await store.record_accepted(envs)
        for env in envs:
            await store.record_dead_letter(dead_letter(env, "expired"))
        assert len(await store.replay(["past", "future"])) == 2

    run(path, body)
    conn = sqlite3.connect(path)
    try:
        rows = dict(conn.execute("SELECT id, envelope FROM jobs").fetchall())
    finally:
        conn.close()
    assert wire.decode_job(rows["past"]).deadline is None
    assert wire.decode_job(rows["future"]).deadline == far


def test_purge_deletes_only_dead_jobs(tmp_path: Path) -> None:
    ids = [f"d{i}" for i in range(MAX_VARIABLES + 20)]  # more than one IN (...) of ids

    async def body(store: SqliteStore) -> None:
        await store.record_accepted([job(i) for i in ids] + [job("q"), job("t", task="other")])
        for i in [*ids, "t"]:
            await store.record_dead_letter(dead_letter(job(i)))
        assert await store.purge(["q", "nobody"]) == 0
        assert await store.purge(task="other") == 1
        assert await store.purge(ids[:3]) == 3
        assert await store.purge(limit=7) == 7
        assert await store.purge([*ids, *ids]) == len(ids) - 10
        assert await store.get(ids[-1]) is None
        assert (await store.get("q")) is not None

    run(tmp_path / "l.sqlite3", body)


def test_a_late_outcome_of_the_run_before_a_replay_is_a_duplicate(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        env = job("late")
        await store.record_accepted([env])
        assert await store.record_dead_letter(dead_letter(env)) == "recorded"
        (replayed,) = await store.replay(["late"])
        replayed_at = replayed.runs[-1]["replayed_at"]
        # The run before's failed result and a redelivered letter arrive after the replay.
        assert await store.record_result(result("late", "failed")) == "duplicate"
        assert await store.record_dead_letter(dead_letter(env)) == "duplicate"
        assert (await store.get("late")).status == "queued"  # type: ignore[union-attr]
        # The new run's outcome counts.
        new = msgspec.structs.replace(result("late"), started_at=replayed_at + 1)
        assert await store.record_result(new) == "recorded"
        assert (await store.get("late")).status == "succeeded"  # type: ignore[union-attr]

    run(tmp_path / "ledger.sqlite3", body)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 1023, 1024, 1025, 2100])
def test_accepts_of_any_size_are_recorded_whole_and_in_order(tmp_path: Path, n: int) -> None:
    """An accept is one statement up to 1,024 jobs, its last padded with copies of its last
    row: every job goes in once, in order, and a taken id still answers as before."""

    async def body(store: SqliteStore) -> tuple[list[Any], list[Any]]:
        await store.record_accepted([job("taken")])
        jobs = [job(f"j{i:05}") for i in range(n)]
        new = await store.record_accepted(jobs, bodies=[wire.encode(j) for j in jobs])
        again = await store.record_accepted([job("taken"), job("fresh")])
        return new, again

    new, again = run(tmp_path / "l.sqlite3", body)
    assert [a.kind for a in new] == ["new"] * n
    assert [a.kind for a in again] == ["same", "new"]
    conn = sqlite3.connect(tmp_path / "l.sqlite3")
    ids = [row[0] for row in conn.execute("SELECT id FROM jobs ORDER BY seq")]
    conn.close()
    assert ids == ["taken", *(f"j{i:05}" for i in range(n)), "fresh"]


def test_an_outcome_that_beats_its_record_is_tried_again_until_the_record_is_in(
    tmp_path: Path,
) -> None:
    import time
    from types import SimpleNamespace

    from nsqjobs.ledger.outcomes import UNKNOWN_REQUEUE_MS, UNKNOWN_WAIT_S, OutcomeRecorder
    from nsqjobs.names import RESULTS_TOPIC
    from nsqjobs.observability.metrics import LedgerMetrics
    from prometheus_client import CollectorRegistry

    answers: list[tuple[str, str, int | None]] = []

    def message(job_id: str, age_s: float, attempts: int = 1) -> SimpleNamespace:
        return SimpleNamespace(
            id=job_id.encode(),
            body=wire.encode(result(job_id)),
            timestamp=int((time.time() - age_s) * 1e9),
            attempts=attempts,
            enable_async=lambda: None,
            finish=lambda: answers.append((job_id, "FIN", None)),
            requeue=lambda backoff, time_ms: answers.append((job_id, "REQ", time_ms)),
        )

    async def settled(n: int) -> None:
        while len(answers) < n:
            await asyncio.sleep(0.01)

    async def body(store: SqliteStore) -> float:
        registry = CollectorRegistry()
        recorder = OutcomeRecorder(store, LedgerMetrics(registry), ["127.0.0.1:9"])
        record = recorder._record_result
        # A gateway publishes a job it made the id of beside its record: the result first.
        early = message("fresh", age_s=0.1)
        recorder._on_message(RESULTS_TOPIC, record, early)
        await settled(1)
        await store.record_accepted([job("fresh")])
        recorder._on_message(RESULTS_TOPIC, record, early)  # nsqd's redelivery
        # An id never recorded, past the wait: dropped and counted.
        recorder._on_message(RESULTS_TOPIC, record, message("stranger", UNKNOWN_WAIT_S + 1))
        # Still young, tried before: each wait twice the one before, up to 5 s.
        recorder._on_message(RESULTS_TOPIC, record, message("later", 3.0, attempts=4))
        recorder._on_message(RESULTS_TOPIC, record, message("latest", 20.0, attempts=9))
        await settled(5)
        assert (await store.get("fresh")).status == "succeeded"  # type: ignore[union-attr]
        value = registry.get_sample_value(
            "nsqjobs_ledger_outcomes_total", {"topic": RESULTS_TOPIC, "verdict": "unknown"}
        )
        return value or 0.0

    unknown = run(tmp_path / "ledger.sqlite3", body)
    assert sorted(answers) == [
        ("fresh", "FIN", None),
        ("fresh", "REQ", UNKNOWN_REQUEUE_MS),
        ("later", "REQ", 8 * UNKNOWN_REQUEUE_MS),
        ("latest", "REQ", 5000),
        ("stranger", "FIN", None),
    ]
    assert unknown == 1.0
