"""What ``track_started`` costs the worker: noop jobs with and without it, side by side.

    python -m bench.started [--quick] [--rounds N] [--messages N]

One ``nsqjobs worker`` (thread executor, ``--concurrency 64``) drains a topic pre-filled with N
``debug.noop`` envelopes, then (alternating the order each round) N ``debug.noop_tracked``
envelopes, the same function with ``track_started=True``: one more publish per job (a started
event, fire and forget) on top of the result. A bare pynsq Reader (``bench/bare_reader.py``)
drains the same messages in each round, as in ``python -m bench``'s worker dispatch, so both
worker figures are also given against it. The clock and the drain are those of
``bench.scenarios`` (first message drained to an empty channel on nsqd's /stats).

Figures go to ``bench/results/started.json`` and ``started.md``; progress to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from nsqjobs import wire
from nsqjobs.names import (
    ENV_DEBUG_TASKS,
    LEDGER_CHANNEL,
    RESULTS_TOPIC,
    STARTED_TOPIC,
    WORKER_CHANNEL,
)
from nsqjobs.testing import (
    HarnessError,
    Nsq,
    free_port,
    need_binary,
    start_nsq,
    temp_dir,
    wait_for,
    wait_ready,
)

from bench import payloads, report, scenarios
from bench.procs import ROOT, BenchError, log, start_process, worker_argv
from bench.results_model import Comparison, Round

ARMS = ("untracked", "tracked", "bare")
TASKS = {"untracked": "debug.noop", "tracked": "debug.noop_tracked", "bare": "debug.noop"}


def envelopes(task: str, n: int) -> list[bytes]:
    """``n`` distinct noop envelopes of ``task`` (the arguments of ``python -m bench``)."""
    now = wire.now()
    return [
        wire.encode(
            wire.JobEnvelope(id=job_id, task=task, args=payloads.ARGS, created_at=now, timeout_s=10)
        )
        for job_id in wire.new_job_ids(n)
    ]


@dataclass
class Run:
    """One arm's drain: its rate, and the CPU the consumer and nsqd spent per message."""

    rate: float
    consumer_us: float
    nsqd_us: float
    event_messages: int  # messages on the started topic (each holds one loop turn's events)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bare_argv(nsq: Nsq, topic: str, channel: str, max_in_flight: int) -> list[str]:
    """The baseline: a bare pynsq Reader that FINs everything on ``topic``/``channel``."""
    return [
        sys.executable,
        "-m",
        "bench.bare_reader",
        "--nsqd-tcp-address",
        nsq.nsqd_tcp,
        "--topic",
        topic,
        "--channel",
        channel,
        "--max-in-flight",
        str(max_in_flight),
    ]


def consumer_argv(nsq: Nsq, arm: str, topic: str, s: scenarios.Settings, port: int) -> list[str]:
    """The worker, or the bare Reader, on ``topic``."""
    if arm == "bare":
        return bare_argv(nsq, topic, WORKER_CHANNEL, s.worker_concurrency)
    return worker_argv(
        nsq,
        concurrency=s.worker_concurrency,
        queue=topic,
        channel=WORKER_CHANNEL,
        lookupd=False,
        port=port,
    )


def events_read(nsq: Nsq) -> Callable[[], bool]:
    """Nothing left on the ledger's channel of the started topic, queued or in flight."""

    def check() -> bool:
        c = nsq.channel(STARTED_TOPIC, LEDGER_CHANNEL)
        return c is not None and (c["depth"], c["in_flight_count"]) == (0, 0)

    return check


def subscribed(nsq: Nsq, topic: str, channel: str) -> Callable[[], bool]:
    """Some client is subscribed to ``topic``/``channel``."""
    return lambda: bool((nsq.channel(topic, channel) or {}).get("clients"))


def drain(
    nsq: Nsq, arm: str, round_no: int, bodies: list[bytes], s: scenarios.Settings, work: Path
) -> Run:
    """Start the consumer on a paused channel, pre-fill it, then time the drain.

    The consumer is connected and idle before the messages come, so the CPU it spends from
    the unpause to the end is the drain's alone (start-up excluded).
    """
    n, topic = len(bodies), f"bench_started_{round_no}_{arm}"
    nsq.create_channel(topic, WORKER_CHANNEL)
    nsq.post("/channel/pause", topic=topic, channel=WORKER_CHANNEL)
    if nsq.nsqd is None:
        raise BenchError("no nsqd process to measure")
    nsqd_pid = nsq.nsqd.proc.pid
    with ExitStack() as stack:
        # The ledger's part: a reader of the started events on its durable channel, in every
        # arm (idle in two), so nsqd delivers the events rather than keeping them.
        count_file = work / f"events-{topic}.txt"
        ledger = [
            sys.executable,
            "-m",
            "bench.events_reader",
            "--nsqd-tcp-address",
            nsq.nsqd_tcp,
            "--count-file",
            str(count_file),
        ]
        events_reader = start_process(stack, f"events-{topic}", ledger, work)
        wait_for(subscribed(nsq, STARTED_TOPIC, LEDGER_CHANNEL), 60, "the events' reader")
        port = free_port()
        argv = consumer_argv(nsq, arm, topic, s, port)
        proc = start_process(stack, f"{arm}-{topic}", argv, work)
        if arm == "bare":
            wait_for(subscribed(nsq, topic, WORKER_CHANNEL), 60, "the bare Reader")
        else:
            wait_ready(proc, f"http://127.0.0.1:{port}/readyz", 90.0)
        nsq.mpub(topic, bodies)
        wait_for(
            lambda: (nsq.channel(topic, WORKER_CHANNEL) or {}).get("depth") == n,
            30.0,
            f"{n} messages in {topic}/{WORKER_CHANNEL}",
        )
        consumer0, nsqd0 = cpu_s(proc.proc.pid), cpu_s(nsqd_pid)
        nsq.post("/channel/unpause", topic=topic, channel=WORKER_CHANNEL)
        t0, t1, done0, _ = scenarios._measure_drain(nsq, proc, topic, n, s.drain_poll_s)
        consumer1, nsqd1 = cpu_s(proc.proc.pid), cpu_s(nsqd_pid)
        wait_for(events_read(nsq), 30, "the started events read")
        if events_reader.stop() != 0:
            raise BenchError(f"the events reader failed: {events_reader.log_tail()}")
        events = int(count_file.read_text())
    results = nsq.message_count(RESULTS_TOPIC)
    messages = nsq.message_count(STARTED_TOPIC)
    for done in (topic, RESULTS_TOPIC, STARTED_TOPIC):  # nobody reads them: do not let them grow
        nsq.delete_topic(done)
    if arm != "bare" and results != n:
        raise BenchError(f"{arm}: the worker published {results} results for {n} jobs")
    if events != (n if arm == "tracked" else 0):
        raise BenchError(f"{arm}: {events} started events for {n} jobs")
    seconds = t1 - t0
    return Run(
        rate=(n - done0) / seconds if seconds > 0 else 0.0,
        consumer_us=(consumer1 - consumer0) / n * 1e6,
        nsqd_us=(nsqd1 - nsqd0) / n * 1e6,
        event_messages=messages,
    )


def comparisons(s: scenarios.Settings, n: int) -> dict[str, Comparison]:
    """The three ratios the rounds give: tracked/untracked, and each worker against bare."""
    settings = {
        "rounds": s.rounds,
        "messages_per_run": n,
        "worker_concurrency": s.worker_concurrency,
        "executor": "thread",
    }
    worker = f"nsqjobs worker --concurrency {s.worker_concurrency}"
    bare = f"bench/bare_reader.py (pynsq Reader, max_in_flight {s.worker_concurrency}, FIN only)"
    return {
        "tracked_vs_untracked": Comparison(
            key="tracked_vs_untracked",
            title="track_started: noop with it vs without it",
            unit="jobs/s",
            subject=f"{worker}, debug.noop_tracked (result + started event per job)",
            baseline=f"{worker}, debug.noop (result per job)",
            target=0.9,
            settings=settings,
        ),
        "untracked_vs_bare": Comparison(
            key="untracked_vs_bare",
            title="Worker dispatch without track_started vs a bare Reader",
            unit="jobs/s",
            subject=f"{worker}, debug.noop",
            baseline=bare,
            target=0.8,
            settings=settings,
        ),
        "tracked_vs_bare": Comparison(
            key="tracked_vs_bare",
            title="Worker dispatch with track_started vs a bare Reader",
            unit="jobs/s",
            subject=f"{worker}, debug.noop_tracked",
            baseline=bare,
            target=0.8,
            settings=settings,
        ),
    }


def run(s: scenarios.Settings, n: int, work: Path, nsq: Nsq) -> dict[str, Comparison]:
    """Alternate the three arms over ``s.rounds`` rounds on fresh topics."""
    bodies = {arm: envelopes(TASKS[arm], n) for arm in ARMS}
    found = comparisons(s, n)
    for r in range(s.rounds):
        order = ARMS[r % 3 :] + ARMS[: r % 3]
        runs = {arm: drain(nsq, arm, r, bodies[arm], s, work) for arm in order}
        for key, (subject, baseline) in {
            "tracked_vs_untracked": ("tracked", "untracked"),
            "untracked_vs_bare": ("untracked", "bare"),
            "tracked_vs_bare": ("tracked", "bare"),
        }.items():
            a, b = runs[subject], runs[baseline]
            found[key].rounds.append(
                Round(
                    subject=a.rate,
                    baseline=b.rate,
                    order=",".join(order),
                    detail={
                        "subject_cpu_us_per_job": round(a.consumer_us, 2),
                        "baseline_cpu_us_per_job": round(b.consumer_us, 2),
                        "nsqd_cpu_us_per_job_subject": round(a.nsqd_us, 2),
                        "nsqd_cpu_us_per_job_baseline": round(b.nsqd_us, 2),
                        "subject_event_messages": a.event_messages,
                    },
                )
            )
        log(
            f"round {r + 1} ({','.join(order)}): "
            + "; ".join(
                f"{arm} {run.rate:,.0f} jobs/s, {run.consumer_us:.1f} us CPU/job "
                f"(nsqd {run.nsqd_us:.1f})"
                for arm, run in runs.items()
            )
        )
    return found


def write_markdown(path: Path, header: dict[str, object], found: dict[str, Comparison]) -> None:
    """The human-readable report."""
    c = found["tracked_vs_untracked"]
    out = [
        "# track_started: what a started event costs the worker",
        "",
        f"- Date: {header['date']}",
        f"- CPU: {header['cpu_model']}, {header['cores']} cores (shared and noisy: compare "
        "the ratios, not the rates)",
        f"- Command: `{header['command']}`",
        f"- NSQ {header['nsq_version']}, Python {header['python']}; "
        f"{c.settings['messages_per_run']:,} noop jobs per run, {c.settings['rounds']} rounds, "
        "the order of the three arms rotating every round",
        "",
        "| Comparison | Subject (median) | Baseline (median) | Ratio (median) | Ratios per round |",
        "|---|---:|---:|---:|---|",
    ]
    for comp in found.values():
        per_round = ", ".join(f"{r.ratio:.3f}" for r in comp.rounds)
        out.append(
            f"| {comp.title} | {comp.subject_median:,.0f} jobs/s | "
            f"{comp.baseline_median:,.0f} jobs/s | **{comp.ratio:.3f}** | {per_round} |"
        )

    def median(comp: Comparison, key: str) -> float:
        return statistics.median(float(r.detail[key]) for r in comp.rounds)

    bare = found["untracked_vs_bare"]
    cpu = {
        "debug.noop (untracked)": (
            median(c, "baseline_cpu_us_per_job"),
            median(c, "nsqd_cpu_us_per_job_baseline"),
        ),
        "debug.noop_tracked (tracked)": (
            median(c, "subject_cpu_us_per_job"),
            median(c, "nsqd_cpu_us_per_job_subject"),
        ),
        "bare Reader": (
            median(bare, "baseline_cpu_us_per_job"),
            median(bare, "nsqd_cpu_us_per_job_baseline"),
        ),
    }
    out += [
        "",
        "CPU time per job during the drain (user + system, from /proc; median of the rounds): "
        "less noisy than the rates on a shared machine.",
        "",
        "| Consumer | its CPU per job | nsqd's CPU per job |",
        "|---|---:|---:|",
        *[f"| {name} | {us:.1f} us | {nsqd:.1f} us |" for name, (us, nsqd) in cpu.items()],
    ]
    tracked, untracked = cpu["debug.noop_tracked (tracked)"], cpu["debug.noop (untracked)"]
    out += [
        "",
        f"A started event costs the worker **{tracked[0] - untracked[0]:.1f} us** of CPU per "
        f"job ({(tracked[0] / untracked[0] - 1) * 100:.0f}% of a noop job's "
        f"{untracked[0]:.1f} us), and nsqd {tracked[1] - untracked[1]:.1f} us.",
        "",
        "Started events per message (one message per worker loop turn), per round: "
        + ", ".join(
            f"{int(c.settings['messages_per_run']) / int(r.detail['subject_event_messages']):.1f}"
            for r in c.rounds
            if r.detail["subject_event_messages"]
        )
        + ".",
    ]
    out += [
        "",
        "- The subjects and baselines:",
        *[f"  - {comp.title}: {comp.subject} / {comp.baseline}" for comp in found.values()],
        "- Started events are published fire and forget (nsqd's OK is not waited for): the "
        "events of one worker loop turn travel as one message (a JSON array).",
        "- In every arm a reader (bench/events_reader.py, max_in_flight 500 as the ledger's) "
        "reads the `started` topic on the ledger's channel and decodes every message, as the "
        "ledger would (without its SQLite writes); it idles in the two arms without events. "
        "Every run checks that it counted one event per tracked job and none for the others.",
        "- Each run drains a fresh topic pre-filled by MPUB; the clock runs from the first "
        "message drained to depth, in-flight and deferred all 0 on nsqd's /stats "
        "(bench/scenarios.py).",
    ]
    report.write_text(path, "\n".join(out).rstrip() + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison and write the figures."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.started", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 20,000 jobs")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--messages", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    s = scenarios.Settings.quick() if args.quick else scenarios.Settings(drain_messages=100_000)
    if args.rounds:
        s = dataclasses.replace(s, rounds=args.rounds)
    n = args.messages or s.drain_messages
    os.environ[ENV_DEBUG_TASKS] = "1"  # the workers started here load the debug.noop pair
    try:
        need_binary("nsqd")
        need_binary("nsqlookupd")
    except HarnessError as exc:
        raise SystemExit(f"bench.started: {exc}") from None
    header: dict[str, object] = {
        **report.machine(),
        "command": report.command_line(argv, "bench.started"),
        "nsq_version": "?",
    }
    started = time.monotonic()
    with ExitStack() as stack:
        work = temp_dir(stack, "nsqjobs-bench-started-")
        nsq = start_nsq(stack, work)
        header["nsq_version"] = nsq.version
        found = run(s, n, work, nsq)
    header["duration_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(args.out / "started.json", header, list(found.values()), [])
    write_markdown(args.out / "started.md", header, found)
    for comp in found.values():
        log(f"{comp.key}: ratio {comp.ratio:.3f} ({comp.subject_median:,.0f} jobs/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
