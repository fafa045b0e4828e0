"""Loading kernel implementations in tests: a compiled one that is missing skips on a laptop and
fails under CI (a CI run that quietly skipped the compiled kernels would prove nothing)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from nsqjobs_tasks import impl

COMPILED = ("numba", "cython")


def load(kernel: str, name: str, function: str) -> Any | None:
    """One implementation's function, or None when it cannot be imported and CI is unset."""
    try:
        module = impl.load(kernel, name)
    except impl.KernelUnavailableError as exc:
        if os.environ.get("CI"):  # as tests/conftest.py reads it
            pytest.fail(f"the {name} {kernel} kernel cannot be imported: {exc}")
        return None
    return getattr(module, function)


def compiled(kernel: str, function: str) -> dict[str, Any]:
    """Every importable compiled implementation by name; skips if there is none."""
    found = {n: f for n in COMPILED if (f := load(kernel, n, function)) is not None}
    if not found:
        pytest.skip(f"no compiled {kernel} kernel can be imported (build it: pip install -e .)")
    return found


def param(kernel: str, function: str, name: str) -> Any:
    """The implementation ``name`` for a parametrised fixture; a missing one skips."""
    found = load(kernel, name, function)
    if found is None:
        pytest.skip(f"the {name} {kernel} kernel cannot be imported (build it: pip install -e .)")
    return found
