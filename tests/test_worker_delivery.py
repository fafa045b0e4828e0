"""Adaptive delivery against real nsqd: eager (RDY = in flight + 1) while the worker keeps up,
batched under a backlog, and back, with no job lost or run twice across the switches.

nsqd flushes a connection's batch when its RDY is used up, or at the buffer timeout; these tests
ask for the longest timeout nsqd takes (1 s), so a lone delivery that waited for it would show.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

import pytest
from nsqjobs import wire
from nsqjobs.testing import Daemon, Nsq, Tail, http, wait_for

pytestmark = pytest.mark.integration

SWITCHES = "nsqjobs_worker_delivery_switches_total"


def envelope(job_id: str, task: str = "noop", args: dict[str, Any] | None = None) -> bytes:
    return wire.encode(
        wire.JobEnvelope(id=job_id, task=task, args=args or {}, created_at=wire.now())
    )


def publish(nsq: Nsq, body: bytes) -> None:
    status, _, answer = http("POST", f"http://{nsq.nsqd_http}/pub?topic=jobs", raw=body)
    assert status == 200, answer


def ready_counts(nsq: Nsq) -> list[int]:
    channel = nsq.channel("jobs", "workers")
    return [int(c["ready_count"]) for c in (channel or {}).get("clients") or []]


def drained(nsq: Nsq) -> bool:
    ch = nsq.channel("jobs", "workers") or {}
    return (ch.get("depth"), ch.get("in_flight_count"), ch.get("deferred_count")) == (0, 0, 0)


@pytest.mark.parametrize(("delivery", "ready"), [("adaptive", 1), ("batched", 8)])
def test_an_idle_connection_is_eager_only_with_adaptive_delivery(
    nsq: Nsq, daemons: Callable[..., Daemon], delivery: str, ready: int
) -> None:
    daemons(
        "worker",
        nsq,
        NSQJOBS_CONCURRENCY="8",
        NSQJOBS_DELIVERY=delivery,
        NSQJOBS_DELIVERY_BUFFER_MS="1000",
    )
    # Eager: one message of room although 8 slots are free, so nsqd flushes each at once.
    wait_for(lambda: ready_counts(nsq) == [ready], 15, f"RDY {ready} for 8 idle slots")


def test_lone_jobs_are_not_held_for_nsqds_buffer_timeout(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("results", "test")
    results = tails(nsq, "results", "test")
    daemons("worker", nsq, NSQJOBS_CONCURRENCY="8", NSQJOBS_DELIVERY_BUFFER_MS="1000")
    wait_for(lambda: ready_counts(nsq) == [1], 15, "an eager connection")
    took = []
    for i in range(6):
        started = time.monotonic()
        publish(nsq, envelope(f"lone-{i}"))
        (raw,) = results.collect(1, timeout=10)
        took.append(time.monotonic() - started)
        assert wire.decode_result(raw).id == f"lone-{i}"
    # Batched, each job after the first would wait for nsqd's next 1 s flush tick (0.5 s on
    # average); eager, each goes out at once. The bound is generous for a loaded machine.
    assert sorted(took)[len(took) // 2] < 0.25, took


def test_a_backlog_turns_the_connection_batched_and_idle_turns_it_back_losing_no_job(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("results", "test")
    nsq.create_channel("jobs", "workers")
    results = tails(nsq, "results", "test")
    worker = daemons("worker", nsq, NSQJOBS_CONCURRENCY="16")
    wait_for(lambda: ready_counts(nsq) == [1], 15, "an eager connection")
    sent: list[str] = []
    batched = 0.0
    for burst in range(3):
        # Jobs of 2 ms with 16 slots: many overlap, so the connection is never idle for long.
        ids = [f"b{burst}-{i}" for i in range(600)]
        sent += ids
        nsq.mpub("jobs", [envelope(i, "debug.sleep", {"seconds": 0.002}) for i in ids])
        wait_for(lambda: drained(nsq), 60, f"burst {burst} drained")
        # The burst turned the connection batched (maybe more than once: a lull mid-burst
        # turns it eager), and every batched spell ended once the worker was idle.
        now = worker.metric(SWITCHES, mode="batched")
        assert now > batched, f"burst {burst}: never batched"
        batched = now

        def eager_again(spells: float = now) -> bool:
            return worker.metric(SWITCHES, mode="eager") == spells

        wait_for(eager_again, 15, f"back to eager after burst {burst}")
        wait_for(lambda: ready_counts(nsq) == [1], 15, "RDY 1 again")
    # Results are published before FIN: drained means every one is in the results topic.
    assert nsq.message_count("results") == len(sent)
    got = collections.Counter(
        wire.decode_result(raw).id for raw in results.collect(len(sent), timeout=30)
    )
    assert got == collections.Counter(sent)
