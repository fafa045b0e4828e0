"""The job ledger's HTTP API against a real gateway (SQLite ledger), nsqd and worker: listings
with filters and cursors, cancel, dead letters (list, replay, purge), ``?wait=`` answered from
the ledger, and every error as problem+json."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import sqlite3
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nsqjobs.names import CANCEL_TOPIC, DEFAULT_QUEUE
from nsqjobs.testing import Daemon, Nsq, http, nsq_pair, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
PROBLEM = "application/problem+json"


def ledger_gateway(daemons: Callable[..., Daemon], nsq: Nsq, path: Path, **env: str) -> Daemon:
    return daemons("gateway", nsq, NSQJOBS_LEDGER_URL=f"sqlite:///{path}", **env)


def get(gateway: Daemon, path: str) -> tuple[int, dict[str, str], Any]:
    return http("GET", gateway.url + path)


def nsqd_start_time(nsq: Nsq) -> int:
    """The nsqd's ``start_time`` (Unix seconds, truncated), from its /stats."""
    with urllib.request.urlopen(f"http://{nsq.nsqd_http}/stats?format=json", timeout=5) as r:
        return int(json.load(r)["start_time"])


def status_of(gateway: Daemon, job_id: str, status: str, timeout: float = 30) -> dict[str, Any]:
    """Poll GET /v1/jobs/{id} until the job has ``status``."""

    def check() -> dict[str, Any] | None:
        code, _, body = get(gateway, f"/v1/jobs/{job_id}")
        assert code == 200, body
        return body if body["status"] == status else None

    return wait_for(check, timeout, f"job {job_id} {status}")


def problem(answer: tuple[int, dict[str, str], Any], status: int, slug: str) -> dict[str, Any]:
    """Check that ``answer`` is a problem+json of this status and type; its body."""
    code, headers, body = answer
    assert code == status, body
    assert headers["Content-Type"] == PROBLEM
    assert body["type"] == f"urn:nsqjobs:problem:{slug}" and body["status"] == status
    return dict(body)


def query_fields(answer: tuple[int, dict[str, str], Any]) -> list[str]:
    """The fields a 400 bad-query problem names."""
    return [e["field"] for e in problem(answer, 400, "bad-query")["errors"]]


def listing(gateway: Daemon, path: str) -> list[str]:
    """Every id of a listing, following its cursors."""
    ids: list[str] = []
    cursor = None
    while True:
        sep = "&" if "?" in path else "?"
        code, _, page = get(gateway, path + (f"{sep}cursor={cursor}" if cursor else ""))
        assert code == 200, page
        ids += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids


def test_listing_with_filters_cursors_and_query_errors(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway = ledger_gateway(daemons, nsq, tmp_path / "ledger.sqlite3")
    jobs: list[dict[str, Any]] = [
        {"id": f"j{i}", "task": "noop"}
        if i % 2
        else {"id": f"j{i}", "task": "primes.count", "args": {"start": 0, "stop": 10}}
        for i in range(7)
    ]
    assert http("POST", f"{gateway.url}/v1/jobs/batch", {"jobs": jobs})[0] == 202
    code, _, page = get(gateway, "/v1/jobs?limit=3")
    assert code == 200 and [j["id"] for j in page["jobs"]] == ["j0", "j1", "j2"]
    assert page["jobs"][0]["status"] == "queued" and page["next_cursor"]
    code, _, second = get(gateway, f"/v1/jobs?limit=3&cursor={page['next_cursor']}")
    assert [j["id"] for j in second["jobs"]] == ["j3", "j4", "j5"]
    assert listing(gateway, "/v1/jobs?limit=2") == [f"j{i}" for i in range(7)]
    assert listing(gateway, "/v1/jobs?task=noop&limit=1") == ["j1", "j3", "j5"]
    assert listing(gateway, "/v1/jobs?status=succeeded") == []

    # A cursor is good only for the listing and filters that gave it out.
    cursor = page["next_cursor"]
    assert query_fields(get(gateway, f"/v1/jobs?task=noop&cursor={cursor}")) == ["query.cursor"]
    assert query_fields(get(gateway, f"/v1/dead-letters?cursor={cursor}")) == ["query.cursor"]
    for bad, fields in [
        ("status=nope", ["query.status"]),
        ("status=", ["query.status"]),
        ("limit=0", ["query.limit"]),
        ("limit=1001", ["query.limit"]),
        ("limit=x", ["query.limit"]),
        ("limit=%C2%B2", ["query.limit"]),
        ("task=", ["query.task"]),
        ("cursor=not-ours", ["query.cursor"]),
        # Ours in form, with a position in digits str.isdigit() takes but int() does not: "²".
        ("cursor=WyJqb2JzIixudWxsLG51bGwsIsKyIl0", ["query.cursor"]),
        ("cursor=", ["query.cursor"]),
        ("limit=1&limit=2", ["query.limit"]),
        # More digits than Python's int() converts (4,300): a 400, not a 500.
        ("limit=" + "9" * 5000, ["query.limit"]),
        ("limit=" + "0" * 4999 + "1", ["query.limit"]),
        # Ours in form but nested deeper than the JSON decoder recurses.
        (f"cursor={base64.urlsafe_b64encode(b'[' * 5000).decode().rstrip('=')}", ["query.cursor"]),
        ("stauts=failed", ["query.stauts"]),
        ("status=nope&limit=0", ["query.status", "query.limit"]),
    ]:
        assert query_fields(get(gateway, f"/v1/jobs?{bad}")) == fields, bad
    for path in ("/v1/dead-letters", "/v1/dead-letters/replay"):
        method = "POST" if path.endswith("replay") else "GET"
        answer = http(method, f"{gateway.url}{path}?limit={'1' * 5000}")
        assert query_fields(answer) == ["query.limit"], path
    assert query_fields(get(gateway, "/v1/jobs/j1?verbose=1")) == ["query.verbose"]
    assert query_fields(get(gateway, "/v1/dead-letters?status=dead")) == ["query.status"]

    # POST stays the hot path's; any other method is answered 405 naming both.
    code, headers, _ = http("PUT", f"{gateway.url}/v1/jobs", {})
    assert code == 405 and headers["Allow"] == "GET, HEAD, POST"
    # /v1/jobs/batch is also the path of the job whose id is "batch" (POST is the batch route).
    problem(http("GET", f"{gateway.url}/v1/jobs/batch"), 404, "unknown-job")
    assert http("POST", f"{gateway.url}/v1/jobs", {"id": "batch", "task": "noop"})[0] == 202
    code, _, record = get(gateway, "/v1/jobs/batch")
    assert code == 200 and record["id"] == "batch" and record["task"] == "noop"
    code, headers, _ = http("PUT", f"{gateway.url}/v1/jobs/batch", {})
    assert code == 405 and headers["Allow"] == "GET, DELETE, HEAD, POST"
    code, _, body = http("HEAD", f"{gateway.url}/v1/jobs?limit=1")
    assert (code, body) == (200, "")
    jobs.append({"id": "batch", "task": "noop"})

    daemons("worker", nsq)
    for job in jobs:
        status_of(gateway, job["id"], "succeeded")
    assert listing(gateway, "/v1/jobs?status=succeeded&task=primes.count") == [
        "j0",
        "j2",
        "j4",
        "j6",
    ]
    assert listing(gateway, "/v1/jobs?status=queued") == []


def test_cancel_before_start_and_after_the_end(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway = ledger_gateway(daemons, nsq, tmp_path / "ledger.sqlite3")
    worker = daemons("worker", nsq)
    worker.pause()  # the job is delivered to a worker that cannot start it
    try:
        assert http("POST", f"{gateway.url}/v1/jobs", {"id": "c1", "task": "noop"})[0] == 202
        code, _, cancelled = http("DELETE", f"{gateway.url}/v1/jobs/c1")
        assert code == 200 and cancelled["status"] == "cancelled", cancelled
        assert cancelled["finished_at"] is not None and cancelled["result"] is None
        # Idempotent: cancelled again, announced again.
        assert http("DELETE", f"{gateway.url}/v1/jobs/c1")[0] == 200
        assert nsq.message_count(CANCEL_TOPIC) == 2
    finally:
        worker.resume()
    # Resubmitting the id answers the cancelled job and publishes nothing.
    before = nsq.message_count(DEFAULT_QUEUE)
    code, _, again = http("POST", f"{gateway.url}/v1/jobs", {"id": "c1", "task": "noop"})
    assert code == 200 and again["status"] == "cancelled"
    assert nsq.message_count(DEFAULT_QUEUE) == before

    # Whatever the worker did with it, the job is never reported succeeded: a later job on the
    # same worker finishing first is the barrier.
    assert http("POST", f"{gateway.url}/v1/jobs", {"id": "after", "task": "noop"})[0] == 202
    status_of(gateway, "after", "succeeded")
    wait_for(
        lambda: worker.metric("nsqjobs_jobs_received_total", task="noop") >= 2,
        20,
        "the worker to have seen both jobs",
    )
    code, _, record = get(gateway, "/v1/jobs/c1")
    assert code == 200 and record["status"] == "cancelled" and record["result"] is None

    body = problem(http("DELETE", f"{gateway.url}/v1/jobs/after"), 409, "already-finished")
    assert body["job_status"] == "succeeded" and body["id"] == "after"
    problem(http("DELETE", f"{gateway.url}/v1/jobs/nobody"), 404, "unknown-job")
    code, headers, _ = http("POST", f"{gateway.url}/v1/jobs/c1", {})
    assert code == 405 and headers["Allow"] == "GET, DELETE, HEAD"


def test_dead_letters_listed_replayed_and_purged(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway = ledger_gateway(daemons, nsq, tmp_path / "ledger.sqlite3")
    worker = daemons("worker", nsq, NSQJOBS_MAX_ATTEMPTS="1")
    fail = {"task": "debug.fail", "args": {"mode": "error"}}
    jobs = [
        {"id": "d1", **fail},
        {"id": "d2", **fail},
        {"id": "d3", "task": "debug.throws"},
        {"id": "ok", "task": "noop"},
        {"id": "d4", **fail},
    ]
    assert http("POST", f"{gateway.url}/v1/jobs/batch", {"jobs": jobs})[0] == 202
    for job_id in ("d1", "d2", "d3", "d4"):
        status_of(gateway, job_id, "dead")
    status_of(gateway, "ok", "succeeded")

    code, _, page = get(gateway, "/v1/dead-letters?limit=2")
    assert code == 200 and [j["id"] for j in page["jobs"]] == ["d1", "d2"]
    first = page["jobs"][0]
    assert first["dead_reason"] == "max_attempts" and first["error"]["type"] == "DebugFailure"
    assert listing(gateway, "/v1/dead-letters?limit=2") == ["d1", "d2", "d3", "d4"]
    assert listing(gateway, "/v1/dead-letters?task=debug.throws") == ["d3"]

    # Replay one: its run so far is kept, it is queued with a fresh history. The worker is
    # paused meanwhile, or the relay's publish would run it again at once.
    worker.pause()
    code, _, replayed = http("POST", f"{gateway.url}/v1/dead-letters/d1/replay")
    assert code == 200, replayed
    assert replayed["status"] == "queued" and replayed["replays"] == 1
    assert replayed["attempts"] == 0 and replayed["error"] is None and replayed["history"] == []
    assert replayed["published_at"] is None and replayed["dead_reason"] is None
    (run,) = replayed["runs"]
    assert run["status"] == "dead" and run["dead_reason"] == "max_attempts"
    assert run["error"]["type"] == "DebugFailure" and run["replayed_at"] >= run["dead_at"]
    body = problem(http("POST", f"{gateway.url}/v1/dead-letters/d1/replay"), 409, "not-dead")
    assert body["job_status"] == "queued"
    problem(http("POST", f"{gateway.url}/v1/dead-letters/ok/replay"), 409, "not-dead")
    problem(http("POST", f"{gateway.url}/v1/dead-letters/zz/replay"), 404, "unknown-job")
    # An empty JSON object (what `json={}` helpers send) counts as no body.
    problem(http("POST", f"{gateway.url}/v1/dead-letters/zz/replay", {}), 404, "unknown-job")
    assert listing(gateway, "/v1/dead-letters") == ["d2", "d3", "d4"]
    # A wait answers from the ledger (queued), not from the failed result of the run before,
    # which this gateway saw go by seconds ago.
    code, _, waited = http("POST", f"{gateway.url}/v1/jobs/wait", {"ids": ["d1"], "timeout_s": 0})
    assert code == 200 and waited["done"] == [] and waited["pending"] == ["d1"], waited

    # The relay publishes it: it runs again, and its new outcome is the new run's.
    worker.resume()
    again = status_of(gateway, "d1", "dead")
    assert again["attempts"] == 1 and len(again["runs"]) == 1 and again["replays"] == 1

    # Bulk replay by filter answers the ids, oldest first, up to the limit.
    worker.pause()
    code, _, bulk = http("POST", f"{gateway.url}/v1/dead-letters/replay?task=debug.fail&limit=2")
    assert code == 200 and bulk == {"ids": ["d1", "d2"]}
    assert status_of(gateway, "d1", "queued")["replays"] == 2
    assert len(status_of(gateway, "d2", "queued")["runs"]) == 1
    assert query_fields(http("POST", f"{gateway.url}/v1/dead-letters/replay?limit=0")) == [
        "query.limit"
    ]
    assert listing(gateway, "/v1/dead-letters") == ["d3", "d4"]

    # Purge one by id, then by filter; only dead jobs.
    code, _, purged = http("DELETE", f"{gateway.url}/v1/dead-letters/d4")
    assert code == 200 and purged == {"purged": 1}
    problem(get(gateway, "/v1/jobs/d4"), 404, "unknown-job")
    problem(http("DELETE", f"{gateway.url}/v1/dead-letters/d4"), 404, "unknown-job")
    body = problem(http("DELETE", f"{gateway.url}/v1/dead-letters/ok"), 409, "not-dead")
    assert body["job_status"] == "succeeded"
    problem(http("DELETE", f"{gateway.url}/v1/dead-letters/d1"), 409, "not-dead")
    # A filter sent as a body is refused, not ignored (it would purge every dead letter).
    refused = http("DELETE", f"{gateway.url}/v1/dead-letters", {"task": "no.such.task"})
    assert "query string" in problem(refused, 400, "bad-request")["detail"]
    refused = http("POST", f"{gateway.url}/v1/dead-letters/replay", {"task": "no.such.task"})
    problem(refused, 400, "bad-request")
    code, _, purged = http("DELETE", f"{gateway.url}/v1/dead-letters?task=debug.throws")
    assert code == 200 and purged == {"purged": 1}
    # Both replayed jobs run and die again (the relay published them when replayed).
    worker.resume()
    assert status_of(gateway, "d1", "dead")["replays"] == 2
    assert len(status_of(gateway, "d2", "dead")["runs"]) == 1
    code, _, purged = http("DELETE", f"{gateway.url}/v1/dead-letters")
    assert code == 200 and purged == {"purged": 2}
    assert listing(gateway, "/v1/dead-letters") == []
    assert query_fields(http("DELETE", f"{gateway.url}/v1/dead-letters?cursor=x")) == [
        "query.cursor"
    ]


def test_wait_is_answered_from_the_ledger(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway = ledger_gateway(daemons, nsq, tmp_path / "ledger.sqlite3")
    job = {"id": "w1", "task": "primes.count", "args": {"start": 0, "stop": 100}}
    assert http("POST", f"{gateway.url}/v1/jobs", job)[0] == 202
    # Known and unfinished: the wait ends with the job as recorded (200), nothing published.
    code, _, record = http("POST", f"{gateway.url}/v1/jobs?wait=0.3", job)
    assert code == 200 and record["status"] == "queued"
    assert nsq.message_count(DEFAULT_QUEUE) == 1

    # The result arrives while a resubmission waits: it answers.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(http, "POST", f"{gateway.url}/v1/jobs?wait=20", job)
        daemons("worker", nsq)
        code, _, outcome = waiting.result(30)
    assert code == 200 and outcome["status"] == "succeeded" and outcome["result"] == 25
    status_of(gateway, "w1", "succeeded")

    # The result came before the wait began: answered from the ledger at once.
    started = time.monotonic()
    code, _, record = http("POST", f"{gateway.url}/v1/jobs?wait=20", job)
    assert code == 200 and record["status"] == "succeeded" and record["result"] == 25
    assert time.monotonic() - started < 5
    assert nsq.message_count(DEFAULT_QUEUE) == 1


def test_a_replica_that_never_sees_the_result_answers_its_wait_from_the_ledger(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    # Two gateways on one ledger; the second reads results from another nsqd, so no result
    # message ever reaches its waiters: only the ledger, written by the first, can answer.
    # The other nsqd starts first, over a second before the job is sent: the second gateway's
    # relay must see no restart evidence that covers the job (nothing re-driven there).
    path = tmp_path / "ledger.sqlite3"
    with nsq_pair() as elsewhere:
        started_s = nsqd_start_time(elsewhere)
        wait_for(lambda: time.time() >= started_s + 1.05, 5, "a second past the nsqd's start")
        first = ledger_gateway(daemons, nsq, path)
        job = {"id": "r1", "task": "debug.sleep", "args": {"seconds": 1.5}}
        assert http("POST", f"{first.url}/v1/jobs", job)[0] == 202
        second = ledger_gateway(daemons, elsewhere, path)
        daemons("worker", nsq)
        started = time.monotonic()
        code, _, outcome = http("POST", f"{second.url}/v1/jobs?wait=20", job)
        assert code == 200 and outcome["status"] == "succeeded", outcome
        assert outcome["result"] == {"slept": 1.5} and time.monotonic() - started < 15
        assert elsewhere.message_count(DEFAULT_QUEUE) == 0
    assert nsq.message_count(DEFAULT_QUEUE) == 1


def test_a_cancel_ends_a_wait_through_the_ledger(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    # A cancelled job has no result message: only the ledger can answer its waiters.
    gateway = ledger_gateway(daemons, nsq, tmp_path / "ledger.sqlite3")
    job = {"id": "w2", "task": "noop"}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(http, "POST", f"{gateway.url}/v1/jobs?wait=30", job)
        wait_for(lambda: get(gateway, "/v1/jobs/w2")[0] == 200, 10, "w2 recorded")
        assert http("DELETE", f"{gateway.url}/v1/jobs/w2")[0] == 200
        code, _, outcome = waiting.result(10)
    assert code == 200 and outcome["status"] == "cancelled" and outcome["id"] == "w2"


def test_a_ledger_that_cannot_write_is_a_503(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "ledger.sqlite3"
    gateway = ledger_gateway(daemons, nsq, path)
    assert http("POST", f"{gateway.url}/v1/jobs", {"id": "x", "task": "noop"})[0] == 202
    # Another process holds the write lock past the ledger's busy timeout (5 s).
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        requests = [
            ("POST", "/v1/jobs", {"id": "y", "task": "noop"}),
            ("DELETE", "/v1/jobs/x", None),
            ("GET", "/v1/jobs", None),
            ("POST", "/v1/dead-letters/replay", None),
        ]
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            answers = list(
                pool.map(lambda r: http(r[0], gateway.url + r[1], r[2], timeout=30), requests)
            )
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    for answer in answers:
        body = problem(answer, 503, "ledger-unavailable")
        assert answer[1]["Retry-After"] and "ledger" in body["detail"]
    # Nothing of it was recorded or published; the ledger works again once the lock is gone.
    problem(get(gateway, "/v1/jobs/y"), 404, "unknown-job")
    assert get(gateway, "/v1/jobs/x")[2]["status"] == "queued"
    assert nsq.message_count(DEFAULT_QUEUE) == 1


def test_without_a_ledger_its_routes_are_absent(nsq: Nsq, daemons: Callable[..., Daemon]) -> None:
    gateway = daemons("gateway", nsq)
    for method, path in [
        ("GET", "/v1/dead-letters"),
        ("DELETE", "/v1/dead-letters"),
        ("POST", "/v1/dead-letters/replay"),
        ("POST", "/v1/dead-letters/x/replay"),
        ("DELETE", "/v1/dead-letters/x"),
        ("DELETE", "/v1/jobs/x"),
        ("GET", "/v1/jobs/x"),
    ]:
        problem(http(method, gateway.url + path), 404, "not-found")
    # /v1/jobs exists (for POST): listing it needs the ledger.
    code, headers, _ = get(gateway, "/v1/jobs")
    assert code == 405 and headers["Allow"] == "POST"
    assert http("POST", f"{gateway.url}/v1/jobs?wait=0.1", {"task": "noop"})[0] == 202


def test_a_cancel_through_the_gateway_makes_the_worker_skip_the_job(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    # One slot, busy: the cancelled job is not delivered before the cancel has reached the
    # worker, which then skips it (counted) instead of running it.
    gateway = ledger_gateway(daemons, nsq, tmp_path / "ledger.sqlite3")
    worker = daemons("worker", nsq, NSQJOBS_CONCURRENCY="1")
    busy = {"id": "busy", "task": "debug.sleep", "args": {"seconds": 1.5}}
    assert http("POST", f"{gateway.url}/v1/jobs", busy)[0] == 202
    status_of(gateway, "busy", "queued")
    wait_for(
        lambda: worker.metric("nsqjobs_jobs_received_total", task="debug.sleep") >= 1,
        20,
        "the worker to be busy",
    )
    assert http("POST", f"{gateway.url}/v1/jobs", {"id": "c2", "task": "noop"})[0] == 202
    assert http("DELETE", f"{gateway.url}/v1/jobs/c2")[0] == 200
    status_of(gateway, "busy", "succeeded")
    wait_for(
        lambda: worker.metric("nsqjobs_worker_jobs_cancelled_total", task="noop") == 1,
        20,
        "the worker to skip the cancelled job",
    )
    assert worker.metric("nsqjobs_jobs_succeeded_total", task="noop") == 0
    assert get(gateway, "/v1/jobs/c2")[2]["status"] == "cancelled"
