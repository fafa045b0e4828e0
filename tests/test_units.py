"""Unit tests without NSQ: wire contract, configuration, registry, backoff, CLI errors."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import pickle
import socket
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, cast

import msgspec
import nsq
import pytest
from nsqjobs import config, testing, wire
from nsqjobs.cli import main
from nsqjobs.client import PartiallyAccepted, UnknownTask
from nsqjobs.errors import (
    ConfigError,
    DecodeError,
    FieldError,
    InvalidArgumentsError,
    TaskFailed,
    UnknownTaskError,
)
from nsqjobs.nsq import publisher
from nsqjobs.nsq.publisher import Publisher
from nsqjobs.observability.metrics import GatewayMetrics, WorkerMetrics
from nsqjobs.observability.worker_hooks import MetricsHook
from nsqjobs.registry import Registry, task
from nsqjobs.testing import run_cli
from nsqjobs.worker.outcome import backoff_delay
from prometheus_client import CollectorRegistry, Gauge, generate_latest


def test_envelopes_round_trip() -> None:
    attempt = wire.Attempt(
        attempt=1,
        worker="w",
        started_at=1.0,
        finished_at=2.0,
        error=wire.ErrorInfo(type="E", message="m"),
    )
    job = wire.JobEnvelope(
        id="j", task="noop", args={"a": [1, 2]}, created_at=1.5, attempts=1, history=(attempt,)
    )
    assert wire.decode_job(wire.encode(job)) == job
    result = wire.ResultEnvelope(
        id="j",
        task="noop",
        status="succeeded",
        result={"a": 1},
        attempts=1,
        worker="w",
        started_at=1,
        finished_at=2,
        duration_s=1,
    )
    assert wire.decode_result(wire.encode(result)) == result
    letter = wire.DeadLetter(reason="undecodable", error=attempt.error, worker="w", at=3, raw="x")
    assert wire.decode_dead_letter(wire.encode(letter)) == letter


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'{"id": "x"}',
        b'{"v": 2, "id": "x", "task": "t", "args": {}, "created_at": 1}',
        b'{"v": 1, "id": 5, "task": "t", "args": {}, "created_at": 1}',
    ],
)
def test_bad_job_bytes_raise_decode_error_keeping_raw(raw: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        wire.decode_job(raw)
    assert info.value.raw == raw


def test_json_nested_past_the_decoders_stack_is_undecodable_not_a_crash() -> None:
    # msgspec raises RecursionError for deep nesting: every consumer (the gateway's results
    # reader, the ledger's) handles DecodeError by dropping the message; anything else would
    # requeue it for ever.
    deep = b"[" * 5000 + b"]" * 5000
    result = (
        b'{"v":1,"id":"a","task":"t","status":"succeeded","result":' + deep + b',"attempts":1,'
        b'"worker":"w","started_at":1,"finished_at":2,"duration_s":1}'
    )
    with pytest.raises(DecodeError, match="result"):
        wire.decode_result(result)
    with pytest.raises(DecodeError):
        wire.decode_job(b'{"v":1,"id":"a","task":"t","args":{"x":' + deep + b'},"created_at":1}')
    with pytest.raises(DecodeError):
        wire.decode_started(deep)


def test_job_ids_are_time_ordered_unique_and_not_shared_with_a_forked_child() -> None:
    before = wire.new_job_id()
    ids = [wire.new_job_id() for _ in range(5000)]  # several 4 KiB reads of the random source
    after = wire.new_job_ids(3)
    assert len(set([before, *ids, *after])) == 5004
    for job_id in [before, *ids, *after]:
        assert len(job_id) == 32 and int(job_id, 16) >= 0
    assert [i[:12] for i in [before, *ids]] == sorted(i[:12] for i in [before, *ids])
    # A forked child must not hand out the digits its parent holds: the same ids in two
    # processes (a worker's process pool forks) would be one job to the ledger.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, then out at once
        try:
            os.write(write, wire.new_job_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    mine = wire.new_job_id()
    assert len(child) == 32 and child[12:] != mine[12:]


def test_config_flags_beat_env_beat_defaults() -> None:
    parser = __import__("argparse").ArgumentParser()
    config.add_arguments(parser, config.WorkerConfig)
    args = parser.parse_args(["--concurrency", "7"])
    cfg = config.load(
        config.WorkerConfig,
        args,
        {"NSQJOBS_CONCURRENCY": "3", "NSQJOBS_QUEUES": "a, b", "NSQJOBS_EXECUTOR": "process"},
    )
    assert (cfg.concurrency, cfg.queues, cfg.executor) == (7, ("a", "b"), "process")
    assert config.load(config.WorkerConfig, None, {}).grace_s == 30.0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"NSQJOBS_CONCURRENCY": "many"},
            "--concurrency / NSQJOBS_CONCURRENCY: invalid value 'many' in NSQJOBS_CONCURRENCY",
        ),
        (
            {"NSQJOBS_EXECUTOR": "fork"},
            "--executor / NSQJOBS_EXECUTOR: invalid value 'fork' in NSQJOBS_EXECUTOR",
        ),
        ({"NSQJOBS_CONCURRENCY": "0"}, "--concurrency / NSQJOBS_CONCURRENCY: must be 1-1024"),
        ({"NSQJOBS_EXECUTOR": "gpu"}, "expected one of thread, process"),
        ({"NSQJOBS_NSQD_TCP_ADDRESS": "localhost"}, "'localhost' is not HOST:PORT"),
        ({"NSQJOBS_BACKOFF_CAP_S": "7200"}, "must be <= 3600"),
        ({"NSQJOBS_CHANNEL": "a.b"}, "without dots"),
    ],
)
def test_bad_config_names_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config.load(config.WorkerConfig, None, env)


class Args(msgspec.Struct, forbid_unknown_fields=True):
    n: Annotated[int, msgspec.Meta(ge=1)]


def other(args: Args) -> int:
    return args.n


def test_registry_validates_and_describes_tasks() -> None:
    reg = Registry()

    @task("demo.double", target=reg, max_attempts=2)
    def double(args: Args) -> int:
        """Twice n."""
        return args.n * 2

    t = reg.get("demo.double")
    assert t.run({"n": 4}) == 8
    assert (t.description, t.max_attempts, t.queue) == ("Twice n.", 2, "jobs")
    assert t.schema["$defs"]["Args"]["properties"]["n"] == {"type": "integer", "minimum": 1}
    with pytest.raises(InvalidArgumentsError) as info:
        t.validate({"n": 0})
    assert info.value.errors[0].field == "args.n"
    with pytest.raises(UnknownTaskError):
        reg.get("demo.triple")
    with pytest.raises(ValueError, match="already registered"):
        task("demo.double", target=reg)(other)
    with pytest.raises(ValueError, match="dotted lowercase"):
        task("Bad Name", target=reg)(double)
    with pytest.raises(ValueError, match="queue"):
        task("demo.q", target=reg, queue="a.b")(double)


def test_backoff_grows_exponentially_with_jitter_and_cap() -> None:
    for attempt in range(1, 12):
        step = min(60.0, 1.0 * 2 ** (attempt - 1))
        delays = [backoff_delay(attempt, 1.0, 60.0) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in delays)
        assert len(set(delays)) > 1  # jittered
    assert max(backoff_delay(30, 1.0, 60.0) for _ in range(100)) <= 60.0


def test_worker_tallies_expose_counters_a_gauge_and_a_histogram() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    hook = MetricsHook(metrics).for_task("t.a")
    MetricsHook(metrics).for_task("t.idle")  # known before its first job: zeros

    class Job:
        task_name, in_progress = "t.a", True

    job = Job()
    for seconds in (0.001, 0.0011, 2.0, 5000.0):  # a bound is inclusive; past the last: +Inf
        hook.received(job)
        hook.started(job)
        hook.succeeded(job, seconds, 10)
    hook.received(job)
    hook.started(job)
    hook.attempt_failed(job, wire.ErrorInfo(type="E", message="m"), 0.5)
    hook.received(job)
    hook.started(job)  # still running

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("nsqjobs_jobs_received_total", task="t.a") == 6
    assert value("nsqjobs_jobs_succeeded_total", task="t.a") == 4
    assert value("nsqjobs_jobs_in_progress", task="t.a") == 1
    ok = {"task": "t.a", "status": "succeeded"}
    assert value("nsqjobs_job_duration_seconds_bucket", le="0.001", **ok) == 1
    assert value("nsqjobs_job_duration_seconds_bucket", le="0.005", **ok) == 2
    assert value("nsqjobs_job_duration_seconds_bucket", le="1800.0", **ok) == 3
    assert value("nsqjobs_job_duration_seconds_bucket", le="+Inf", **ok) == 4
    assert value("nsqjobs_job_duration_seconds_count", **ok) == 4
    assert value("nsqjobs_job_duration_seconds_sum", **ok) == pytest.approx(5002.0021)
    failed = {"task": "t.a", "status": "failed"}
    assert value("nsqjobs_job_duration_seconds_bucket", le="0.1", **failed) == 0
    assert value("nsqjobs_job_duration_seconds_bucket", le="0.5", **failed) == 1
    assert value("nsqjobs_job_errors_total", task="t.a", error="E") == 1
    assert value("nsqjobs_jobs_received_total", task="t.idle") == 0
    assert value("nsqjobs_job_duration_seconds_count", task="t.idle", status="failed") == 0
    text = generate_latest(registry).decode()
    assert "# TYPE nsqjobs_jobs_received_total counter" in text
    assert "# TYPE nsqjobs_job_duration_seconds histogram" in text
    assert 'nsqjobs_jobs_in_progress{task="t.a"} 1.0' in text
    # The names are taken: an instrument of the same name cannot be registered beside them.
    with pytest.raises(ValueError, match="Duplicated"):
        Gauge("nsqjobs_jobs_in_progress", "again", registry=registry)
    with pytest.raises(ValueError, match="expected labels"):
        metrics.duration.labels("t.a")


def test_metrics_use_explicit_registries_and_base_units() -> None:
    reg_a, reg_b = CollectorRegistry(), CollectorRegistry()
    gateway, worker = GatewayMetrics(reg_a), WorkerMetrics(reg_b)  # no duplicate-name clash
    worker.succeeded.labels("noop").value += 1
    assert reg_b.get_sample_value("nsqjobs_jobs_succeeded_total", {"task": "noop"}) == 1
    # Both daemons define the publish histogram: each registry holds only its own samples.
    gateway.publish_duration.labels("pub").observe(0.001)
    worker.publish_duration.labels("pub")
    pub = {"command": "pub"}
    assert reg_a.get_sample_value("nsqjobs_publish_duration_seconds_count", pub) == 1
    assert reg_b.get_sample_value("nsqjobs_publish_duration_seconds_count", pub) == 0
    # Requests are counted by route template and status, in seconds; job-route errors are
    # also rejections, other routes' errors are not.
    gateway.request_done("/v1/jobs", "POST", 422, 0.002)
    gateway.request_done("/v1/jobs", "POST", 422, 0.003)
    gateway.request_done("/metrics", "POST", 405, 0.001)
    # Not submissions: a job looked up or cancelled, a wait, a listing.
    gateway.request_done("/v1/jobs/{id}", "GET", 404, 0.001)
    gateway.request_done("/v1/jobs/{id}", "DELETE", 409, 0.001)
    gateway.request_done("/v1/jobs/wait", "POST", 400, 0.001)
    gateway.request_done("/v1/jobs/{id}", "HEAD", 404, 0.001)
    # A method token of the client's own making is "other": no new series per token.
    for token in ("X-RANDOM-1", "X-RANDOM-2"):
        gateway.request_done("/v1/jobs/{id}", token, 405, 0.001)
    other = {"route": "/v1/jobs/{id}", "method": "other", "status": "405"}
    assert reg_a.get_sample_value("nsqjobs_http_requests_total", other) == 2
    request = {"route": "/v1/jobs", "method": "POST", "status": "422"}
    assert reg_a.get_sample_value("nsqjobs_http_requests_total", request) == 2
    duration = reg_a.get_sample_value(
        "nsqjobs_http_request_duration_seconds_sum", {"route": "/v1/jobs"}
    )
    assert duration == pytest.approx(0.005)
    assert reg_a.get_sample_value("nsqjobs_jobs_rejected_total", {"reason": "422"}) == 2
    assert reg_a.get_sample_value("nsqjobs_jobs_rejected_total", {"reason": "405"}) is None
    for reason in ("404", "409", "400"):
        assert reg_a.get_sample_value("nsqjobs_jobs_rejected_total", {"reason": reason}) is None


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", "noop", "--args", "{bad"]) == 2  # a usage error
    err = capsys.readouterr().err
    assert err.startswith("nsqjobs submit: --args is not valid JSON") and err.count("\n") == 1
    assert main(["submit", "noop", "--gateway-url", "http://127.0.0.1:9"]) == 1
    assert "cannot reach the gateway" in capsys.readouterr().err
    # Text with no UTF-8 form (a lone surrogate, bytes that are not UTF-8): usage errors.
    assert main(["submit", "noop", "--args", '{"s": "\\ud800"}']) == 2
    assert "not valid UTF-8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["submit", "\udcff"])
    assert usage.value.code == 2 and "not valid UTF-8" in capsys.readouterr().err
    for limit in ("0", "1001", "ten"):  # a --limit the gateway would refuse: a usage error
        with pytest.raises(SystemExit) as usage:
            main(["jobs", "--limit", limit])
        err = capsys.readouterr().err
        assert usage.value.code == 2 and "from 1 to 1000" in err
        # One line, as every error: what was wrong, and where the help is.
        assert err.count("\n") == 1 and err.endswith("(see nsqjobs jobs --help)\n"), err
    # `check` with what is not a URL to check: one line, 2; nothing there: one line, 1.
    for url in ("foo", "http://[::1", "http://127.0.0.1:abc/readyz", "ftp://h/x"):
        assert main(["check", url]) == 2, url
        err = capsys.readouterr().err
        assert err.startswith("nsqjobs check: ") and err.count("\n") == 1, err
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
    assert main(["check", f"http://127.0.0.1:{port}/readyz", "--timeout", "2"]) == 1
    assert "cannot reach" in capsys.readouterr().err
    env = {"NSQJOBS_CONCURRENCY": "x", "PATH": "/usr/bin:/bin"}
    proc = run_cli("worker", env=env)
    assert proc.returncode == 1
    assert (
        proc.stderr == "nsqjobs worker: --concurrency / NSQJOBS_CONCURRENCY: invalid value 'x' "
        "in NSQJOBS_CONCURRENCY (invalid literal for int() with base 10: 'x')\n"
    )


@pytest.mark.parametrize("command", ["gateway", "worker", "submit"])
def test_cli_help(command: str) -> None:
    proc = run_cli(command, "--help")
    assert proc.returncode == 0 and "usage: nsqjobs" in proc.stdout
    if command != "submit":
        assert "--nsqd-tcp-address" in proc.stdout and "NSQJOBS_NSQD_TCP_ADDRESS" in proc.stdout


def test_coalesced_publishes_stay_under_nsqds_body_limit() -> None:
    # Single PUBs of one loop turn become MPUBs; each must fit nsqd's --max-body-size. The
    # first of the turn finds the publisher idle and goes alone, at once.
    async def groups(max_body_size: int) -> list[int]:
        publisher = Publisher(["127.0.0.1:9"])  # never connects: only the grouping is used
        sizes: list[int] = []

        def spawn(topic: str, group: list[tuple[bytes, asyncio.Future[None]]]) -> None:
            sizes.append(4 + sum(4 + len(body) for body, _ in group))
            for _, fut in group:
                fut.cancel()
            # Awaiting nsqd's answer, as a real group's task is: the publisher is not idle.
            publisher._groups.add(asyncio.get_running_loop().create_future())  # type: ignore[arg-type]

        publisher._spawn = spawn  # type: ignore[method-assign]
        publisher.set_limits(1024 * 1024, max_body_size)
        futures = [publisher.enqueue("jobs", b"x" * 1000) for _ in range(100)]
        await asyncio.wait(futures)
        publisher.close()
        return sizes

    small = asyncio.run(groups(10_000))
    assert small[0] == 4 + 1004  # the lone one
    assert max(small) <= 10_000 < max(small) + 1004  # then full groups: 9 messages each
    assert len(small) == 12
    assert asyncio.run(groups(5 * 1024 * 1024)) == [4 + 1004, 4 + 99 * 1004]


def test_the_harness_starts_nsq_again_when_a_port_was_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process takes the port between our choosing it and nsqlookupd binding it.
    with socket.socket() as taken, ExitStack() as stack:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        real = testing.free_port
        monkeypatch.setattr(testing, "free_port", lambda: next(ports, None) or real())
        nsq = testing.start_nsq(stack, tmp_path)
        assert nsq.stack is stack
        assert testing.ping(nsq.url("/ping"))
        assert (tmp_path / "try1" / "nsqlookupd.log").read_text().count("address already in use")


def test_a_reader_closed_before_it_started_never_starts() -> None:
    # A SIGTERM while a worker starts closes readers pynsq has not started yet (it starts them
    # on the loop turn after their construction): closing must not fail, nor dial afterwards.
    from nsqjobs.nsq.reader import Reader

    async def body() -> None:
        reader = Reader(
            "jobs", "workers", message_handler=lambda _m: None, nsqd_tcp_addresses=["127.0.0.1:9"]
        )
        reader.close()
        for _ in range(5):
            await asyncio.sleep(0)
        assert reader.conns == {} and reader.redist_periodic is None

    asyncio.run(body())


def test_every_error_survives_pickling_with_its_attributes() -> None:
    # The process executor pickles what a task raised: a task that uses the client and fails
    # with one of its errors must reach the worker as that error, not as "unreadable".
    failed = TaskFailed("ValueError", "bad n", job_id="j1", status="dead")
    unknown = UnknownTask(404, "no such task", {"task": "nope", "type": "x"})
    partial = PartiallyAccepted(503, "part", {"unaccepted_ids": ["a", "b"]})
    partial.retry_after = 1.0
    invalid = InvalidArgumentsError([FieldError("args.n", "must be >= 0")])
    decode = DecodeError("not JSON", b"\xff")
    for error in (failed, unknown, partial, invalid, decode, UnknownTaskError("t" * 200)):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and str(back) == str(error)
        assert vars(back) == vars(error)
    assert pickle.loads(pickle.dumps(partial)).unaccepted_ids == ["a", "b"]


def test_every_setting_is_in_the_readmes_table_with_its_flag_and_default() -> None:
    # The README's configuration table is written by hand: every variable of every daemon is
    # there, with its flag and default, and the table names no variable the code lacks.
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("NSQJOBS_") and cells[1].startswith("--"):
            rows[cells[0]] = (cells[1], cells[3])
    seen = set()
    for cls in (config.GatewayConfig, config.WorkerConfig, config.ExporterConfig):
        for f in dataclasses.fields(cls):
            env = config.env_name(f)
            seen.add(env)
            assert env in rows, f"{env} is not in the README's configuration table"
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            shown = ",".join(default) if isinstance(default, tuple) else str(default)
            flag, written = rows[env]  # a default may be followed by a note in brackets
            assert flag == config.flag_name(f), (env, flag)
            written = written.split(" (")[0]
            if isinstance(default, int | float) and not isinstance(default, bool):
                assert float(written) == default, (env, written)
            else:
                assert written == (shown or "empty"), (env, written)
    assert set(rows) <= seen, set(rows) - seen


def test_nsqd_failing_to_store_a_publish_is_sent_again_not_a_refusal() -> None:
    # E_PUB_FAILED and its kin: nsqd could not store the message (a topic exiting, a disk
    # queue failing) and closes the connection. Nothing was stored: the frame counts as never
    # sent (sent again after a reconnect), not as nsqd refusing the message for good.
    answers: list[object] = []

    class Conn:
        id = "nsqd:4150"
        refused = False
        closed = False

        def __init__(self) -> None:
            self.waiting = collections.deque([(lambda c, d: answers.append(d), 0.0)] * 2)

        def close(self) -> None:
            self.closed = True

    for code, not_sent in ((b"E_PUB_FAILED PUB failed exiting", True), (b"E_BAD_MESSAGE x", False)):
        conn = Conn()
        writer = cast(publisher._Writer, None)  # the method uses nothing of its writer
        publisher._Writer._on_connection_error(writer, conn, error=nsq.protocol.Error(code))
        assert conn.refused and conn.closed  # fatal either way: nsqd reads nothing after it
        assert isinstance(answers[-1], publisher._NotSent) is not_sent
        assert len(conn.waiting) == 1  # the frame behind it is the close's to answer


def test_publishes_pass_over_a_stalled_nsqd_while_another_answers() -> None:
    class Conn:
        refused = False

        def __init__(self, name: str, overdue: bool) -> None:
            self.id = name
            self.sent: list[bytes] = []
            # An answer waited for since long ago (a paused nsqd), or nothing waited for.
            self.waiting = collections.deque([(print, 0.0)] if overdue else [])

        def connected(self) -> bool:
            return True

        def send_now(self, frame: bytes) -> None:
            self.sent.append(frame)

    stalled, healthy = Conn("a:4150", overdue=True), Conn("b:4150", overdue=False)
    writer = publisher._Writer.__new__(publisher._Writer)  # no connections dialled
    writer.conns = {c.id: c for c in (stalled, healthy)}
    writer.stall_s = 5.0
    for _ in range(20):
        writer.send_frame(b"PUB", lambda conn, data: None)
    assert (len(stalled.sent), len(healthy.sent)) == (0, 20)
    healthy.waiting.appendleft((print, 0.0))  # both stalled: a frame still goes somewhere
    writer.send_frame(b"PUB", lambda conn, data: None)
    assert len(stalled.sent) + len(healthy.sent) == 21


def test_a_dead_childs_exit_is_said_as_a_log_would() -> None:
    from nsqjobs.worker.executors import _exit_status

    assert _exit_status(70) == "exit code 70"
    assert _exit_status(-11) == "killed by SIGSEGV"
    assert _exit_status(-9) == "killed by SIGKILL"
    assert _exit_status(-250) == "killed by signal 250"
    assert "still running" in _exit_status(None)


def test_a_tracebacks_log_text_is_cut_however_long_the_message() -> None:
    from nsqjobs.worker.settle import MAX_TRACEBACK_CHARS, traceback_text

    try:
        raise ValueError("x" * 5_000_000)
    except ValueError as exc:
        text = traceback_text(exc)
    assert text.startswith("Traceback (most recent call last):")
    assert len(text) < MAX_TRACEBACK_CHARS + 40 and text.endswith("more chars]")

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise ValueError("no")

    assert "Unprintable" in traceback_text(Unprintable())
