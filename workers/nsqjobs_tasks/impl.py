"""Choosing a kernel implementation: ``NSQJOBS_KERNEL_IMPL`` = numba, cython or python.

Without the variable, the fastest one that imports is used. Kernel modules stay pure; this is
the one place that knows about all of them.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

from nsqjobs.names import ENV_KERNEL_IMPL

IMPLS = ("numba", "cython", "python")
KERNELS = ("primes", "pi", "julia", "diffusion")
# Fastest first, per kernel, as measured by `python -m bench.kernels` (bench/results/kernels.md):
# Numba vectorises the pi and diffusion loops for this CPU (8.6x and 2x Cython there), while
# Cython is a little ahead on primes and level on julia. A test holds this to the figures.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "primes": ("cython", "numba", "python"),
    "pi": ("numba", "cython", "python"),
    "julia": ("cython", "numba", "python"),
    "diffusion": ("numba", "cython", "python"),
}


class KernelUnavailableError(ImportError):
    """The requested implementation cannot be imported (not built, or Numba missing)."""


def module_name(kernel: str, impl: str) -> str:
    """Where an implementation lives: ``_<kernel>_cy`` (Cython) or ``<kernel>_<impl>``."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}")
    if impl not in IMPLS:
        raise KernelUnavailableError(
            f"{ENV_KERNEL_IMPL}={impl!r}: expected one of {', '.join(IMPLS)}"
        )
    leaf = f"_{kernel}_cy" if impl == "cython" else f"{kernel}_{'py' if impl == 'python' else impl}"
    return f"nsqjobs_tasks.kernels.{leaf}"


def load(kernel: str, impl: str) -> ModuleType:
    """Import one implementation of a kernel, with a clear error if it is not there."""
    name = module_name(kernel, impl)
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        hint = " (build it with `pip install -e .`)" if impl == "cython" else ""
        raise KernelUnavailableError(f"{kernel} kernel {impl!r} unavailable: {exc}{hint}") from exc


@functools.cache
def _resolve(kernel: str, wanted: str) -> str:
    if wanted:
        load(kernel, wanted)  # fail loudly at start, not on the first job
        return wanted
    errors = []
    for impl in PREFERENCE[kernel]:
        try:
            load(kernel, impl)
        except KernelUnavailableError as exc:
            errors.append(str(exc))
            continue
        return impl
    raise KernelUnavailableError("; ".join(errors))


def chosen(kernel: str) -> str:
    """The implementation to use: the environment's choice, else the fastest that imports."""
    return _resolve(kernel, os.environ.get(ENV_KERNEL_IMPL, "").strip().lower())


def function(kernel: str, name: str, impl: str | None = None) -> Callable[..., Any]:
    """The callable ``name`` of the chosen (or given) implementation."""
    fn: Callable[..., Any] = getattr(load(kernel, impl or chosen(kernel)), name)
    return fn


def warm_up(kernel: str) -> None:
    """Compile (Numba, from its on-disk cache when present) or import the chosen kernel."""
    module = load(kernel, chosen(kernel))
    hook = getattr(module, "warm_up", None)
    if hook is not None:
        hook()
