"""Worker hooks: the transitions each ending reports, in order, and a failing hook contained.

The state machine runs for real (thread executor, policy, settling coroutines); only the pynsq
message and the publisher are fakes, so every transition is checked without timing games.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
from nsqjobs import wire
from nsqjobs.config import WorkerConfig
from nsqjobs.errors import NsqjobsError, PublishRejected, Retry
from nsqjobs.names import DEAD_LETTER_TOPIC, RESULTS_TOPIC
from nsqjobs.observability.metrics import WorkerMetrics
from nsqjobs.observability.worker_hooks import MetricsHook
from nsqjobs.registry import Registry, task
from nsqjobs.worker.executors import ThreadExecutor
from nsqjobs.worker.hooks import Hooks, JobView, RequeueReason, WorkerHook
from nsqjobs.worker.jobs import Machine
from nsqjobs.worker.state import held_key
from prometheus_client import CollectorRegistry

CONFIG = WorkerConfig(backoff_base_s=0.01, backoff_cap_s=0.02, worker_id="test-worker")


class Permanent(NsqjobsError):
    """Declared by ``t.throws``."""


TASKS = Registry()


@task("t.ok", target=TASKS)
def ok(args: dict[str, Any]) -> dict[str, Any]:
    return args


@task("t.retry", max_attempts=2, target=TASKS)
def retry(args: dict[str, Any]) -> None:
    raise Retry("again", delay=0.05)


@task("t.throws", throws=(Permanent,), target=TASKS)
def throws(args: dict[str, Any]) -> None:
    raise Permanent("for good")


class FakeMessage:
    """A pynsq message: records how it was answered."""

    def __init__(self, body: bytes, attempts: int = 1, msg_id: bytes = b"0" * 16) -> None:
        self.id, self.body, self.attempts = msg_id, body, attempts
        self.answers: list[tuple[str, int]] = []
        self.touched = 0

    def enable_async(self) -> None:
        pass

    def finish(self) -> None:
        self.answers.append(("FIN", 0))

    def requeue(self, *, backoff: bool = True, time_ms: int = -1) -> None:
        self.answers.append(("REQ", time_ms))

    def touch(self) -> None:
        self.touched += 1

    def has_responded(self) -> bool:
        return bool(self.answers)


class FakePublisher:
    """Acknowledges every publish (or refuses the results topic), keeping what was sent."""

    def __init__(self, refuse_results: bool = False) -> None:
        self.sent: list[tuple[str, int, bytes]] = []  # topic, delay_ms, body
        self.refuse_results = refuse_results

    def enqueue(self, topic: str, body: bytes) -> asyncio.Future[None]:
        self.sent.append((topic, 0, body))
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.refuse_results and topic == RESULTS_TOPIC:
            fut.set_exception(PublishRejected(f"pub {topic}: E_BAD_MESSAGE"))
        else:
            fut.set_result(None)
        return fut

    async def pub(self, topic: str, body: bytes) -> None:
        self.sent.append((topic, 0, body))

    async def dpub(self, topic: str, delay_ms: int, body: bytes) -> None:
        self.sent.append((topic, delay_ms, body))

    async def wait_connected(self, timeout_s: float) -> bool:
        return True


Event = tuple[Any, ...]


class Recorder:
    """A hook that writes down every transition with what it was given."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def for_task(self, task: str) -> Recorder:
        return self

    def received(self, job: JobView) -> None:
        self.events.append(("received", job.task_name, job.job_id, job.attempt))

    def started(self, job: JobView) -> None:
        self.events.append(("started", job.task_name, job.attempt, job.max_attempts))

    def succeeded(self, job: JobView, duration_s: float, result_bytes: int) -> None:
        assert duration_s >= 0 and job.in_progress
        self.events.append(("succeeded", job.task_name, result_bytes))

    def attempt_failed(self, job: JobView, error: wire.ErrorInfo, duration_s: float) -> None:
        assert duration_s >= 0
        self.events.append(("attempt_failed", job.task_name, job.attempt, error.type))

    def retried(self, job: JobView, delay_s: float) -> None:
        self.events.append(("retried", job.task_name, delay_s))

    def dead_lettered(
        self, job: JobView, reason: wire.DeadLetterReason, error: wire.ErrorInfo
    ) -> None:
        self.events.append(("dead_lettered", job.task_name, reason, error.type))

    def requeued(self, job: JobView, why: RequeueReason, delay_s: float) -> None:
        self.events.append(("requeued", job.task_name, why))

    def cancelled(self, job: JobView) -> None:
        self.events.append(("cancelled", job.task_name, job.in_progress))


class Broken:
    """A hook whose every transition raises."""

    def for_task(self, task: str) -> Broken:
        return self

    def _boom(self, *args: object) -> None:
        raise RuntimeError("hook bug")

    received = started = succeeded = attempt_failed = retried = dead_lettered = requeued = _boom
    cancelled = _boom


def run_machine(
    hooks: list[WorkerHook],
    scenario: Callable[[Machine, FakePublisher], Awaitable[None]],
    publisher: FakePublisher | None = None,
    executor_size: int = 2,
) -> FakePublisher:
    """Build a machine over a thread executor and run ``scenario`` on a fresh loop."""
    pub = publisher or FakePublisher()
    executor = ThreadExecutor(executor_size)
    machine = Machine(CONFIG, "test-worker", TASKS, executor, pub, Hooks(hooks))
    machine.accepting = True

    async def main() -> None:
        async with asyncio.timeout(20):
            await scenario(machine, pub)

    try:
        asyncio.run(main())
    finally:
        executor.shutdown()
    return pub


async def deliver(machine: Machine, message: FakeMessage) -> None:
    """Hand ``message`` to the machine and wait until it answered nsqd and let go of it."""
    machine.on_message(message)
    deadline = time.monotonic() + 10
    while not message.answers or held_key(message) in machine.held:
        assert time.monotonic() < deadline, "the message was never answered"
        await asyncio.sleep(0.005)


def job(task: str, job_id: str = "j1", **args: Any) -> bytes:
    return wire.encode(wire.JobEnvelope(id=job_id, task=task, args=args, created_at=wire.now()))


def test_success_reports_received_started_succeeded() -> None:
    rec = Recorder()
    message = FakeMessage(job("t.ok", n=1))

    async def scenario(machine: Machine, pub: FakePublisher) -> None:
        await deliver(machine, message)

    pub = run_machine([rec], scenario)
    ((topic, _, body),) = pub.sent
    assert topic == RESULTS_TOPIC and wire.decode_result(body).result == {"n": 1}
    assert rec.events == [
        ("received", "t.ok", "j1", 1),
        ("started", "t.ok", 1, 5),
        ("succeeded", "t.ok", len(body)),
    ]
    assert message.answers == [("FIN", 0)]


def test_retry_then_dead_letter_report_each_step() -> None:
    rec = Recorder()

    async def scenario(machine: Machine, pub: FakePublisher) -> None:
        await deliver(machine, FakeMessage(job("t.retry")))
        ((topic, delay_ms, body),) = pub.sent
        assert (topic, delay_ms) == ("jobs", 50)  # Retry(delay=0.05), republished with DPUB
        # The copy says when it is due (a worker defers it if nsqd forgets the delay).
        again = wire.decode_job(body)
        assert again.due_at is not None and 0 < again.due_at - wire.now() <= 0.05
        # The republished envelope carries the attempt: delivered again once due (as nsqd does
        # after the delay), it is the last one.
        due = msgspec.structs.replace(again, due_at=wire.now())
        await deliver(machine, FakeMessage(wire.encode(due), msg_id=b"1" * 16))

    pub = run_machine([rec], scenario)
    assert rec.events == [
        ("received", "t.retry", "j1", 1),
        ("started", "t.retry", 1, 2),
        ("attempt_failed", "t.retry", 1, "Retry"),
        ("retried", "t.retry", 0.05),
        ("received", "t.retry", "j1", 2),
        ("started", "t.retry", 2, 2),
        ("attempt_failed", "t.retry", 2, "Retry"),
        ("dead_lettered", "t.retry", "max_attempts", "Retry"),
    ]
    assert [topic for topic, _, _ in pub.sent] == ["jobs", DEAD_LETTER_TOPIC, RESULTS_TOPIC]
    letter = wire.decode_dead_letter(pub.sent[1][2])
    assert letter.job is not None and [a.attempt for a in letter.job.history] == [1, 2]


def test_not_retryable_failures_and_strays_go_straight_to_dead_letters() -> None:
    rec = Recorder()

    async def scenario(machine: Machine, pub: FakePublisher) -> None:
        await deliver(machine, FakeMessage(job("t.throws")))
        await deliver(machine, FakeMessage(job("t.ok"), msg_id=b"2" * 16))
        await deliver(machine, FakeMessage(job("no.such"), msg_id=b"3" * 16))
        await deliver(machine, FakeMessage(b"garbage", msg_id=b"4" * 16))

    run_machine([rec], scenario)
    assert rec.events == [
        ("received", "t.throws", "j1", 1),
        ("started", "t.throws", 1, 5),
        ("attempt_failed", "t.throws", 1, "Permanent"),
        ("dead_lettered", "t.throws", "not_retryable", "Permanent"),
        ("received", "t.ok", "j1", 1),
        ("started", "t.ok", 1, 5),
        ("succeeded", "t.ok", rec.events[6][2]),
        ("dead_lettered", "-", "unknown_task", "UnknownTaskError"),
        ("dead_lettered", "-", "undecodable", "DecodeError"),
    ]


def test_refused_result_is_a_failed_attempt_not_retried() -> None:
    rec = Recorder()
    message = FakeMessage(job("t.ok"))

    async def scenario(machine: Machine, pub: FakePublisher) -> None:
        await deliver(machine, message)

    pub = run_machine([rec], scenario, FakePublisher(refuse_results=True))
    assert rec.events[2:] == [
        ("attempt_failed", "t.ok", 1, "PublishRejected"),
        ("dead_lettered", "t.ok", "not_retryable", "PublishRejected"),
    ]
    assert [topic for topic, _, _ in pub.sent] == [RESULTS_TOPIC, DEAD_LETTER_TOPIC, RESULTS_TOPIC]
    assert message.answers == [("FIN", 0)]


def test_a_failing_hook_is_logged_once_per_transition_and_the_jobs_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec, broken = Recorder(), Broken()
    hooks: list[WorkerHook] = [
        broken,
        rec,
    ]  # the broken one first: the recorder must still hear everything
    messages = [FakeMessage(job("t.ok", f"j{i}"), msg_id=bytes([48 + i]) * 16) for i in range(3)]
    collected: list[Hooks] = []

    async def scenario(machine: Machine, pub: FakePublisher) -> None:
        collected.append(machine.hooks)
        for message in messages:
            await deliver(machine, message)
        await deliver(machine, FakeMessage(job("t.throws"), msg_id=b"x" * 16))

    with caplog.at_level(logging.DEBUG, logger="nsqjobs.worker.hooks"):
        pub = run_machine(hooks, scenario)
    assert all(m.answers == [("FIN", 0)] for m in messages)
    assert len(pub.sent) == 3 + 2  # three results, then a dead letter and a failed result
    assert [e[0] for e in rec.events].count("succeeded") == 3
    assert rec.events[-1] == ("dead_lettered", "t.throws", "not_retryable", "Permanent")
    errors = [
        r for r in caplog.records if r.name == "nsqjobs.worker.hooks" and r.levelno >= logging.ERROR
    ]
    assert sorted(r.getMessage().split()[1] for r in errors) == [
        "Broken.attempt_failed",
        "Broken.dead_lettered",
        "Broken.received",
        "Broken.started",
        "Broken.succeeded",
    ]
    assert all(r.exc_info is not None for r in errors)
    (hooks_used,) = collected
    assert hooks_used.failures[("Broken", "received")] == 4
    assert hooks_used.failures[("Broken", "succeeded")] == 3


def test_a_hook_failing_to_resolve_a_task_is_left_out_of_it() -> None:
    class NoTasks:
        def for_task(self, task: str) -> Recorder:
            raise RuntimeError("cannot")

    rec = Recorder()
    message = FakeMessage(job("t.ok"))

    async def scenario(machine: Machine, pub: FakePublisher) -> None:
        await deliver(machine, message)

    run_machine([NoTasks(), rec], scenario)
    assert [e[0] for e in rec.events] == ["received", "started", "succeeded"]
    assert message.answers == [("FIN", 0)]


def test_metrics_hook_counts_every_ending_and_returns_in_progress_to_zero() -> None:
    registry = CollectorRegistry()
    metrics_hook = MetricsHook(WorkerMetrics(registry))

    async def scenario(machine: Machine, pub: FakePublisher) -> None:
        await deliver(machine, FakeMessage(job("t.ok")))
        await deliver(machine, FakeMessage(job("t.throws"), msg_id=b"1" * 16))
        await deliver(machine, FakeMessage(job("t.retry"), msg_id=b"2" * 16))
        await deliver(machine, FakeMessage(b"garbage", msg_id=b"3" * 16))

    run_machine([metrics_hook], scenario)

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("nsqjobs_jobs_received_total", task="t.ok") == 1
    assert value("nsqjobs_jobs_succeeded_total", task="t.ok") == 1
    assert value("nsqjobs_job_duration_seconds_count", task="t.ok", status="succeeded") == 1
    assert value("nsqjobs_jobs_failed_total", task="t.throws") == 1
    assert value("nsqjobs_jobs_dead_lettered_total", task="t.throws", reason="not_retryable") == 1
    assert value("nsqjobs_job_errors_total", task="t.throws", error="Permanent") == 1
    assert value("nsqjobs_job_duration_seconds_count", task="t.throws", status="failed") == 1
    assert value("nsqjobs_jobs_retried_total", task="t.retry") == 1
    assert value("nsqjobs_jobs_dead_lettered_total", task="-", reason="undecodable") == 1
    assert value("nsqjobs_jobs_failed_total", task="-") == 0  # no job, so no failed result
    for name in ("t.ok", "t.throws", "t.retry"):
        assert value("nsqjobs_jobs_in_progress", task=name) == 0


def test_shutdown_gives_running_jobs_back_without_spending_an_attempt() -> None:
    registry = CollectorRegistry()
    rec = Recorder()
    slow = Registry()

    @task("t.slow", target=slow)
    def blocked(args: dict[str, Any]) -> None:
        time.sleep(0.2)  # still running when the worker shuts down

    message = FakeMessage(job("t.slow"))

    async def scenario(machine: Machine, pub: FakePublisher) -> None:
        machine.tasks = slow
        machine.on_message(message)
        assert [e[0] for e in rec.events] == ["received", "started"]
        machine.accepting = False
        assert await machine.hand_back() == 1
        deadline = time.monotonic() + 5
        while machine.held:  # the run's late outcome is dropped, the job let go
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)

    hooks: list[WorkerHook] = [MetricsHook(WorkerMetrics(registry)), rec]
    pub = run_machine(hooks, scenario)
    # Republished with this delivery not counted (nsqd's REQ would count it), then FINed.
    assert message.answers == [("FIN", 0)]
    ((topic, delay_ms, body),) = pub.sent
    back = wire.decode_job(body)
    assert (topic, delay_ms, back.id, back.attempts) == ("jobs", 0, "j1", 0)
    assert rec.events[2:] == [("requeued", "t.slow", "shutdown")]
    labels = {"task": "t.slow"}
    assert registry.get_sample_value("nsqjobs_jobs_requeued_on_shutdown_total", labels) == 1
    assert registry.get_sample_value("nsqjobs_jobs_in_progress", labels) == 0


def test_an_internal_error_requeues_the_message_and_is_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Crashing(FakePublisher):
        def enqueue(self, topic: str, body: bytes) -> asyncio.Future[None]:
            raise RuntimeError("publisher bug")

    registry = CollectorRegistry()
    rec = Recorder()
    message = FakeMessage(job("t.ok"))

    async def scenario(machine: Machine, pub: FakePublisher) -> None:
        await deliver(machine, message)

    hooks: list[WorkerHook] = [MetricsHook(WorkerMetrics(registry)), rec]
    with caplog.at_level(logging.ERROR, logger="nsqjobs.worker"):
        run_machine(hooks, scenario, Crashing())
    assert message.answers == [("REQ", int(CONFIG.backoff_cap_s * 1000))]
    assert rec.events[2:] == [("requeued", "t.ok", "internal_error")]
    assert any("internal error" in r.getMessage() for r in caplog.records)
    labels = {"task": "t.ok"}
    assert (
        registry.get_sample_value("nsqjobs_job_errors_total", {**labels, "error": "InternalError"})
        == 1
    )
    assert registry.get_sample_value("nsqjobs_jobs_in_progress", labels) == 0
