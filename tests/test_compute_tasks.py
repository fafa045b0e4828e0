"""The compute tasks: argument validation through the gateway, and each one end to end."""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from nsqjobs.names import ENV_KERNEL_IMPL
from nsqjobs.registry import registry
from nsqjobs.testing import Daemon, Nsq, http, run_cli
from nsqjobs_tasks import builtin as tasks
from nsqjobs_tasks import impl

ROOT = Path(__file__).resolve().parent.parent

JULIA: dict[str, Any] = {
    "width": 64,
    "height": 48,
    "x_min": -1.5,
    "x_max": 1.5,
    "y_min": -1.2,
    "y_max": 1.2,
    "c_re": -0.8,
    "c_im": 0.156,
    "max_iter": 120,
}
DIFFUSION: dict[str, Any] = {"n": 24, "steps": 15, "d": 1.0, "dt": 0.2, "seed": 2**64 - 1}

INVALID = [
    ("pi.estimate", {"samples": 0, "seed": 1}, "args.samples"),
    ("pi.estimate", {"samples": 10**10 + 1, "seed": 1}, "args.samples"),
    ("pi.estimate", {"samples": 10, "seed": -1}, "args.seed"),
    ("pi.estimate", {"samples": 10, "seed": 2**64}, "args"),
    ("diffusion.run", {**DIFFUSION, "seed": 2**64}, "args"),
    ("julia.tile", {**JULIA, "width": 1}, "args.width"),
    ("julia.tile", {**JULIA, "width": 2001, "height": 2000}, "args"),
    ("julia.tile", {**JULIA, "max_iter": 10_001}, "args.max_iter"),
    ("julia.tile", {**JULIA, "x_min": 2.0}, "args"),
    ("julia.tile", {**JULIA, "c_re": "0.3"}, "args.c_re"),
    ("diffusion.run", {**DIFFUSION, "n": 4097}, "args.n"),
    ("diffusion.run", {**DIFFUSION, "steps": 10_001}, "args.steps"),
    ("diffusion.run", {**DIFFUSION, "d": 0}, "args.d"),
    ("diffusion.run", {**DIFFUSION, "dt": 0.26, "d": 1.0}, "args"),
    ("primes.count", {"start": 0, "stop": 10**9 + 1}, "args"),
]


@pytest.mark.integration
def test_out_of_range_arguments_are_422_and_publish_nothing(
    nsq: Nsq, daemons: Callable[..., Daemon]
) -> None:
    gw = daemons("gateway", nsq)
    for task, args, field in INVALID:
        status, headers, body = http("POST", gw.url + "/v1/jobs", {"task": task, "args": args})
        assert status == 422, (task, args, body)
        assert headers["Content-Type"] == "application/problem+json"
        assert body["errors"][0]["field"] == field, (task, args, body)
    assert nsq.message_count("jobs") == 0


@pytest.mark.integration
def test_each_compute_task_end_to_end(nsq: Nsq, daemons: Callable[..., Daemon]) -> None:
    gw = daemons("gateway", nsq)
    worker = daemons("worker", nsq)

    def run(task: str, args: dict[str, Any]) -> Any:
        status, _, body = http("POST", gw.url + "/v1/jobs?wait=60", {"task": task, "args": args})
        assert status == 200 and body["status"] == "succeeded", body
        return body["result"]

    from nsqjobs_tasks.kernels import diffusion_py, julia_py, pi_py, primes_py

    assert run("primes.count", {"start": 10**12 - 1000, "stop": 10**12}) == primes_py.count_primes(
        10**12 - 1000, 10**12
    )

    pi = run("pi.estimate", {"samples": 200_000, "seed": 7})
    assert pi["inside"] == pi_py.count_inside(200_000, 7)
    assert pi["estimate"] == 4 * pi["inside"] / 200_000 and abs(pi["estimate"] - math.pi) < 0.02

    julia = run("julia.tile", JULIA)
    want = julia_py.escape_counts(*JULIA.values())
    got = np.frombuffer(base64.b64decode(julia["counts"]), dtype="<u2")
    assert np.array_equal(got, want)
    assert julia["total_iterations"] == int(want.sum())
    assert sum(julia["histogram"]) == JULIA["width"] * JULIA["height"]

    big = run("julia.tile", {**JULIA, "width": 400, "height": 300, "max_iter": 50})
    assert "counts" not in big and sum(big["histogram"]) == 120_000

    diffusion = run("diffusion.run", DIFFUSION)
    mean, top, checksum = diffusion_py.run(*DIFFUSION.values())
    assert diffusion == {"mean": mean, "max": top, "checksum": checksum}

    ran = {"primes.count": 1, "pi.estimate": 1, "julia.tile": 2, "diffusion.run": 1}
    for name, jobs in ran.items():
        assert worker.metric("nsqjobs_jobs_succeeded_total", task=name) == jobs
        timed = worker.metric("nsqjobs_job_duration_seconds_count", task=name, status="succeeded")
        assert timed == jobs
        assert worker.metric("nsqjobs_jobs_failed_total", task=name) == 0
    # Warm-up (before /readyz) has no metric: its log line is the only trace it leaves.
    log = worker.log()
    for name in ran:
        assert f"warmed up {name} in" in log


def test_julia_histogram_has_deciles_of_max_iter() -> None:
    args = tasks.JuliaTileArgs(**{**JULIA, "width": 9, "height": 7, "max_iter": 20})
    result = registry.get("julia.tile").fn(args)
    counts = np.frombuffer(base64.b64decode(result["counts"]), dtype="<u2").astype(int)
    expected = [0] * 10
    for c in counts:
        expected[min(c * 10 // 20, 9)] += 1
    assert result["histogram"] == expected
    assert result["total_iterations"] == counts.sum()


@pytest.mark.parametrize("choice", ["python", "numba", "cython"])
def test_kernel_implementation_is_chosen_by_environment(choice: str) -> None:
    code = (
        "from nsqjobs_tasks import impl; print(impl.chosen('primes'), "
        "impl.function('primes', 'count_primes')(0, 100))"
    )
    env = {**os.environ, "NSQJOBS_KERNEL_IMPL": choice}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, text=True, capture_output=True, timeout=60
    )
    assert out.stdout.split() == [choice, "25"], out.stderr


def test_unknown_kernel_implementation_stops_the_worker_with_one_line() -> None:
    env = {**os.environ, "NSQJOBS_KERNEL_IMPL": "fortran"}
    out = run_cli("worker", env=env)
    assert out.returncode != 0
    assert "NSQJOBS_KERNEL_IMPL='fortran': expected one of numba, cython, python" in out.stderr


def _importable(kernel: str, name: str) -> bool:
    try:
        impl.load(kernel, name)
    except impl.KernelUnavailableError:
        return False
    return True


@pytest.mark.parametrize("kernel", impl.KERNELS)
def test_default_is_the_first_importable_preference(
    kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_KERNEL_IMPL, raising=False)
    available = [name for name in impl.PREFERENCE[kernel] if _importable(kernel, name)]
    assert sorted(impl.PREFERENCE[kernel]) == sorted(impl.IMPLS)
    assert available and impl.chosen(kernel) == available[0]


# Same-machine figures of `python -m bench.kernels`; a noisy machine gets 10 % of slack.
KERNEL_FIGURES = ROOT / "bench" / "results" / "kernels.json"
NOISE = 1.10


@pytest.mark.parametrize("kernel", [*impl.KERNELS, "primes_1e12"])
def test_preference_puts_the_fastest_measured_first(kernel: str) -> None:
    if not KERNEL_FIGURES.exists():
        pytest.skip(f"no {KERNEL_FIGURES.name}: run `python -m bench.kernels`")
    figures = json.loads(KERNEL_FIGURES.read_text())["kernels"].get(kernel) or {}
    seconds = {
        name: float(t["median_s"])
        for name, t in (figures.get("times") or {}).items()
        if name in impl.IMPLS and t.get("median_s")
    }
    if (figures.get("python") or {}).get("full_input_seconds"):
        seconds["python"] = float(figures["python"]["full_input_seconds"])
    if len(seconds) < 2:
        pytest.skip(f"{KERNEL_FIGURES.name} has no figures to rank for {kernel}")
    preferred = next(name for name in impl.PREFERENCE[kernel.split("_")[0]] if name in seconds)
    fastest = min(seconds, key=seconds.__getitem__)
    assert seconds[preferred] <= NOISE * seconds[fastest], (
        f"{kernel}: PREFERENCE picks {preferred} ({seconds[preferred] * 1000:.1f} ms) but "
        f"{fastest} measured {seconds[fastest] * 1000:.1f} ms in {KERNEL_FIGURES.name}"
    )


@pytest.mark.parametrize("kernel", impl.KERNELS)
def test_numba_warm_up_reuses_the_on_disk_cache(kernel: str) -> None:
    # Two fresh processes: the first may compile and write the cache, the second must only load.
    code = f"""
import numba
from nsqjobs_tasks import impl
module = impl.load({kernel!r}, "numba")
module.warm_up()
hits = misses = 0
for obj in vars(module).values():
    if isinstance(obj, numba.core.registry.CPUDispatcher):
        hits += sum(obj.stats.cache_hits.values())
        misses += sum(obj.stats.cache_misses.values())
print(hits, misses)
"""
    runs = [
        subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, text=True, capture_output=True, timeout=120
        )
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr
    hits, misses = map(int, runs[1].stdout.split())
    assert hits >= 1 and misses == 0
