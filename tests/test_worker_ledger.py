"""The worker's side of the job ledger: started events (``track_started``) reported as running,
and the attempt history of failed attempts recorded with the outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nsqjobs import wire
from nsqjobs.ledger import SqliteStore
from nsqjobs.names import LEDGER_CHANNEL, STARTED_TOPIC
from nsqjobs.testing import Daemon, Nsq, http, wait_for

FAST_RETRY = {"NSQJOBS_BACKOFF_BASE_S": "0.2", "NSQJOBS_BACKOFF_CAP_S": "1"}


def attempt(n: int, message: str = "boom") -> wire.Attempt:
    return wire.Attempt(
        attempt=n,
        worker="w1",
        started_at=1000.0 + n,
        finished_at=1000.5 + n,
        error=wire.ErrorInfo(type="Boom", message=message),
    )


@pytest.mark.timeout(30)
def test_store_records_started_once_and_histories(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        jobs = [wire.JobEnvelope(id=i, task="noop", args={}, created_at=1000.0) for i in ("a", "b")]
        await store.record_accepted(jobs)
        assert await store.record_started("a", "w1", 1001.0) == "recorded"
        record = await store.get("a")
        assert record is not None
        assert (record.status, record.started_at, record.worker) == ("running", 1001.0, "w1")
        # A second event (another attempt, a redelivery) changes nothing.
        assert await store.record_started("a", "w2", 1005.0) == "duplicate"
        assert await store.record_started("nope", "w1", 1001.0) == "unknown"
        history = (attempt(1), attempt(2, "again"))
        result = wire.ResultEnvelope(
            id="a",
            task="noop",
            status="succeeded",
            result=3,
            attempts=3,
            worker="w1",
            started_at=1003.0,
            finished_at=1004.0,
            duration_s=1.0,
            history=history,
        )
        assert await store.record_result(result) == "recorded"
        record = await store.get("a")
        assert record is not None
        assert (record.status, record.history, record.started_at) == (
            "succeeded",
            history,
            1001.0,
        )
        # A started event after the outcome (published fire-and-forget, it can come late).
        assert await store.record_started("a", "w1", 1010.0) == "duplicate"
        record = await store.get("a")
        assert record is not None and record.status == "succeeded"
        dead_job = msgspec.structs.replace(jobs[1], attempts=2, history=history)
        letter = wire.DeadLetter(
            reason="max_attempts",
            error=history[-1].error,
            worker="w1",
            at=1006.0,
            job=dead_job,
        )
        assert await store.record_dead_letter(letter) == "recorded"
        dead = await store.get("b")
        assert dead is not None and (dead.status, dead.history) == ("dead", history)
        assert [a["error"]["message"] for a in dead.view()["history"]] == ["boom", "again"]

    async def main() -> None:
        store = SqliteStore(tmp_path / "ledger.sqlite3")
        try:
            await asyncio.wait_for(body(store), 10)
        finally:
            store.close()

    asyncio.run(main())


# -- through the real pipeline ------------------------------------------------------------------


def ledger_gateway(daemons: Callable[..., Daemon], nsq: Nsq, path: Path) -> Daemon:
    return daemons("gateway", nsq, NSQJOBS_LEDGER_URL=f"sqlite:///{path}")


def status_of(gateway: Daemon, job_id: str) -> dict[str, Any]:
    code, _, body = http("GET", f"{gateway.url}/v1/jobs/{job_id}")
    assert code == 200, body
    assert isinstance(body, dict)
    return body


def has_status(gateway: Daemon, job_id: str, status: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        body = status_of(gateway, job_id)
        return body if body["status"] == status else None

    return check


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_tracked_job_is_running_while_it_runs(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway = ledger_gateway(daemons, nsq, tmp_path / "ledger.sqlite3")
    worker = daemons("worker", nsq)
    job = {"id": "tracked", "task": "debug.sleep_tracked", "args": {"seconds": 2}}
    plain = {"id": "plain", "task": "debug.sleep", "args": {"seconds": 2}}
    submitted = wire.now()
    for body in (job, plain):
        code, _, answer = http("POST", f"{gateway.url}/v1/jobs", body)
        assert code == 202, answer
    running = wait_for(has_status(gateway, "tracked", "running"), 10, "the job to be running")
    assert running["started_at"] >= submitted and running["finished_at"] is None
    assert running["worker"]
    # Both run side by side (two slots at least); the untracked one is never reported running.
    wait_for(
        lambda: worker.metric("nsqjobs_jobs_in_progress", task="debug.sleep") == 1,
        10,
        "the plain job to run",
    )
    assert status_of(gateway, "plain")["status"] == "queued"
    done = wait_for(has_status(gateway, "tracked", "succeeded"), 20, "the job to succeed")
    assert done["result"] == {"slept": 2} and done["started_at"] == running["started_at"]
    assert done["finished_at"] - done["started_at"] >= 1.9
    wait_for(has_status(gateway, "plain", "succeeded"), 20, "the plain job to succeed")
    # The started event was read on the ledger's durable channel, and is not an outcome.
    channel = nsq.channel(STARTED_TOPIC, LEDGER_CHANNEL)
    assert channel is not None and channel["message_count"] == 1
    assert (
        gateway.metric("nsqjobs_ledger_outcomes_total", topic=STARTED_TOPIC, verdict="recorded")
        == 1
    )
    assert gateway.metric("nsqjobs_ledger_duplicate_outcomes_total") == 0


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_the_ledger_keeps_the_attempts_that_failed(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway = ledger_gateway(daemons, nsq, tmp_path / "ledger.sqlite3")
    daemons("worker", nsq, **FAST_RETRY)
    flaky = {"id": "flaky", "task": "debug.flaky", "args": {"key": "k1", "fails": 2}}
    failing = {"id": "failing", "task": "debug.fail", "args": {"mode": "error"}}
    for body in (flaky, failing):
        assert http("POST", f"{gateway.url}/v1/jobs", body)[0] == 202
    done = wait_for(has_status(gateway, "flaky", "succeeded"), 30, "the flaky job to succeed")
    assert done["attempts"] == 3 and done["result"] == {"calls": 3}
    history = done["history"]
    assert [a["attempt"] for a in history] == [1, 2]
    assert {a["error"]["type"] for a in history} == {"DebugFailure"}
    assert all(a["worker"] and a["finished_at"] >= a["started_at"] for a in history)
    assert history[0]["finished_at"] <= history[1]["started_at"]
    dead = wait_for(has_status(gateway, "failing", "dead"), 60, "the failing job to be dead")
    assert [a["attempt"] for a in dead["history"]] == [1, 2, 3, 4, 5]
    assert dead["dead_reason"] == "max_attempts"
