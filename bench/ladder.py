"""The ladder: the same jobs inline, on a local process pool, on IPython Parallel and on NSQ.

    python -m bench.ladder [--quick] [--rounds N] [--rungs inline,processes,ipyparallel,nsq]

Jobs from a no-op to about half a CPU-second: ``noop``, then ``primes.count`` over [0, 10**k)
for k = 3 ... 9 (26 us to 0.5 s inline on this machine). Each size runs a fixed number of jobs
(about ``budget_s`` of work for 2 workers, between ``min_jobs`` and ``max_jobs``) through
``executor.map`` on every rung, in one run, the rungs' order rotating from size to size and
round to round; the figures are medians over the rounds.

- ``inline``: the caller, one job at a time (the reference: the task's own time per job).
- ``processes``: 2 child processes (``nsqjobs.executor("processes", workers=2)``).
- ``ipyparallel``: a local cluster of 2 engines started by the executor.
- ``nsq``: nsqd + nsqlookupd + one gateway + 2 ``nsqjobs worker --executor process
  --concurrency 1 --delivery-buffer-ms 0`` processes (2 CPU slots, each job in a child process
  as on the process rung, so the difference is the transport), through
  ``nsqjobs.executor("nsq")``; reported "not run (missing)" until ``nsqjobs.ladder.nsq`` exists.

Every rung gets the same ``max_in_flight`` (``MAX_IN_FLIGHT``), so latency does not cap
throughput. Per-job overhead = 2 x wall / jobs - the inline time per job in the same round: the
worker time each job costs beyond the task itself (the caller, nsqd and the gateway share the
same 2 cores, so their CPU shows up here too). Figures go to ``ladder.json``, ``ladder.md`` and
``ladder.png`` in ``--out``; progress to stderr. Exit status 1 if a rung that should run could
not, or a rung's results differ from the inline ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nsqjobs import executor
from nsqjobs.ladder import TaskExecutor
from nsqjobs.names import DEFAULT_QUEUE, WORKER_CHANNEL
from nsqjobs.testing import HarnessError, free_port, need_binary, start_nsq, temp_dir, wait_ready

from bench import report
from bench.procs import ROOT, log, start_gateway, start_process, worker_argv
from bench.scenarios import GATEWAY_TOPICS

RUNGS = ("inline", "processes", "ipyparallel", "nsq")
WORKERS = 2
MAX_IN_FLIGHT = 64
NSQ_WORKER_FLAGS = ("--executor", "process", "--delivery-buffer-ms", "0")
SMALL = ("noop", "primes 10^3")  # the sizes the target speaks of


@dataclass(frozen=True)
class Settings:
    """How much work a run does."""

    rounds: int = 3
    max_exponent: int = 9
    budget_s: float = 2.0
    min_jobs: int = 8
    max_jobs: int = 2000

    @classmethod
    def quick(cls) -> Settings:
        """A smoke run: one round, up to 10**7, small loads (well under a minute)."""
        return cls(rounds=1, max_exponent=7, budget_s=0.2, min_jobs=4, max_jobs=200)


@dataclass
class Size:
    """One job size: its task and arguments, its inline time, how many jobs a run sends."""

    label: str
    task: str
    args: dict[str, Any]
    inline_s: float = 0.0
    jobs: int = 0


def sizes(s: Settings) -> list[Size]:
    """noop, then primes.count over [0, 10**k)."""
    out = [Size("noop", "noop", {"n": 1})]
    for k in range(3, s.max_exponent + 1):
        out.append(Size(f"primes 10^{k}", "primes.count", {"start": 0, "stop": 10**k}))
    return out


@dataclass
class Cell:
    """One rung on one size: per-round jobs/s and per-job overhead."""

    jobs_per_s: list[float] = field(default_factory=list)
    overhead_s: list[float] = field(default_factory=list)

    def rate(self) -> float:
        """Median jobs/s."""
        return statistics.median(self.jobs_per_s)

    def overhead(self) -> float:
        """Median per-job overhead, seconds."""
        return statistics.median(self.overhead_s)


@dataclass
class Rung:
    """One rung: its executor, how long it took to start, or why it did not run."""

    kind: str
    ex: TaskExecutor | None = None
    start_s: float = 0.0
    missing: str = ""
    cells: dict[str, Cell] = field(default_factory=dict)


def _nsq_rung(stack: ExitStack, work: Path) -> TaskExecutor:
    """nsqd, a gateway and 2 workers of one slot each (process executor); the nsq executor."""
    need_binary("nsqd")
    need_binary("nsqlookupd")
    nsq = start_nsq(stack, work)
    gateway = start_gateway(stack, nsq, work, GATEWAY_TOPICS)
    for i in range(WORKERS):
        port = free_port()
        argv = worker_argv(
            nsq, concurrency=1, queue=DEFAULT_QUEUE, channel=WORKER_CHANNEL, lookupd=True, port=port
        )
        proc = start_process(stack, f"worker{i + 1}", [*argv, *NSQ_WORKER_FLAGS], work)
        wait_ready(proc, f"http://127.0.0.1:{port}/readyz", 120.0)
    ex = executor("nsq", url=gateway, workers=WORKERS)
    stack.callback(ex.shutdown)
    return ex


def start_rung(kind: str, stack: ExitStack, work: Path) -> Rung:
    """Start one rung, or say why it cannot run here."""
    rung = Rung(kind)
    if kind == "ipyparallel" and importlib.util.find_spec("ipyparallel") is None:
        rung.missing = "missing: ipyparallel (pip install -e '.[ladder]')"
        return rung
    if kind == "nsq" and importlib.util.find_spec("nsqjobs.ladder.nsq") is None:
        rung.missing = "missing: nsqjobs.ladder.nsq"
        return rung
    t0 = time.perf_counter()
    try:
        if kind == "nsq":
            rung.ex = _nsq_rung(stack, work)
        else:
            rung.ex = executor(kind, **({} if kind == "inline" else {"workers": WORKERS}))
            stack.callback(rung.ex.shutdown)
    except HarnessError as exc:
        rung.missing = f"could not start: {exc}"
        return rung
    rung.start_s = time.perf_counter() - t0
    return rung


def _timed(ex: TaskExecutor, size: Size, n: int) -> tuple[float, list[Any]]:
    t0 = time.perf_counter()
    results = list(ex.map(size.task, [size.args] * n, max_in_flight=MAX_IN_FLIGHT, timeout=600))
    return time.perf_counter() - t0, results


def calibrate(inline: TaskExecutor, all_sizes: list[Size], s: Settings) -> None:
    """Each size's inline time (median of 3 to 50 calls after a warm-up) and its job count."""
    for size in all_sizes:
        t0 = time.perf_counter()
        inline.submit(size.task, size.args).result()
        first = time.perf_counter() - t0
        times = []
        for _ in range(max(3, min(50, int(0.2 / max(first, 1e-6))))):
            t0 = time.perf_counter()
            inline.submit(size.task, size.args).result()
            times.append(time.perf_counter() - t0)
        size.inline_s = statistics.median(times)
        wanted = int(s.budget_s * WORKERS / max(size.inline_s, 1e-6))
        size.jobs = max(s.min_jobs, min(s.max_jobs, wanted))


def measure(rungs: list[Rung], all_sizes: list[Size], s: Settings) -> list[str]:
    """The rounds: every size on every rung that runs, the order rotating. Returns errors."""
    running = [r for r in rungs if r.ex is not None]
    inline = next(r for r in running if r.kind == "inline")
    assert inline.ex is not None  # start_rung never fails for inline
    expected = {size.label: inline.ex.submit(size.task, size.args).result() for size in all_sizes}
    errors: list[str] = []
    for rung in running:  # warm-up: every task once, so no kernel compiles in a measurement
        assert rung.ex is not None
        for size in all_sizes[:2]:
            rung.ex.submit(size.task, size.args).result(timeout=120)
    turn = 0
    for r in range(s.rounds):
        for size in all_sizes:
            order = running[turn % len(running) :] + running[: turn % len(running)]
            turn += 1
            wall: dict[str, float] = {}
            for rung in order:
                assert rung.ex is not None
                elapsed, results = _timed(rung.ex, size, size.jobs)
                if any(x != expected[size.label] for x in results):
                    errors.append(f"{rung.kind} {size.label}: results differ from inline")
                wall[rung.kind] = elapsed
            own = wall["inline"] / size.jobs
            for rung in running:
                cell = rung.cells.setdefault(size.label, Cell())
                slots = 1 if rung.kind == "inline" else WORKERS
                cell.jobs_per_s.append(size.jobs / wall[rung.kind])
                cell.overhead_s.append(slots * wall[rung.kind] / size.jobs - own)
            log(
                f"round {r + 1} {size.label} x{size.jobs}: "
                + ", ".join(f"{k} {size.jobs / w:,.0f}/s" for k, w in wall.items())
            )
    return errors


# -- the report ----------------------------------------------------------------------------------


def _us(seconds: float) -> str:
    us = seconds * 1e6
    if abs(us) >= 10_000:
        return f"{us / 1000:,.0f} ms"
    return f"{us:,.0f} us" if abs(us) >= 10 else f"{us:,.1f} us"


def _time(seconds: float) -> str:
    return _us(seconds) if seconds < 0.01 else f"{seconds * 1000:,.0f} ms"


def findings(rungs: list[Rung], all_sizes: list[Size]) -> dict[str, Any]:
    """Crossovers (the first size where a rung beats another on jobs/s) and the target."""
    ran = {r.kind: r for r in rungs if r.cells}
    cross: dict[str, str | None] = {}
    for a, b in (
        ("processes", "inline"),
        ("ipyparallel", "inline"),
        ("nsq", "inline"),
        ("nsq", "ipyparallel"),
        ("nsq", "processes"),
    ):
        if a in ran and b in ran:
            first = next(
                (
                    z.label
                    for z in all_sizes
                    if ran[a].cells[z.label].rate() > ran[b].cells[z.label].rate()
                ),
                None,
            )
            cross[f"{a} over {b}"] = first
    efficient: dict[str, str | None] = {}
    for kind, rung in ran.items():
        if kind != "inline":
            efficient[kind] = next(
                (z.label for z in all_sizes if rung.cells[z.label].overhead() <= 0.1 * z.inline_s),
                None,
            )
    target: dict[str, Any] = {"rule": "nsq per-job overhead <= 2 x processes' on small jobs"}
    if "nsq" in ran and "processes" in ran:
        ratios = {
            z: ran["nsq"].cells[z].overhead() / max(ran["processes"].cells[z].overhead(), 1e-9)
            for z in SMALL
            if z in ran["nsq"].cells
        }
        target["ratios"] = ratios
        target["met"] = all(v <= 2.0 for v in ratios.values())
    else:
        target["met"] = None
    return {"crossovers": cross, "overhead_under_10pct_from": efficient, "target": target}


def to_json(
    header: dict[str, Any], rungs: list[Rung], all_sizes: list[Size], found: dict[str, Any]
) -> dict[str, Any]:
    """Everything, as plain data."""
    return {
        **header,
        "sizes": [asdict(z) for z in all_sizes],
        "rungs": {
            r.kind: {
                "status": "ran" if r.cells else f"not run ({r.missing})",
                "start_s": round(r.start_s, 2),
                "cells": {
                    label: {
                        "jobs_per_s": round(c.rate(), 1),
                        "overhead_us": round(c.overhead() * 1e6, 1),
                        "jobs_per_s_rounds": [round(x, 1) for x in c.jobs_per_s],
                        "overhead_us_rounds": [round(x * 1e6, 1) for x in c.overhead_s],
                    }
                    for label, c in r.cells.items()
                },
            }
            for r in rungs
        },
        **found,
    }


def markdown(
    header: dict[str, Any], rungs: list[Rung], all_sizes: list[Size], found: dict[str, Any]
) -> str:
    """The report people read."""
    cols = [r for r in rungs if r.cells]
    lines = [
        "# The ladder: the same jobs inline, on processes, on IPython Parallel and on NSQ",
        "",
        f"- Date: {header['date']}",
        f"- CPU: {header['cpu_model']}, {header['cores']} cores (shared and noisy)",
        f"- Command: `{header['command']}`",
        f"- Python {header['python']}; {header['settings']['rounds']} round(s), rungs and sizes "
        f"interleaved (order rotating); every rung with {WORKERS} workers except inline; "
        f"`map(..., max_in_flight={MAX_IN_FLIGHT})` on every rung",
        "- Rungs: "
        + "; ".join(
            f"**{r.kind}** "
            + (f"started in {r.start_s:.1f} s" if r.cells else f"not run ({r.missing})")
            for r in rungs
        ),
        f"- nsq: nsqd, one gateway, {WORKERS} `nsqjobs worker {' '.join(NSQ_WORKER_FLAGS)} "
        "--concurrency 1` (2 CPU slots; each job in a child process, as on the processes rung)",
        "",
        "## Jobs per second (median)",
        "",
        "| Job | Inline time | Jobs | " + " | ".join(r.kind for r in cols) + " |",
        "|---|---:|---:|" + "---:|" * len(cols),
    ]
    for z in all_sizes:
        cells = " | ".join(f"{r.cells[z.label].rate():,.0f}" for r in cols)
        lines.append(f"| {z.label} | {_time(z.inline_s)} | {z.jobs:,} | {cells} |")
    lines += [
        "",
        "## Per-job overhead (median): 2 x wall / jobs - the inline time per job",
        "",
        "| Job | Inline time | " + " | ".join(r.kind for r in cols if r.kind != "inline") + " |",
        "|---|---:|" + "---:|" * (len(cols) - 1),
    ]
    for z in all_sizes:
        cells = " | ".join(_us(r.cells[z.label].overhead()) for r in cols if r.kind != "inline")
        lines.append(f"| {z.label} | {_time(z.inline_s)} | {cells} |")
    lines += ["", "## Crossovers", ""]
    for pair, label in found["crossovers"].items():
        lines.append(f"- {pair}: " + (f"from **{label}** up" if label else "at no size measured"))
    for kind, label in found["overhead_under_10pct_from"].items():
        lines.append(
            f"- {kind}: overhead under 10% of the job "
            + (f"from **{label}** up" if label else "at no size measured")
        )
    target = found["target"]
    lines += ["", "## Target", "", f"- {target['rule']}: " + _verdict(target)]
    lines += ["", "![the ladder](ladder.png)", ""]
    return "\n".join(lines)


def _verdict(target: dict[str, Any]) -> str:
    if target["met"] is None:
        return "not measured (the nsq or processes rung did not run)"
    ratios = ", ".join(f"{k} {v:.1f}x" for k, v in target["ratios"].items())
    return ("**met**" if target["met"] else "**missed**") + f" ({ratios})"


COLOURS = {"inline": "#444444", "processes": "#1f77b4", "ipyparallel": "#2ca02c", "nsq": "#d62728"}


def plot(rungs: list[Rung], all_sizes: list[Size], out: Path) -> None:
    """Jobs/s and per-job overhead for each job size, one line per rung."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = list(range(len(all_sizes)))
    for r in rungs:
        if not r.cells:
            continue
        style = {"marker": "o", "label": r.kind, "color": COLOURS.get(r.kind)}
        left.plot(xs, [r.cells[z.label].rate() for z in all_sizes], **style)
        if r.kind != "inline":
            over = [max(r.cells[z.label].overhead(), 1e-7) * 1e6 for z in all_sizes]
            right.plot(xs, over, **style)
    right.plot(
        xs, [z.inline_s * 1e6 for z in all_sizes], linestyle=":", color="grey", label="the job"
    )
    labels = [
        f"{z.label.removeprefix('primes ')}\n{_time(z.inline_s).replace(' ', '')}"
        for z in all_sizes
    ]
    for ax, title, unit in (
        (left, f"Jobs per second ({WORKERS} workers; inline: 1)", "jobs/s"),
        (right, "Per-job overhead, beside the job's own time", "microseconds"),
    ):
        ax.set_yscale("log")
        ax.set_xticks(xs, labels, fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("job: noop, then primes.count over [0, 10^k); its time inline")
        ax.set_ylabel(unit)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def run(
    quick: bool,
    out: Path,
    command: str,
    *,
    kinds: Sequence[str] = RUNGS,
    settings: Settings | None = None,
    draw: Callable[[list[Rung], list[Size], Path], None] = plot,
) -> int:
    """One run: start the rungs, calibrate, measure, write the files."""
    s = settings or (Settings.quick() if quick else Settings())
    header: dict[str, Any] = {
        **report.machine(),
        "command": command,
        "quick": quick,
        "settings": asdict(s),
        "workers": WORKERS,
        "max_in_flight": MAX_IN_FLIGHT,
        "nsq_worker_flags": list(NSQ_WORKER_FLAGS),
    }
    started = time.monotonic()
    all_sizes = sizes(s)
    with ExitStack() as stack:
        work = temp_dir(stack, "nsqjobs-bench-ladder-")
        rungs = []
        for kind in ("inline", *[k for k in kinds if k != "inline"]):
            log(f"starting the {kind} rung")
            rungs.append(start_rung(kind, stack, work))
            if rungs[-1].missing:
                log(f"  {kind}: not run ({rungs[-1].missing})")
        inline = rungs[0].ex
        assert inline is not None
        calibrate(inline, all_sizes, s)
        errors = measure(rungs, all_sizes, s)
        log("stopping the rungs")
    header["duration_s"] = round(time.monotonic() - started, 1)
    header["errors"] = errors
    found = findings(rungs, all_sizes)
    out.mkdir(parents=True, exist_ok=True)
    report.write_text(
        out / "ladder.json", json.dumps(to_json(header, rungs, all_sizes, found), indent=2) + "\n"
    )
    report.write_text(out / "ladder.md", markdown(header, rungs, all_sizes, found))
    draw(rungs, all_sizes, out / "ladder.png")
    log(f"done in {header['duration_s']}s on {platform.node()}: {out}/ladder.{{json,md,png}}")
    log(f"target: {found['target']['rule']}: {_verdict(found['target'])}")
    failed = [r.kind for r in rungs if r.missing.startswith("could not")]
    return 1 if errors or failed else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ladder", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="one short round, up to 10**7")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; quick 1)")
    parser.add_argument("--rungs", default=",".join(RUNGS), help="comma-separated rungs")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="where the figures go"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run, write the figures."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    kinds = [k.strip() for k in args.rungs.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(RUNGS))
    if unknown:
        raise SystemExit(f"bench.ladder: unknown rung(s) {', '.join(unknown)}")
    s = Settings.quick() if args.quick else Settings()
    if args.rounds:
        s = Settings(**{**asdict(s), "rounds": args.rounds})
    return run(
        args.quick, args.out, report.command_line(argv, "bench.ladder"), kinds=kinds, settings=s
    )


if __name__ == "__main__":
    sys.exit(main())
