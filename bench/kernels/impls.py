"""Loading every implementation of a kernel that is there, and checking their results agree."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from bench.kernels.cbuild import C_BINDINGS, CBuild
from bench.kernels.specs import KERNELS_DIR, Fn, KernelSpec, rel


def _import(module: str, path: Path, what: str) -> ModuleType | str:
    """Import a kernel module, or say why it is not there."""
    if not path.exists():
        return f"{what}: not present ({rel(path)})"
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
        candidates["cython"] = f"Cython: not present ({rel(pyx)})"
    elif not list(KERNELS_DIR.glob(f"_{k}_cy.*.so")) + list(KERNELS_DIR.glob(f"_{k}_cy.*.pyd")):
        candidates["cython"] = f"Cython: {rel(pyx)} is not built (pip install -e . builds it)"
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
