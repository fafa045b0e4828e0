"""The two jobs every peer runs, the same functions for all of them.

``mark(seq)`` is the no-op job: it appends one fixed-width record (its sequence number and the
time it ran) to the file named by ``NSQJOBS_BENCH_MARKS``, so the benchmark times and counts
executions per job across processes (drain rates, losses, duplicates) without asking any
broker. ``primes(seq)`` counts the primes below 10**7 with the kernel ``NSQJOBS_KERNEL_IMPL``
names (python or cython), as ``primes.count`` does, then marks.
"""

from __future__ import annotations

import os
import time

from nsqjobs_tasks import impl

MARKS_ENV = "NSQJOBS_BENCH_MARKS"
RECORD = 28  # bytes per mark: b"%09d %017.6f\n", the sequence number and time.time()
PRIMES_STOP = 10**7
PRIMES_BELOW_STOP = 664_579

_fd: int | None = None


def _append(seq: int) -> None:
    global _fd
    if _fd is None:
        _fd = os.open(os.environ[MARKS_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    # One write of a few bytes to an O_APPEND file is atomic: threads and processes may share it.
    os.write(_fd, b"%09d %017.6f\n" % (seq, time.time()))


def mark(seq: int) -> int:
    """The no-op job: record that job ``seq`` ran; returns ``seq`` (the stored result)."""
    _append(seq)
    return seq


def primes(seq: int) -> int:
    """The CPU-bound job: the number of primes in [0, 10**7), then the mark."""
    count: int = impl.function("primes", "count_primes")(0, PRIMES_STOP)
    _append(seq)
    return count


def read_marks(path: str) -> list[tuple[int, float]]:
    """Every (sequence number, time.time() when done) marked in ``path``, in the order written."""
    with open(path, "rb") as f:
        data = f.read()
    return [
        (int(data[i : i + 9]), float(data[i + 10 : i + RECORD - 1]))
        for i in range(0, len(data), RECORD)
    ]
