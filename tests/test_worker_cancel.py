"""Cancelling jobs: the bounded set of cancelled ids, the state machine's answers, and real
workers reading the cancels topic (a queued job skipped, a running child killed, a running
thread left to finish)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nsqjobs import wire
from nsqjobs.errors import DecodeError
from nsqjobs.names import CANCEL_TOPIC, RESULTS_TOPIC, STARTED_TOPIC
from nsqjobs.observability.metrics import WorkerMetrics
from nsqjobs.observability.worker_hooks import MetricsHook
from nsqjobs.registry import Registry, task
from nsqjobs.testing import Daemon, Nsq, Tail, http, wait_for
from nsqjobs.worker.cancels import CancelledIds
from nsqjobs.worker.daemon import cancel_channel
from nsqjobs.worker.hooks import WorkerHook
from nsqjobs.worker.jobs import Machine
from nsqjobs.worker.state import held_key
from prometheus_client import CollectorRegistry

from tests.test_hooks import FakeMessage, FakePublisher, Recorder, deliver, job, run_machine

CANCELLED = "nsqjobs_worker_jobs_cancelled_total"

# -- the bounded set ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_cancelled_ids_are_bounded_in_number_oldest_first() -> None:
    ids = CancelledIds(max_ids=3, ttl_s=100, clock=Clock())
    assert "a" not in ids and not ids
    for name in "abcd":
        assert ids.add(name)
    assert len(ids) == 3 and "a" not in ids and all(n in ids for n in "bcd")
    assert not ids.add("b")  # known: refreshed, so "c" is now the oldest
    ids.add("e")
    assert "c" not in ids and all(n in ids for n in "bde")


def test_cancelled_ids_expire_by_age() -> None:
    clock = Clock()
    ids = CancelledIds(max_ids=100, ttl_s=10, clock=clock)
    ids.add("old")
    clock.now = 5
    ids.add("newer")
    clock.now = 12
    assert "old" not in ids and len(ids) == 1  # expired on lookup, and forgotten
    assert "newer" in ids
    clock.now = 16
    ids.add("x")  # adding drops what has expired, looked up or not
    assert len(ids) == 1 and "x" in ids


def test_a_hundred_thousand_ids_stay_a_hundred_thousand() -> None:
    ids = CancelledIds()
    for i in range(100_050):
        ids.add(f"{i:032x}")
    assert len(ids) == 100_000 and f"{0:032x}" not in ids and f"{100_049:032x}" in ids


def test_cancel_channel_is_ephemeral_valid_and_unique_per_process() -> None:
    one, two = cancel_channel("host.example:123"), cancel_channel("host.example:123")
    assert one != two and one.endswith("#ephemeral") and len(one) <= 64
    assert "." not in one and ":" not in one
    assert len(cancel_channel("x" * 200)) <= 64


# -- the state machine, with fakes --------------------------------------------------------------

SLOW = Registry()


@task("t.slow", target=SLOW)
def slow(args: dict[str, Any]) -> dict[str, Any]:
    time.sleep(float(args.get("s", 0.3)))
    return args


@task("t.tracked", track_started=True, target=SLOW)
def tracked(args: dict[str, Any]) -> dict[str, Any]:
    return args


def cancel_message(job_id: str, msg_id: bytes = b"c" * 16) -> FakeMessage:
    return FakeMessage(wire.encode(wire.Cancel(id=job_id, at=wire.now())), msg_id=msg_id)


def test_a_cancelled_job_that_arrives_is_finished_without_running() -> None:
    registry = CollectorRegistry()
    rec = Recorder()
    message = FakeMessage(job("t.slow", "gone"))
    other = FakeMessage(job("t.slow", "kept", s=0), msg_id=b"1" * 16)

    async def scenario(machine: Machine, pub: FakePublisher) -> None:
        machine.tasks = SLOW
        assert machine.on_cancel(cancel_message("gone")) is True
        await deliver(machine, message)
        await deliver(machine, other)

    hooks: list[WorkerHook] = [MetricsHook(WorkerMetrics(registry)), rec]
    pub = run_machine(hooks, scenario)
    assert message.answers == [("FIN", 0)]
    assert rec.events[:2] == [("received", "t.slow", "gone", 1), ("cancelled", "t.slow", False)]
    ((topic, _, body),) = pub.sent  # the other job's result only
    assert topic == RESULTS_TOPIC and wire.decode_result(body).id == "kept"
    assert registry.get_sample_value(CANCELLED, {"task": "t.slow"}) == 1
    assert registry.get_sample_value("nsqjobs_jobs_in_progress", {"task": "t.slow"}) == 0


def test_a_job_waiting_for_a_slot_is_skipped_and_a_running_thread_runs_on() -> None:
    rec = Recorder()
    first = FakeMessage(job("t.slow", "a", s=0.3), msg_id=b"1" * 16)
    second = FakeMessage(job("t.slow", "b", s=0.3), msg_id=b"2" * 16)
    third = FakeMessage(job("t.slow", "c", s=0.3), msg_id=b"3" * 16)

    async def scenario(machine: Machine, pub: FakePublisher) -> None:
        machine.tasks = SLOW
        for message in (first, second, third):  # two slots: the third waits
            machine.on_message(message)
        machine.on_cancel(cancel_message("c"))
        assert third.answers == [("FIN", 0)] and held_key(third) not in machine.held
        machine.on_cancel(cancel_message("a", msg_id=b"d" * 16))  # runs in a thread
        deadline = time.monotonic() + 10
        while machine.held:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    pub = run_machine([rec], scenario)
    done = sorted(wire.decode_result(b).id for t, _, b in pub.sent if t == RESULTS_TOPIC)
    assert done == ["a", "b"]
    assert ("cancelled", "t.slow", False) in rec.events
    assert [e[0] for e in rec.events].count("cancelled") == 1


def test_tracked_tasks_announce_their_start_and_results_carry_the_history() -> None:
    earlier = wire.Attempt(
        attempt=1,
        worker="w0",
        started_at=1.0,
        finished_at=2.0,
        error=wire.ErrorInfo(type="Boom", message="first try"),
    )
    env = wire.JobEnvelope(
        id="t1", task="t.tracked", args={}, created_at=wire.now(), attempts=1, history=(earlier,)
    )
    message = FakeMessage(wire.encode(env))
    plain = FakeMessage(job("t.slow", "p", s=0), msg_id=b"1" * 16)

    async def scenario(machine: Machine, pub: FakePublisher) -> None:
        machine.tasks = SLOW
        await deliver(machine, message)
        await deliver(machine, plain)

    pub = run_machine([], scenario)
    topics = [t for t, _, _ in pub.sent]
    assert topics == [STARTED_TOPIC, RESULTS_TOPIC, RESULTS_TOPIC]  # none for the plain task
    (started,) = wire.decode_started(pub.sent[0][2])
    assert (started.id, started.worker) == ("t1", "test-worker") and started.at > 0
    result = wire.decode_result(pub.sent[1][2])
    assert (result.attempts, result.history) == (2, (earlier,))
    assert wire.decode_result(pub.sent[2][2]).history == ()


def test_the_starts_of_one_loop_turn_travel_as_one_message() -> None:
    messages = [FakeMessage(job("t.tracked", f"b{i}"), msg_id=b"%016d" % i) for i in range(5)]

    async def scenario(machine: Machine, pub: FakePublisher) -> None:
        machine.tasks = SLOW
        machine.capacity = 5
        for message in messages:  # one turn: five deliveries
            machine.on_message(message)
        deadline = time.monotonic() + 10
        while machine.held:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)

    pub = run_machine([], scenario, executor_size=5)
    events = [wire.decode_started(b) for t, _, b in pub.sent if t == STARTED_TOPIC]
    assert len(events) == 1 and [e.id for e in events[0]] == [f"b{i}" for i in range(5)]
    # One event on its own (another producer's) decodes as a list of one.
    single = wire.encode(wire.Started(id="x", worker="w", at=1.0))
    assert wire.decode_started(single) == [wire.Started(id="x", worker="w", at=1.0)]
    with pytest.raises(DecodeError):
        wire.decode_started(b'[{"v":2,"id":"x","worker":"w","at":1.0}]')


def test_old_results_without_history_still_decode() -> None:
    old = (
        b'{"v":1,"id":"x","task":"noop","status":"succeeded","result":1,"attempts":1,'
        b'"worker":"w","started_at":1.0,"finished_at":2.0,"duration_s":1.0}'
    )
    assert wire.decode_result(old).history == ()


# -- real nsqd and workers ----------------------------------------------------------------------


def publish(nsq: Nsq, topic: str, body: bytes) -> None:
    status, _, answer = http("POST", nsq.url("/pub", topic=topic), raw=body)
    assert status == 200, answer


def cancel(nsq: Nsq, job_id: str) -> None:
    publish(nsq, CANCEL_TOPIC, wire.encode(wire.Cancel(id=job_id, at=wire.now())))


def put_job(nsq: Nsq, job_id: str, task_name: str, args: dict[str, Any]) -> None:
    env = wire.JobEnvelope(id=job_id, task=task_name, args=args, created_at=wire.now())
    publish(nsq, "jobs", wire.encode(env))


def subscribed(nsq: Nsq) -> Callable[[], bool]:
    """The worker's ephemeral channel exists on the cancels topic (a cancel reaches it)."""

    def check() -> bool:
        topic = nsq.topic(CANCEL_TOPIC)
        return bool(
            topic and any(c["channel_name"].endswith("#ephemeral") for c in topic["channels"])
        )

    return check


def read_all(nsq: Nsq, topic: str, channel: str, n: int) -> Callable[[], bool]:
    """``n`` messages went through the channel, and none is left there or in flight."""

    def check() -> bool:
        c = nsq.channel(topic, channel)
        return c is not None and (c["message_count"], c["depth"], c["in_flight_count"]) == (n, 0, 0)

    return check


def running(worker: Daemon, task_name: str) -> Callable[[], bool]:
    return lambda: worker.metric("nsqjobs_jobs_in_progress", task=task_name) == 1


def held_none(nsq: Nsq) -> Callable[[], bool]:
    def check() -> bool:
        c = nsq.channel("jobs", "workers")
        return c is not None and (c["depth"], c["in_flight_count"], c["deferred_count"]) == (
            0,
            0,
            0,
        )

    return check


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_cancelled_queued_job_is_skipped(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel(RESULTS_TOPIC, "test")
    results = tails(nsq, RESULTS_TOPIC, "test")
    worker = daemons("worker", nsq)
    wait_for(subscribed(nsq), 10, "the worker's cancels channel")
    cancel(nsq, "doomed")
    # The cancel is on its way before the job; the worker reads the two topics independently.
    wait_for(read_all(nsq, CANCEL_TOPIC, _channel(nsq), 1), 10, "the worker to read the cancel")
    put_job(nsq, "doomed", "debug.sleep", {"seconds": 0})
    put_job(nsq, "fine", "debug.sleep", {"seconds": 0})
    got = [wire.decode_result(b) for b in results.collect(2, timeout=10)]
    assert [r.id for r in got] == ["fine"]
    wait_for(held_none(nsq), 10, "both jobs FINed")
    assert worker.metric(CANCELLED, task="debug.sleep") == 1
    assert worker.metric("nsqjobs_jobs_succeeded_total", task="debug.sleep") == 1
    assert re.search(r"job doomed debug\.sleep +cancelled on arrival", worker.log())


def _channel(nsq: Nsq) -> str:
    topic = nsq.topic(CANCEL_TOPIC) or {"channels": []}
    (name,) = [c["channel_name"] for c in topic["channels"]]
    return str(name)


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task_dir in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.update(int(p) for p in (task_dir / "children").read_text().split())
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_cancelling_a_running_job_kills_its_child_process(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel(RESULTS_TOPIC, "test")
    results = tails(nsq, RESULTS_TOPIC, "test")
    worker = daemons("worker", nsq, NSQJOBS_EXECUTOR="process", NSQJOBS_CONCURRENCY="1")
    wait_for(subscribed(nsq), 10, "the worker's cancels channel")
    before = _children(worker.proc.pid)
    put_job(nsq, "long", "debug.sleep", {"seconds": 60})
    wait_for(running(worker, "debug.sleep"), 20, "the job to run")
    started = time.monotonic()
    cancel(nsq, "long")
    wait_for(held_none(nsq), 10, "the cancelled job FINed")
    took = time.monotonic() - started
    assert took < 5, took
    assert worker.metric(CANCELLED, task="debug.sleep") == 1
    assert worker.metric("nsqjobs_jobs_in_progress", task="debug.sleep") == 0
    assert worker.metric("nsqjobs_jobs_retried_total", task="debug.sleep") == 0
    # Its child was killed (and replaced: the worker runs the next job).
    wait_for(lambda: any(not _alive(p) for p in before), 5, "the job's child to be gone")
    put_job(nsq, "next", "debug.sleep", {"seconds": 0})
    got = [wire.decode_result(b) for b in results.collect(1, timeout=30)]
    assert [(r.id, r.status) for r in got] == [("next", "succeeded")]
    assert results.collect(1, timeout=0.5) == []  # and none for the cancelled job
    assert nsq.message_count(RESULTS_TOPIC) == 1
    assert worker.proc.poll() is None


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_running_job_in_a_thread_runs_to_its_end(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel(RESULTS_TOPIC, "test")
    results = tails(nsq, RESULTS_TOPIC, "test")
    worker = daemons("worker", nsq)
    wait_for(subscribed(nsq), 10, "the worker's cancels channel")
    put_job(nsq, "busy", "debug.sleep", {"seconds": 1.5})
    wait_for(running(worker, "debug.sleep"), 20, "the job to run")
    cancel(nsq, "busy")
    wait_for(lambda: "cancelled while running in a thread" in worker.log(), 10, "the log line")
    (raw,) = results.collect(1, timeout=20)
    result = wire.decode_result(raw)
    # A thread cannot be stopped: the result goes out (the ledger, which says cancelled,
    # ignores it), and the job counts as succeeded here, not as cancelled.
    assert (result.id, result.status, result.result) == ("busy", "succeeded", {"slept": 1.5})
    assert worker.metric(CANCELLED, task="debug.sleep") == 0
    assert worker.proc.poll() is None


def test_a_redelivered_copy_of_a_running_message_is_held_on_its_own() -> None:
    # nsqd delivers a message again with the same id (the first copy's connection closed, and
    # the copy timed out) while the first copy still runs here. Each copy is held, counted
    # against the slots and answered on its own: the first to end must not drop the other.
    first = FakeMessage(job("t.slow", "same", s=0.2), msg_id=b"7" * 16)
    again = FakeMessage(job("t.slow", "same", s=0.6), msg_id=b"7" * 16)

    async def scenario(machine: Machine, pub: FakePublisher) -> None:
        machine.tasks = SLOW
        machine.on_message(first)
        machine.on_message(again)
        assert machine.used() == 2 and len(machine.held) == 2
        deadline = time.monotonic() + 10
        while not first.answers:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        # The second copy is still running: still held, still taking its slot.
        assert machine.used() == 1 and held_key(again) in machine.held
        while not again.answers:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        assert machine.used() == 0 and not machine.held

    run_machine([], scenario)
    assert first.answers == [("FIN", 0)] and again.answers == [("FIN", 0)]
