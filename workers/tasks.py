"""The built-in tasks. Importing this module registers them (debug ones only if enabled)."""

from __future__ import annotations

import os
import time
from typing import Annotated, Any, Literal

import msgspec

from service.errors import NsqjobsError
from service.registry import task
from workers import impl

MAX_PRIME_BOUND = 10**12
MAX_PRIME_SPAN = 10**9


class PrimesCountArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Count primes p with start <= p < stop (stop - start <= 10**9)."""

    start: Annotated[int, msgspec.Meta(ge=0, le=MAX_PRIME_BOUND)]
    stop: Annotated[int, msgspec.Meta(ge=0, le=MAX_PRIME_BOUND)]

    def __post_init__(self) -> None:
        if self.start > self.stop:
            raise ValueError(f"start ({self.start}) must be <= stop ({self.stop})")
        if self.stop - self.start > MAX_PRIME_SPAN:
            raise ValueError(f"stop - start must be <= {MAX_PRIME_SPAN}")


def _warm_primes() -> None:
    fn = impl.function("primes", "count_primes")
    fn(0, 1000)


@task("primes.count", time_limit_s=600, warm_up=_warm_primes)
def primes_count(args: PrimesCountArgs) -> int:
    """Number of primes in [start, stop), by a segmented sieve (Numba, Cython or Python)."""
    count: int = impl.function("primes", "count_primes")(args.start, args.stop)
    return count


@task("noop", time_limit_s=10)
def noop(args: dict[str, Any]) -> dict[str, Any]:
    """Return the arguments unchanged (for measuring the pipeline itself)."""
    return args


class DebugSleepArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Seconds to sleep."""

    seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)]


class DebugFailArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How to fail: raise an exception, or kill the process running the task."""

    mode: Literal["error", "crash"]


class DebugFailure(NsqjobsError):
    """The error ``debug.fail`` raises on purpose."""


def debug_sleep(args: DebugSleepArgs) -> dict[str, float]:
    """Sleep for ``seconds`` (for timeouts, touches and drains)."""
    time.sleep(args.seconds)
    return {"slept": args.seconds}


def debug_fail(args: DebugFailArgs) -> None:
    """Raise (``error``) or kill the process running the task (``crash``)."""
    if args.mode == "crash":
        os._exit(70)
    raise DebugFailure("debug.fail asked to fail")


if os.environ.get("NSQJOBS_DEBUG_TASKS", "") == "1":
    task("debug.sleep", time_limit_s=3600)(debug_sleep)
    task("debug.fail", max_attempts=5)(debug_fail)
