"""Where a job's latency goes at light load: ``python -m bench.latency_parts [--jobs N]``.

The peers benchmark's nsqjobs stack (nsqd, one gateway, one worker of 64 threads) and its
latency load (one no-op job every 20 ms, each awaited with ``POST /v1/jobs?wait=``), split
with the times the worker stamps on every result (one machine, one clock):

- *in*: the request leaving here to the worker taking the message (client, gateway, nsqd);
- *job*: from there to the worker having the task's return value (hand-over to a thread, the
  task, hand-back);
- *out*: from there to the answer read here (result to nsqd, nsqd to the gateway, the answer).

Prints p50, p90 and p99 of each part and of the whole, and the mean of each part over the
middle of the distribution and over its slowest 2 %: a part that makes the tail is larger
there. Nothing is written.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import time
from contextlib import ExitStack
from typing import Any

from nsqjobs.testing import start_nsq, temp_dir

from bench.peers import nsqjobs_peer
from bench.peers.base import WorkerRun
from bench.peers.nsqjobs_jobs import MARK
from bench.procs import paced

RATE = 50.0
PARTS = ("in", "job", "out", "whole")


def _quantiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return f"p50 {q[49]:.2f}  p90 {q[89]:.2f}  p99 {q[98]:.2f} ms"


def main() -> None:
    """Run the load and print the split."""
    parser = argparse.ArgumentParser(prog="python -m bench.latency_parts")
    parser.add_argument("--jobs", type=int, default=3000, help="jobs at 50/s (default 3000)")
    jobs = parser.parse_args().jobs
    if jobs < 100:
        raise SystemExit("bench.latency_parts: --jobs must be at least 100")
    with ExitStack() as stack:
        work = temp_dir(stack, "nsqjobs-latency-parts-")
        nsq = start_nsq(stack, work)
        peer = nsqjobs_peer.peer(stack, nsq, work)
        if not isinstance(peer, nsqjobs_peer.NsqjobsPeer):
            raise SystemExit("bench.latency_parts: the nsqjobs peer did not start")
        stack.callback(peer.close)
        peer.start_worker(stack, "noop", WorkerRun(marks=work / "marks", log_dir=work))
        host, _, port = peer.gateway.removeprefix("http://").partition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        stack.callback(conn.close)

        def run(seq: int) -> dict[str, Any]:
            body = json.dumps({"task": MARK, "args": {"seq": seq}})
            conn.request("POST", "/v1/jobs?wait=10", body, {"Content-Type": "application/json"})
            answer: dict[str, Any] = json.loads(conn.getresponse().read())
            if answer.get("status") != "succeeded":
                raise SystemExit(f"bench.latency_parts: job {seq}: {answer}")
            return answer

        for seq in range(10**8, 10**8 + 50):  # the worker is ready: warm every path
            run(seq)
        parts: dict[str, list[float]] = {name: [] for name in PARTS}
        print(f"{jobs} jobs at {RATE:g}/s ...", flush=True)
        for seq, _late in paced(jobs, RATE):
            sent = time.time()
            answer = run(seq)
            got = time.time()
            started, finished = answer["started_at"], answer["finished_at"]
            for name, ms in zip(
                PARTS,
                (started - sent, finished - started, got - finished, got - sent),
                strict=True,
            ):
                parts[name].append(ms * 1000.0)
    order = sorted(range(jobs), key=parts["whole"].__getitem__)
    middle = order[jobs * 2 // 5 : jobs * 3 // 5]
    slowest = order[jobs - max(1, jobs // 50) :]
    for name in PARTS:
        values = parts[name]
        mid = statistics.fmean(values[i] for i in middle)
        slow = statistics.fmean(values[i] for i in slowest)
        print(
            f"{name:>5}: {_quantiles(values)};  mean {mid:.2f} in the middle 20 %, "
            f"{slow:.2f} in the slowest 2 %"
        )


if __name__ == "__main__":
    main()
