"""The four pipeline benchmarks. Each measures nsqjobs and its bare-NSQ baseline back to back."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nsqjobs.names import DEAD_LETTER_TOPIC, DEFAULT_QUEUE, RESULTS_TOPIC, WORKER_CHANNEL
from nsqjobs.testing import Nsq, Proc, free_port, wait_for, wait_ready

from bench import hey, payloads
from bench.keepalive import KeepAlive
from bench.procs import BenchError, log, start_gateway, start_process, worker_argv
from bench.results_model import Comparison, Latency, Round

JSON = "application/json"
PUB_TOPIC = "bench_pub"
MPUB_TOPIC = "bench_mpub"
GATEWAY_TOPICS = (DEFAULT_QUEUE, RESULTS_TOPIC, DEAD_LETTER_TOPIC)


@dataclass(frozen=True)
class Settings:
    """Sizes and durations of one run (``--quick`` makes everything shorter)."""

    rounds: int = 3
    single_seconds: float = 10.0
    single_concurrency: int = 32
    batch_seconds: float = 5.0
    batch_concurrency: int = 4
    warmup_seconds: float = 1.0
    drain_messages: int = 200_000
    worker_concurrency: int = 64
    drain_poll_s: float = 0.02
    latency_rate: float = 50.0
    latency_seconds: float = 10.0
    latency_wait_s: float = 5.0

    @classmethod
    def quick(cls) -> Settings:
        """A shorter run: fewer rounds, shorter loads, fewer messages."""
        return cls(
            rounds=2,
            single_seconds=3.0,
            batch_seconds=2.0,
            warmup_seconds=0.5,
            drain_messages=20_000,
            latency_seconds=4.0,
        )


def _order(round_no: int, first: str, second: str) -> tuple[str, str]:
    """ABAB...: alternate which side runs first, so drift hits both sides alike."""
    return (first, second) if round_no % 2 == 0 else (second, first)


# -- 1 and 2: the gateway against nsqd's own HTTP publish ------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One side of a hey comparison: where to POST what."""

    name: str
    url: str
    body: Path


def _hey_rounds(
    comparison: Comparison,
    arms: list[Arm],
    *,
    concurrency: int,
    seconds: float,
    warmup_s: float,
    per_request: int,
    rounds: int,
    cleanup: list[str],
    nsq: Nsq,
) -> Comparison:
    """Rotate hey runs over ``arms`` (nsqjobs, baseline, optional reference) for ``rounds``.

    Rates are 2xx answers x ``per_request`` per second; the order rotates every round.
    """
    for arm in arms:  # untimed warm-up of every side
        hey.run(arm.url, arm.body, concurrency=concurrency, seconds=warmup_s, content_type=JSON)
    for topic in cleanup:
        nsq.delete_topic(topic)
    for r in range(rounds):
        order = arms[r % len(arms) :] + arms[: r % len(arms)]
        got: dict[str, hey.HeyResult] = {}
        for arm in order:
            got[arm.name] = hey.run(
                arm.url, arm.body, concurrency=concurrency, seconds=seconds, content_type=JSON
            )
            for topic in cleanup:  # keep nsqd's backlog from growing across runs
                nsq.delete_topic(topic)
        subject, baseline = got[arms[0].name], got[arms[1].name]
        reference = got[arms[2].name] if len(arms) > 2 else None
        rnd = Round(
            subject=subject.ok_per_s * per_request,
            baseline=baseline.ok_per_s * per_request,
            reference=reference.ok_per_s * per_request if reference else None,
            order=",".join(a.name for a in order),
            subject_failed=subject.failed,
            baseline_failed=baseline.failed,
            detail={
                "subject_status": {str(k): v for k, v in subject.statuses.items()},
                "baseline_status": {str(k): v for k, v in baseline.statuses.items()},
                "subject_errors": subject.errors,
                "baseline_errors": baseline.errors,
            },
        )
        comparison.rounds.append(rnd)
        extra = f", reference {rnd.reference:,.0f}" if rnd.reference is not None else ""
        failed = (
            f" (failed: nsqjobs {subject.failed}, baseline {baseline.failed})"
            if subject.failed or baseline.failed
            else ""
        )
        log(
            f"  {comparison.key} round {r + 1}: nsqjobs {rnd.subject:,.0f} {comparison.unit}, "
            f"baseline {rnd.baseline:,.0f}{extra}, ratio {rnd.ratio:.3f}{failed}"
        )
    return comparison


def gateway_single(nsq: Nsq, gateway: str, s: Settings, work: Path) -> Comparison:
    """POST /v1/jobs (one noop job) against nsqd's POST /pub of an envelope-sized body.

    A third arm, for reference only, measures a do-nothing tornado handler on tornado's own
    HTTP server: the most one process answers here through tornado's HTTP1Connection, which
    is why the gateway serves its tornado application on an httptools connection layer.
    """
    submit = payloads.write(work / "submit.json", payloads.submit_body())
    env = payloads.write(work / "envelope.json", payloads.envelope())
    comparison = Comparison(
        key="gateway_single",
        title="Gateway single job: POST /v1/jobs vs nsqd POST /pub",
        unit="req/s",
        subject="nsqjobs gateway POST /v1/jobs (noop), 202 answers",
        baseline=f"nsqd POST /pub?topic={PUB_TOPIC}, 200 answers",
        reference="bench/tornado_ceiling.py, one process on tornado's own HTTP server whose "
        "POST handler answers a canned 202 (no parsing, no publish)",
        target=0.3,
        settings={
            "tool": "hey",
            "rounds": s.rounds,
            "seconds_per_run": s.single_seconds,
            "concurrency": s.single_concurrency,
            "request_body_bytes": submit.stat().st_size,
            "baseline_body_bytes": env.stat().st_size,
            "gateway_processes": 1,
        },
        notes=[
            "Only 2xx answers count. The baseline body is a real job envelope, as the gateway "
            "publishes it.",
            "Both topics have no channel (nsqd keeps the messages) and are deleted after each run.",
        ],
    )
    with ExitStack() as stack:
        port = free_port()
        ceiling = start_process(
            stack,
            "tornado-ceiling",
            [sys.executable, "-m", "bench.tornado_ceiling", "--port", str(port)],
            work,
        )
        wait_ready(ceiling, f"http://127.0.0.1:{port}/ping", 30.0)
        return _hey_rounds(
            comparison,
            [
                Arm("gateway", f"{gateway}/v1/jobs", submit),
                Arm("nsqd", nsq.url("/pub", topic=PUB_TOPIC), env),
                Arm("tornado", f"http://127.0.0.1:{port}/v1/jobs", submit),
            ],
            concurrency=s.single_concurrency,
            seconds=s.single_seconds,
            warmup_s=s.warmup_seconds,
            per_request=1,
            rounds=s.rounds,
            cleanup=[DEFAULT_QUEUE, PUB_TOPIC],
            nsq=nsq,
        )


def gateway_batch(nsq: Nsq, gateway: str, s: Settings, work: Path) -> Comparison:
    """POST /v1/jobs/batch (1000 jobs) against nsqd's POST /mpub of 1000 envelopes."""
    n = payloads.BATCH_SIZE
    batch = payloads.write(work / "batch.json", payloads.batch_body(n))
    mpub = payloads.write(work / "mpub.txt", payloads.mpub_body(n))
    comparison = Comparison(
        key="gateway_batch",
        title=f"Batch of {n}: POST /v1/jobs/batch vs nsqd POST /mpub",
        unit="jobs/s",
        subject=f"nsqjobs gateway POST /v1/jobs/batch ({n} noop jobs), 202 answers",
        baseline=f"nsqd POST /mpub?topic={MPUB_TOPIC} ({n} newline-separated envelopes)",
        target=0.5,
        settings={
            "tool": "hey",
            "rounds": s.rounds,
            "seconds_per_run": s.batch_seconds,
            "concurrency": s.batch_concurrency,
            "jobs_per_request": n,
            "request_body_bytes": batch.stat().st_size,
            "baseline_body_bytes": mpub.stat().st_size,
            "gateway_processes": 1,
        },
        notes=["jobs/s = 2xx answers x 1000 / run time. Topics deleted after each run."],
    )
    return _hey_rounds(
        comparison,
        [
            Arm("gateway", f"{gateway}/v1/jobs/batch", batch),
            Arm("nsqd", nsq.url("/mpub", topic=MPUB_TOPIC), mpub),
        ],
        concurrency=s.batch_concurrency,
        seconds=s.batch_seconds,
        warmup_s=s.warmup_seconds,
        per_request=n,
        rounds=s.rounds,
        cleanup=[DEFAULT_QUEUE, MPUB_TOPIC],
        nsq=nsq,
    )


# -- 3: one worker against a bare pynsq Reader -----------------------------------------------------


@dataclass
class Drain:
    """How one consumer drained a pre-filled channel."""

    rate: float  # messages per second, from the first observed drain to empty
    seconds: float
    counted: int
    requeued: int
    timed_out: int
    results: int  # result envelopes published meanwhile (the worker's; 0 for the bare reader)


def _measure_drain(
    nsq: Nsq, proc: Proc, topic: str, n: int, poll_s: float
) -> tuple[float, float, int, dict[str, Any]]:
    """Poll the channel until it is empty; the clock starts at the first drained message."""
    start_deadline = time.monotonic() + 90.0
    drain_deadline = float("inf")
    t0: float | None = None
    done0 = 0
    while True:
        proc.check_alive()
        before = time.monotonic()
        ch = nsq.channel(topic, WORKER_CHANNEL)
        at = (before + time.monotonic()) / 2
        if ch is None:
            raise BenchError(f"channel {topic}/{WORKER_CHANNEL} disappeared")
        left = int(ch["depth"]) + int(ch["in_flight_count"]) + int(ch["deferred_count"])
        if t0 is None and int(ch["depth"]) < n:
            t0, done0 = at, n - left
            drain_deadline = at + max(60.0, n / 200)
        if t0 is not None and left == 0:
            return t0, at, done0, ch
        now = time.monotonic()
        if t0 is None and now > start_deadline:
            raise BenchError(f"{proc.name} did not start consuming {topic} within 90s")
        if now > drain_deadline:
            raise BenchError(f"{proc.name} did not drain {topic} in time ({left} left)")
        time.sleep(poll_s)


def _drain_once(
    nsq: Nsq, who: str, topic: str, bodies: list[bytes], s: Settings, log_dir: Path
) -> Drain:
    """Pre-fill a fresh topic, start one consumer, time the drain, stop it, clean up."""
    n = len(bodies)
    nsq.create_channel(topic, WORKER_CHANNEL)
    nsq.mpub(topic, bodies)
    wait_for(
        lambda: (nsq.channel(topic, WORKER_CHANNEL) or {}).get("depth") == n,
        30.0,
        f"{n} messages in {topic}/{WORKER_CHANNEL}",
    )
    with ExitStack() as stack:
        if who.startswith("worker"):
            argv = worker_argv(
                nsq,
                concurrency=s.worker_concurrency,
                queue=topic,
                channel=WORKER_CHANNEL,
                lookupd=False,
                port=free_port(),
            )
            if who == "worker_batched":
                argv += ["--delivery", "batched"]
        else:
            argv = [
                sys.executable,
                "-m",
                "bench.bare_reader",
                "--nsqd-tcp-address",
                nsq.nsqd_tcp,
                "--topic",
                topic,
                "--channel",
                WORKER_CHANNEL,
                "--max-in-flight",
                str(s.worker_concurrency),
            ]
        proc = start_process(stack, f"{who}-{topic}", argv, log_dir)
        t0, t1, done0, ch = _measure_drain(nsq, proc, topic, n, s.drain_poll_s)
    results = nsq.message_count(RESULTS_TOPIC)
    nsq.delete_topic(topic)
    nsq.delete_topic(RESULTS_TOPIC)
    if who.startswith("worker") and results != n:
        raise BenchError(f"the worker published {results} results for {n} jobs")
    seconds = t1 - t0
    return Drain(
        rate=(n - done0) / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        counted=n - done0,
        requeued=int(ch["requeue_count"]),
        timed_out=int(ch["timeout_count"]),
        results=results,
    )


def worker_dispatch(nsq: Nsq, s: Settings, log_dir: Path) -> Comparison:
    """One ``nsqjobs worker`` against a bare FIN-only pynsq Reader on the same messages."""
    n = s.drain_messages
    log(f"  building {n:,} job envelopes")
    bodies = payloads.envelopes(n)
    comparison = Comparison(
        key="worker_dispatch",
        title="Worker dispatch: one nsqjobs worker vs a bare pynsq Reader",
        unit="jobs/s",
        subject=f"nsqjobs worker --concurrency {s.worker_concurrency} (thread executor, default "
        "adaptive delivery), noop",
        baseline=f"bench/bare_reader.py: pynsq Reader, max_in_flight {s.worker_concurrency}, "
        "handler returns True (FIN)",
        reference="the same worker with --delivery batched (the old default: nsqd always batches)",
        target=0.9,
        settings={
            "rounds": s.rounds,
            "messages_per_run": n,
            "worker_concurrency": s.worker_concurrency,
            "max_in_flight": s.worker_concurrency,
            "poll_interval_s": s.drain_poll_s,
            "envelope_bytes": len(bodies[0]),
        },
        notes=[
            "The worker's cost includes publishing one result envelope per job to topic "
            f"'{RESULTS_TOPIC}' and waiting for nsqd's OK before FIN; the bare Reader only FINs.",
            "Each run gets a fresh topic pre-filled by MPUB; the clock starts at the first "
            "message drained (process start-up excluded) and stops when depth, in-flight and "
            "deferred are all 0 on nsqd's /stats.",
            "Both consumers read straight from nsqd (no nsqlookupd).",
            "The bare Reader lets nsqd batch deliveries up to 16 KiB with pynsq's default flush "
            "timeout (250 ms); the worker asks 16 KiB and 25 ms, and by default keeps each "
            "connection eager (unbatched) until a backlog shows, then batched.",
            "The worker runs at --log-level WARNING (at INFO it logs two lines per job).",
        ],
    )
    for r in range(s.rounds):
        order = (*_order(r, "worker", "bare"), "worker_batched")
        got: dict[str, Drain] = {}
        for who in order:
            got[who] = _drain_once(nsq, who, f"bench_drain_{r}_{who}", bodies, s, log_dir)
        w, b, u = got["worker"], got["bare"], got["worker_batched"]
        rnd = Round(
            subject=w.rate,
            baseline=b.rate,
            reference=u.rate,
            order=",".join(order),
            subject_failed=w.requeued + w.timed_out,
            baseline_failed=b.requeued + b.timed_out,
            detail={
                "subject_seconds": round(w.seconds, 3),
                "baseline_seconds": round(b.seconds, 3),
                "subject_counted": w.counted,
                "baseline_counted": b.counted,
                "subject_results_published": w.results,
            },
        )
        comparison.rounds.append(rnd)
        log(
            f"  worker_dispatch round {r + 1}: worker {w.rate:,.0f} jobs/s ({w.seconds:.2f}s), "
            f"bare reader {b.rate:,.0f} ({b.seconds:.2f}s), ratio {rnd.ratio:.3f}; "
            f"batched worker {u.rate:,.0f} ({u.rate / b.rate:.3f})"
        )
    return comparison


# -- 4: end-to-end latency -------------------------------------------------------------------------


# The worker's delivery settings the latency benchmark compares, each in its own runs.
DELIVERY_ARMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("adaptive (default)", ()),
    ("batched (--delivery batched, the old default)", ("--delivery", "batched")),
    ("unbuffered (--delivery-buffer-ms 0)", ("--delivery-buffer-ms", "0")),
)


async def _submit_at_rate(gateway: str, s: Settings, result: Latency) -> None:
    """Open loop: one ``?wait=`` submission every 1/rate s, over kept-alive connections."""
    client = KeepAlive(gateway)
    path = f"/v1/jobs?wait={s.latency_wait_s:g}"
    body = payloads.submit_body()

    async def one(record: bool) -> None:
        sent = time.perf_counter()
        try:
            code, answer = await client.post(path, body, JSON)
        except Exception:
            if record:
                result.failed += 1
            return
        elapsed = time.perf_counter() - sent
        if not record:
            return
        if code == 202:
            result.timed_out += 1
        elif code == 200 and json.loads(answer).get("status") == "succeeded":
            result.latencies_s.append(elapsed)
        else:
            result.failed += 1

    try:
        for _ in range(5):  # warm-up, not recorded: a few connections, every path once
            await asyncio.gather(*(one(record=False) for _ in range(4)))
        count = round(s.latency_rate * s.latency_seconds)
        start = time.perf_counter()
        tasks = []
        for i in range(count):
            delay = start + i / s.latency_rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(record=True)))
            result.sent += 1
        await asyncio.wait_for(asyncio.gather(*tasks), s.latency_wait_s + 20)
    finally:
        client.close()


def end_to_end_latency(nsq: Nsq, s: Settings, log_dir: Path) -> list[Latency]:
    """One gateway and one worker per run; noop jobs at a light fixed rate, waiting for results.

    One run per worker delivery setting (``DELIVERY_ARMS``) per round, the order rotating each
    round; each setting's samples of all rounds make one :class:`Latency`.
    """
    got = [
        Latency(
            settings={
                "delivery": label,
                "worker_flags": " ".join(flags),
                "rate_per_s": s.latency_rate,
                "seconds": s.latency_seconds * s.rounds,
                "rounds": s.rounds,
                "wait_s": s.latency_wait_s,
                "worker_concurrency": s.worker_concurrency,
                "discovery": "nsqlookupd (gateway results reader and worker)",
            },
            notes=[
                "Latency = client send to HTTP 200 carrying the succeeded result: gateway "
                "validation, PUB to nsqd, worker receive, run, result PUB, gateway results "
                "reader, answer.",
                "The client keeps its connections alive (bench/keepalive.py), as the peers' "
                "clients keep theirs; 20 warm-up requests per run are not counted.",
            ],
        )
        for label, flags in DELIVERY_ARMS
    ]
    with ExitStack() as stack:
        gateway = start_gateway(stack, nsq, log_dir, GATEWAY_TOPICS, name="gateway-latency")
        for r in range(s.rounds):
            arms = list(range(len(DELIVERY_ARMS)))
            for i in arms[r % len(arms) :] + arms[: r % len(arms)]:
                label, flags = DELIVERY_ARMS[i]
                one = Latency(settings={})
                with ExitStack() as run:
                    port = free_port()
                    argv = worker_argv(
                        nsq,
                        concurrency=s.worker_concurrency,
                        queue=DEFAULT_QUEUE,
                        channel=WORKER_CHANNEL,
                        lookupd=True,
                        port=port,
                    )
                    worker = start_process(run, f"worker-latency-{r}-{i}", [*argv, *flags], log_dir)
                    wait_ready(worker, f"http://127.0.0.1:{port}/readyz", 90.0)
                    asyncio.run(_submit_at_rate(gateway, s, one))
                log(
                    f"  latency round {r + 1}, {label}: p50 {one.ms(50):.2f} ms, "
                    f"p99 {one.ms(99):.2f} ms ({len(one.latencies_s)} of {one.sent} ok, "
                    f"{one.timed_out} timed out, {one.failed} failed)"
                )
                merged = got[i]
                merged.latencies_s += one.latencies_s
                merged.sent += one.sent
                merged.timed_out += one.timed_out
                merged.failed += one.failed
    nsq.delete_topic(DEFAULT_QUEUE)
    return got


def settings_json(s: Settings) -> dict[str, object]:
    """Settings as plain data."""
    return asdict(s)
