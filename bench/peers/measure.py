"""The measurements, the same for every peer: enqueue rates, a drain, latency at a fixed rate.

Progress is read from the marks file the jobs append to (``bench.peers.jobs``), never from a
broker, so every peer is timed alike: a drain is timed by the jobs' own clock readings, from the
first job done (worker start-up excluded) to the last; the count per sequence number finds lost
and duplicated jobs.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nsqjobs.testing import DeadlineExceeded, wait_for

from bench.peers import jobs
from bench.peers.base import Mode, Peer, Task, WorkerRun
from bench.procs import BenchError, paced

POLL_S = 0.005
SETTLE_S = 0.5  # after the last job, how long a duplicate delivery has to show up


@dataclass(frozen=True)
class Sizes:
    """How much of everything one run does (``--quick``: a smoke-sized run)."""

    rounds: int = 3
    enqueue_jobs: int = 5_000
    drain_jobs: int = 20_000
    latency_rate: float = 50.0
    latency_seconds: float = 30.0
    cpu_jobs_python: int = 12
    cpu_jobs_compiled: int = 200

    @classmethod
    def quick(cls) -> Sizes:
        """One short round: a few seconds per peer and measurement."""
        return cls(
            rounds=1,
            enqueue_jobs=500,
            drain_jobs=2_000,
            latency_seconds=3.0,
            cpu_jobs_python=4,
            cpu_jobs_compiled=40,
        )


@dataclass(frozen=True)
class Drain:
    """One drain: jobs/s from the first job done to the last, and what the marks say."""

    rate: float
    seconds: float
    jobs: int
    lost: int
    duplicated: int
    results_stored: int | None


def _marks_count(path: Path) -> int:
    try:
        return path.stat().st_size // jobs.RECORD
    except FileNotFoundError:
        return 0


def _check_marks(path: Path, seqs: range) -> tuple[int, int, list[float]]:
    """(lost, duplicated, the times they were done) of the jobs ``seqs``, from ``path``."""
    marks = [(s, t) for s, t in (jobs.read_marks(str(path)) if path.exists() else []) if s in seqs]
    counts = Counter(s for s, _ in marks)
    lost = sum(1 for s in seqs if counts[s] == 0)
    duplicated = sum(c - 1 for c in counts.values() if c > 1)
    return lost, duplicated, sorted(t for _, t in marks)


def enqueue_rate(
    peer: Peer, run: WorkerRun, n: int, bulk: bool, *, blocking: bool = False
) -> float:
    """Jobs/s of ``n`` no-op jobs enqueued from here, no worker running (unless the peer
    needs one to accept jobs: IPython Parallel); ``blocking``: the single-job call's blocking
    form (peers with ``has_blocking_single``)."""
    peer.flush()
    peer.single_blocks = blocking
    try:
        with ExitStack() as stack:
            peer.enqueue_setup(stack, run)
            t0 = time.perf_counter()
            peer.submit("mark", range(n), results=True, bulk=bulk)
            seconds = time.perf_counter() - t0
            peer.flush()
    finally:
        peer.single_blocks = False
    return n / seconds


def drain(
    peer: Peer,
    run: WorkerRun,
    n: int,
    *,
    task: Task = "mark",
    mode: Mode = "noop",
    results: bool = True,
    min_rate: float = 20.0,
) -> Drain:
    """Enqueue ``n`` jobs (bulk), then start the worker and time it working through them."""
    peer.flush()
    seqs = range(n)
    handles = peer.submit(task, seqs, results=results, bulk=True)
    deadline = 60.0 + n / min_rate
    with ExitStack() as stack:
        peer.start_worker(stack, mode, run)
        _wait_marks(run.marks, n, deadline, peer.label)
        stored = None
        if results:
            stored = _wait_stored(peer, handles, n)
        time.sleep(SETTLE_S)
    lost, duplicated, done = _check_marks(run.marks, seqs)
    peer.flush()
    seconds = done[-1] - done[0]
    rate = (len(done) - 1) / seconds if seconds > 0 else float("nan")
    return Drain(rate, seconds, n, lost, duplicated, stored)


def cpu(peer: Peer, run: WorkerRun, n: int) -> Drain:
    """``n`` primes jobs enqueued (bulk) once the 2-slot worker is ready; the clock runs from
    the enqueue to the last job done, so dispatch is part of what is measured."""
    peer.flush()
    seqs = range(n)
    with ExitStack() as stack:
        peer.start_worker(stack, "cpu", run)
        t0 = time.time()  # the clock the jobs mark with
        handles = peer.submit("primes", seqs, results=True, bulk=True)
        _wait_marks(run.marks, n, 120.0 + 10.0 * n, peer.label)
        stored = _wait_stored(peer, handles, n)
        time.sleep(SETTLE_S)
    lost, duplicated, done = _check_marks(run.marks, seqs)
    peer.flush()
    return Drain(n / (done[-1] - t0), done[-1] - t0, n, lost, duplicated, stored)


def _wait_marks(path: Path, want: int, timeout: float, who: str) -> None:
    """Poll until ``want`` marks are in."""
    end = time.monotonic() + timeout
    while True:
        count = _marks_count(path)
        if count >= want:
            return
        if time.monotonic() > end:
            raise BenchError(f"{who}: {count} of {want} jobs done after {timeout:.0f}s")
        time.sleep(POLL_S)


def _wait_stored(peer: Peer, handles: list[Any], n: int) -> int:
    """How many results are stored, once all are or after a few seconds."""
    found = [0]

    def all_stored() -> bool | None:
        found[0] = peer.results_stored(handles)
        return found[0] >= n or None

    with contextlib.suppress(DeadlineExceeded):  # then the count says how many are missing
        wait_for(all_stored, 10.0, "results", interval=0.1)
    return found[0]


@dataclass(frozen=True)
class LatencyRun:
    """Submit-to-result latencies (ms) at a fixed rate."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    jobs: int
    late_sends: int
    lost: int
    duplicated: int


def latency(peer: Peer, run: WorkerRun, rate: float, seconds: float) -> LatencyRun:
    """One producer submits a no-op job every 1/``rate`` s and waits for its result each time
    (a send delayed by a slow answer counts as late; at this light rate there should be none)."""
    peer.flush()
    n = int(rate * seconds)
    timeout = 10.0
    samples: list[float] = []
    with ExitStack() as stack:
        peer.start_worker(stack, "noop", run)
        # The first answer waits for the worker to start; then a few to warm every path.
        warm = iter(range(10**8, 10**8 + 10**6))
        wait_for(lambda: _answers(peer, next(warm)), 90.0, f"{peer.label}: a first result")
        for _ in range(10):
            peer.submit_wait(next(warm), timeout)
        late = 0
        for i, behind in paced(n, rate):
            late += behind
            t = time.perf_counter()
            got = peer.submit_wait(i, timeout)
            samples.append((time.perf_counter() - t) * 1000.0)
            if got != i:
                raise BenchError(f"{peer.label}: job {i} answered {got!r}")
        time.sleep(SETTLE_S)
    lost, duplicated, _ = _check_marks(run.marks, range(n))
    peer.flush()
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return LatencyRun(q[49], q[89], q[98], n, late, lost, duplicated)


def _answers(peer: Peer, seq: int) -> bool | None:
    try:
        peer.submit_wait(seq, 5.0)
    except Exception:
        return None
    return True
