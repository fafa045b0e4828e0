"""The chaos suite, short: the checker on known inputs, the checker on defects planted in a real
run, then each fault scenario with small counts against real daemons (``bench.chaos``; the full
sizes are ``make chaos``).

Targets asserted: nothing accepted is lost, no outcome is recorded twice, duplicate executions
stay within what the run's events can cause, and a deep backlog causes no re-drive.
"""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import ExitStack
from pathlib import Path

import pytest
from nsqjobs import wire
from nsqjobs.ledger import open_store

from bench.chaos import scenarios
from bench.chaos.check import Bound, LedgerRow, LedgerWatch, Submitted, Verdict, judge
from bench.chaos.ledger import STORES, Ledger, PostgresLedger, open_ledger
from bench.chaos.run import Result, run

# -- the checker on known inputs ----------------------------------------------------------------


def _submitted(*specs: tuple[str, str]) -> dict[str, Submitted]:
    answers = {"accepted": ("202",), "unconfirmed": ("503 outcome-unknown",), "rejected": ("409",)}
    return {i: Submitted(i, state, answers[state]) for i, state in specs}  # type: ignore[arg-type]


def _verdict(
    submitted: dict[str, Submitted],
    rows: list[LedgerRow],
    executions: dict[str, int],
    results: dict[str, int] | None = None,
    bound: Bound | None = None,
) -> Verdict:
    watch = LedgerWatch()
    watch.read(rows)
    return judge(
        submitted,
        watch,
        executions,
        results or {},
        duplicate_outcomes_ignored=0,
        redrives_by_reason={},
        bound=bound or Bound(),
    )


def test_lost_is_exactly_the_accepted_jobs_without_an_outcome() -> None:
    submitted = _submitted(
        ("a", "accepted"), ("b", "accepted"), ("c", "accepted"), ("d", "unconfirmed")
    )
    rows = [
        LedgerRow("a", "succeeded", 1.0, "w"),
        LedgerRow("b", "queued"),  # recorded, never finished
        LedgerRow("d", "queued"),  # never confirmed: reported, not lost
    ]
    # "c" has no row at all: a 202 for a job the ledger never recorded.
    v = _verdict(submitted, rows, {"a": 1})
    assert v.lost == ("b", "c")
    assert v.unrecorded == ("c",)
    assert v.accepted == 3 and v.unconfirmed == 1 and v.unconfirmed_recorded == 0
    assert v.never_executed == 2
    assert not v.passed


def test_an_outcome_for_a_job_that_never_ran_fails_the_run_and_so_does_a_stuck_one() -> None:
    # The ledger's word is not enough: an accepted job the executions log never saw is lost
    # whatever the ledger says, and a job the client could not confirm, which the ledger holds
    # unfinished, was promised too.
    submitted = _submitted(("a", "accepted"), ("b", "accepted"), ("d", "unconfirmed"))
    rows = [
        LedgerRow("a", "succeeded", 1.0, "w"),
        LedgerRow("b", "succeeded", 1.0, "w"),  # recorded, never run
        LedgerRow("d", "queued"),  # recorded, never finished
    ]
    v = _verdict(submitted, rows, {"a": 1})
    assert v.lost == () and v.unrun == ("b",) and v.stuck_unconfirmed == ("d",)
    assert not v.passed and "never ran 1" in v.summary()
    fine = _verdict(submitted, [*rows[:2], LedgerRow("d", "succeeded", 1.0)], {"a": 1, "b": 1})
    assert fine.passed


def test_dead_and_failed_are_outcomes_running_is_not() -> None:
    submitted = _submitted(("a", "accepted"), ("b", "accepted"), ("c", "accepted"))
    rows = [LedgerRow("a", "dead"), LedgerRow("b", "failed", 2.0), LedgerRow("c", "running")]
    assert _verdict(submitted, rows, {}).lost == ("c",)


def test_duplicate_executions_count_runs_beyond_the_first_against_their_bound() -> None:
    submitted = _submitted(("a", "accepted"), ("b", "accepted"), ("c", "accepted"))
    rows = [LedgerRow(i, "succeeded", 1.0, "w") for i in "abc"]
    runs = {"a": 3, "b": 2, "c": 1, "stranger": 1}
    bound = Bound(worker_faults=1, concurrency=2, retried_publishes=0)
    v = _verdict(submitted, rows, runs, {"a": 2, "b": 1, "c": 1}, bound)
    assert v.duplicate_executions == 3 and v.ran_twice == ("a", "b") and v.most_runs == 3
    assert v.duplicate_results == 1 and v.results_seen == 3
    assert v.phantoms == ("stranger",)  # ran, never sent
    assert v.bound.total == 2
    assert not v.passed  # 3 > 2, and a phantom
    within = _verdict(submitted, rows, {"a": 2, "b": 2, "c": 1}, bound=bound)
    assert within.duplicate_executions == 2 and within.passed


def test_a_terminal_outcome_that_changes_between_reads_is_a_duplicate_recorded_outcome() -> None:
    watch = LedgerWatch()
    watch.read([LedgerRow("a", "queued"), LedgerRow("b", "succeeded", 1.0, "w1")])
    # "a" finishing is its first outcome; "b" recorded again by another execution is not.
    watch.read([LedgerRow("a", "succeeded", 2.0, "w1"), LedgerRow("b", "failed", 3.0, "w2")])
    watch.read([LedgerRow("a", "succeeded", 2.0, "w1"), LedgerRow("b", "failed", 3.0, "w2")])
    assert set(watch.rewritten) == {"b"}
    # Two rows for one id (a store without a unique key).
    a = LedgerRow("a", "succeeded", 2.0, "w1")
    watch.read([a, a, LedgerRow("b", "failed", 3.0, "w2")])
    assert watch.extra_rows == {"a": 1}
    v = judge(
        _submitted(("a", "accepted"), ("b", "accepted")),
        watch,
        {"a": 1, "b": 2},
        {},
        duplicate_outcomes_ignored=1,
        redrives_by_reason={"nsqd_restart": 1},
        bound=Bound(),
    )
    assert v.duplicate_recorded == ("a", "b") and not v.lost and not v.passed
    assert v.bound.redrives == 1  # a re-drive may run a job once more


def test_redrives_are_the_ledgers_count_and_the_bound_sums_its_terms() -> None:
    submitted = _submitted(("a", "accepted"), ("b", "accepted"))
    rows = [LedgerRow("a", "succeeded", 1.0, "w", redrives=2), LedgerRow("b", "succeeded", 1.0)]
    bound = Bound(
        worker_faults=3,
        concurrency=4,
        retried_publishes=5,
        requeued_results=7,
        nsqd_kills_on_disk=1,
    )
    v = _verdict(submitted, rows, {"a": 1, "b": 1}, bound=bound)
    assert v.redrives == 2
    assert v.bound.total == 3 * 4 + 5 + 7 + 2 + 2500
    assert v.bound.terms() == (
        "3x4 worker + 5 retried + 7 results unacknowledged + 2 re-driven + 1x2500 nsqd disk"
    )


# -- the audit trigger, on each store ---------------------------------------------------------


def _result(job_id: str, status: str, worker: str = "w1") -> wire.ResultEnvelope:
    error = None if status == "succeeded" else wire.ErrorInfo(type="ValueError", message="bad")
    return wire.ResultEnvelope(
        id=job_id,
        task="noop",
        status=status,  # type: ignore[arg-type]
        error=error,
        attempts=1,
        worker=worker,
        started_at=1001.0,
        finished_at=1002.0,
        duration_s=1.0,
    )


async def _outcomes(url: str) -> None:
    """Through the store, what the product writes: first outcomes, duplicates it ignores, a
    failed result completed by its dead letter."""
    store = open_store(url)
    try:
        ids = ("ok", "dup", "dead", "changed", "back")
        jobs = [wire.JobEnvelope(id=i, task="noop", args={}, created_at=1000.0) for i in ids]
        await store.record_accepted(jobs)
        for i in ("ok", "dup", "changed", "back"):
            assert await store.record_result(_result(i, "succeeded")) == "recorded"
        assert await store.record_result(_result("dup", "failed", "w2")) == "duplicate"
        assert await store.record_result(_result("dead", "failed")) == "recorded"
        letter = wire.DeadLetter(
            reason="max_attempts",
            error=wire.ErrorInfo(type="ValueError", message="bad"),
            worker="w1",
            at=1002.0,
            job=jobs[2],
        )
        assert await store.record_dead_letter(letter) == "recorded"
        assert (await store.get("dead")).status == "dead"  # type: ignore[union-attr]
    finally:
        store.close()


def _rewrite(ledger: Ledger, statements: list[str]) -> None:
    """Change the file or database behind the store, as a defect would."""
    if isinstance(ledger, PostgresLedger):
        ledger.server.psql("; ".join(statements))
        return
    conn = sqlite3.connect(ledger.path)  # type: ignore[attr-defined]
    try:
        for statement in statements:
            with conn:
                conn.execute(statement)
    finally:
        conn.close()


@pytest.mark.integration
@pytest.mark.timeout(90)
@pytest.mark.parametrize("store", STORES)
def test_the_audit_sees_every_change_of_a_recorded_outcome_and_none_of_the_stores_own(
    store: str, tmp_path: Path
) -> None:
    with ExitStack() as stack:
        ledger = open_ledger(store, stack, tmp_path)
        open_store(ledger.url).close()  # the gateway's tables, made as the gateway makes them
        ledger.audit()
        ledger.audit()  # a gateway restarted under the suite: adding it again changes nothing
        asyncio.run(_outcomes(ledger.url))
        assert ledger.rewrites() == {}
        _rewrite(
            ledger,
            [
                "UPDATE jobs SET worker = 'w9' WHERE id = 'changed'",
                "UPDATE jobs SET finished_at = finished_at + 1 WHERE id = 'back'",
                "UPDATE jobs SET finished_at = finished_at - 1 WHERE id = 'back'",
                "UPDATE jobs SET redrives = redrives + 1 WHERE id = 'ok'",  # not an outcome
            ],
        )
        found = ledger.rewrites()
        assert set(found) == {"changed", "back"}
        assert found["changed"][0].startswith("succeeded@1002") and "w9" in found["changed"][1]
        # A read of the rows now sees "back" as it was: only the audit saw it change.
        watch = LedgerWatch()
        watch.read(ledger.rows())
        assert watch.rows["back"].finished_at == 1002.0


# -- real runs ------------------------------------------------------------------------------------

SHORT = {s.name: s for s in scenarios.short()}


def _run(name: str) -> Result:
    result = run(SHORT[name], lambda line: print(line, flush=True))
    print(result.summary())
    if result.verdict is None:
        raise AssertionError(f"{name} could not run: {result.error}")
    return result


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_the_checker_finds_exactly_the_defects_planted_in_a_real_run() -> None:
    result = _run("selftest")
    plant = SHORT["selftest"].plant
    assert plant is not None
    assert {k: len(v) for k, v in result.planted.items()} == {
        "lost": plant.lose,
        "rerun": plant.rerun,
        "rewritten": plant.rewrite,
    }
    assert result.missed_plants() == []


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", [n for n in scenarios.IN_TESTS if n != "selftest"])
def test_nothing_accepted_is_lost_or_recorded_twice(name: str) -> None:
    result = _run(name)
    v = result.verdict
    assert v is not None
    assert v.accepted > 0.9 * SHORT[name].jobs, v.answers
    assert v.lost == (), f"{len(v.lost)} accepted jobs lost: {v.lost[:10]}; {result.events}"
    assert v.unrun == (), f"{len(v.unrun)} accepted jobs never ran: {v.unrun[:10]}"
    assert v.stuck_unconfirmed == (), v.stuck_unconfirmed[:10]
    assert v.duplicate_recorded == ()
    assert v.phantoms == ()
    assert v.duplicate_executions <= v.bound.total, v.bound.terms()
    if SHORT[name].no_redrives:
        assert v.redrives == 0 and not v.redrives_by_reason
    assert result.passed
