"""Choosing a kernel implementation: ``NSQJOBS_KERNEL_IMPL`` = numba, cython or python.

Without the variable, the fastest one that imports is used. Kernel modules stay pure; this is
the one place that knows about all of them.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

ENV_KERNEL_IMPL = "NSQJOBS_KERNEL_IMPL"  # mirrors service.constants; kernels import nothing of ours
IMPLS = ("numba", "cython", "python")
# Fastest first, as measured on count_primes(0, 1e8) and near 1e12 (Cython ~10% ahead).
PREFERENCE = ("cython", "numba", "python")

_MODULES = {
    "primes": {
        "numba": "workers.kernels.primes_numba",
        "cython": "workers.kernels._primes_cy",
        "python": "workers.kernels.primes_py",
    },
}


class KernelUnavailableError(ImportError):
    """The requested implementation cannot be imported (not built, or Numba missing)."""


def load(kernel: str, impl: str) -> ModuleType:
    """Import one implementation of a kernel, with a clear error if it is not there."""
    if impl not in IMPLS:
        raise ValueError(f"{ENV_KERNEL_IMPL}={impl!r}: expected one of {', '.join(IMPLS)}")
    try:
        return importlib.import_module(_MODULES[kernel][impl])
    except ImportError as exc:
        hint = " (build it with `pip install -e .`)" if impl == "cython" else ""
        raise KernelUnavailableError(f"{kernel} kernel {impl!r} unavailable: {exc}{hint}") from exc


def available(kernel: str) -> list[str]:
    """The implementations of ``kernel`` that import here, fastest first."""
    found = []
    for impl in PREFERENCE:
        try:
            load(kernel, impl)
        except KernelUnavailableError:
            continue
        found.append(impl)
    return found


def chosen(kernel: str) -> str:
    """The implementation to use: the environment's choice, else the fastest available."""
    wanted = os.environ.get(ENV_KERNEL_IMPL, "").strip().lower()
    if wanted:
        load(kernel, wanted)  # fail loudly at start, not on the first job
        return wanted
    return available(kernel)[0]


def function(kernel: str, name: str, impl: str | None = None) -> Callable[..., Any]:
    """The callable ``name`` of the chosen (or given) implementation."""
    fn: Callable[..., Any] = getattr(load(kernel, impl or chosen(kernel)), name)
    return fn
