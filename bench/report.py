"""Writing the figures: ``pipeline.json`` for machines, ``pipeline.md`` for people."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.procs import ROOT
from bench.results_model import (
    LATENCY_TARGET_P50_MS,
    LATENCY_TARGET_P99_MS,
    Comparison,
    Latency,
)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line(argv: Sequence[str], module: str) -> str:
    """How this run was started (``python -m MODULE ARGV``), for the report."""
    exe = sys.executable
    if exe.startswith(str(ROOT) + os.sep):
        exe = os.path.relpath(exe, ROOT)
    cmd = shlex.join([exe, "-m", module, *argv])
    if str(ROOT / ".bin") in os.environ.get("PATH", "").split(os.pathsep):
        cmd = "PATH=.bin:$PATH " + cmd
    return cmd


def machine() -> dict[str, Any]:
    """Where the figures come from."""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_json(
    path: Path, header: dict[str, Any], comparisons: list[Comparison], latencies: list[Latency]
) -> None:
    """The machine-readable figures."""
    doc = {
        **header,
        "benchmarks": {c.key: c.to_json() for c in comparisons},
        "latency": [latency.to_json() for latency in latencies],
        "all_pass": all(c.passed for c in comparisons),
    }
    write_text(path, json.dumps(doc, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write a results file whole (through a temporary file), so no reader sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _rate(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}"


def write_markdown(
    path: Path,
    header: dict[str, Any],
    comparisons: list[Comparison],
    latencies: list[Latency],
    title: str = "nsqjobs pipeline benchmark",
) -> None:
    """The human-readable report."""
    out = [
        f"# {title}",
        "",
        f"- Date: {header['date']}",
        f"- CPU: {header['cpu_model']}, {header['cores']} cores "
        "(a shared, noisy machine: compare the ratios, not the absolute rates)",
        f"- Command: `{header['command']}`" + (" (quick run)" if header["quick"] else ""),
        f"- NSQ {header['nsq_version']} (nsqd defaults, data path on tmpfs), "
        f"Python {header['python']}",
        "",
        "Each figure is measured against its bare-NSQ baseline back to back in the same run, "
        "alternating which goes first; the ratio is the median of the per-round ratios.",
        "",
        "| Benchmark | nsqjobs (median) | Baseline (median) | Ratio (median) | Ratios per round "
        "| Target | Result |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for c in comparisons:
        per_round = ", ".join(f"{r.ratio:.3f}" for r in c.rounds)
        out.append(
            f"| {c.title} | {_rate(c.subject_median, c.unit)} | "
            f"{_rate(c.baseline_median, c.unit)} | **{c.ratio:.3f}** | {per_round} | "
            f">= {c.target:g} | {'PASS' if c.passed else 'FAIL'} |"
        )
    for c in comparisons:
        ref, ref_ratio = c.reference_median, c.reference_ratio()
        if c.reference and ref and ref_ratio is not None:
            out += [
                "",
                f'Reference for "{c.title}" (context, no target): {c.reference}: '
                f"{_rate(ref, c.unit)}, **{ref_ratio:.3f}** x the baseline; nsqjobs's "
                f"median is {c.subject_median / ref:.2f} x the reference's.",
            ]
    if header.get("errors"):
        out += ["", "## Could not run", ""]
        out += [f"- {name}: {why}" for name, why in header["errors"].items()]
    if latencies:
        out += latency_section(latencies)
    out += ["", "## What each row measures", ""]
    for c in comparisons:
        out += [
            f"### {c.title}",
            "",
            f"- nsqjobs: {c.subject}",
            f"- Baseline: {c.baseline}",
            "- Settings: " + ", ".join(f"{k} {v}" for k, v in c.settings.items()),
        ]
        out += [f"- {n}" for n in c.notes]
        failed = [(r.subject_failed, r.baseline_failed) for r in c.rounds]
        if any(a or b for a, b in failed):
            out.append(
                "- Failed requests/messages per round (nsqjobs, baseline): "
                + ", ".join(f"({a}, {b})" for a, b in failed)
            )
        out.append("")
    write_text(path, "\n".join(out).rstrip() + "\n")


def latency_section(latencies: list[Latency]) -> list[str]:
    """The latency table: one row per worker delivery setting, the default's targets checked."""
    first = latencies[0].settings
    p50, p99 = latencies[0].ms(50), latencies[0].ms(99)
    ok = p50 <= LATENCY_TARGET_P50_MS and p99 <= LATENCY_TARGET_P99_MS
    out = [
        "",
        "## End-to-end latency at light load",
        "",
        f"{first['rate_per_s']:g} jobs/s through `POST /v1/jobs?wait={first['wait_s']:g}`, "
        f"one gateway, one worker (--concurrency {first['worker_concurrency']}), "
        f"{first['rounds']} rounds of {first['seconds'] / first['rounds']:g} s per delivery "
        "setting, the order rotating each round.",
        "",
        "| Worker delivery | Sent | Completed | Timed out (202) | Failed | p50 | p90 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for latency in latencies:
        out.append(
            f"| {latency.settings['delivery']} | {latency.sent} | {len(latency.latencies_s)} | "
            f"{latency.timed_out} | {latency.failed} | {latency.ms(50):.2f} ms | "
            f"{latency.ms(90):.2f} ms | {latency.ms(99):.2f} ms | {latency.ms(100):.2f} ms |"
        )
    out += [
        "",
        f"Target for the default (issue 12: Dramatiq on RabbitMQ's figures here): p50 <= "
        f"{LATENCY_TARGET_P50_MS:g} ms and p99 <= {LATENCY_TARGET_P99_MS:g} ms: "
        f"**{'PASS' if ok else 'FAIL'}** ({p50:.2f} ms and {p99:.2f} ms).",
        "",
    ]
    out += [f"- {n}" for n in latencies[0].notes]
    out.append(
        "- Batched, nsqd holds a lone delivery until its 25 ms flush tick (up to 16 KiB); "
        "adaptive, each connection stays eager (RDY = in flight + 1, so nsqd flushes each "
        "message at once) until a backlog shows, then batches; unbuffered asks nsqd for a "
        "64-byte buffer (each message written as it comes, fewer jobs/s under load)."
    )
    return out
