"""Writing the kernel figures: ``kernels.json`` for machines, ``kernels.md`` for people."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from bench.kernels.impls import summary
from bench.kernels.specs import COMPILED, RATIO_TARGET, THREAD_TARGET, WORKER_TASK
from bench.kernels.threads import Scaling
from bench.kernels.timing import KernelResult
from bench.kernels.worker import WorkerThroughput
from bench.report import write_text


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:,.1f} ms"


def verdict(passed: bool | None) -> str:
    return "-" if passed is None else ("PASS" if passed else "FAIL")


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
    write_text(path, json.dumps(doc, indent=2) + "\n")


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
        outcome = verdict(all(checks) if checks else None)
        if not k.results_match:
            outcome = "FAIL (results differ)"
        result = _result_text(k.result) if k.result is not None else "-"
        out.append(
            f"| {k.spec.title} | {result}{'' if k.results_match else ' **DIFFER**'} | "
            f"{_ms(k.median('c'))} | {_ms(k.median('numba'))} | {_ms(k.median('cython'))} | "
            f"{'-' if rn is None else f'**{rn:.3f}**'} | {'-' if rc is None else f'**{rc:.3f}**'}"
            f" | <= {RATIO_TARGET:g} | {outcome} | {k.load.cell() if k.load else '-'} |"
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
            + f" | {verdict(k.python_passed())} |"
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
            + f" | {'-' if sc.target is None else f'>= {sc.target:g}'} | {verdict(sc.passed)} | "
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
    write_text(path, "\n".join(out).rstrip() + "\n")
