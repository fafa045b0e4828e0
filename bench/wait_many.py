"""Waiting for many results: one long poll of many ids against a request per job.

    python -m bench.wait_many [--quick] [--rounds N]

A private nsqd, one gateway with a SQLite ledger (polling a job by id needs it) and two
workers. Each round submits N jobs in batches (``Client.submit_many``), then waits for every
result, one arm after the other (their order alternating each round):

- ``wait route``: ``Client.wait(ids, return_when="all")``, i.e. ``POST /v1/jobs/wait`` long
  polls of up to 1000 ids each;
- ``poll each``: ``GET /v1/jobs/{id}`` for every unfinished job, then a pause (0.1, 0.2, 0.5,
  then 1 s: the backoff the CLI's ``result`` used), until all finished.

Both arms use one ``nsqjobs.Client`` (keep-alive pool) from one thread. Reported per arm:
seconds from the end of the submission to the last result known (median over rounds), HTTP
requests made for it, and the client's CPU seconds. Jobs: ``noop`` (results arrive within
milliseconds) and ``debug.sleep`` of 0.5 s. Figures go to ``bench/results/wait_many.md``;
progress to stderr.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from nsqjobs.client import Client
from nsqjobs.names import DEFAULT_QUEUE, ENV_DEBUG_TASKS, RESULTS_TOPIC
from nsqjobs.testing import HarnessError, Nsq, free_port, start_nsq, temp_dir, wait_ready

from bench import report
from bench.procs import ROOT, log, start_gateway, start_process, worker_argv

POLL_S = (0.1, 0.2, 0.5, 1.0)
UNFINISHED = ("queued", "running")


@dataclass
class Arm:
    """One arm's measurements over the rounds."""

    seconds: list[float] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)


class Counting(httpx.HTTPTransport):
    """Counts the requests sent."""

    sent = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        return super().handle_request(request)


def by_wait_route(client: Client, ids: list[str]) -> None:
    """Wait with ``POST /v1/jobs/wait`` (long polls of up to 1000 ids)."""
    answer = client.wait(ids, timeout=None, return_when="all")
    if answer.pending or answer.unknown:
        raise HarnessError(f"the wait ended with {len(answer.pending)} pending")


def by_polling(client: Client, ids: list[str]) -> None:
    """Poll ``GET /v1/jobs/{id}`` for each unfinished job, pausing between rounds."""
    pending = ids
    for turn in range(10_000):
        pending = [i for i in pending if client.job(i).status() in UNFINISHED]
        if not pending:
            return
        time.sleep(POLL_S[min(turn, len(POLL_S) - 1)])
    raise HarnessError("polling did not finish")


ARMS: dict[str, Callable[[Client, list[str]], None]] = {
    "wait route": by_wait_route,
    "poll each": by_polling,
}


def measure(
    client: Client, counter: Counting, task: str, args: dict[str, Any], n: int, arm: str
) -> tuple[float, int, float]:
    """Submit ``n`` jobs, then wait for all by ``arm``: seconds, requests, client CPU seconds."""
    ids = [job.id for job in client.submit_many(task, [args] * n)]
    sent, started, cpu = counter.sent, time.perf_counter(), time.process_time()
    ARMS[arm](client, ids)
    return time.perf_counter() - started, counter.sent - sent, time.process_time() - cpu


def run(rounds: int, sizes: Sequence[int], out: Path, command: str) -> int:
    """Run every case and write the figures."""
    cases: list[tuple[str, dict[str, Any], int]] = [("noop", {}, n) for n in sizes]
    cases += [("debug.sleep", {"seconds": 0.5}, n) for n in sizes]
    results: dict[tuple[str, int], dict[str, Arm]] = {}
    with ExitStack() as stack:
        work = temp_dir(stack, "nsqjobs-bench-wait-")
        nsq: Nsq = start_nsq(stack, work)
        extra = ["--ledger-url", f"sqlite:///{work / 'ledger.sqlite3'}"]
        os.environ[ENV_DEBUG_TASKS] = "1"  # debug.sleep, in the daemons started below
        url = start_gateway(stack, nsq, work, (DEFAULT_QUEUE, RESULTS_TOPIC), extra=extra)
        for i in (1, 2):
            port = free_port()
            argv = worker_argv(
                nsq, concurrency=64, queue=DEFAULT_QUEUE, channel="workers", lookupd=True, port=port
            )
            proc = start_process(stack, f"worker{i}", argv, work)
            wait_ready(proc, f"http://127.0.0.1:{port}/readyz", 60.0)
        counter = Counting()
        with Client(url, timeout_s=60.0, transport=counter) as client:
            for arm in ARMS:  # warm up both sides
                measure(client, counter, "noop", {}, 50, arm)
            for task, args, n in cases:
                arms = results.setdefault((task, n), {a: Arm() for a in ARMS})
                for r in range(rounds):
                    order = list(ARMS) if r % 2 == 0 else list(reversed(ARMS))
                    for arm in order:
                        seconds, requests, cpu = measure(client, counter, task, args, n, arm)
                        arms[arm].seconds.append(seconds)
                        arms[arm].requests.append(requests)
                        arms[arm].cpu_s.append(cpu)
                        log(f"{task} x{n} {arm}: {seconds:.3f}s, {requests} requests")
    write(out / "wait_many.md", results, rounds, command)
    return 0


def write(
    path: Path, results: dict[tuple[str, int], dict[str, Arm]], rounds: int, command: str
) -> None:
    """The table, one row per case and arm."""
    machine = report.machine()
    lines = [
        "# Waiting for many results: `POST /v1/jobs/wait` against polling each job",
        "",
        f"`{command}`: {rounds} rounds, medians; one gateway (SQLite ledger), two workers, "
        f"{machine['date']}, {machine['cores']} cores ({machine['cpu_model']}), Python "
        f"{machine['python']}.",
        "Seconds from the end of the submission (batches) to the last result known; requests "
        "made while waiting; the client's CPU seconds.",
        "",
        "| jobs | arm | seconds | requests | client CPU s |",
        "|---|---|---:|---:|---:|",
    ]
    for (task, n), arms in results.items():
        label = "noop" if task == "noop" else "debug.sleep 0.5 s"
        for name, arm in arms.items():
            lines.append(
                f"| {n} x {label} | {name} | {statistics.median(arm.seconds):.3f} | "
                f"{statistics.median(arm.requests):.0f} | {statistics.median(arm.cpu_s):.3f} |"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    log(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.wait_many``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.wait_many", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 round, 100 jobs only")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per case [3]")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    sizes = (100,) if args.quick else (100, 1000)
    rounds = 1 if args.quick else args.rounds
    try:
        return run(rounds, sizes, args.out, report.command_line(argv, "bench.wait_many"))
    except HarnessError as exc:
        log(f"could not run: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
