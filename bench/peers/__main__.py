"""nsqjobs against its peers: ``python -m bench.peers [--quick] [--only celery,rq,...]``.

Celery, Dramatiq (Redis and RabbitMQ), RQ and IPython Parallel against nsqjobs, side by side in
one run, rounds interleaved (each round runs every peer once, the order rotated), medians of
the rounds, each figure also as a ratio to nsqjobs':

- enqueue: no-op jobs/s from one producer in this process, one call per job and the peer's
  bulk call, no worker running;
- drain: one worker process working through 20,000 pre-enqueued no-op jobs, with results
  stored and without (where the peer can drop them);
- latency: one no-op job every 20 ms (50/s), submit to result seen here: p50, p90, p99;
- cpu: ``primes`` jobs (the primes below 10**7, the same kernel functions as ``primes.count``)
  with 2 slots, pure Python and the compiled (Cython) kernel;
- for each peer its version, broker and settings, and every job lost or run twice (counted per
  job from what the jobs themselves record).

Redis and RabbitMQ are Debian's (``apt-get install redis-server rabbitmq-server``), started
here on free loopback ports with temporary directories and stopped at the end, like nsqd and
the gateway. The peers come from the ``bench-peers`` extra (``pip install -e '.[bench-peers]'``).
Figures go to ``bench/results/peers.json``, ``peers.md`` and ``peers.png``.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from nsqjobs.testing import HarnessError, need_binary, start_nsq, temp_dir

from bench import report
from bench.peers import measure, servers, table
from bench.peers.base import Peer, WorkerRun
from bench.procs import ROOT, log

PEERS = ("nsqjobs", "celery", "dramatiq-redis", "dramatiq-rabbitmq", "rq", "rq-fork", "ipyparallel")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="one short round of everything")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 3, --quick 1)")
    parser.add_argument(
        "--only", default=",".join(PEERS), help=f"comma-separated subset of {','.join(PEERS)}"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results", help="where the figures go"
    )
    parser.add_argument("--no-chart", action="store_true", help="skip peers.png")
    parser.add_argument(
        "--rewrite",
        action="store_true",
        help="measure nothing: write peers.md and peers.png again from OUT/peers.json",
    )
    return parser


def _start_peers(stack: ExitStack, work: Path, only: Sequence[str]) -> list[Peer]:
    """Start what the chosen peers need (nsqd, Redis, RabbitMQ, ipcontroller); their adapters."""
    # Imported here: each peer module imports its library, which only the extra installs.
    from bench.peers import nsqjobs_peer

    need_binary("nsqd")
    need_binary("nsqlookupd")
    nsq = start_nsq(stack, work)
    peers: list[Peer] = [nsqjobs_peer.peer(stack, nsq, work)]
    redis = None
    if any(p in only for p in ("celery", "dramatiq-redis", "dramatiq-rabbitmq", "rq", "rq-fork")):
        redis = servers.start_redis(stack, work)
        log(f"redis-server {redis.version} at {redis.url}")
    if "celery" in only and redis:
        from bench.peers import celery_peer

        peers.append(celery_peer.peer(redis.url))
    if "dramatiq-redis" in only and redis:
        from bench.peers import dramatiq_peer

        peers.append(dramatiq_peer.peer("redis", redis.url, redis.url))
    if "dramatiq-rabbitmq" in only and redis:
        from bench.peers import dramatiq_peer

        rabbit = servers.start_rabbitmq(stack, work)
        log(f"RabbitMQ {rabbit.version} at {rabbit.url}")
        peers.append(dramatiq_peer.peer("rabbitmq", rabbit.url, redis.url))
    for key, forking in (("rq", False), ("rq-fork", True)):
        if key in only and redis:
            from bench.peers import rq_peer

            peers.append(rq_peer.peer(redis.url, forking))
    if "ipyparallel" in only:
        from bench.peers import ipp_peer

        peers.append(ipp_peer.peer(stack, work))
    for peer in peers:
        stack.callback(peer.close)
    return [p for p in peers if p.key in only]


def _one_peer(peer: Peer, s: measure.Sizes, work: Path, rnd: int) -> dict[str, Any]:
    """Every measurement of one peer in one round; failures are recorded, not raised."""
    out: dict[str, Any] = {}
    logs = work / "logs"
    logs.mkdir(exist_ok=True)

    def run(kind: str, impl: str = "python") -> WorkerRun:
        return WorkerRun(work / f"marks-{peer.key}-{kind}-{rnd}", logs, impl)

    def attempt(name: str, fn: Callable[[], Any]) -> None:
        t = time.monotonic()
        try:
            value = fn()
            out[name] = (
                asdict(value)
                if is_dataclass(value) and not isinstance(value, type)
                else {"rate": value}
            )
        except (HarnessError, Exception) as exc:  # one failure must not end the run
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"  {peer.key} {name}: FAILED {exc}")
            try:
                peer.flush()
            except Exception as flush_exc:
                log(f"  {peer.key}: flush after the failure failed too: {flush_exc}")
            return
        log(f"  {peer.key} {name}: {table.brief(out[name])} ({time.monotonic() - t:.1f}s)")

    n = min(s.drain_jobs, peer.drain_cap or s.drain_jobs)
    if peer.enqueue_measured:
        for bulk in (False, True):
            attempt(
                f"enqueue_{'bulk' if bulk else 'single'}",
                lambda bulk=bulk: measure.enqueue_rate(  # type: ignore[misc]
                    peer, run("enqueue"), s.enqueue_jobs, bulk
                ),
            )
        if peer.has_blocking_single:
            attempt(
                "enqueue_single_blocking",
                lambda: measure.enqueue_rate(
                    peer, run("enqueue"), s.enqueue_jobs, False, blocking=True
                ),
            )
    attempt("drain_results", lambda: measure.drain(peer, run("drain"), n))
    if peer.stores_optional:
        attempt(
            "drain_no_results",
            lambda: measure.drain(peer, run("drain-quiet"), n, results=False),
        )
    attempt(
        "latency",
        lambda: measure.latency(peer, run("latency"), s.latency_rate, s.latency_seconds),
    )
    for impl, jobs in (("python", s.cpu_jobs_python), ("cython", s.cpu_jobs_compiled)):
        attempt(
            f"cpu_{impl}",
            lambda impl=impl, jobs=jobs: measure.cpu(  # type: ignore[misc]
                peer, run(f"cpu-{impl}", impl), jobs
            ),
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run every chosen peer, ``rounds`` times interleaved; write the figures."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: every broker, worker and daemon started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(only) - set(PEERS))
    if unknown:
        raise SystemExit(f"bench.peers: unknown peer(s) {', '.join(unknown)}")
    if args.rewrite:
        table.rewrite(args.out, chart_too=not args.no_chart)
        return 0
    if "nsqjobs" not in only:
        only.insert(0, "nsqjobs")  # every ratio is to nsqjobs
    sizes = measure.Sizes.quick() if args.quick else measure.Sizes()
    if args.rounds:
        sizes = measure.Sizes(**{**sizes.__dict__, "rounds": args.rounds})
    cmd = report.command_line(argv, "bench.peers")
    header: dict[str, Any] = {
        **report.machine(),
        "command": f"make bench ({cmd})" if os.environ.get("MAKELEVEL") and not argv else cmd,
        "quick": args.quick,
        "sizes": sizes.__dict__,
        "load_average": [],
        "primes_in_process_s": {},
    }
    started = time.monotonic()
    rounds: list[dict[str, dict[str, Any]]] = []
    with ExitStack() as stack:
        work = temp_dir(stack, "nsqjobs-peers-")
        log(f"starting brokers and nsqjobs (work dir {work})")
        try:
            peers = _start_peers(stack, work, only)
        except (HarnessError, ImportError) as exc:
            raise SystemExit(f"bench.peers: cannot start: {exc}") from None
        header["peers"] = table.describe(peers)
        header["primes_in_process_s"] = table.primes_reference()
        for r in range(sizes.rounds):
            order = peers[r % len(peers) :] + peers[: r % len(peers)]
            log(f"round {r + 1}/{sizes.rounds}: {', '.join(p.key for p in order)}")
            header["load_average"].append([round(x, 2) for x in os.getloadavg()])
            rounds.append({p.key: _one_peer(p, sizes, work, r) for p in order})
        header["load_average"].append([round(x, 2) for x in os.getloadavg()])
        log("stopping brokers and daemons")
    header["duration_s"] = round(time.monotonic() - started, 1)
    summary = table.summarise(rounds, [p.key for p in peers])
    args.out.mkdir(parents=True, exist_ok=True)
    table.write(args.out, header, rounds, summary, chart_too=not args.no_chart)
    log(f"done in {header['duration_s']}s on {platform.node()}: {args.out}/peers.{{json,md,png}}")
    failed = [
        f"{k}.{m}"
        for rnd in rounds
        for k, ms in rnd.items()
        for m, v in ms.items()
        if isinstance(v, dict) and "error" in v
    ]
    if failed:
        log(f"failed: {', '.join(sorted(set(failed)))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
