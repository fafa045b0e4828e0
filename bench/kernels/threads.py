"""Thread scaling: one call on one thread against the same call on two threads at once."""

from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bench.kernels.load import Load, Quiet
from bench.kernels.specs import THREAD_TARGET, Args, Fn, Settings
from bench.kernels.timing import KernelResult
from bench.procs import BenchError, log


def _run_threads(fn: Fn, args: Args, n: int, calls: int = 1) -> float:
    """Wall time of ``n`` threads each making the same ``calls`` calls, released together."""
    barrier = threading.Barrier(n + 1)
    failures: list[BaseException] = []

    def body() -> None:
        barrier.wait()
        try:
            for _ in range(calls):
                fn(*args)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=body, name=f"bench-kernel-{i}") for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if failures:
        raise BenchError(f"a kernel call failed in a thread: {failures[0]!r}")
    return elapsed


@dataclass
class Scaling:
    """One implementation of one kernel: 1 thread against 2 threads, per round."""

    key: str
    impl: str
    calls: int  # per thread: short calls are repeated so a thread runs ~thread_min_s
    one: list[float] = field(default_factory=list)
    two: list[float] = field(default_factory=list)
    loads: list[float | None] = field(default_factory=list)  # others' cores, per kept round
    redone: int = 0  # rounds measured under other load and redone

    @property
    def speedups(self) -> list[float]:
        """2 * t1 / t2 per round."""
        return [2 * a / b for a, b in zip(self.one, self.two, strict=True)]

    @property
    def speedup(self) -> float:
        """Median of the per-round speed-ups."""
        return statistics.median(self.speedups) if self.one else 0.0

    @property
    def target(self) -> float | None:
        """The target (C is measured for reference only)."""
        return None if self.impl == "c" else THREAD_TARGET

    @property
    def passed(self) -> bool | None:
        """Whether the median speed-up meets the target."""
        return None if self.target is None else self.speedup >= self.target

    def to_json(self) -> dict[str, Any]:
        """Machine-readable figures."""
        return {
            "kernel": self.key,
            "impl": self.impl,
            "calls_per_thread": self.calls,
            "one_thread_median_s": round(statistics.median(self.one), 6),
            "two_threads_median_s": round(statistics.median(self.two), 6),
            "speedup_median": round(self.speedup, 4),
            "speedup_per_round": [round(x, 4) for x in self.speedups],
            "target_min": self.target,
            "pass": self.passed,
            "other_load_cores_per_round": [None if x is None else round(x, 3) for x in self.loads],
            "rounds_redone_for_other_load": self.redone,
        }


def thread_scaling(
    kr: KernelResult, found: dict[str, Fn], s: Settings, quiet: Quiet
) -> list[Scaling]:
    """For each compiled implementation: rounds of (1 thread, 2 threads), alternating order.

    A round during which other processes kept more than ``quiet_cores`` busy is redone while
    the quiet budget lasts.
    """
    out = []
    for impl in ("numba", "cython", "c"):
        single = kr.median(impl)
        if impl not in found or single is None:
            continue
        sc = Scaling(kr.spec.key, impl, calls=max(1, math.ceil(s.thread_min_s / single)))
        r = 0
        while len(sc.one) < s.thread_rounds:
            got: dict[int, float] = {}
            meter = Load.start()
            for n in (1, 2) if r % 2 == 0 else (2, 1):
                got[n] = _run_threads(found[impl], kr.spec.args, n, sc.calls)
            load = meter.stop()
            r += 1
            if quiet.retry(load):
                sc.redone += 1
                continue
            sc.one.append(got[1])
            sc.two.append(got[2])
            sc.loads.append(load.others_cores)
        loads = [x for x in sc.loads if x is not None]
        log(
            f"  {kr.spec.key} {impl}: {sc.calls} call(s) per thread: 1 thread "
            f"{1000 * statistics.median(sc.one):.1f} ms, 2 threads "
            f"{1000 * statistics.median(sc.two):.1f} ms, speed-up {sc.speedup:.2f}"
            + (f" (other load up to {max(loads):.2f} cores" if loads else " (")
            + f", {sc.redone} round(s) redone)"
        )
        out.append(sc)
    return out
