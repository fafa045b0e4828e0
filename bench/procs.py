"""What the benchmarks add to ``nsqjobs.testing``: progress lines, and daemons started with flags.

The harness (free ports, deadlines, nsqd/nsqlookupd, spawning and stopping) is the package's
own ``nsqjobs.testing``, shared with the tests. The benchmarks start their daemons with CLI
flags (quiet, a given queue and channel) rather than the tests' environment variables.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path

from nsqjobs.testing import (
    BIN_DIR_ENV,
    HarnessError,
    Nsq,
    Proc,
    free_port,
    nsqjobs_command,
    spawn,
    wait_ready,
)

ROOT = Path(__file__).resolve().parent.parent

# `make nsq` builds NSQ into .bin/: look there first, also when bench runs on its own.
os.environ.setdefault(BIN_DIR_ENV, str(ROOT / ".bin"))


class BenchError(HarnessError):
    """A benchmark could not run (a count is wrong, a load did not finish in time)."""


def log(message: str) -> None:
    """Progress, on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def start_process(stack: ExitStack, name: str, argv: Sequence[str], log_dir: Path) -> Proc:
    """Start ``argv`` from the repository, logging to ``log_dir/NAME.log``; ``stack`` stops it."""
    return spawn(argv, log_dir / f"{name}.log", name=name, cwd=ROOT, stack=stack)


def gateway_argv(nsq: Nsq, port: int) -> list[str]:
    """The command line of one quiet ``nsqjobs gateway`` on ``port``."""
    return [
        *nsqjobs_command(),
        "gateway",
        "--nsqd-tcp-address",
        nsq.nsqd_tcp,
        "--nsqd-http-address",
        nsq.nsqd_http,
        "--lookupd-http-address",
        nsq.lookupd_http,
        "--gateway-port",
        str(port),
        "--log-level",
        "WARNING",
    ]


def start_gateway(
    stack: ExitStack,
    nsq: Nsq,
    log_dir: Path,
    topics: Sequence[str],
    name: str = "gateway",
    extra: Sequence[str] = (),
) -> str:
    """One ``nsqjobs gateway`` process (``extra``: more flags); returns its base URL once
    /readyz answers 200.

    ``topics`` are created first, so that nsqlookupd knows the results topic before the
    gateway's results reader first asks it (otherwise readiness waits for the next poll).
    """
    for topic in topics:
        nsq.post("/topic/create", topic=topic)
    port = free_port()
    proc = start_process(stack, name, [*gateway_argv(nsq, port), *extra], log_dir)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, f"{base}/readyz", 60.0)
    return base


def worker_argv(
    nsq: Nsq, *, concurrency: int, queue: str, channel: str, lookupd: bool, port: int
) -> list[str]:
    """The command line of one ``nsqjobs worker``."""
    return [
        *nsqjobs_command(),
        "worker",
        "--nsqd-tcp-address",
        nsq.nsqd_tcp,
        "--nsqd-http-address",
        nsq.nsqd_http,
        "--lookupd-http-address",
        nsq.lookupd_http if lookupd else "",
        "--worker-port",
        str(port),
        "--concurrency",
        str(concurrency),
        "--queues",
        queue,
        "--channel",
        channel,
        "--log-level",
        "WARNING",
    ]


def paced(n: int, rate: float) -> Iterator[tuple[int, bool]]:
    """``0 .. n-1``, each when it is due (``i / rate`` seconds after the first), sleeping until
    then; with each, whether it came more than one interval late (the caller was slow)."""
    start = time.perf_counter()
    for i in range(n):
        due = start + i / rate
        now = time.perf_counter()
        if now < due:
            time.sleep(due - now)
        yield i, now - due > 1.0 / rate
