"""Compute-kernel benchmarks: ``python -m bench.kernels [--quick] [--out DIR]``, or ``make bench``.

What is measured (the machine is shared and noisy, so every figure is taken side by side with its
baseline in the same run, interleaved and repeated, and the median is reported):

1. Single call: each kernel's Numba and Cython implementations against a plain C99 baseline of
   the same algorithm (``bench/c/<kernel>.c``, built here with ``gcc -O2 -shared -fPIC``, no
   -march, no -ffast-math, called through ctypes) on a fixed input, after warm-up; each round
   calls every implementation once, in an order that rotates from round to round. The ratios
   Numba/C and Cython/C are medians of the per-round ratios. Target: <= 1.25 each. Every
   implementation must return the same result, the pure-Python reference included (checked and
   recorded; any difference is an error).
2. Pure-Python reference: one call on the same input when a small probe predicts it takes less
   than ``python_full_max_s``; otherwise one call on a smaller input of the same shape (fewer
   samples, a coarser grid of the same region, a shorter range), whose time is scaled up linearly
   to the full input, and the report says so. For primes the compiled kernels must be >= 50x
   faster than it.
3. Thread scaling: one call on one thread against two threads each running the same call at the
   same time (``threading.Thread``, released together by a barrier); speed-up = 2 * t1 / t2,
   median over rounds; a call shorter than 0.1 s is repeated in each thread. Target: >= 1.8 for
   Numba and Cython (2 cores); C alongside as the control (ctypes releases the GIL), no target.
4. Through the worker: ``primes.count`` jobs/s drained by ONE ``nsqjobs worker --concurrency 2``
   against TWO ``nsqjobs worker --concurrency 1`` processes, on a private nsqd. Each run fills a
   fresh, paused channel with N identical job envelopes, starts the worker(s), waits until every
   one is connected with RDY > 0, unpauses, and times until depth + in-flight + deferred = 0.
   For the record, no target.

The machine is shared: the cores other processes keep busy (from /proc/stat, less this process
and its children) are recorded for every section. A thread-scaling round measured while they
used more than ``quiet_cores`` is redone, and each worker drain first waits for a quiet machine,
as long as the run has spent less than ``quiet_budget_s`` waiting; after that figures count as
they are, with their load shown next to them.

Kernels (or implementations) that are not there -- no module, no ``bench/c`` file, Cython not
built -- are skipped with a line in the report. Figures go to ``kernels.json`` and ``kernels.md``
in ``--out`` (default ``bench/results``); progress goes to stderr. A full run takes two to three
minutes; ``--quick`` runs fewer rounds and smaller loads (under a minute and a half). Exit
status: 1 if something could not run or the results differ, 2 with ``--strict`` if a target is
missed.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import importlib
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from bench import report
from bench.procs import (
    ROOT,
    BenchError,
    Nsq,
    binary,
    free_port,
    log,
    spawn,
    start_nsq,
    temp_dir,
    wait_ready,
    wait_until,
    worker_argv,
)

Fn = Callable[..., Any]
KERNELS_DIR = ROOT / "workers" / "kernels"
C_DIR = ROOT / "bench" / "c"
GCC_FLAGS = ("-O2", "-shared", "-fPIC")
GCC_LIBS = ("-lm",)
COMPILED = ("c", "numba", "cython")  # the C baseline first
RATIO_TARGET = 1.25  # Numba/C and Cython/C, at most
THREAD_TARGET = 1.8  # 2 * t1 / t2, at least
PYTHON_SPEEDUP_TARGET = 50.0  # primes: compiled kernels against the pure-Python reference
WORKER_TASK = "primes.count"


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


# -- the kernels, their inputs and their C signatures ----------------------------------------------

Args = tuple[Any, ...]
Scale = Callable[[Args, float], tuple[Args, float]]


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


def _bind_primes(lib: ctypes.CDLL) -> Fn:
    """long long count_primes(long long start, long long stop); -1: out of memory."""
    fn = lib.count_primes
    fn.argtypes = [ctypes.c_longlong, ctypes.c_longlong]
    fn.restype = ctypes.c_longlong

    def count_primes(start: int, stop: int) -> int:
        count: int = fn(start, stop)
        if count < 0:
            raise MemoryError("bench/c/primes.c: could not allocate the sieve buffers")
        return count

    return count_primes


def _bind_pi(lib: ctypes.CDLL) -> Fn:
    """long long count_inside(unsigned long long samples, unsigned long long seed)."""
    fn = lib.count_inside
    fn.argtypes = [ctypes.c_ulonglong, ctypes.c_ulonglong]
    fn.restype = ctypes.c_longlong

    def count_inside(samples: int, seed: int) -> int:
        inside: int = fn(samples, seed)
        return inside

    return count_inside


def _bind_julia(lib: ctypes.CDLL) -> Fn:
    """void escape_counts(int w, int h, 6 x double, int max_iter, unsigned short *out)."""
    fn = lib.escape_counts
    fn.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_ushort),
    ]
    fn.restype = None

    def escape_counts(
        width: int,
        height: int,
        x_min: float,
        x_max: float,
        y_min: float,
        y_max: float,
        c_re: float,
        c_im: float,
        max_iter: int,
    ) -> npt.NDArray[np.uint16]:
        out = np.empty(width * height, dtype=np.uint16)
        fn(
            width,
            height,
            x_min,
            x_max,
            y_min,
            y_max,
            c_re,
            c_im,
            max_iter,
            out.ctypes.data_as(ctypes.POINTER(ctypes.c_ushort)),
        )
        return out

    return escape_counts


def _bind_diffusion(lib: ctypes.CDLL) -> Fn:
    """void diffusion_run(int n, int steps, double d, double dt, uint64 seed, double *out3)."""
    fn = lib.diffusion_run
    fn.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_ulonglong,
        ctypes.POINTER(ctypes.c_double),
    ]
    fn.restype = None

    def run(n: int, steps: int, d: float, dt: float, seed: int) -> tuple[float, float, float]:
        out = (ctypes.c_double * 3)()
        fn(n, steps, d, dt, seed, out)
        return (out[0], out[1], out[2])

    return run


C_BINDINGS: dict[str, Callable[[ctypes.CDLL], Fn]] = {
    "primes": _bind_primes,
    "pi": _bind_pi,
    "julia": _bind_julia,
    "diffusion": _bind_diffusion,
}


# -- building and loading --------------------------------------------------------------------------


def gcc_version() -> str:
    """The first line of ``gcc --version``."""
    try:
        out = subprocess.run(
            ["gcc", "--version"], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchError(f"gcc is not usable: {exc}") from exc
    return out.stdout.splitlines()[0].strip()


@dataclass
class CBuild:
    """What compiling ``bench/c/*.c`` gave: a loaded library per kernel, or why not."""

    libs: dict[str, ctypes.CDLL] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    commands: dict[str, str] = field(default_factory=dict)


def build_c(out_dir: Path) -> CBuild:
    """Compile every ``bench/c/*.c`` into ``out_dir`` and load it."""
    build = CBuild()
    for source in sorted(C_DIR.glob("*.c")):
        name = source.stem
        target = out_dir / f"{name}.so"
        argv = ["gcc", *GCC_FLAGS, "-o", str(target), str(source), *GCC_LIBS]
        build.commands[name] = shlex.join(
            ["gcc", *GCC_FLAGS, "-o", f"<tmp>/{name}.so", f"bench/c/{source.name}", *GCC_LIBS]
        )
        log(f"  gcc {_rel(source)}")
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
        except (OSError, subprocess.SubprocessError) as exc:
            build.failed[name] = f"gcc could not run: {exc}"
            continue
        if done.returncode != 0:
            build.failed[name] = f"gcc failed ({done.returncode}): {done.stderr.strip()[-1500:]}"
            continue
        try:
            build.libs[name] = ctypes.CDLL(str(target))
        except OSError as exc:
            build.failed[name] = f"could not load {target.name}: {exc}"
    return build


def _rel(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _import(module: str, path: Path, what: str) -> ModuleType | str:
    """Import a kernel module, or say why it is not there."""
    if not path.exists():
        return f"{what}: not present ({_rel(path)})"
    try:
        return importlib.import_module(module)
    except Exception as exc:  # a half-written module may raise anything
        return f"{what}: import failed: {type(exc).__name__}: {exc}"


def load_impls(spec: KernelSpec, build: CBuild) -> tuple[dict[str, Fn], dict[str, str]]:
    """The implementations of a kernel that are there (c, numba, cython, python), and why not."""
    found: dict[str, Fn] = {}
    missing: dict[str, str] = {}
    k = spec.kernel
    candidates: dict[str, ModuleType | str] = {
        "numba": _import(
            f"nsqjobs_tasks.kernels.{k}_numba", KERNELS_DIR / f"{k}_numba.py", "Numba"
        ),
        "python": _import(f"nsqjobs_tasks.kernels.{k}_py", KERNELS_DIR / f"{k}_py.py", "Python"),
    }
    pyx = KERNELS_DIR / f"_{k}_cy.pyx"
    if not pyx.exists():
        candidates["cython"] = f"Cython: not present ({_rel(pyx)})"
    elif not list(KERNELS_DIR.glob(f"_{k}_cy.*.so")) + list(KERNELS_DIR.glob(f"_{k}_cy.*.pyd")):
        candidates["cython"] = f"Cython: {_rel(pyx)} is not built (pip install -e . builds it)"
    else:
        candidates["cython"] = _import(f"nsqjobs_tasks.kernels._{k}_cy", pyx, "Cython")
    for impl, got in candidates.items():
        if isinstance(got, str):
            missing[impl] = got
        elif not callable(getattr(got, spec.function, None)):
            missing[impl] = f"{impl}: {got.__name__} has no function {spec.function}()"
        else:
            found[impl] = getattr(got, spec.function)
            warm = getattr(got, "warm_up", None)
            if impl == "numba" and callable(warm):
                warm()  # compile, or load from the on-disk cache
    if k in build.libs:
        try:
            found["c"] = C_BINDINGS[k](build.libs[k])
        except AttributeError as exc:
            missing["c"] = f"C: bench/c/{k}.c does not export the expected function: {exc}"
    elif k in build.failed:
        missing["c"] = f"C: {build.failed[k]}"
    else:
        missing["c"] = f"C: not present (bench/c/{k}.c)"
    return found, missing


# -- results: identical, and summarised for the report ---------------------------------------------


def _difference(a: Any, b: Any) -> str | None:
    """None when two results are identical (bit for bit), else what differs."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        x, y = np.asarray(a).ravel(), np.asarray(b).ravel()
        if x.shape != y.shape:
            return f"{x.size} values vs {y.size}"
        if np.array_equal(x, y):
            return None
        diff = int(np.count_nonzero(x != y))
        return f"{diff} of {x.size} values differ"
    if isinstance(a, tuple) or isinstance(b, tuple):
        ta, tb = tuple(a), tuple(b)
        if len(ta) != len(tb):
            return f"{len(ta)} values vs {len(tb)}"
        if all(float(p).hex() == float(q).hex() for p, q in zip(ta, tb, strict=True)):
            return None
        return f"{[repr(float(v)) for v in ta]} vs {[repr(float(v)) for v in tb]}"
    return None if a == b else f"{a!r} vs {b!r}"


def summary(value: Any) -> Any:
    """A JSON-able record of a result (arrays by size, sum and digest)."""
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value)
        return {
            "dtype": str(data.dtype),
            "shape": list(data.shape),
            "sum": int(data.sum(dtype=np.int64)),
            "sha256": hashlib.sha256(data.tobytes()).hexdigest()[:16],
        }
    if isinstance(value, tuple):
        return [float(v) for v in value]
    if isinstance(value, (int, np.integer)):
        return int(value)
    return repr(value)


def check_same(results: dict[str, Any], what: str) -> list[str]:
    """Compare every implementation's result with the first one; the differences as text."""
    names = list(results)
    problems = []
    for name in names[1:]:
        diff = _difference(results[names[0]], results[name])
        if diff is not None:
            problems.append(f"{what}: {name} differs from {names[0]}: {diff}")
    return problems


# -- how busy the rest of the machine was --------------------------------------------------------


def _proc_stat() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _own_cpu() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


@dataclass
class Load:
    """Cores kept busy by other processes (and stolen by the hypervisor) over a section.

    The machine is shared: this says how much of it the figures of that section could use.
    """

    wall0: float
    stat0: tuple[float, float] | None
    own0: float
    wall_s: float = 0.0
    others_cores: float | None = None
    steal_cores: float | None = None

    @classmethod
    def start(cls) -> Load:
        """Start measuring now."""
        return cls(time.monotonic(), _proc_stat(), _own_cpu())

    def stop(self) -> Load:
        """Stop measuring; returns itself."""
        self.wall_s = time.monotonic() - self.wall0
        stat1 = _proc_stat()
        if self.stat0 is not None and stat1 is not None and self.wall_s > 0:
            busy = stat1[0] - self.stat0[0] - (_own_cpu() - self.own0)
            self.others_cores = max(0.0, busy / self.wall_s)
            self.steal_cores = (stat1[1] - self.stat0[1]) / self.wall_s
        return self

    def text(self) -> str:
        """For progress lines: empty when unknown."""
        if self.others_cores is None:
            return ""
        return f" (other processes: {self.others_cores:.2f} cores, steal {self.steal_cores:.2f})"

    def cell(self) -> str:
        """For the report's tables."""
        return "-" if self.others_cores is None else f"{self.others_cores:.2f}"

    def to_json(self) -> dict[str, Any]:
        """Machine-readable figures."""
        return {
            "wall_s": round(self.wall_s, 2),
            "others_cores": None if self.others_cores is None else round(self.others_cores, 3),
            "steal_cores": None if self.steal_cores is None else round(self.steal_cores, 3),
        }


class Quiet:
    """A budget of time to spend waiting for the other processes to leave both cores free.

    Figures that need both cores (thread scaling, the two worker setups) are worthless while
    another process keeps a core busy: such rounds are redone, or a drain waits, until the
    budget is spent; after that they count as they are, and the report shows their load.
    """

    def __init__(self, s: Settings) -> None:
        self.threshold = s.quiet_cores
        self.left_s = s.quiet_budget_s
        self.redone = 0

    def quiet(self, load: Load) -> bool:
        """Whether a section ran without much else on the machine (unknown counts as quiet)."""
        return load.others_cores is None or load.others_cores <= self.threshold

    def retry(self, load: Load) -> bool:
        """After a noisy round: whether to redo it (waiting for quiet first, from the budget)."""
        if self.quiet(load) or self.left_s <= 0:
            return False
        self.redone += 1
        self.wait()
        return True

    def wait(self, window_s: float = 0.5) -> None:
        """Sample the machine in short windows until it is quiet or the budget is spent."""
        while self.left_s > 0:
            started = time.monotonic()
            meter = Load.start()
            time.sleep(window_s)
            load = meter.stop()
            self.left_s -= time.monotonic() - started
            if self.quiet(load):
                return


# -- 1 and 2: single-call times --------------------------------------------------------------------


def _timed(fn: Fn, args: Args) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - t0, value


@dataclass
class PythonRun:
    """The pure-Python reference: one call, on the full input or a scaled one."""

    args: Args
    fraction: float  # of the full input's work; 1.0 when it ran on the full input
    seconds: float
    probe_seconds: float
    probe_fraction: float
    value: Any = None

    @property
    def full_seconds(self) -> float:
        """Measured (fraction 1) or scaled linearly to the full input."""
        return self.seconds / self.fraction

    def to_json(self) -> dict[str, Any]:
        """Machine-readable figures."""
        return {
            "args": list(self.args),
            "scaled": self.fraction < 1.0,
            "work_fraction": round(self.fraction, 6),
            "seconds": round(self.seconds, 4),
            "full_input_seconds": round(self.full_seconds, 3),
            "full_input_seconds_is_extrapolated": self.fraction < 1.0,
            "probe_seconds": round(self.probe_seconds, 4),
            "probe_work_fraction": round(self.probe_fraction, 6),
            "result": summary(self.value),
        }


@dataclass
class KernelResult:
    """Figures for one kernel input."""

    spec: KernelSpec
    impls: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=dict)  # per round, in seconds
    orders: list[str] = field(default_factory=list)
    result: Any = None
    results_match: bool = False
    problems: list[str] = field(default_factory=list)
    python: PythonRun | None = None
    load: Load | None = None  # over the interleaved rounds

    def median(self, impl: str) -> float | None:
        """Median seconds per call."""
        t = self.times.get(impl)
        return statistics.median(t) if t else None

    def ratio(self, impl: str) -> float | None:
        """Median of the per-round ratios impl / C."""
        t, c = self.times.get(impl), self.times.get("c")
        if not t or not c:
            return None
        return statistics.median(a / b for a, b in zip(t, c, strict=True))

    def ratio_passed(self, impl: str) -> bool | None:
        """Whether impl / C meets its target (None when it was not measured)."""
        r = self.ratio(impl)
        return None if r is None else r <= RATIO_TARGET

    def python_speedup(self, impl: str) -> float | None:
        """Pure-Python seconds (full input, maybe extrapolated) over the impl's median."""
        m = self.median(impl)
        return self.python.full_seconds / m if self.python and m else None

    def python_passed(self) -> bool | None:
        """Numba and Cython both meet the speed-up target over Python (None: no target)."""
        target = self.spec.python_target
        if target is None or self.python is None:
            return None
        ups = [self.python_speedup(i) for i in ("numba", "cython") if i in self.times]
        return bool(ups) and all(u is not None and u >= target for u in ups)

    def to_json(self) -> dict[str, Any]:
        """Machine-readable figures."""
        per_impl = {}
        for impl in self.impls:
            t = self.times.get(impl, [])
            per_impl[impl] = {
                "median_s": round(statistics.median(t), 6) if t else None,
                "min_s": round(min(t), 6) if t else None,
                "per_round_s": [round(x, 6) for x in t],
            }
        ratios = {}
        for impl in ("numba", "cython"):
            r = self.ratio(impl)
            if r is not None:
                ratios[f"{impl}_over_c"] = {
                    "median": round(r, 4),
                    "per_round": [
                        round(a / b, 4)
                        for a, b in zip(self.times[impl], self.times["c"], strict=True)
                    ],
                    "target_max": RATIO_TARGET,
                    "pass": r <= RATIO_TARGET,
                }
        python: dict[str, Any] | None = None
        if self.python is not None:
            python = self.python.to_json()
            python["speedup"] = {
                impl: round(up, 1)
                for impl in COMPILED
                if (up := self.python_speedup(impl)) is not None
            }
            if self.spec.python_target is not None:
                python["speedup_target_min"] = self.spec.python_target
                python["pass"] = self.python_passed()
        return {
            "title": self.spec.title,
            "args": list(self.spec.args),
            "implementations": self.impls,
            "missing": self.missing,
            "result": summary(self.result),
            "results_match": self.results_match,
            "problems": self.problems,
            "orders": self.orders,
            "times": per_impl,
            "ratios": ratios,
            "other_load": self.load.to_json() if self.load else None,
            "python": python,
        }


def python_reference(spec: KernelSpec, fn: Fn, s: Settings) -> PythonRun:
    """Time the pure-Python reference, scaling the input down when a probe says it is slow."""
    probe_args, probe_fraction = spec.scale(spec.args, spec.probe_fraction)
    probe_seconds, _ = _timed(fn, probe_args)
    predicted = probe_seconds / probe_fraction
    if predicted <= s.python_full_max_s:
        args, fraction = spec.args, 1.0
        log(f"  {spec.key}: pure Python on the full input (predicted {predicted:.1f}s)")
    else:
        args, fraction = spec.scale(spec.args, s.python_scaled_s / predicted)
        log(
            f"  {spec.key}: pure Python would take ~{predicted:.0f}s: running "
            f"{fraction:.4f} of the work instead, args {args}"
        )
    seconds, value = _timed(fn, args)
    return PythonRun(args, fraction, seconds, probe_seconds, probe_fraction, value)


def measure_kernel(spec: KernelSpec, found: dict[str, Fn], s: Settings) -> KernelResult:
    """Warm up, check the results agree, then time interleaved rounds and the Python reference."""
    impls = [i for i in COMPILED if i in found]
    kr = KernelResult(spec, impls=impls)
    results = {impl: found[impl](*spec.args) for impl in impls}  # warm-up, and the results
    kr.problems += check_same(results, spec.title)
    kr.result = results[impls[0]] if impls else None
    gc.collect()
    kr.times = {impl: [] for impl in impls}
    meter = Load.start()
    for r in range(s.rounds):
        order = impls[r % len(impls) :] + impls[: r % len(impls)]
        kr.orders.append(",".join(order))
        for impl in order:
            kr.times[impl].append(_timed(found[impl], spec.args)[0])
    kr.load = meter.stop()
    line = ", ".join(f"{i} {1000 * (kr.median(i) or 0):.1f} ms" for i in impls)
    ratios = ", ".join(
        f"{i}/C {q:.3f}" for i in ("numba", "cython") if (q := kr.ratio(i)) is not None
    )
    log(f"  {spec.key}: {line}" + (f"; {ratios}" if ratios else "") + kr.load.text())

    if "python" in found:
        kr.python = python_reference(spec, found["python"], s)
        if kr.python.fraction == 1.0:
            same = {"python": kr.python.value, **results}
        else:  # the compiled ones on the smaller input too, to compare with Python there
            same = {"python": kr.python.value}
            same.update({impl: found[impl](*kr.python.args) for impl in impls})
        kr.problems += check_same(same, f"{spec.title} (pure-Python input {kr.python.args})")
        if kr.result is None:
            kr.result = kr.python.value if kr.python.fraction == 1.0 else None
        ups = ", ".join(f"{i} {u:.0f}x" for i in impls if (u := kr.python_speedup(i)) is not None)
        log(
            f"  {spec.key}: pure Python {kr.python.seconds:.2f}s"
            + (f" (full input ~{kr.python.full_seconds:.1f}s)" if kr.python.fraction < 1 else "")
            + (f"; compiled speed-up {ups}" if ups else "")
        )
    kr.results_match = not kr.problems
    for p in kr.problems:
        log(f"  RESULTS DIFFER: {p}")
    return kr


# -- 3: thread scaling -----------------------------------------------------------------------------


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


# -- 4: through the worker -------------------------------------------------------------------------

SETUPS = {"one_process_c2": (1, 2), "two_processes_c1": (2, 1)}  # processes, --concurrency


@dataclass
class WorkerThroughput:
    """primes.count jobs/s: one worker process with 2 threads vs two with 1 thread each."""

    settings: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def median(self, setup: str) -> float:
        """Median jobs/s of one setup."""
        return float(statistics.median(r[setup]["jobs_per_s"] for r in self.rounds))

    @property
    def ratio(self) -> float:
        """Median of the per-round ratios two processes / one process."""
        return float(
            statistics.median(
                r["two_processes_c1"]["jobs_per_s"] / r["one_process_c2"]["jobs_per_s"]
                for r in self.rounds
            )
        )

    def to_json(self) -> dict[str, Any]:
        """Machine-readable figures."""
        return {
            "title": "primes.count jobs/s: 1 worker x --concurrency 2 vs 2 workers x 1",
            "unit": "jobs/s",
            "one_process_c2_median": round(self.median("one_process_c2"), 2),
            "two_processes_c1_median": round(self.median("two_processes_c1"), 2),
            "ratio_two_over_one_median": round(self.ratio, 4),
            "target": None,
            "rounds": self.rounds,
            "settings": self.settings,
        }


def _job_bodies(n: int, start: int, stop: int) -> list[bytes]:
    """``n`` primes.count envelopes with the same arguments (distinct ids)."""
    from nsqjobs import wire
    from nsqjobs.registry import load_task_modules, registry

    load_task_modules(["nsqjobs_tasks.builtin"])
    limit = registry.get(WORKER_TASK).time_limit_s
    return [
        wire.encode(
            wire.JobEnvelope(
                id=wire.new_job_id(),
                task=WORKER_TASK,
                args={"start": start, "stop": stop},
                created_at=wire.now(),
                timeout_s=limit,
            )
        )
        for _ in range(n)
    ]


def _drain(
    nsq: Nsq, setup: str, topic: str, bodies: list[bytes], s: Settings, log_dir: Path
) -> dict[str, Any]:
    """Fill a paused channel, start the worker(s), unpause once all are ready, time the drain."""
    from nsqjobs.names import DEAD_LETTER_TOPIC, RESULTS_TOPIC, WORKER_CHANNEL

    processes, concurrency = SETUPS[setup]
    n = len(bodies)
    nsq.create_channel(topic, WORKER_CHANNEL)
    nsq.post("/channel/pause", topic=topic, channel=WORKER_CHANNEL)
    nsq.mpub(topic, bodies)
    wait_until(
        lambda: (nsq.channel_stats(topic, WORKER_CHANNEL) or {}).get("depth") == n,
        30.0,
        f"{n} messages in {topic}/{WORKER_CHANNEL}",
    )
    with ExitStack() as stack:
        procs = []
        for p in range(processes):
            port = free_port()
            argv = worker_argv(
                nsq,
                concurrency=concurrency,
                queue=topic,
                channel=WORKER_CHANNEL,
                lookupd=False,
                port=port,
            )
            proc = spawn(stack, f"worker-{topic}-{p}", argv, log_dir)
            procs.append((proc, port))
        for proc, port in procs:
            wait_ready(proc, f"http://127.0.0.1:{port}/readyz", 90.0)

        def all_rdy() -> bool:
            clients = (nsq.channel_stats(topic, WORKER_CHANNEL) or {}).get("clients") or []
            return len(clients) == processes and all(
                int(c.get("ready_count", 0)) > 0 for c in clients
            )

        wait_until(all_rdy, 30.0, f"{processes} worker(s) with RDY > 0 on {topic}")
        nsq.post("/channel/unpause", topic=topic, channel=WORKER_CHANNEL)
        t0 = time.monotonic()
        deadline = t0 + max(120.0, n * 0.5)
        while True:
            for proc, _ in procs:
                proc.check_alive()
            ch = nsq.channel_stats(topic, WORKER_CHANNEL)
            if ch is None:
                raise BenchError(f"channel {topic}/{WORKER_CHANNEL} disappeared")
            left = int(ch["depth"]) + int(ch["in_flight_count"]) + int(ch["deferred_count"])
            if left == 0:
                seconds = time.monotonic() - t0
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{setup} did not drain {topic} in time ({left} left)")
            time.sleep(s.drain_poll_s)
    results = nsq.message_count(RESULTS_TOPIC)
    dead = nsq.message_count(DEAD_LETTER_TOPIC)
    for t in (topic, RESULTS_TOPIC, DEAD_LETTER_TOPIC):
        nsq.delete_topic(t)
    if results != n or dead:
        raise BenchError(f"{setup}: {results} results and {dead} dead letters for {n} jobs")
    return {
        "jobs_per_s": round(n / seconds, 3),
        "seconds": round(seconds, 3),
        "requeued": int(ch["requeue_count"]),
        "timed_out": int(ch["timeout_count"]),
    }


def _job_cost(start: int, stop: int) -> tuple[str, float]:
    """The worker's default primes implementation here, and its median in-process call time."""
    from nsqjobs_tasks import impl

    chosen = impl.chosen("primes")
    fn = impl.function("primes", "count_primes", chosen)
    fn(start, stop)
    return chosen, statistics.median(_timed(fn, (start, stop))[0] for _ in range(5))


def worker_throughput(nsq: Nsq, s: Settings, log_dir: Path, quiet: Quiet) -> WorkerThroughput:
    """Rounds of (one process x 2 threads, two processes x 1 thread), alternating order."""
    start, stop = s.worker_job_start, s.worker_job_stop
    chosen, cost = _job_cost(start, stop)
    bodies = _job_bodies(s.worker_jobs, start, stop)
    log(
        f"  {s.worker_jobs} {WORKER_TASK} jobs [{start}, {stop}), kernel {chosen}: "
        f"{1000 * cost:.1f} ms each in-process"
    )
    wt = WorkerThroughput(
        settings={
            "task": WORKER_TASK,
            "args": {"start": start, "stop": stop},
            "jobs_per_run": s.worker_jobs,
            "rounds": s.worker_rounds,
            "kernel_impl": chosen,
            "kernel_impl_env": os.environ.get("NSQJOBS_KERNEL_IMPL", ""),
            "job_seconds_in_process_median": round(cost, 5),
            "executor": "thread",
            "log_level": "WARNING",
            "poll_interval_s": s.drain_poll_s,
            "envelope_bytes": len(bodies[0]),
        }
    )
    for r in range(s.worker_rounds):
        order = list(SETUPS) if r % 2 == 0 else list(reversed(SETUPS))
        rnd: dict[str, Any] = {"order": ",".join(order)}
        for setup in order:
            quiet.wait()
            meter = Load.start()
            rnd[setup] = _drain(nsq, setup, f"bench_kernels_{r}_{setup}", bodies, s, log_dir)
            rnd[setup]["other_load"] = meter.stop().to_json()
        one, two = rnd["one_process_c2"], rnd["two_processes_c1"]
        rnd["ratio_two_over_one"] = round(two["jobs_per_s"] / one["jobs_per_s"], 4)
        wt.rounds.append(rnd)
        log(
            f"  worker round {r + 1}: 1 process x 2 threads {one['jobs_per_s']:.1f} jobs/s, "
            f"2 processes x 1 {two['jobs_per_s']:.1f}, ratio {rnd['ratio_two_over_one']:.3f} "
            f"(other processes: {one['other_load']['others_cores']} and "
            f"{two['other_load']['others_cores']} cores)"
        )
    return wt


# -- the report ------------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:,.1f} ms"


def _verdict(passed: bool | None) -> str:
    return "-" if passed is None else ("PASS" if passed else "FAIL")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def missed(kernels: list[KernelResult], scaling: list[Scaling]) -> list[str]:
    """Every measured target that was missed, and every result that differs, in words."""
    out = []
    for k in kernels:
        if not k.results_match:
            out.append(f"{k.spec.key}: the implementations' results differ")
        for impl in ("numba", "cython"):
            r = k.ratio(impl)
            if r is not None and r > RATIO_TARGET:
                out.append(f"{k.spec.key}: {impl}/C {r:.3f} > {RATIO_TARGET:g}")
        if k.python_passed() is False:
            ups = ", ".join(
                f"{i} {u:.0f}x"
                for i in ("numba", "cython")
                if (u := k.python_speedup(i)) is not None
            )
            out.append(f"{k.spec.key}: speed-up over pure Python {ups} < {k.spec.python_target:g}x")
    for sc in scaling:
        if sc.passed is False:
            out.append(
                f"{sc.key} {sc.impl}: 2-thread speed-up {sc.speedup:.2f} < {THREAD_TARGET:g}"
            )
    return out


def all_pass(kernels: list[KernelResult], scaling: list[Scaling], header: dict[str, Any]) -> bool:
    """Every measured target met, every result identical, nothing failed to run."""
    return not header["errors"] and not missed(kernels, scaling)


def write_json(
    path: Path,
    header: dict[str, Any],
    kernels: list[KernelResult],
    scaling: list[Scaling],
    worker: WorkerThroughput | None,
) -> None:
    """The machine-readable figures."""
    doc = {
        **header,
        "kernels": {k.spec.key: k.to_json() for k in kernels},
        "thread_scaling": [sc.to_json() for sc in scaling],
        "worker_throughput": worker.to_json() if worker and worker.rounds else None,
        "all_pass": all_pass(kernels, scaling, header),
        "missed_targets": missed(kernels, scaling),
    }
    _write(path, json.dumps(doc, indent=2) + "\n")


def _result_text(value: Any) -> str:
    v = summary(value)
    if isinstance(v, dict):
        return f"{v['shape']} {v['dtype']}, sum {v['sum']:,}"
    if isinstance(v, list):
        return ", ".join(f"{x:.17g}" for x in v)
    return f"{v:,}" if isinstance(v, int) else str(v)


def write_markdown(
    path: Path,
    header: dict[str, Any],
    kernels: list[KernelResult],
    scaling: list[Scaling],
    worker: WorkerThroughput | None,
) -> None:
    """The human-readable report."""
    s = header["settings"]
    out = [
        "# nsqjobs compute-kernel benchmark",
        "",
        f"- Date: {header['date']}",
        f"- CPU: {header['cpu_model']}, {header['cores']} cores "
        "(a shared, noisy machine: compare the ratios, not the absolute times)",
        f"- Command: `{header['command']}`" + (" (quick run)" if header["quick"] else ""),
        f"- C baseline: {header['gcc']}, `{header['gcc_command']}` (no -march, no -ffast-math), "
        "called through ctypes",
        f"- Python {header['python']}, NumPy {header['numpy']}, Numba {header['numba']}, "
        f"Cython {header['cython']} (the Cython kernels are built by setup.py with -O3)",
        f"- Settings: {s['rounds']} interleaved rounds per kernel (order rotating), "
        f"{s['thread_rounds']} thread-scaling rounds, {s['worker_rounds']} worker round(s) of "
        f"{s['worker_jobs']} jobs; pure Python on the full input when predicted "
        f"<= {s['python_full_max_s']:g} s, else scaled down to ~{s['python_scaled_s']:g} s",
        f"- Duration: {header['duration_s']} s, of which {header['quiet_waited_s']} s waiting for "
        "other processes to leave both cores free. All targets met: "
        f"**{'yes' if header['all_pass'] else 'no'}**"
        + "".join(f"; missed: {m}" for m in missed(kernels, scaling)),
        "",
        "## Single call: Numba and Cython against C",
        "",
        "Median time per call after warm-up; each round calls every implementation once, in a "
        "rotating order; the ratio is the median of the per-round ratios. Target: <= "
        f"{RATIO_TARGET:g}.",
        "",
        "Numba compiles for this CPU (AVX-512 here); the C baseline (-O2, no -march) and the "
        "Cython kernels (setup.py: -O3, no -march) target baseline x86-64. Where a loop "
        "vectorises, Numba/C well below 1 reflects that, not a different algorithm. *Other load*: "
        "cores kept busy by other processes meanwhile (from /proc/stat), out of "
        f"{header['cores']}.",
        "",
        "| Kernel, input | Result (all identical) | C | Numba | Cython | Numba/C | Cython/C "
        "| Target | Result | Other load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for k in kernels:
        rn, rc = k.ratio("numba"), k.ratio("cython")
        checks = [p for p in (k.ratio_passed("numba"), k.ratio_passed("cython")) if p is not None]
        verdict = _verdict(all(checks) if checks else None)
        if not k.results_match:
            verdict = "FAIL (results differ)"
        result = _result_text(k.result) if k.result is not None else "-"
        out.append(
            f"| {k.spec.title} | {result}{'' if k.results_match else ' **DIFFER**'} | "
            f"{_ms(k.median('c'))} | {_ms(k.median('numba'))} | {_ms(k.median('cython'))} | "
            f"{'-' if rn is None else f'**{rn:.3f}**'} | {'-' if rc is None else f'**{rc:.3f}**'}"
            f" | <= {RATIO_TARGET:g} | {verdict} | {k.load.cell() if k.load else '-'} |"
        )
    out += [
        "",
        "## Pure-Python reference",
        "",
        "One call. *Scaled* rows ran a smaller input of the same shape (a shorter range, fewer "
        "samples, a coarser grid of the same region, a smaller field): their full-input time is "
        "that time divided by the work fraction, an extrapolation. The results on that input "
        "were compared with every compiled implementation's on the same input.",
        "",
        "| Kernel, input | Python input | Python time | Full input (s) | C speed-up "
        "| Numba speed-up | Cython speed-up | Target | Result |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for k in kernels:
        py = k.python
        if py is None:
            continue
        scaled = py.fraction < 1.0
        ups = [k.python_speedup(i) for i in COMPILED]
        target = k.spec.python_target
        out.append(
            f"| {k.spec.title} | "
            + (f"*scaled*: {py.args}, {py.fraction:.4f} of the work" if scaled else "full")
            + f" | {py.seconds:.2f} s | {py.full_seconds:.1f}{' (extrapolated)' if scaled else ''}"
            + "".join(f" | {'-' if u is None else f'{u:,.0f}x'}" for u in ups)
            + f" | {'-' if target is None else f'>= {target:g}x (Numba, Cython)'}"
            + f" | {_verdict(k.python_passed())} |"
        )
    out += [
        "",
        "## Thread scaling",
        "",
        "One call on one thread against two threads each making the same call at once; speed-up "
        f"= 2 * t1 / t2 (2.0 is perfect on 2 cores), median over rounds. A call shorter than "
        f"{s['thread_min_s']:g} s is repeated in each thread (*calls*) so thread start-up does "
        "not count; the times are wall times of all of a thread's calls, median over rounds. "
        f"Target: >= {THREAD_TARGET:g} for Numba and Cython. C (ctypes releases the "
        "GIL) is the control: when it does not scale either, the limit is the machine (other "
        "load, shared cores), not the GIL. A round during which other processes kept more than "
        f"{s['quiet_cores']:g} cores busy is redone after waiting for a quiet machine, while "
        f"the run has spent less than {s['quiet_budget_s']:g} s waiting (*Redone*); after that "
        "rounds count whatever their load.",
        "",
        "| Kernel | Impl | Calls | 1 thread | 2 threads | Speed-up | Per round | Target | Result "
        "| Other load per round (cores) | Redone |",
        "|---|---|---:|---:|---:|---:|---|---:|---|---|---:|",
    ]
    for sc in scaling:
        out.append(
            f"| {sc.key} | {sc.impl} | {sc.calls} | {_ms(statistics.median(sc.one))} | "
            f"{_ms(statistics.median(sc.two))} | **{sc.speedup:.2f}** | "
            + ", ".join(f"{x:.2f}" for x in sc.speedups)
            + f" | {'-' if sc.target is None else f'>= {sc.target:g}'} | {_verdict(sc.passed)} | "
            + ", ".join("-" if x is None else f"{x:.2f}" for x in sc.loads)
            + f" | {sc.redone} |"
        )
    if worker is not None and worker.rounds:
        ws = worker.settings
        out += [
            "",
            "## Through the worker (for the record, no target)",
            "",
            f"{ws['jobs_per_run']} identical `{WORKER_TASK}` jobs "
            f"(`{json.dumps(ws['args'])}`, kernel {ws['kernel_impl']}, "
            f"{1000 * ws['job_seconds_in_process_median']:.1f} ms each in-process) per run, "
            "drained from a paused, pre-filled channel on a private nsqd (unpaused once every "
            "worker is connected with RDY > 0; the clock stops at depth + in-flight = 0). "
            "`--log-level WARNING`, thread executor, one result published per job. *Other "
            "load*: cores busy outside this process and its workers over each whole run, start-up "
            "included (our nsqd counts there, lightly).",
            "",
            "| Setup | Jobs/s (median) | Per round | Other load per round |",
            "|---|---:|---|---|",
        ]
        for setup, label in (
            ("one_process_c2", "1 `nsqjobs worker --concurrency 2`"),
            ("two_processes_c1", "2 `nsqjobs worker --concurrency 1`"),
        ):
            per = ", ".join(f"{r[setup]['jobs_per_s']:.1f}" for r in worker.rounds)
            load = ", ".join(str(r[setup]["other_load"]["others_cores"]) for r in worker.rounds)
            out.append(f"| {label} | {worker.median(setup):.1f} | {per} | {load} |")
        per = ", ".join(f"{r['ratio_two_over_one']:.3f}" for r in worker.rounds)
        out += [
            "",
            f"Ratio two processes / one process: **{worker.ratio:.3f}** (per round: {per}). "
            f"Ceiling on 2 cores: {2 / ws['job_seconds_in_process_median']:.1f} jobs/s.",
        ]
    skipped = [f"- {k.spec.title}: {why}" for k in kernels for why in k.missing.values()] + [
        f"- {why}" for why in header["skipped"]
    ]
    if skipped:
        out += ["", "## Not measured", "", *skipped]
    problems = [p for k in kernels for p in k.problems]
    if header["errors"] or problems:
        out += ["", "## Errors", ""]
        out += [f"- {name}: {' '.join(why.split())}" for name, why in header["errors"].items()]
        out += [f"- results differ: {p}" for p in problems]
    _write(path, "\n".join(out).rstrip() + "\n")


# -- main ------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    versions = {"numpy": np.__version__}
    for name in ("numba", "Cython"):
        try:
            versions[name.lower()] = str(importlib.import_module(name).__version__)
        except ImportError:
            versions[name.lower()] = "not installed"
    return versions


def command_line(argv: Sequence[str], module: str = "bench.kernels") -> str:
    """How this run was started, for the report."""
    exe = sys.executable
    if exe.startswith(str(ROOT) + os.sep):
        exe = os.path.relpath(exe, ROOT)
    cmd = shlex.join([exe, "-m", module, *argv])
    if str(ROOT / ".bin") in os.environ.get("PATH", "").split(os.pathsep):
        cmd = "PATH=.bin:$PATH " + cmd
    return cmd


def run(quick: bool, out: Path, command: str, strict: bool = False) -> int:
    """Run every kernel benchmark and write ``kernels.json`` and ``kernels.md`` into ``out``."""
    s = Settings.quick() if quick else Settings()
    started = time.monotonic()
    errors: dict[str, str] = {}
    skipped: list[str] = []
    kernels: list[KernelResult] = []
    scaling: list[Scaling] = []
    worker: WorkerThroughput | None = None
    quiet = Quiet(s)
    header: dict[str, Any] = {
        **report.machine(),
        **_versions(),
        "command": command,
        "quick": quick,
        "settings": asdict(s),
        "gcc": "?",
        "gcc_flags": [*GCC_FLAGS, *GCC_LIBS],
        "gcc_command": "gcc " + " ".join(GCC_FLAGS) + " -o <tmp>/<name>.so bench/c/<name>.c -lm",
        "nsq_version": "?",
        "targets": {
            "compiled_over_c_max": RATIO_TARGET,
            "thread_speedup_min": THREAD_TARGET,
            "primes_python_speedup_min": PYTHON_SPEEDUP_TARGET,
        },
    }
    with ExitStack() as stack:
        so_dir = Path(tempfile.mkdtemp(prefix="nsqjobs-kernels-"))  # not tmpfs: it may be noexec
        stack.callback(shutil.rmtree, so_dir, ignore_errors=True)
        log("kernels: compiling bench/c/*.c")
        try:
            header["gcc"] = gcc_version()
            build = build_c(so_dir)
        except BenchError as exc:
            errors["gcc"] = str(exc)
            build = CBuild()
        for name, why in build.failed.items():
            errors[f"bench/c/{name}.c"] = why
        for name in sorted(set(build.libs) - set(C_BINDINGS)):
            skipped.append(f"bench/c/{name}.c compiled, but no kernel benchmark uses it")

        for spec in SPECS:
            log(f"kernel {spec.key} ...")
            found, missing = load_impls(spec, build)
            for why in missing.values():
                log(f"  {spec.key}: skipping {why}")
            if not any(i in found for i in COMPILED):
                skipped.append(f"{spec.title}: no compiled implementation is present")
                log(f"  {spec.key}: skipped, nothing compiled to measure")
                continue
            try:
                kr = measure_kernel(spec, found, s)
                kr.missing = missing
                kernels.append(kr)
                if spec.threads:
                    scaling += thread_scaling(kr, found, s, quiet)
            except Exception as exc:  # one broken kernel must not stop the others
                log(f"  {spec.key} could not run: {type(exc).__name__}: {exc}")
                errors[spec.key] = f"{type(exc).__name__}: {exc}"

        log("worker throughput ...")
        try:
            binary("nsqd")
            binary("nsqlookupd")
            work = temp_dir(stack)
            with ExitStack() as nsq_stack:
                nsq = start_nsq(nsq_stack, work)
                header["nsq_version"] = nsq.version
                worker = worker_throughput(nsq, s, work, quiet)
                log("stopping daemons")
        except BenchError as exc:
            log(f"worker throughput could not run: {exc}")
            errors["worker_throughput"] = str(exc)

    header["duration_s"] = round(time.monotonic() - started, 1)
    header["quiet_waited_s"] = round(s.quiet_budget_s - max(0.0, quiet.left_s), 1)
    header["errors"] = errors
    header["skipped"] = skipped
    header["all_pass"] = all_pass(kernels, scaling, header)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "kernels.json", header, kernels, scaling, worker)
    write_markdown(out / "kernels.md", header, kernels, scaling, worker)
    log(f"kernels done in {header['duration_s']}s on {platform.node()}: {out}/kernels.{{json,md}}")
    for k in kernels:
        for impl in ("numba", "cython"):
            r = k.ratio(impl)
            if r is not None:
                log(
                    f"  {k.spec.key} {impl}/C: {r:.3f} (target <= {RATIO_TARGET:g}) "
                    f"{_verdict(r <= RATIO_TARGET)}"
                )
    for sc in scaling:
        if sc.target is not None:
            log(f"  {sc.key} {sc.impl} 2 threads: {sc.speedup:.2f}x {_verdict(sc.passed)}")
    for m in missed(kernels, scaling):
        log(f"  missed: {m}")
    if errors or any(not k.results_match for k in kernels):
        return 1
    if strict and not header["all_pass"]:
        return 2
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.kernels",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller inputs")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="where the figures go"
    )
    parser.add_argument("--strict", action="store_true", help="exit 2 when a target is missed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run, write the figures."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    return run(args.quick, args.out, command_line(argv), strict=args.strict)


if __name__ == "__main__":
    sys.exit(main())
