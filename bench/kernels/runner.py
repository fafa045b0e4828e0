"""One run of every kernel benchmark, in order, with its header; the figures go to ``--out``."""

from __future__ import annotations

import importlib
import platform
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from nsqjobs.testing import HarnessError, need_binary, start_nsq, temp_dir

from bench import report as common
from bench.kernels.cbuild import C_BINDINGS, CBuild, build_c, gcc_version
from bench.kernels.impls import load_impls
from bench.kernels.load import Quiet
from bench.kernels.report import all_pass, missed, verdict, write_json, write_markdown
from bench.kernels.specs import (
    COMPILED,
    GCC_FLAGS,
    GCC_LIBS,
    PYTHON_SPEEDUP_TARGET,
    RATIO_TARGET,
    SPECS,
    THREAD_TARGET,
    Settings,
)
from bench.kernels.threads import Scaling, thread_scaling
from bench.kernels.timing import KernelResult, measure_kernel
from bench.kernels.worker import WorkerThroughput, worker_throughput
from bench.procs import log


def _versions() -> dict[str, str]:
    versions = {"numpy": np.__version__}
    for name in ("numba", "Cython"):
        try:
            versions[name.lower()] = str(importlib.import_module(name).__version__)
        except ImportError:
            versions[name.lower()] = "not installed"
    return versions


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
        **common.machine(),
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
        except HarnessError as exc:
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
            need_binary("nsqd")
            need_binary("nsqlookupd")
            work = temp_dir(stack, "nsqjobs-bench-")
            with ExitStack() as nsq_stack:
                nsq = start_nsq(nsq_stack, work)
                header["nsq_version"] = nsq.version
                worker = worker_throughput(nsq, s, work, quiet)
                log("stopping daemons")
        except HarnessError as exc:
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
                    f"{verdict(r <= RATIO_TARGET)}"
                )
    for sc in scaling:
        if sc.target is not None:
            log(f"  {sc.key} {sc.impl} 2 threads: {sc.speedup:.2f}x {verdict(sc.passed)}")
    for m in missed(kernels, scaling):
        log(f"  missed: {m}")
    if errors or any(not k.results_match for k in kernels):
        return 1
    if strict and not header["all_pass"]:
        return 2
    return 0
