"""The C99 baselines: compile ``bench/c/*.c`` with gcc and bind them through ctypes."""

from __future__ import annotations

import ctypes
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bench.kernels.specs import C_DIR, GCC_FLAGS, GCC_LIBS, Fn, rel
from bench.procs import ROOT, BenchError, log


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
        log(f"  gcc {rel(source)}")
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
