"""Worker failure modes against real nsqd: SIGKILL, SIGTERM drain, retries and dead letters."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nsqjobs import wire
from nsqjobs.testing import Daemon, Nsq, Tail, alive, http, need_binary, nsq_pair, wait_for

pytestmark = pytest.mark.integration

FAST_RETRY = {"NSQJOBS_BACKOFF_BASE_S": "0.2", "NSQJOBS_BACKOFF_CAP_S": "2"}


@pytest.fixture
def nsq3() -> Iterator[Nsq]:
    """An nsq pair whose message timeout is 3 s, so lost consumers' messages come back soon."""
    with nsq_pair(msg_timeout="3s") as pair:
        yield pair


def submit(gw: Daemon, task: str, args: dict[str, object], **extra: object) -> str:
    status, _, body = http("POST", gw.url + "/v1/jobs", {"task": task, "args": args, **extra})
    assert status == 202, body
    return str(body["id"])


def in_flight(nsq: Nsq, n: int) -> Callable[[], bool]:
    def check() -> bool:
        channel = nsq.channel("jobs", "workers")
        return bool(channel and channel["in_flight_count"] == n)

    return check


def settled(nsq: Nsq) -> Callable[[], bool]:
    """Nothing queued, in flight or deferred on the workers' channel: no job can still run."""

    def check() -> bool:
        c = nsq.channel("jobs", "workers")
        pending = (c["depth"], c["in_flight_count"], c["deferred_count"]) if c else None
        return pending == (0, 0, 0)

    return check


def publish_job(nsq: Nsq, env: wire.JobEnvelope) -> None:
    """Put a job envelope on the jobs topic directly (no gateway: nothing validated first)."""
    status, _, body = http("POST", f"http://{nsq.nsqd_http}/pub?topic=jobs", raw=wire.encode(env))
    assert status == 200, body


def test_sigkilled_worker_jobs_complete_elsewhere(
    nsq3: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq3.create_channel("results", "test")
    results = tails(nsq3, "results", "test")
    gw = daemons("gateway", nsq3)
    short = {"NSQJOBS_MSG_TIMEOUT_S": "3", "NSQJOBS_CONCURRENCY": "2"}
    doomed = daemons("worker", nsq3, **short)
    ids = {submit(gw, "debug.sleep", {"seconds": 1.5}) for _ in range(4)}
    wait_for(in_flight(nsq3, 2), 10, "the first worker to hold 2 jobs")
    doomed.proc.kill()
    doomed.proc.wait(5)
    daemons("worker", nsq3, **short)
    got = [wire.decode_result(b) for b in results.collect(4, timeout=30)]
    assert {r.id for r in got} == ids
    assert all(r.status == "succeeded" for r in got)
    # The two the killed worker held came back after the message timeout: second delivery.
    assert sorted(r.attempts for r in got) == [1, 1, 2, 2]


def test_sigterm_drains_jobs_in_flight(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("results", "test")
    results = tails(nsq, "results", "test")
    gw = daemons("gateway", nsq)
    worker = daemons("worker", nsq, NSQJOBS_CONCURRENCY="2", NSQJOBS_GRACE_S="10")
    ids = {submit(gw, "debug.sleep", {"seconds": 2}) for _ in range(2)}
    wait_for(in_flight(nsq, 2), 10, "the worker to hold both jobs")
    wait_for(
        lambda: worker.metric("nsqjobs_jobs_in_progress", task="debug.sleep") == 2,
        10,
        "both jobs to be running when SIGTERM comes",
    )
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(12) == 0
    assert time.monotonic() - started < 10
    got = [wire.decode_result(b) for b in results.collect(2, timeout=5)]
    assert {r.id for r in got} == ids
    # Both finished here during the drain, first time: none went back to nsqd.
    assert all((r.status, r.attempts) == ("succeeded", 1) for r in got), got
    channel = nsq.channel("jobs", "workers")
    assert channel is not None
    assert (channel["depth"], channel["in_flight_count"], channel["requeue_count"]) == (0, 0, 0)
    assert channel["message_count"] == 2


def test_sigterm_requeues_what_outlives_the_grace_period(
    nsq: Nsq, daemons: Callable[..., Daemon]
) -> None:
    gw = daemons("gateway", nsq)
    worker = daemons("worker", nsq, NSQJOBS_GRACE_S="1")
    submit(gw, "debug.sleep", {"seconds": 30})
    wait_for(in_flight(nsq, 1), 10, "the worker to hold the job")
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(10) == 0
    assert time.monotonic() - started < 5
    channel = nsq.channel("jobs", "workers")
    assert channel is not None
    # Given back at once as a new message (no REQ: nsqd would count the delivery as an
    # attempt): the job waits for another worker, not for a timeout.
    assert (channel["depth"], channel["in_flight_count"], channel["requeue_count"]) == (1, 0, 0)
    assert channel["timeout_count"] == 0 and nsq.message_count("jobs") == 2


def test_failing_task_is_dead_lettered_after_max_attempts_with_backoff(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("results", "test")
    nsq.create_channel("dead_letters", "test")
    results, dead = tails(nsq, "results", "test"), tails(nsq, "dead_letters", "test")
    gw = daemons("gateway", nsq)
    worker = daemons("worker", nsq, **FAST_RETRY)
    job_id = submit(gw, "debug.fail", {"mode": "error"})
    (raw,) = dead.collect(1, timeout=30)
    letter = wire.decode_dead_letter(raw)
    assert letter.reason == "max_attempts" and letter.job is not None
    assert letter.job.id == job_id and letter.job.attempts == 5
    assert letter.error.type == "DebugFailure"
    assert [a.attempt for a in letter.job.history] == [1, 2, 3, 4, 5]
    for n, (a, b) in enumerate(zip(letter.job.history, letter.job.history[1:], strict=False), 1):
        least = min(2.0, 0.2 * 2 ** (n - 1)) / 2  # equal jitter: at least half the step
        assert b.started_at - a.finished_at >= least * 0.9, (n, b.started_at - a.finished_at)
    (raw,) = results.collect(1, timeout=5)
    result = wire.decode_result(raw)
    assert (result.id, result.status, result.attempts) == (job_id, "failed", 5)
    assert result.error is not None and result.error.type == "DebugFailure"
    # Nothing else came, or can come: the job's message is FINed and no retry is deferred.
    wait_for(settled(nsq), 10, "the jobs channel to hold nothing")
    assert (nsq.message_count("results"), nsq.message_count("dead_letters")) == (1, 1)
    assert worker.metric("nsqjobs_jobs_retried_total", task="debug.fail") == 4
    assert worker.metric("nsqjobs_jobs_failed_total", task="debug.fail") == 1
    assert (
        worker.metric("nsqjobs_jobs_dead_lettered_total", task="debug.fail", reason="max_attempts")
        == 1
    )
    assert worker.metric("nsqjobs_job_errors_total", task="debug.fail", error="DebugFailure") == 5


def test_garbage_and_unknown_tasks_go_to_dead_letters_at_once(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("dead_letters", "test")
    dead = tails(nsq, "dead_letters", "test")
    worker = daemons("worker", nsq)
    to_nsq = need_binary("to_nsq")
    subprocess.run(
        [to_nsq, "--topic=jobs", f"--nsqd-tcp-address={nsq.nsqd_tcp}"],
        input=b"this is not a job\n",
        check=True,
        timeout=20,
        capture_output=True,
    )
    (raw,) = dead.collect(1, timeout=20)
    letter = wire.decode_dead_letter(raw)
    assert (letter.reason, letter.raw, letter.job) == ("undecodable", "this is not a job", None)
    assert letter.error.type == "DecodeError"

    env = wire.JobEnvelope(id="u1", task="no.such.task", args={}, created_at=wire.now())
    status, _, _ = http("POST", f"http://{nsq.nsqd_http}/pub?topic=jobs", raw=wire.encode(env))
    assert status == 200
    (raw,) = dead.collect(1, timeout=20)
    letter = wire.decode_dead_letter(raw)
    assert letter.reason == "unknown_task" and letter.job == env

    def counted(reason: str) -> Callable[[], bool]:
        return lambda: (
            worker.metric("nsqjobs_jobs_dead_lettered_total", task="-", reason=reason) == 1
        )

    for reason in ("undecodable", "unknown_task"):
        wait_for(counted(reason), 5, f"the {reason} dead letter to be counted")
    channel = nsq.channel("jobs", "workers")
    assert channel is not None and channel["requeue_count"] == 0 and channel["depth"] == 0


def test_crashing_task_in_process_pool_is_retried_then_dead_lettered(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("dead_letters", "test")
    dead = tails(nsq, "dead_letters", "test")
    gw = daemons("gateway", nsq)
    worker = daemons(
        "worker",
        nsq,
        NSQJOBS_EXECUTOR="process",
        NSQJOBS_CONCURRENCY="1",
        NSQJOBS_MAX_ATTEMPTS="3",
        **FAST_RETRY,
    )
    job_id = submit(gw, "debug.fail", {"mode": "crash"})
    (raw,) = dead.collect(1, timeout=60)
    letter = wire.decode_dead_letter(raw)
    assert letter.job is not None and letter.job.id == job_id and letter.job.attempts == 3
    assert letter.error.type == "BrokenProcessPool"
    assert "(exit code 70)" in letter.error.message  # the child's own os._exit(70)
    # The worker survived its children's deaths and still runs jobs.
    status, _, body = http("POST", gw.url + "/v1/jobs?wait=30", {"task": "noop", "args": {}})
    assert status == 200 and body["status"] == "succeeded", body
    assert worker.proc.poll() is None


def test_job_that_kills_its_worker_stops_after_max_attempts(
    nsq3: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq3.create_channel("dead_letters", "test")
    dead = tails(nsq3, "dead_letters", "test")
    gw = daemons("gateway", nsq3)
    opts = {"NSQJOBS_MSG_TIMEOUT_S": "3", "NSQJOBS_MAX_ATTEMPTS": "2"}
    job_id = submit(gw, "debug.fail", {"mode": "crash"})
    for _ in range(2):  # each delivery kills the thread-pool worker that runs it
        victim = daemons("worker", nsq3, ready=False, **opts)
        assert victim.proc.wait(20) == 70
    daemons("worker", nsq3, **opts)
    (raw,) = dead.collect(1, timeout=20)
    letter = wire.decode_dead_letter(raw)
    assert letter.job is not None and letter.job.id == job_id
    assert letter.error.type == "AttemptsExhausted"


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_job_past_its_time_limit_is_retried_then_dead_lettered(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail], executor: str
) -> None:
    nsq.create_channel("dead_letters", "test")
    nsq.create_channel("results", "test")
    dead, results = tails(nsq, "dead_letters", "test"), tails(nsq, "results", "test")
    worker = daemons(
        "worker",
        nsq,
        NSQJOBS_EXECUTOR=executor,
        NSQJOBS_CONCURRENCY="2",
        NSQJOBS_MAX_ATTEMPTS="2",
        **FAST_RETRY,
    )
    # The envelope's own limit (0.3 s) beats the task's (300 s); the job would sleep 2 s.
    env = wire.JobEnvelope(
        id="slow1", task="debug.sleep", args={"seconds": 2}, created_at=wire.now(), timeout_s=0.3
    )
    status, _, _ = http("POST", f"http://{nsq.nsqd_http}/pub?topic=jobs", raw=wire.encode(env))
    assert status == 200
    (raw,) = dead.collect(1, timeout=30)
    letter = wire.decode_dead_letter(raw)
    assert letter.reason == "max_attempts" and letter.job is not None
    assert letter.error.type == "TaskTimeoutError"
    assert "0.3s time limit" in letter.error.message
    assert [a.attempt for a in letter.job.history] == [1, 2]
    for a in letter.job.history:
        assert 0.25 <= a.finished_at - a.started_at < 1.5, a
    # A timed-out job's thread or child runs on to its end; then the slot serves new work.
    ok = wire.JobEnvelope(id="quick1", task="noop", args={"n": 1}, created_at=wire.now())
    http("POST", f"http://{nsq.nsqd_http}/pub?topic=jobs", raw=wire.encode(ok))
    got = {r.id: r for r in map(wire.decode_result, results.collect(2, timeout=20))}
    assert got["slow1"].status == "failed" and got["quick1"].status == "succeeded", got
    assert (
        worker.metric("nsqjobs_job_errors_total", task="debug.sleep", error="TaskTimeoutError") == 2
    )


def test_task_calling_sys_exit_fails_its_attempt_not_the_worker(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail], tmp_path: Path
) -> None:
    (tmp_path / "exiting_tasks.py").write_text(
        "import sys\n"
        "from typing import Any\n"
        "from nsqjobs.registry import task\n\n"
        "@task('test.exit', max_attempts=1)\n"
        "def exits(args: dict[str, Any]) -> None:\n"
        "    sys.exit(3)\n"
    )
    nsq.create_channel("dead_letters", "test")
    dead = tails(nsq, "dead_letters", "test")
    worker = daemons(
        "worker",
        nsq,
        NSQJOBS_TASK_MODULE="nsqjobs_tasks.builtin,exiting_tasks",
        PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    env = wire.JobEnvelope(id="exit1", task="test.exit", args={}, created_at=wire.now())
    status, _, _ = http("POST", f"http://{nsq.nsqd_http}/pub?topic=jobs", raw=wire.encode(env))
    assert status == 200
    (raw,) = dead.collect(1, timeout=20)
    letter = wire.decode_dead_letter(raw)
    assert letter.reason == "max_attempts" and letter.error.type == "RuntimeError"
    assert "SystemExit(3)" in letter.error.message
    assert worker.proc.poll() is None and http("GET", worker.url + "/healthz")[0] == 200


def test_retry_raised_by_a_task_waits_the_delay_it_asks_for(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("dead_letters", "test")
    dead = tails(nsq, "dead_letters", "test")
    worker = daemons("worker", nsq, **FAST_RETRY)  # backoff alone would wait 0.1-0.2 s
    publish_job(
        nsq,
        wire.JobEnvelope(id="r1", task="debug.retry", args={"delay": 1.5}, created_at=wire.now()),
    )
    (raw,) = dead.collect(1, timeout=30)
    letter = wire.decode_dead_letter(raw)
    assert (letter.reason, letter.error.type) == ("max_attempts", "Retry")
    assert letter.job is not None and [a.attempt for a in letter.job.history] == [1, 2]
    first, second = letter.job.history
    assert 1.5 * 0.95 <= second.started_at - first.finished_at < 10
    # The retry went back as a deferred publish (DPUB), not as nsqd's REQ.
    wait_for(settled(nsq), 10, "the jobs channel to hold nothing")
    channel = nsq.channel("jobs", "workers")
    assert channel is not None and channel["requeue_count"] == 0
    assert nsq.message_count("jobs") == 2
    assert worker.metric("nsqjobs_jobs_retried_total", task="debug.retry") == 1
    assert worker.metric("nsqjobs_job_errors_total", task="debug.retry", error="Retry") == 2


def test_job_past_its_deadline_is_dead_lettered_as_expired(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("dead_letters", "test")
    nsq.create_channel("results", "test")
    nsq.create_channel("jobs", "workers")  # keeps the job until a worker comes
    dead, results = tails(nsq, "dead_letters", "test"), tails(nsq, "results", "test")
    gw = daemons("gateway", nsq)
    submitted = wire.now()
    job_id = submit(gw, "debug.sleep", {"seconds": 0}, expires_s=0.5)
    wait_for(lambda: wire.now() > submitted + 0.6, 5, "the job's deadline to pass")
    worker = daemons("worker", nsq)
    (raw,) = dead.collect(1, timeout=20)
    letter = wire.decode_dead_letter(raw)
    assert (letter.reason, letter.error.type) == ("expired", "Expired")
    assert letter.job is not None and letter.job.id == job_id
    assert letter.job.deadline is not None and letter.job.deadline < letter.at
    assert letter.job.history == ()  # it never ran
    (raw,) = results.collect(1, timeout=10)
    result = wire.decode_result(raw)
    assert (result.id, result.status, result.attempts) == (job_id, "failed", 0)
    wait_for(  # counted once nsqd acknowledged the failed result, a moment after we read it
        lambda: (
            worker.metric("nsqjobs_jobs_dead_lettered_total", task="debug.sleep", reason="expired")
            == 1
        ),
        10,
        "the expired dead letter to be counted",
    )
    assert worker.metric("nsqjobs_jobs_succeeded_total", task="debug.sleep") == 0


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_failures_retrying_cannot_fix_are_dead_lettered_after_one_attempt(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail], executor: str
) -> None:
    nsq.create_channel("dead_letters", "test")
    dead = tails(nsq, "dead_letters", "test")
    worker = daemons("worker", nsq, NSQJOBS_EXECUTOR=executor, NSQJOBS_CONCURRENCY="2")
    # A result nsqd refuses (over --max-msg-size) is not here: nsqd closes the connection after
    # E_BAD_MESSAGE, and which of the two the publisher sees first is a race (see test_hooks).
    expected: dict[str, tuple[str, dict[str, Any], str]] = {
        "enc": ("debug.unencodable", {}, "ResultNotEncodable"),
        "throws": ("debug.throws", {}, "DebugPermanentFailure"),
        "args": ("debug.sleep", {"seconds": "soon"}, "InvalidArgumentsError"),
    }
    for job_id, (task, args, _) in expected.items():
        publish_job(nsq, wire.JobEnvelope(id=job_id, task=task, args=args, created_at=wire.now()))
    letters = {
        letter.job.id: letter
        for letter in map(wire.decode_dead_letter, dead.collect(3, timeout=30))
        if letter.job is not None
    }
    assert set(letters) == set(expected)
    for job_id, (_, _, error) in expected.items():
        letter = letters[job_id]
        assert (letter.reason, letter.error.type) == ("not_retryable", error), letter
        assert letter.job is not None and [a.attempt for a in letter.job.history] == [1]

    def counted(task: str) -> Callable[[], bool]:
        return lambda: (
            worker.metric("nsqjobs_jobs_dead_lettered_total", task=task, reason="not_retryable")
            == 1
        )

    for task, _, _ in expected.values():
        wait_for(counted(task), 10, f"the {task} dead letter to be counted")
    wait_for(settled(nsq), 10, "the jobs channel to hold nothing")
    channel = nsq.channel("jobs", "workers")
    assert channel is not None and channel["requeue_count"] == 0
    assert nsq.message_count("jobs") == 3  # nothing republished for a retry
    assert all(
        worker.metric("nsqjobs_jobs_retried_total", task=task) == 0
        for task, _, _ in expected.values()
    )


def test_result_nsqd_does_not_acknowledge_is_requeued_and_the_job_completes(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[..., Tail]
) -> None:
    nsq.create_channel("results", "test")
    results = tails(nsq, "results", "test")
    worker = daemons("worker", nsq, NSQJOBS_CONCURRENCY="1", **FAST_RETRY)
    publish_job(
        nsq,
        wire.JobEnvelope(id="p1", task="debug.sleep", args={"seconds": 1}, created_at=wire.now()),
    )
    wait_for(
        lambda: worker.metric("nsqjobs_jobs_in_progress", task="debug.sleep") == 1,
        10,
        "the job to be running",
    )
    assert nsq.nsqd is not None
    nsq.nsqd.pause()  # the result's PUB gets no answer within the publish timeout
    try:
        wait_for(
            lambda: worker.metric("nsqjobs_publish_errors_total", command="pub") >= 1,
            20,
            "the result publish to time out",
        )
    finally:
        nsq.nsqd.resume()
    # nsqd then reads what waited in its socket: the result (so a first copy is published:
    # at least once) and the REQ, which delivers the job again; that attempt is FINed.
    got = [wire.decode_result(b) for b in results.collect(2, timeout=30)]
    assert [(r.id, r.status) for r in got] == [("p1", "succeeded")] * 2
    assert sorted(r.attempts for r in got) == [1, 2]
    wait_for(settled(nsq), 10, "the jobs channel to hold nothing")
    channel = nsq.channel("jobs", "workers")
    assert channel is not None and channel["requeue_count"] == 1
    assert channel["timeout_count"] == 0
    wait_for(
        lambda: worker.metric("nsqjobs_jobs_succeeded_total", task="debug.sleep") == 1,
        10,
        "the second attempt's success to be counted",
    )
    assert worker.metric("nsqjobs_jobs_in_progress", task="debug.sleep") == 0


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def test_a_killed_childs_subprocesses_end_with_it_and_children_die_with_their_worker(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    # The process executor kills a child's whole process group at a time limit (or a cancel):
    # what its task started ends too. And a child dies with its worker, even a SIGKILLed one.
    log = tmp_path / "runs.log"
    worker = daemons(
        "worker",
        nsq,
        NSQJOBS_EXECUTOR="process",
        NSQJOBS_CONCURRENCY="1",
        NSQJOBS_DEBUG_EXECUTIONS_LOG=str(log),
    )

    def spawned(key: str) -> int | None:
        for line in log.read_text().split() if log.exists() else []:
            if line.startswith(f"{key}:"):
                return int(line.split(":")[1])
        return None

    started: list[int] = []
    try:
        env = wire.JobEnvelope(
            id="spawn1",
            task="debug.spawn",
            args={"key": "spawn1", "seconds": 120},
            created_at=wire.now(),
            timeout_s=1.0,
        )
        publish_job(nsq, env)
        first = wait_for(lambda: spawned("spawn1"), 30, "the task's subprocess to start")
        started.append(first)
        wait_for(lambda: not alive(first), 20, "the subprocess to end with its child at the limit")

        env = msgspec.structs.replace(
            env, id="spawn2", args={"key": "spawn2", "seconds": 120}, timeout_s=600.0
        )
        publish_job(nsq, env)
        second = wait_for(lambda: spawned("spawn2"), 30, "the second subprocess to start")
        started.append(second)
        children = children_of(worker.proc.pid)
        assert children and all(alive(c) for c in children)
        worker.proc.kill()
        worker.proc.wait(5)
        wait_for(
            lambda: not any(alive(c) for c in children), 20, "the children to die with the worker"
        )
    finally:
        for pid in started:  # a task's own subprocess may outlive a SIGKILLed worker
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
