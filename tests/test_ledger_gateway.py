"""The job ledger through the real pipeline: gateway (with a SQLite ledger) -> nsqd -> worker ->
results, and the ledger reading outcomes back on its durable channel."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nsqjobs import wire
from nsqjobs.names import DEAD_LETTER_TOPIC, LEDGER_CHANNEL, RESULTS_TOPIC, STARTED_TOPIC
from nsqjobs.testing import Daemon, Nsq, http, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]
PROBLEM = "application/problem+json"


def ledger_gateway(daemons: Callable[..., Daemon], nsq: Nsq, path: Path) -> Daemon:
    return daemons("gateway", nsq, NSQJOBS_LEDGER_URL=f"sqlite:///{path}")


def job_status(gateway: Daemon, job_id: str) -> tuple[int, dict[str, str], Any]:
    return http("GET", f"{gateway.url}/v1/jobs/{job_id}")


def finished(gateway: Daemon, job_id: str, status: str = "succeeded") -> dict[str, Any]:
    """Poll GET /v1/jobs/{id} until the job has ``status``."""

    def check() -> dict[str, Any] | None:
        code, _, body = job_status(gateway, job_id)
        assert code == 200, body
        return body if body["status"] == status and body["finished_at"] else None

    return wait_for(check, 30, f"job {job_id} {status} in the ledger")


def test_status_by_id_from_queued_to_succeeded(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway = ledger_gateway(daemons, nsq, tmp_path / "ledger.sqlite3")
    code, _, body = http("POST", f"{gateway.url}/v1/jobs", {"id": "j-1", "task": "noop"})
    assert code == 202, body
    # Recorded before the 202: queued, published, no worker yet.
    code, _, queued = job_status(gateway, "j-1")
    assert code == 200
    assert queued["status"] == "queued" and queued["task"] == "noop" and queued["attempts"] == 0
    assert queued["accepted_at"] >= queued["created_at"] and queued["finished_at"] is None

    daemons("worker", nsq)
    done = finished(gateway, "j-1")
    assert done["attempts"] == 1 and done["error"] is None and done["worker"]
    assert done["published_at"] is not None and done["finished_at"] >= done["created_at"]

    code, headers, problem = job_status(gateway, "no-such-job")
    assert code == 404 and headers["Content-Type"] == PROBLEM
    assert problem["type"].endswith("unknown-job") and problem["id"] == "no-such-job"
    # The ledger's readers found every topic they read (the gateway made them): no warnings
    # from nsqlookupd's 404 for a topic no worker had published to yet.
    wait_for(lambda: nsq.channel(STARTED_TOPIC, LEDGER_CHANNEL), 10, "the started reader")
    assert "WARNING" not in gateway.log(), gateway.log_tail()


def test_failures_are_recorded_dead_with_their_error(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway = ledger_gateway(daemons, nsq, tmp_path / "ledger.sqlite3")
    daemons("worker", nsq, NSQJOBS_MAX_ATTEMPTS="1")
    body = {"id": "bad", "task": "debug.fail", "args": {"mode": "error"}}
    assert http("POST", f"{gateway.url}/v1/jobs", body)[0] == 202
    dead = finished(gateway, "bad", "dead")
    assert dead["dead_reason"] == "max_attempts" and dead["attempts"] == 1
    assert dead["error"]["type"] == "DebugFailure"


def test_a_known_id_is_answered_from_the_ledger_and_published_once(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway = ledger_gateway(daemons, nsq, tmp_path / "ledger.sqlite3")
    job = {"id": "once", "task": "primes.count", "args": {"start": 0, "stop": 100}}
    assert http("POST", f"{gateway.url}/v1/jobs", job)[0] == 202
    code, _, again = http("POST", f"{gateway.url}/v1/jobs", job)
    assert code == 200 and again["id"] == "once" and again["status"] == "queued"
    # Keys in another order and 100.0 for 100 are the same job.
    same = {"task": "primes.count", "id": "once", "args": {"stop": 100.0, "start": 0}}
    assert http("POST", f"{gateway.url}/v1/jobs?wait=1", same)[0] == 200
    assert nsq.message_count("jobs") == 1

    other = {**job, "args": {"start": 0, "stop": 101}}
    code, headers, problem = http("POST", f"{gateway.url}/v1/jobs", other)
    assert code == 409 and headers["Content-Type"] == PROBLEM
    assert problem["type"].endswith("id-conflict")
    code, _, problem = http("POST", f"{gateway.url}/v1/jobs", {"id": "once", "task": "noop"})
    assert code == 409

    # A batch: the known id is not published again, a conflicting one refuses the whole batch.
    new = {"id": "b-new", "task": "primes.count", "args": {"start": 0, "stop": 10}}
    batch = {"jobs": [job, new]}
    code, _, answer = http("POST", f"{gateway.url}/v1/jobs/batch", batch)
    assert code == 202 and answer["ids"] == ["once", "b-new"]
    assert nsq.message_count("jobs") == 2
    clash = {"jobs": [{"id": "b-2", "task": "noop"}, {"id": "b-new", "task": "noop"}]}
    code, _, problem = http("POST", f"{gateway.url}/v1/jobs/batch", clash)
    assert code == 409 and problem["errors"] == [
        {"field": "jobs[1].id", "message": "id taken by another job"}
    ]
    assert job_status(gateway, "b-2")[0] == 404
    # A batch of one known job is still a batch: 202 with its id, nothing published again (a
    # schemathesis run found it answered like a single job once).
    code, _, answer = http("POST", f"{gateway.url}/v1/jobs/batch", {"jobs": [job]})
    assert code == 202 and answer["ids"] == ["once"]
    code, _, problem = http("POST", f"{gateway.url}/v1/jobs/batch", {"jobs": [other]})
    assert code == 409 and problem["errors"][0]["field"] == "jobs[0].id"
    assert nsq.message_count("jobs") == 2

    daemons("worker", nsq)
    assert finished(gateway, "once")["result"] == 25


def test_the_first_outcome_wins_and_duplicates_are_counted(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway = ledger_gateway(daemons, nsq, tmp_path / "ledger.sqlite3")
    daemons("worker", nsq)
    job = {"id": "dup", "task": "primes.count", "args": {"start": 0, "stop": 10}}
    assert http("POST", f"{gateway.url}/v1/jobs", job)[0] == 202
    first = finished(gateway, "dup")
    assert first["result"] == 4
    # The same job's outcome arrives twice more (a redelivery ran it again): ignored, counted.
    late = wire.ResultEnvelope(
        id="dup",
        task="primes.count",
        status="failed",
        error=wire.ErrorInfo(type="Late", message="a second execution"),
        attempts=2,
        worker="other",
        started_at=1.0,
        finished_at=2.0,
        duration_s=1.0,
    )
    nsq.post("/pub", wire.encode(late), topic=RESULTS_TOPIC)
    nsq.post("/pub", wire.encode(late), topic=RESULTS_TOPIC)
    name = "nsqjobs_ledger_duplicate_outcomes_total"
    wait_for(lambda: gateway.metric(name) == 2, 20, "two duplicate outcomes counted")
    code, _, now = job_status(gateway, "dup")
    assert code == 200 and now == first
    assert gateway.metric("nsqjobs_ledger_outcomes_total", topic="results", verdict="recorded") == 1


def test_outcomes_wait_in_nsqd_for_a_gateway_that_is_down(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "ledger.sqlite3"
    gateway = ledger_gateway(daemons, nsq, path)
    job = {"id": "later", "task": "debug.sleep", "args": {"seconds": 0}}
    assert http("POST", f"{gateway.url}/v1/jobs", job)[0] == 202
    gateway.proc.kill()  # SIGKILL: nothing is flushed on the way out
    gateway.proc.wait(10)
    # The channels are durable: the result is kept for the ledger while no gateway runs.
    daemons("worker", nsq)

    def kept() -> bool:
        ch = nsq.channel(RESULTS_TOPIC, LEDGER_CHANNEL)
        return ch is not None and ch["depth"] == 1

    wait_for(kept, 30, "the result kept on the ledger's channel")
    assert nsq.channel(DEAD_LETTER_TOPIC, LEDGER_CHANNEL) is not None
    restarted = ledger_gateway(daemons, nsq, path)
    assert finished(restarted, "later")["result"] == {"slept": 0}


def test_without_a_ledger_nothing_changes(nsq: Nsq, daemons: Callable[..., Daemon]) -> None:
    gateway = daemons("gateway", nsq)
    job = {"id": "twice", "task": "noop"}
    assert http("POST", f"{gateway.url}/v1/jobs", job)[0] == 202
    assert http("POST", f"{gateway.url}/v1/jobs", job)[0] == 202
    assert nsq.message_count("jobs") == 2
    code, _, problem = job_status(gateway, "twice")
    assert code == 404 and problem["type"].endswith("not-found")
    assert nsq.channel(RESULTS_TOPIC, LEDGER_CHANNEL) is None
    assert "nsqjobs_ledger" not in json.dumps([f.name for f in gateway.metrics()])


def test_a_retry_publishes_a_job_nsqd_never_acknowledged(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway = daemons(
        "gateway",
        nsq,
        NSQJOBS_LEDGER_URL=f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
        NSQJOBS_PUBLISH_TIMEOUT_S="1",
    )
    nsq.stop_nsqd()
    job = {"id": "retry-me", "task": "noop"}
    code, _, problem = http("POST", f"{gateway.url}/v1/jobs", job)
    assert code == 503, problem
    # Recorded, never acknowledged: the ledger says so.
    code, _, record = job_status(gateway, "retry-me")
    assert code == 200 and record["status"] == "queued" and record["published_at"] is None
    nsq.start_nsqd()
    wait_for(lambda: http("GET", f"{gateway.url}/readyz")[0] == 200, 30, "the gateway ready")
    code, _, answer = http("POST", f"{gateway.url}/v1/jobs", job)
    assert code == 202, answer
    assert nsq.message_count("jobs") == 1
    daemons("worker", nsq)
    assert finished(gateway, "retry-me")["published_at"] is not None
