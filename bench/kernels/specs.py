"""What the kernel benchmarks measure: settings, targets, inputs and how to scale them down."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nsqjobs_tasks.kernels

from bench.procs import ROOT

Fn = Callable[..., Any]
KERNELS_DIR = Path(nsqjobs_tasks.kernels.__file__).resolve().parent
C_DIR = ROOT / "bench" / "c"
GCC_FLAGS = ("-O2", "-shared", "-fPIC")
GCC_LIBS = ("-lm",)
COMPILED = ("c", "numba", "cython")  # the C baseline first
RATIO_TARGET = 1.25  # Numba/C and Cython/C, at most
THREAD_TARGET = 1.8  # 2 * t1 / t2, at least
PYTHON_SPEEDUP_TARGET = 50.0  # primes: compiled kernels against the pure-Python reference
WORKER_TASK = "primes.count"

Args = tuple[Any, ...]
Scale = Callable[[Args, float], tuple[Args, float]]


@dataclass(frozen=True)
class Settings:
    """Repeats and sizes of one run (``--quick`` makes everything smaller)."""

    rounds: int = 15  # timed calls of each compiled implementation, interleaved
    thread_rounds: int = 11  # (1 thread, 2 threads) pairs per implementation
    thread_min_s: float = 0.1  # a thread repeats a shorter call until it runs about this long
    quiet_cores: float = 0.25  # a 2-core round is redone when others used more than this...
    quiet_budget_s: float = 60.0  # ...while the run has spent less than this waiting for quiet
    python_full_max_s: float = 60.0  # predicted pure-Python time up to which the full input runs
    python_scaled_s: float = 15.0  # what a scaled-down pure-Python call should take
    worker_jobs: int = 500
    worker_rounds: int = 3  # (one process x 2 threads, two processes x 1) pairs
    worker_job_start: int = 0
    worker_job_stop: int = 10**8  # ~35 ms per job with the compiled kernels here
    drain_poll_s: float = 0.02

    @classmethod
    def quick(cls) -> Settings:
        """Fewer rounds, smaller pure-Python inputs, fewer jobs."""
        return cls(
            rounds=5,
            thread_rounds=3,
            quiet_budget_s=20.0,
            python_full_max_s=12.0,
            python_scaled_s=4.0,
            worker_jobs=200,
            worker_rounds=1,
        )


def _scale_range(args: Args, fraction: float) -> tuple[Args, float]:
    """primes: the first ``fraction`` of [start, stop), from the same start."""
    start, stop = args
    span = max(1000, round((stop - start) * fraction))
    return (start, start + span), span / (stop - start)


def _scale_samples(args: Args, fraction: float) -> tuple[Args, float]:
    """pi: fewer samples of the same stream."""
    samples, seed = args
    n = max(1000, round(samples * fraction))
    return (n, seed), n / samples


def _scale_grid(args: Args, fraction: float) -> tuple[Args, float]:
    """julia: a coarser grid over the same region (both axes shrink by sqrt(fraction))."""
    width, height, *rest = args
    f = fraction**0.5
    w, h = max(8, round(width * f)), max(8, round(height * f))
    return (w, h, *rest), (w * h) / (width * height)


def _scale_field(args: Args, fraction: float) -> tuple[Args, float]:
    """diffusion: a smaller n x n field, same steps (initialisation and steps both scale)."""
    n, *rest = args
    m = max(16, round(n * fraction**0.5))
    return (m, *rest), (m * m) / (n * n)


@dataclass(frozen=True)
class KernelSpec:
    """One benchmarked call: which kernel, which function, which fixed input."""

    key: str
    kernel: (
        str  # module stem: workers/nsqjobs_tasks/kernels/<kernel>_py.py, bench/c/<kernel>.c, ...
    )
    function: str  # the Python-level function every implementation exports
    title: str
    args: Args
    scale: Scale
    probe_fraction: float  # size of the pure-Python probe that predicts its full-input time
    python_target: float | None = None  # compiled speed-up over pure Python, at least
    threads: bool = True  # also measure thread scaling on this input


SPECS: tuple[KernelSpec, ...] = (
    KernelSpec(
        "primes",
        "primes",
        "count_primes",
        "primes count_primes(0, 10**8)",
        (0, 10**8),
        _scale_range,
        0.01,
        python_target=PYTHON_SPEEDUP_TARGET,
    ),
    KernelSpec(
        "primes_1e12",
        "primes",
        "count_primes",
        "primes count_primes(10**12 - 10**8, 10**12)",
        (10**12 - 10**8, 10**12),
        _scale_range,
        0.01,
        python_target=PYTHON_SPEEDUP_TARGET,
        threads=False,
    ),
    KernelSpec(
        "pi",
        "pi",
        "count_inside",
        "pi count_inside(samples=10**7, seed=1)",
        (10**7, 1),
        _scale_samples,
        0.001,
    ),
    KernelSpec(
        "julia",
        "julia",
        "escape_counts",
        "julia escape_counts 1000x1000, [-1.5, 1.5]^2, c = -0.8+0.156i, max_iter 300",
        (1000, 1000, -1.5, 1.5, -1.5, 1.5, -0.8, 0.156, 300),
        _scale_grid,
        0.0025,
    ),
    KernelSpec(
        "diffusion",
        "diffusion",
        "run",
        "diffusion run(n=512, steps=200, d=1.0, dt=0.2, seed=1)",
        (512, 200, 1.0, 0.2, 1),
        _scale_field,
        0.004,
    ),
)


def rel(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
