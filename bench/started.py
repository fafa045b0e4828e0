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
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from nsqjobs import wire
from nsqjobs.names import ENV_DEBUG_TASKS, STARTED_TOPIC
from nsqjobs.testing import HarnessError, Nsq, need_binary, start_nsq, temp_dir

from bench import payloads, report, scenarios
from bench.procs import ROOT, BenchError, log
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


def drain(
    nsq: Nsq, arm: str, round_no: int, bodies: list[bytes], s: scenarios.Settings, work: Path
) -> tuple[float, int]:
    """One arm's drain rate, and the started events it published."""
    who = "bare" if arm == "bare" else "worker"
    got = scenarios._drain_once(nsq, who, f"bench_started_{round_no}_{arm}", bodies, s, work)
    events = nsq.message_count(STARTED_TOPIC)
    nsq.delete_topic(STARTED_TOPIC)  # nobody reads it here: do not let it grow
    expected = len(bodies) if arm == "tracked" else 0
    if events != expected:
        raise BenchError(f"{arm}: {events} started events for {len(bodies)} jobs")
    return got.rate, events


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
        rates = {arm: drain(nsq, arm, r, bodies[arm], s, work)[0] for arm in order}
        for key, (subject, baseline) in {
            "tracked_vs_untracked": ("tracked", "untracked"),
            "untracked_vs_bare": ("untracked", "bare"),
            "tracked_vs_bare": ("tracked", "bare"),
        }.items():
            found[key].rounds.append(
                Round(subject=rates[subject], baseline=rates[baseline], order=",".join(order))
            )
        log(
            f"round {r + 1} ({','.join(order)}): untracked {rates['untracked']:,.0f} jobs/s, "
            f"tracked {rates['tracked']:,.0f}, bare {rates['bare']:,.0f}; tracked/untracked "
            f"{rates['tracked'] / rates['untracked']:.3f}"
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
    cost = [1 / r.subject - 1 / r.baseline for r in c.rounds if r.subject and r.baseline]
    if cost:
        out += [
            "",
            "Extra worker time per tracked job (1/tracked - 1/untracked, median of the rounds): "
            f"**{statistics.median(cost) * 1e6:.1f} us**.",
        ]
    out += [
        "",
        "- The subjects and baselines:",
        *[f"  - {comp.title}: {comp.subject} / {comp.baseline}" for comp in found.values()],
        "- A started event is published fire and forget (nsqd's OK is not waited for), in the "
        "same loop turn's batch as other publishes to the `started` topic; every run checks "
        "that nsqd received one event per tracked job and none for the others.",
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
