"""Single-call times: compiled implementations interleaved with C, and the pure-Python baseline."""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from bench.kernels.impls import check_same, summary
from bench.kernels.load import Load
from bench.kernels.specs import COMPILED, RATIO_TARGET, Args, Fn, KernelSpec, Settings
from bench.procs import log


def timed(fn: Fn, args: Args) -> tuple[float, Any]:
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
    probe_seconds, _ = timed(fn, probe_args)
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
    seconds, value = timed(fn, args)
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
            kr.times[impl].append(timed(found[impl], spec.args)[0])
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
