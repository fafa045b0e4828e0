"""Worker limits against real nsqd: slots and RDY, time limits, attempts kept, sizes, due times.

Jobs are published straight to nsqd (no gateway), so each test is about the worker alone.
"""

from __future__ import annotations

import importlib.util
import signal
import socket
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from nsqjobs import wire
from nsqjobs.testing import Daemon, Nsq, Tail, http, start_nsq, wait_for

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def envelope(job_id: str, task: str, args: dict[str, Any], **extra: Any) -> wire.JobEnvelope:
    return wire.JobEnvelope(id=job_id, task=task, args=args, created_at=wire.now(), **extra)


def publish(nsq: Nsq, body: bytes | wire.JobEnvelope, topic: str = "jobs", **query: str) -> None:
    raw = body if isinstance(body, bytes) else wire.encode(body)
    qs = "".join(f"&{k}={v}" for k, v in query.items())
    status, _, answer = http("POST", f"http://{nsq.nsqd_http}/pub?topic={topic}{qs}", raw=raw)
    assert status == 200, answer


def clients(nsq: Nsq, topic: str = "jobs") -> list[dict[str, Any]]:
    channel = nsq.channel(topic, "workers")
    return list(channel["clients"] or []) if channel else []


def results_by_id(tail: Tail, n: int, timeout: float) -> dict[str, wire.ResultEnvelope]:
    return {r.id: r for r in map(wire.decode_result, tail.collect(n, timeout=timeout))}


def test_overrunning_thread_keeps_its_slot_and_the_next_jobs_run_in_full(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("results", "test")
    nsq.create_channel("dead_letters", "test")
    results, dead = tails(nsq, "results", "test"), tails(nsq, "dead_letters", "test")
    daemons("worker", nsq, NSQJOBS_CONCURRENCY="1", NSQJOBS_MAX_ATTEMPTS="1")
    # 0.3 s limit, 4 s of sleep: the thread cannot be stopped and runs on.
    publish(nsq, envelope("slow", "debug.sleep", {"seconds": 4}, timeout_s=0.3))
    (raw,) = dead.collect(1, timeout=20)
    assert wire.decode_dead_letter(raw).error.type == "TaskTimeoutError"
    for later in ("b", "c"):
        publish(nsq, envelope(later, "debug.sleep", {"seconds": 0.5}, timeout_s=2))
    wait_for(
        lambda: [c["finish_count"] for c in clients(nsq)] == [1],
        10,
        "the timed-out job's message to be FINed",
    )
    # Its thread still sleeps: the worker's only slot is taken, so it takes nothing more.
    channel = nsq.channel("jobs", "workers")
    assert channel is not None
    assert (channel["depth"], channel["in_flight_count"]) == (2, 0), channel
    assert [c["ready_count"] for c in clients(nsq)] == [0]
    # Once the thread returns, the next jobs run, each with its whole time limit.
    got = results_by_id(results, 3, timeout=30)
    assert got["slow"].status == "failed"
    assert [(got[i].status, got[i].attempts) for i in ("b", "c")] == [("succeeded", 1)] * 2


def test_process_executor_kills_an_overrunning_child_and_goes_on(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("results", "test")
    results = tails(nsq, "results", "test")
    daemons(
        "worker",
        nsq,
        NSQJOBS_EXECUTOR="process",
        NSQJOBS_CONCURRENCY="1",
        NSQJOBS_MAX_ATTEMPTS="1",
    )
    publish(nsq, envelope("stuck", "debug.sleep", {"seconds": 300}, timeout_s=0.5))
    publish(nsq, envelope("next", "noop", {"n": 1}))
    # The stuck child is killed at 0.5 s and replaced; the next job gets its own full limit
    # (noop's 10 s), long before the stuck one would have ended.
    got = results_by_id(results, 2, timeout=60)
    assert got["stuck"].status == "failed" and got["stuck"].error is not None
    assert got["stuck"].error.type == "TaskTimeoutError"
    assert (got["next"].status, got["next"].result) == ("succeeded", {"n": 1})


@pytest.mark.timeout(120)
def test_process_executor_takes_large_frames_and_awkward_exceptions_on_the_default_loop(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("results", "test")
    nsq.create_channel("dead_letters", "test")
    results, dead = tails(nsq, "results", "test"), tails(nsq, "dead_letters", "test")
    worker = daemons(
        "worker",
        nsq,
        NSQJOBS_EXECUTOR="process",
        NSQJOBS_CONCURRENCY="2",
        NSQJOBS_TASK_MODULE="nsqjobs_tasks.builtin,tests.executor_tasks",
        PYTHONPATH=str(Path(__file__).resolve().parent.parent),
        NSQJOBS_BACKOFF_BASE_S="0.05",
        NSQJOBS_BACKOFF_CAP_S="0.1",
    )
    assert importlib.util.find_spec("uvloop") is not None  # the worker's default loop
    # Results and arguments larger than the pipe's buffer (uvloop makes a watched fd
    # non-blocking: they used to read as a dead child, or a half-sent job).
    big = [f"big-{i}" for i in range(6)]
    for i in big:
        publish(nsq, envelope(i, "xt.big", {"n": 300_000}))
    publish(nsq, envelope("args", "xt.size", {"s": "z" * 800_000}))
    publish(nsq, envelope("too-big", "xt.big", {"n": 2 * MIB}))
    # Exceptions a future refuses (StopIteration) or that cannot be printed.
    publish(nsq, envelope("stop", "xt.stop_iteration", {}))
    publish(nsq, envelope("unprintable", "xt.unprintable", {}))
    # A child that dies while a process its task forked holds the pipe open (no EOF).
    publish(nsq, envelope("forked", "xt.fork_then_die", {"seconds": 60}))
    got = results_by_id(results, 11, timeout=45)
    for i in big:
        assert (got[i].status, len(got[i].result)) == ("succeeded", 300_000), got[i].error
    assert (got["args"].status, got["args"].result) == ("succeeded", 800_000), got["args"].error
    letters = {
        letter.job.id: letter
        for letter in map(wire.decode_dead_letter, dead.collect(4, timeout=30))
        if letter.job is not None
    }
    assert (letters["too-big"].reason, letters["too-big"].error.type) == (
        "not_retryable",
        "ResultTooLarge",
    )
    stop = letters["stop"]
    assert (stop.reason, stop.error.type) == ("max_attempts", "RuntimeError")
    assert "StopIteration('stop')" in stop.error.message and stop.job is not None
    assert [a.error.type for a in stop.job.history] == ["RuntimeError", "RuntimeError"]
    # Declared in throws=: dead at once, described as unprintable (not an internal error).
    odd = letters["unprintable"]
    assert (odd.reason, odd.error.type) == ("not_retryable", "Unprintable")
    assert odd.error.message == "<unprintable Unprintable object>"
    assert "internal error" not in worker.log()
    # Seen at its exit, not at the task's time limit (60 s).
    forked = letters["forked"]
    assert (forked.error.type, forked.reason) == ("BrokenProcessPool", "max_attempts")
    assert "(exit code 3)" in forked.error.message


def test_rdy_never_exceeds_the_slots_across_queues(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("results", "test")
    results = tails(nsq, "results", "test")
    worker = daemons("worker", nsq, NSQJOBS_CONCURRENCY="1", NSQJOBS_QUEUES="jobs,other")
    # A queue no task uses is consumed, and said (a typo would look like a worker without jobs).
    assert "no task of this worker uses queue(s) other (--queues / NSQJOBS_QUEUES)" in worker.log()
    wait_for(
        lambda: len(clients(nsq, "jobs")) == 1 and len(clients(nsq, "other")) == 1,
        15,
        "a connection per queue",
    )

    def ready() -> int:
        return sum(c["ready_count"] for q in ("jobs", "other") for c in clients(nsq, q))

    wait_for(lambda: ready() == 1, 10, "one RDY in all for one slot")
    for _ in range(20):  # the RDY moves between the queues; it never adds up to more
        assert ready() <= 1
    # Each queue gets its turn.
    publish(nsq, envelope("on-other", "noop", {}), topic="other")
    publish(nsq, envelope("on-jobs", "noop", {}), topic="jobs")
    got = results_by_id(results, 2, timeout=20)
    assert {i: r.status for i, r in got.items()} == {
        "on-other": "succeeded",
        "on-jobs": "succeeded",
    }


def test_sigterm_mid_run_does_not_spend_an_attempt(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("results", "test")
    results = tails(nsq, "results", "test")
    once = {"NSQJOBS_MAX_ATTEMPTS": "1"}
    first = daemons("worker", nsq, NSQJOBS_GRACE_S="0.2", **once)
    publish(nsq, envelope("once", "debug.sleep", {"seconds": 2}))
    wait_for(
        lambda: first.metric("nsqjobs_jobs_in_progress", task="debug.sleep") == 1,
        10,
        "the job to be running when SIGTERM comes",
    )
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(10) == 0
    daemons("worker", nsq, **once)
    (raw,) = results.collect(1, timeout=30)
    result = wire.decode_result(raw)
    # Its one attempt is the run on the second worker: the interrupted one was not counted.
    assert (result.id, result.status, result.attempts) == ("once", "succeeded", 1)
    assert nsq.message_count("dead_letters") == 0


def test_result_over_nsqd_message_size_fails_at_once_and_costs_no_other_job(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("results", "test")
    nsq.create_channel("dead_letters", "test")
    results, dead = tails(nsq, "results", "test"), tails(nsq, "dead_letters", "test")
    # Configured above nsqd's real 1 MiB: the worker reads nsqd's value at start and uses it.
    worker = daemons("worker", nsq, NSQJOBS_CONCURRENCY="2", NSQJOBS_NSQD_MAX_MSG_SIZE=str(4 * MIB))
    publish(nsq, envelope("big", "debug.big", {"size": 2 * MIB}))
    publish(nsq, envelope("small", "noop", {"n": 2}))
    (raw,) = dead.collect(1, timeout=30)
    letter = wire.decode_dead_letter(raw)
    assert (letter.reason, letter.error.type) == ("not_retryable", "ResultTooLarge")
    assert "1048576" in letter.error.message
    assert letter.job is not None and [a.attempt for a in letter.job.history] == [1]
    got = results_by_id(results, 2, timeout=20)
    assert got["big"].status == "failed" and got["small"].status == "succeeded"
    # No frame nsqd would refuse was sent: no publish failed, no connection was dropped.
    for command in ("pub", "mpub", "dpub"):
        assert worker.metric("nsqjobs_publish_errors_total", command=command) == 0
    wait_for(
        lambda: (
            worker.metric(
                "nsqjobs_jobs_dead_lettered_total", task="debug.big", reason="not_retryable"
            )
            == 1
        ),
        10,
        "the dead letter to be counted",
    )
    channel = nsq.channel("jobs", "workers")
    assert channel is not None and channel["requeue_count"] == 0


def test_dead_letter_of_a_job_near_the_size_limit_still_fits(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("dead_letters", "test")
    dead = tails(nsq, "dead_letters", "test")
    daemons("worker", nsq)
    # The envelope fits nsqd's 1 MiB; with the error added, the dead letter would not.
    fat = envelope("fat", "debug.unencodable", {"pad": "x" * (MIB - 200)})
    assert MIB - 200 < len(wire.encode(fat)) <= MIB
    publish(nsq, fat)
    (raw,) = dead.collect(1, timeout=30)
    assert len(raw) <= MIB
    letter = wire.decode_dead_letter(raw)
    assert (letter.reason, letter.error.type) == ("not_retryable", "ResultNotEncodable")
    assert letter.job is not None and letter.job.id == "fat" and letter.job.args == {}
    assert "left out" in letter.error.message
    channel = nsq.channel("jobs", "workers")
    assert channel is not None and channel["requeue_count"] == 0


def test_delayed_job_does_not_run_early_after_nsqd_restarts(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("jobs", "workers")
    delay_s = 8.0
    due = wire.now() + delay_s
    job = envelope("later", "noop", {}, due_at=due)
    publish(nsq, job, defer=str(int(delay_s * 1000)))
    wait_for(
        lambda: (nsq.channel("jobs", "workers") or {}).get("deferred_count") == 1,
        5,
        "the job to be deferred",
    )
    # A clean restart keeps the message but not its delay: nsqd delivers it at once.
    nsq.stop_nsqd()
    nsq.start_nsqd()
    nsq.create_channel("results", "test")
    results = tails(nsq, "results", "test")
    worker = daemons("worker", nsq)
    (raw,) = results.collect(1, timeout=30)
    result = wire.decode_result(raw)
    assert (result.id, result.status, result.attempts) == ("later", "succeeded", 1)
    assert result.started_at >= due - 0.01, due - result.started_at
    # The counter moves once nsqd acknowledged the result, which may be after it was seen.
    wait_for(
        lambda: worker.metric("nsqjobs_jobs_succeeded_total", task="noop") == 1,
        10,
        "the worker to count the job",
    )


def test_each_worker_identifies_to_nsqd_by_its_worker_id(
    nsq: Nsq, daemons: Callable[..., Daemon]
) -> None:
    daemons("worker", nsq, NSQJOBS_WORKER_ID="worker-a")
    unnamed = daemons("worker", nsq)
    wait_for(lambda: len(clients(nsq)) == 2, 15, "both workers to subscribe")
    named = {"worker-a", f"{socket.gethostname()}:{unnamed.proc.pid}"}
    assert {c["client_id"] for c in clients(nsq)} == named

    # Their result publishers too: nsqd lists a connection as a producer once it published, so
    # keep giving the pair noop jobs until both have published a result.
    def producers() -> set[str]:
        job = wire.JobEnvelope(id=wire.new_job_id(), task="noop", args={}, created_at=wire.now())
        nsq.post("/pub", wire.encode(job), topic="jobs")
        return {p["client_id"] for p in nsq.stats().get("producers") or []}

    wait_for(lambda: producers() == named, 15, "both publishers to identify by worker id")


def test_envelope_too_deep_to_decode_is_dead_lettered_at_once(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("dead_letters", "test")
    dead = tails(nsq, "dead_letters", "test")
    daemons("worker", nsq)
    deep = b"[" * 5000 + b"]" * 5000
    publish(nsq, b'{"v":1,"id":"deep","task":"noop","created_at":1,"args":{"a":' + deep + b"}}")
    (raw,) = dead.collect(1, timeout=20)
    letter = wire.decode_dead_letter(raw)
    assert (letter.reason, letter.error.type, letter.job) == ("undecodable", "DecodeError", None)
    assert "RecursionError" in letter.error.message
    channel = nsq.channel("jobs", "workers")
    assert channel is not None and channel["requeue_count"] == 0


def test_a_worker_reads_nsqds_body_size_as_well_as_its_message_size(
    daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    # Results coalesced in one loop turn go as one MPUB: it must stay under nsqd's own
    # --max-body-size (nsqd closes the connection over a larger body), read from nsqd at start
    # and given to the publisher with the message size (it logs a value other than nsqd's
    # default).
    with ExitStack() as stack:
        nsq = start_nsq(stack, tmp_path, nsqd_args=["--max-body-size=2097152"])
        worker = daemons("worker", nsq)
        wait_for(lambda: "--max-body-size is 2097152" in worker.log(), 20, "the limit read")
