"""End to end through real nsqd/nsqlookupd: HTTP -> gateway -> nsqd -> workers -> results."""

from __future__ import annotations

import http.client as httpclient
import json
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from nsqjobs import wire
from nsqjobs.testing import Daemon, Nsq, Tail, http, wait_for
from nsqjobs_tasks.kernels.primes_py import count_primes

pytestmark = pytest.mark.integration


def post_many(base_url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """POST each body to /v1/jobs over one keep-alive connection; returns the 202 answers."""
    host, _, port = base_url.removeprefix("http://").partition(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=30)
    answers = []
    try:
        for body in bodies:
            conn.request("POST", "/v1/jobs", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = json.loads(resp.read())
            assert resp.status == 202, payload
            answers.append(payload)
    finally:
        conn.close()
    return answers


def test_thousand_prime_jobs_through_two_workers(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("results", "test")
    results = tails(nsq, "results", "test")
    gateway = daemons("gateway", nsq)
    workers = [daemons("worker", nsq, NSQJOBS_LOG_LEVEL="WARNING") for _ in range(2)]
    rng = random.Random(2)
    ranges = []
    for i in range(1000):
        start = rng.randrange(0, 10**6) if i % 10 else rng.randrange(0, 10**12 - 10**4)
        ranges.append((start, start + rng.randrange(0, 5000)))
    answers = post_many(
        gateway.url, [{"task": "primes.count", "args": {"start": a, "stop": b}} for a, b in ranges]
    )
    expected = {ans["id"]: count_primes(a, b) for ans, (a, b) in zip(answers, ranges, strict=True)}
    assert len(expected) == 1000

    bodies = results.collect(1000, timeout=120)
    assert len(bodies) == 1000
    got = [wire.decode_result(b) for b in bodies]
    per_id = Counter(r.id for r in got)
    assert set(per_id) == set(expected)
    assert max(per_id.values()) == 1  # exactly one result per job
    assert all(r.status == "succeeded" for r in got)
    assert {r.id: r.result for r in got} == expected
    assert len({r.worker for r in got}) == 2  # both workers took part

    # No stray extra result, proven by nsqd's counts rather than a quiet wait: a worker FINs a
    # job only after nsqd confirmed its result, so once the jobs channel is empty with nothing
    # requeued or timed out, every result that will ever exist is on the results topic.
    def drained() -> dict[str, Any] | None:
        ch = nsq.channel("jobs", "workers")
        busy = ch is None or ch["depth"] + ch["in_flight_count"] + ch["deferred_count"]
        return None if busy else ch

    jobs = wait_for(drained, 30, "the jobs channel to drain")
    assert (jobs["message_count"], jobs["requeue_count"], jobs["timeout_count"]) == (1000, 0, 0)
    assert nsq.message_count("results") == 1000
    total = sum(w.metric("nsqjobs_jobs_succeeded_total", task="primes.count") for w in workers)
    assert total == 1000
    assert gateway.metric("nsqjobs_jobs_accepted_total", task="primes.count") == 1000


def test_wait_returns_the_result(nsq: Nsq, daemons: Callable[..., Daemon]) -> None:
    gateway = daemons("gateway", nsq)
    daemons("worker", nsq)
    status, headers, body = http(
        "POST",
        gateway.url + "/v1/jobs?wait=10",
        {"task": "primes.count", "args": {"start": 0, "stop": 100}, "id": "w1"},
    )
    assert status == 200, body
    assert headers["Content-Type"] == "application/json" and headers["Date"].endswith(" GMT")
    assert body["id"] == "w1" and body["status"] == "succeeded" and body["result"] == 25
    assert body["attempts"] == 1 and body["duration_s"] >= 0


def test_wait_answers_202_when_the_task_outlives_it(
    nsq: Nsq, daemons: Callable[..., Daemon]
) -> None:
    gateway = daemons("gateway", nsq)
    daemons("worker", nsq)
    status, _, body = http(
        "POST", gateway.url + "/v1/jobs?wait=0.5", {"task": "debug.sleep", "args": {"seconds": 3}}
    )
    assert status == 202, body
    assert body["status"] == "queued" and body["task"] == "debug.sleep"


def test_batch_of_thousand(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("results", "test")
    results = tails(nsq, "results", "test")
    gateway = daemons("gateway", nsq)
    jobs = [{"task": "noop", "args": {"i": i}} for i in range(1000)]
    jobs[7]["id"] = "client-chosen-7"
    status, _, body = http("POST", gateway.url + "/v1/jobs/batch", {"jobs": jobs})
    assert status == 202, body
    assert len(body["ids"]) == 1000 and body["ids"][7] == "client-chosen-7"
    assert nsq.message_count("jobs") == 1000
    daemons("worker", nsq, NSQJOBS_CONCURRENCY="8", NSQJOBS_LOG_LEVEL="WARNING")
    got = {r.id: r.result for r in map(wire.decode_result, results.collect(1000, timeout=60))}
    assert got == {id_: {"i": i} for i, id_ in enumerate(body["ids"])}


def test_batch_with_one_invalid_job_publishes_nothing(
    nsq: Nsq, daemons: Callable[..., Daemon]
) -> None:
    gateway = daemons("gateway", nsq)
    jobs: list[dict[str, Any]] = [
        {"task": "primes.count", "args": {"start": 0, "stop": 10}} for _ in range(999)
    ]
    jobs.insert(500, {"task": "primes.count", "args": {"start": 0, "stop": -1}})
    status, headers, body = http("POST", gateway.url + "/v1/jobs/batch", {"jobs": jobs})
    assert status == 422, body
    assert headers["Content-Type"] == "application/problem+json"
    assert [e["field"] for e in body["errors"]] == ["jobs[500].args.stop"]
    assert nsq.message_count("jobs") == 0
    # An unknown task in a batch is a field error of that job, and still nothing is published.
    jobs[500] = {"task": "no.such", "args": {}}
    status, _, body = http("POST", gateway.url + "/v1/jobs/batch", {"jobs": jobs})
    assert status == 422 and body["errors"][0]["field"] == "jobs[500].task"
    assert nsq.message_count("jobs") == 0


def test_delayed_job_is_delivered_later(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("results", "test")
    results = tails(nsq, "results", "test")
    gateway = daemons("gateway", nsq)
    daemons("worker", nsq)
    status, _, body = http(
        "POST", gateway.url + "/v1/jobs", {"task": "noop", "args": {}, "delay_ms": 1500}
    )
    assert status == 202
    submitted = wire.now()
    (raw,) = results.collect(1, timeout=20)
    result = wire.decode_result(raw)
    assert result.id == body["id"]
    assert result.started_at - submitted >= 1.0
    channel = wait_for(lambda: nsq.channel("jobs", "workers"), 5, "workers channel")
    assert channel["deferred_count"] == 0


def test_messages_of_every_size_cross_reads_intact(
    nsq: Nsq, daemons: Callable[..., Daemon]
) -> None:
    # Connections read up to 256 KiB at a time and split frames themselves: bodies from a few
    # bytes to ~900 KB (nsqd's limit is 1 MiB) must come through whole, in jobs and results.
    gw = daemons("gateway", nsq, NSQJOBS_MAX_BODY_BYTES=str(1024 * 1024))
    daemons("worker", nsq, NSQJOBS_CONCURRENCY="4")
    rng = random.Random(7)
    for size in (0, 1, 250, 65_535, 262_140, 262_150, 700_000, 900_000):
        text = "".join(rng.choice("abcdefgh") for _ in range(size))
        status, _, body = http(
            "POST", gw.url + "/v1/jobs?wait=30", {"task": "noop", "args": {"text": text}}
        )
        assert status == 200, (size, status)
        assert body["status"] == "succeeded" and body["result"] == {"text": text}, size
