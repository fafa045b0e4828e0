"""``python -m bench.chaos``: run the chaos scenarios, print one line each, write the figures.

``make chaos`` runs them all (about 7 minutes on 2 cores) into ``bench/results/chaos.md`` and
``chaos.json``; ``--only`` picks some, ``--store postgres`` runs them against a PostgreSQL
ledger (into ``chaos-postgres.*``), ``--short`` runs the ``make test`` sizes (``chaos-short.*``),
``--long`` runs the full-size deep backlog (``chaos-long.*``), ``--scale`` multiplies the job
counts. Exit status 1 when a scenario could not run, 2 when one
missed a target.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from nsqjobs.testing import HarnessError, MissingBinary, need_binary

from bench.chaos import report, scenarios
from bench.chaos.ledger import STORES
from bench.chaos.run import Result, run
from bench.procs import ROOT
from bench.report import command_line, machine


def log(message: str) -> None:
    """Progress, on stderr."""
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--only", default="", help="comma-separated scenario names")
    parser.add_argument("--store", choices=STORES, default="sqlite", help="the ledger's store")
    parser.add_argument("--short", action="store_true", help="the small sizes make test runs")
    parser.add_argument(
        "--long",
        action="store_true",
        help="the full-size deep backlog (50,000 jobs behind slow workers; about 14 minutes)",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the job counts")
    parser.add_argument("--drain", type=float, help="longest drain, seconds (default per scenario)")
    parser.add_argument(
        "--stall", type=float, help="end a drain when nothing moved this long (seconds)"
    )
    parser.add_argument(
        "--keep-failed", type=Path, help="keep a failed scenario's logs and files under DIR"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="where the figures go"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenarios and write chaos.md and chaos.json."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.long:
        catalogue = scenarios.long(args.store)
    elif args.short:
        catalogue = scenarios.short(args.store)
    else:
        catalogue = scenarios.full(args.store, args.scale)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - {s.name for s in catalogue})
    if unknown:
        raise SystemExit(f"chaos: unknown scenario(s) {', '.join(unknown)}")
    chosen = [s for s in catalogue if not names or s.name in names]
    if args.drain is not None:
        chosen = [dataclasses.replace(s, drain_s=args.drain) for s in chosen]
    if args.stall is not None:
        chosen = [dataclasses.replace(s, stall_s=args.stall) for s in chosen]
    try:
        need_binary("nsqd")
        need_binary("nsqlookupd")
    except HarnessError as exc:
        raise SystemExit(f"chaos: {exc}") from None
    cmd = command_line(argv, "bench.chaos")
    header = {
        **machine(),
        "commit": report.commit(),
        "command": f"make chaos ({cmd})" if os.environ.get("MAKELEVEL") and not argv else cmd,
        "nsq_version": "?",
        "relay": "?",
    }
    results: list[Result] = []
    began = time.monotonic()
    for scenario in chosen:
        try:
            result = run(scenario, log, args.keep_failed)
        except MissingBinary as exc:
            result = Result(scenario, error=str(exc))
        results.append(result)
        print(result.summary(), flush=True)
        if result.verdict is not None:
            header["nsq_version"] = result.nsq_version
    ran = [r for r in results if r.verdict is not None]
    header["relay"] = (
        "yes (nsqjobs_ledger_redrives_total exposed)"
        if any(r.relay for r in ran)
        else "no (nsqjobs_ledger_redrives_total absent: re-drives cannot happen)"
    )
    header["duration_s"] = round(time.monotonic() - began, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    # chaos.md for the default run; chaos-postgres.md, chaos-short.md, ... beside it.
    stem = "-".join(
        [
            "chaos",
            *(["postgres"] if args.store == "postgres" else []),
            *(["short"] * args.short),
            *(["long"] * args.long),
        ]
    )
    report.write_json(args.out / f"{stem}.json", header, results)
    report.write_markdown(args.out / f"{stem}.md", header, results)
    log(f"done in {header['duration_s']}s on {platform.node()}: {args.out}/{stem}.{{md,json}}")
    skipped = [r for r in results if r.verdict is None]
    if any(not r.passed for r in ran):
        return 2
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
