"""Where a daemon's time goes under benchmark load: the daemon runs under cProfile.

    python -m bench.profile_daemon gateway   # hey -c 32 on POST /v1/jobs
    python -m bench.profile_daemon batch     # hey -c 4 on POST /v1/jobs/batch
    python -m bench.profile_daemon worker    # one worker draining pre-filled noop jobs
    python -m bench.profile_daemon gateway --ledger-url sqlite:////tmp/l.sqlite3  # ledger on

Prints the top functions by own time and by cumulative time (main thread only: cProfile does
not see the executor's threads, which only run the noop task here). Profiling slows Python
down, so read the shares, not the rates.
"""

from __future__ import annotations

import argparse
import io
import pstats
import shutil
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from nsqjobs.names import WORKER_CHANNEL
from nsqjobs.testing import free_port, nsqjobs_command, start_nsq, temp_dir, wait_for, wait_ready

from bench import hey, payloads
from bench.procs import gateway_argv, log, start_process, worker_argv
from bench.scenarios import GATEWAY_TOPICS, JSON


def _profiled(argv: list[str], out: Path) -> list[str]:
    """``argv`` (an nsqjobs command) run under cProfile, writing ``out`` on exit."""
    cli = argv[len(nsqjobs_command()) :]
    return [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "nsqjobs.cli", *cli]


def _show(prof: Path, top: int) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buf)
    stats.strip_dirs()
    buf.write("=== by own time (tottime) ===\n")
    stats.sort_stats("tottime").print_stats(top)
    buf.write("=== by cumulative time ===\n")
    stats.sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """Profile one daemon under load and print the hot spots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("target", choices=("gateway", "batch", "worker"))
    parser.add_argument("--seconds", type=float, default=8.0, help="hey run length")
    parser.add_argument("--messages", type=int, default=30_000, help="jobs for the worker")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--save", type=Path, help="keep the raw cProfile file here")
    parser.add_argument("--ledger-url", default="", help="the gateway's --ledger-url")
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        work = temp_dir(stack, "nsqjobs-bench-")
        nsq = start_nsq(stack, work)
        prof = work / "daemon.prof"
        with ExitStack() as daemon:
            if args.target == "worker":
                topic = "bench_profile"
                nsq.create_channel(topic, WORKER_CHANNEL)
                nsq.mpub(topic, payloads.envelopes(args.messages))
                argv_w = worker_argv(
                    nsq,
                    concurrency=64,
                    queue=topic,
                    channel=WORKER_CHANNEL,
                    lookupd=False,
                    port=free_port(),
                )
                proc = start_process(daemon, "worker", _profiled(argv_w, prof), work)

                def drained() -> bool:
                    proc.check_alive()
                    ch = nsq.channel(topic, WORKER_CHANNEL) or {}
                    return ch.get("depth") == 0 and ch.get("in_flight_count") == 0

                log(f"worker draining {args.messages:,} jobs under cProfile")
                wait_for(drained, 600.0, "the worker to drain", interval=0.2)
            else:
                for topic in GATEWAY_TOPICS:
                    nsq.post("/topic/create", topic=topic)
                port = free_port()
                gateway = gateway_argv(nsq, port)
                if args.ledger_url:
                    gateway += ["--ledger-url", args.ledger_url]
                proc = start_process(daemon, "gateway", _profiled(gateway, prof), work)
                base = f"http://127.0.0.1:{port}"
                wait_ready(proc, f"{base}/readyz", 60.0)
                if args.target == "gateway":
                    url, body, conc = f"{base}/v1/jobs", payloads.submit_body(), 32
                else:
                    url, body, conc = f"{base}/v1/jobs/batch", payloads.batch_body(), 4
                body_file = payloads.write(work / "body.json", body)
                log(f"hey -c {conc} on {url} for {args.seconds:g}s under cProfile")
                res = hey.run(
                    url, body_file, concurrency=conc, seconds=args.seconds, content_type=JSON
                )
                log(f"{res.ok_per_s:,.0f} 2xx/s (profiled), {res.failed} failed")
        # The daemon stopped (SIGTERM, clean exit): cProfile has written its file.
        if not prof.exists():
            log("no profile written (the daemon did not exit cleanly)")
            return 1
        print(_show(prof, args.top))
        if args.save:
            shutil.copyfile(prof, args.save)
            log(f"profile saved to {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
