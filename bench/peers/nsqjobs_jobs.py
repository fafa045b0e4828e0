"""The benchmark's jobs as nsqjobs tasks (``--task-module bench.peers.nsqjobs_jobs``)."""

from __future__ import annotations

import msgspec
from nsqjobs import task
from nsqjobs_tasks import impl

from bench.peers import jobs

MARK = "bench.mark"
PRIMES = "bench.primes"


class SeqArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The job's sequence number."""

    seq: int


@task(MARK, max_attempts=1)
def mark(args: SeqArgs) -> int:
    """The no-op job."""
    return jobs.mark(args.seq)


@task(PRIMES, max_attempts=1, time_limit_s=600, warm_up=lambda: impl.warm_up("primes"))
def primes(args: SeqArgs) -> int:
    """The CPU-bound job."""
    return jobs.primes(args.seq)
