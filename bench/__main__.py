"""nsqjobs pipeline and compute-kernel benchmarks: ``make bench``, or ``python -m bench [--quick]``.

What is measured, each time against a bare-NSQ baseline on the same nsqd, in the same run,
alternating which side goes first in each round (the machine is shared and noisy, so only the
ratios are meaningful; the figure reported is the median of the per-round ratios):

1. Gateway single job: 2xx requests/s of ``POST /v1/jobs`` (one noop job, ~60 bytes of args)
   under ``hey -c 32``, against nsqd's own ``POST /pub`` of a real job envelope (the body the
   gateway publishes) with the same hey settings. Target: ratio >= 0.3.
2. Batch: jobs/s through ``POST /v1/jobs/batch`` (1000 noop jobs per request, one MPUB) against
   nsqd's ``POST /mpub`` of 1000 newline-separated envelopes, both with ``hey -c 4``.
   Target: ratio >= 0.5.
3. Worker dispatch: jobs/s drained by one ``nsqjobs worker`` (thread executor,
   ``--concurrency 64``) from a topic pre-filled with N noop envelopes, against
   ``bench/bare_reader.py`` (a pynsq Reader that only FINs, same max_in_flight) draining an
   identical fresh topic. The clock runs from the first message drained to depth + in-flight = 0
   on nsqd's /stats. The worker also publishes a result per job and waits for nsqd's OK before
   FIN: that is part of its real cost. Target: ratio >= 0.9 (issue 12), with the old always
   batched delivery (``--delivery batched``) beside it for reference.
4. End-to-end latency: with one gateway and one worker, noop jobs submitted at 50/s for 10 s to
   ``POST /v1/jobs?wait=5`` over kept-alive connections, per worker delivery setting (adaptive,
   the default; batched; unbuffered), rounds interleaved; p50/p90/p99 of send-to-result.
   Target for the default (issue 12): p50 <= 1.6 ms and p99 <= 2.4 ms.
5. ``ledger_ingest``: 1 and 2 with the job ledger on, SQLite and PostgreSQL, side by side with
   the gateway without a ledger and nsqd in one rotation (bench/ledger_ingest.py). Targets:
   single >= 0.25 of /pub, batch >= 0.4 of /mpub. Figures in ``ledger_ingest.json`` / ``.md``.
6. ``kernels``: the compute-kernel benchmarks of ``bench/kernels/`` (Numba and Cython against
   C, the pure-Python reference, thread scaling, jobs/s through one or two workers), run after
   the four above once their daemons are stopped; see ``python -m bench.kernels --help``.
7. ``wait_many``: waiting for N results through ``POST /v1/jobs/wait`` against polling each job
   (``bench/wait_many.py``; figures in ``wait_many.md``).
8. ``ladder``: the same jobs (noop to half a CPU-second) inline, on a local process pool, on
   IPython Parallel and on NSQ, 2 workers each: jobs/s and per-job overhead, the crossovers, and
   the target (NSQ's overhead within 2x of the process pool's on small jobs); figures in
   ``ladder.json`` / ``.md`` / ``.png`` (bench/ladder.py, ``python -m bench.ladder``).
9. ``peers``: nsqjobs against Celery, Dramatiq, RQ and IPython Parallel (``bench/peers/``, the
   ``bench-peers`` extra, Redis and RabbitMQ from Debian): enqueue, drain, latency and CPU
   figures with ratios to nsqjobs, in ``peers.json`` / ``peers.md`` / ``peers.png``; see
   ``python -m bench.peers --help``.

How: a private nsqlookupd + nsqd (free ports on 127.0.0.1, data path in a temporary directory on
tmpfs, nsqd defaults otherwise) and the daemons run as subprocesses; each one is stopped
(SIGTERM, then SIGKILL) and the directory removed, whatever happens. Topics are deleted after
each run so nsqd's backlog stays the same for both sides. Every load is bounded in time (hey -z,
with a subprocess timeout) and in count (pre-fill size, latency submissions), with deadlines.

Figures go to ``bench/results/pipeline.json`` and ``bench/results/pipeline.md`` (and
``kernels.json`` / ``kernels.md`` for 5); progress goes to stderr. ``--quick`` runs 2 shorter
rounds of everything (a few minutes with the kernels); ``--only`` runs some benchmarks (the
pipeline files then hold only those; ``--only kernels`` leaves them alone). The exit status is 1
if a benchmark could not run (or kernel results differ), and with ``--strict`` 2 if a ratio
misses its target.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from nsqjobs.testing import HarnessError, need_binary, start_nsq, temp_dir

from bench import hey, kernels, ladder, ledger_ingest, report, scenarios, wait_many
from bench.procs import ROOT, log, start_gateway
from bench.results_model import Comparison, Latency

PIPELINE = ("gateway_single", "gateway_batch", "worker_dispatch", "latency")
BENCHMARKS = (*PIPELINE, "ledger_ingest", "kernels", "wait_many", "ladder", "peers")


def _command(argv: Sequence[str]) -> str:
    cmd = report.command_line(argv, "bench")
    return f"make bench ({cmd})" if os.environ.get("MAKELEVEL") and not argv else cmd


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="2 short rounds of everything")
    parser.add_argument(
        "--only",
        default=",".join(BENCHMARKS),
        help=f"comma-separated subset of {','.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="where the figures go"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 2 when a ratio misses its target"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks and write the figures."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"bench: unknown benchmark(s) {', '.join(unknown)}")
    codes = []
    if any(b in PIPELINE for b in only):
        codes.append(_pipeline(args, argv, only))
    if "ledger_ingest" in only:
        codes.append(_ledger_ingest(args, argv))
    if "kernels" in only:
        codes.append(kernels.run(args.quick, args.out, _command(argv), strict=args.strict))
    if "wait_many" in only:
        sizes = (100,) if args.quick else (100, 1000)
        codes.append(wait_many.run(1 if args.quick else 3, sizes, args.out, _command(argv)))
    if "ladder" in only:
        codes.append(ladder.run(args.quick, args.out, _command(argv)))
    if "peers" in only:
        codes.append(_peers(args))
    return 1 if 1 in codes else max(codes, default=0)


def _pipeline(args: argparse.Namespace, argv: Sequence[str], only: Sequence[str]) -> int:
    """Run the pipeline benchmarks in ``only`` and write ``pipeline.json`` / ``pipeline.md``."""
    hey.hey_binary()
    try:
        need_binary("nsqd")
        need_binary("nsqlookupd")
    except HarnessError as exc:
        raise SystemExit(f"bench: {exc}") from None

    s = scenarios.Settings.quick() if args.quick else scenarios.Settings()
    comparisons: list[Comparison] = []
    latencies: list[Latency] = []
    errors: dict[str, str] = {}
    header: dict[str, object] = {
        **report.machine(),
        "command": _command(argv),
        "quick": args.quick,
        "settings": scenarios.settings_json(s),
        "nsq_version": "?",
    }
    started = time.monotonic()

    def attempt(name: str, fn: Callable[[], None]) -> None:
        if name not in only:
            return
        log(f"{name} ...")
        try:
            fn()
        except HarnessError as exc:
            log(f"{name} could not run: {exc}")
            errors[name] = str(exc)

    with ExitStack() as stack:
        work = temp_dir(stack, "nsqjobs-bench-")
        log(f"starting nsqlookupd and nsqd (work dir {work})")
        nsq = start_nsq(stack, work)
        header["nsq_version"] = nsq.version
        if "gateway_single" in only or "gateway_batch" in only:
            with ExitStack() as gw_stack:
                log("starting the gateway")
                gateway = start_gateway(gw_stack, nsq, work, scenarios.GATEWAY_TOPICS)
                attempt(
                    "gateway_single",
                    lambda: comparisons.append(scenarios.gateway_single(nsq, gateway, s, work)),
                )
                attempt(
                    "gateway_batch",
                    lambda: comparisons.append(scenarios.gateway_batch(nsq, gateway, s, work)),
                )
        attempt(
            "worker_dispatch", lambda: comparisons.append(scenarios.worker_dispatch(nsq, s, work))
        )

        attempt("latency", lambda: latencies.extend(scenarios.end_to_end_latency(nsq, s, work)))
        log("stopping daemons")

    header["duration_s"] = round(time.monotonic() - started, 1)
    header["errors"] = errors
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(args.out / "pipeline.json", header, comparisons, latencies)
    report.write_markdown(args.out / "pipeline.md", header, comparisons, latencies)
    log(f"done in {header['duration_s']}s on {platform.node()}: {args.out}/pipeline.{{json,md}}")
    for c in comparisons:
        verdict = "PASS" if c.passed else "FAIL"
        log(f"  {c.key}: ratio {c.ratio:.3f} (target >= {c.target:g}) {verdict}")
    if errors:
        return 1
    if args.strict and not all(c.passed for c in comparisons):
        return 2
    return 0


def _peers(args: argparse.Namespace) -> int:
    """Run ``bench.peers`` (its own process: the peers' libraries stay out of this one)."""
    argv = [sys.executable, "-m", "bench.peers", "--out", str(args.out)]
    argv += ["--quick"] if args.quick else []
    log("peers ...")
    code = subprocess.run(argv, cwd=ROOT, check=False).returncode
    if code:
        log(f"peers could not run in full (exit status {code})")
    return 1 if code else 0


def _ledger_ingest(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the ledger ingest benchmark and write ``ledger_ingest.json`` / ``.md``."""
    hey.hey_binary()
    s = scenarios.Settings.quick() if args.quick else scenarios.Settings()
    header: dict[str, object] = {
        **report.machine(),
        "command": _command(argv),
        "quick": args.quick,
        "settings": scenarios.settings_json(s),
        "nsq_version": "?",
        "errors": {},
    }
    started = time.monotonic()
    comparisons: list[Comparison] = []
    with ExitStack() as stack:
        work = temp_dir(stack, "nsqjobs-bench-")
        try:
            nsq = start_nsq(stack, work)
            header["nsq_version"] = nsq.version
            log("ledger_ingest ...")
            comparisons = ledger_ingest.ledger_ingest(nsq, s, work)
        except HarnessError as exc:
            log(f"ledger_ingest could not run: {exc}")
            header["errors"] = {"ledger_ingest": str(exc)}
    header["duration_s"] = round(time.monotonic() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(args.out / "ledger_ingest.json", header, comparisons, [])
    report.write_markdown(
        args.out / "ledger_ingest.md",
        header,
        comparisons,
        [],
        title="nsqjobs ingest with the job ledger on",
    )
    for c in comparisons:
        verdict = "PASS" if c.passed else "FAIL"
        log(f"  {c.key}: ratio {c.ratio:.3f} (target >= {c.target:g}) {verdict}")
    if header["errors"]:
        return 1
    return 2 if args.strict and not all(c.passed for c in comparisons) else 0


if __name__ == "__main__":
    sys.exit(main())
