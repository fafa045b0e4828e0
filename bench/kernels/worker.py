"""Jobs/s through real workers: one process with two threads against two processes with one."""

from __future__ import annotations

import os
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsqjobs.testing import Nsq, free_port, wait_for, wait_ready

from bench.kernels.load import Load, Quiet
from bench.kernels.specs import WORKER_TASK, Settings
from bench.kernels.timing import timed
from bench.procs import BenchError, log, start_process, worker_argv

SETUPS = {"one_process_c2": (1, 2), "two_processes_c1": (2, 1)}  # processes, --concurrency


@dataclass
class WorkerThroughput:
    """primes.count jobs/s: one worker process with 2 threads vs two with 1 thread each."""

    settings: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def median(self, setup: str) -> float:
        """Median jobs/s of one setup."""
        return float(statistics.median(r[setup]["jobs_per_s"] for r in self.rounds))

    @property
    def ratio(self) -> float:
        """Median of the per-round ratios two processes / one process."""
        return float(
            statistics.median(
                r["two_processes_c1"]["jobs_per_s"] / r["one_process_c2"]["jobs_per_s"]
                for r in self.rounds
            )
        )

    def to_json(self) -> dict[str, Any]:
        """Machine-readable figures."""
        return {
            "title": "primes.count jobs/s: 1 worker x --concurrency 2 vs 2 workers x 1",
            "unit": "jobs/s",
            "one_process_c2_median": round(self.median("one_process_c2"), 2),
            "two_processes_c1_median": round(self.median("two_processes_c1"), 2),
            "ratio_two_over_one_median": round(self.ratio, 4),
            "target": None,
            "rounds": self.rounds,
            "settings": self.settings,
        }


def _job_bodies(n: int, start: int, stop: int) -> list[bytes]:
    """``n`` primes.count envelopes with the same arguments (distinct ids)."""
    from nsqjobs import wire
    from nsqjobs.registry import load_task_modules, registry

    load_task_modules(["nsqjobs_tasks.builtin"])
    limit = registry.get(WORKER_TASK).time_limit_s
    return [
        wire.encode(
            wire.JobEnvelope(
                id=wire.new_job_id(),
                task=WORKER_TASK,
                args={"start": start, "stop": stop},
                created_at=wire.now(),
                timeout_s=limit,
            )
        )
        for _ in range(n)
    ]


def _drain(
    nsq: Nsq, setup: str, topic: str, bodies: list[bytes], s: Settings, log_dir: Path
) -> dict[str, Any]:
    """Fill a paused channel, start the worker(s), unpause once all are ready, time the drain."""
    from nsqjobs.names import DEAD_LETTER_TOPIC, RESULTS_TOPIC, WORKER_CHANNEL

    processes, concurrency = SETUPS[setup]
    n = len(bodies)
    nsq.create_channel(topic, WORKER_CHANNEL)
    nsq.post("/channel/pause", topic=topic, channel=WORKER_CHANNEL)
    nsq.mpub(topic, bodies)
    wait_for(
        lambda: (nsq.channel(topic, WORKER_CHANNEL) or {}).get("depth") == n,
        30.0,
        f"{n} messages in {topic}/{WORKER_CHANNEL}",
    )
    with ExitStack() as stack:
        procs = []
        for p in range(processes):
            port = free_port()
            argv = worker_argv(
                nsq,
                concurrency=concurrency,
                queue=topic,
                channel=WORKER_CHANNEL,
                lookupd=False,
                port=port,
            )
            proc = start_process(stack, f"worker-{topic}-{p}", argv, log_dir)
            procs.append((proc, port))
        for proc, port in procs:
            wait_ready(proc, f"http://127.0.0.1:{port}/readyz", 90.0)

        def all_rdy() -> bool:
            clients = (nsq.channel(topic, WORKER_CHANNEL) or {}).get("clients") or []
            return len(clients) == processes and all(
                int(c.get("ready_count", 0)) > 0 for c in clients
            )

        wait_for(all_rdy, 30.0, f"{processes} worker(s) with RDY > 0 on {topic}")
        nsq.post("/channel/unpause", topic=topic, channel=WORKER_CHANNEL)
        t0 = time.monotonic()
        deadline = t0 + max(120.0, n * 0.5)
        while True:
            for proc, _ in procs:
                proc.check_alive()
            ch = nsq.channel(topic, WORKER_CHANNEL)
            if ch is None:
                raise BenchError(f"channel {topic}/{WORKER_CHANNEL} disappeared")
            left = int(ch["depth"]) + int(ch["in_flight_count"]) + int(ch["deferred_count"])
            if left == 0:
                seconds = time.monotonic() - t0
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{setup} did not drain {topic} in time ({left} left)")
            time.sleep(s.drain_poll_s)
    results = nsq.message_count(RESULTS_TOPIC)
    dead = nsq.message_count(DEAD_LETTER_TOPIC)
    for t in (topic, RESULTS_TOPIC, DEAD_LETTER_TOPIC):
        nsq.delete_topic(t)
    if results != n or dead:
        raise BenchError(f"{setup}: {results} results and {dead} dead letters for {n} jobs")
    return {
        "jobs_per_s": round(n / seconds, 3),
        "seconds": round(seconds, 3),
        "requeued": int(ch["requeue_count"]),
        "timed_out": int(ch["timeout_count"]),
    }


def _job_cost(start: int, stop: int) -> tuple[str, float]:
    """The worker's default primes implementation here, and its median in-process call time."""
    from nsqjobs_tasks import impl

    chosen = impl.chosen("primes")
    fn = impl.function("primes", "count_primes", chosen)
    fn(start, stop)
    return chosen, statistics.median(timed(fn, (start, stop))[0] for _ in range(5))


def worker_throughput(nsq: Nsq, s: Settings, log_dir: Path, quiet: Quiet) -> WorkerThroughput:
    """Rounds of (one process x 2 threads, two processes x 1 thread), alternating order."""
    start, stop = s.worker_job_start, s.worker_job_stop
    chosen, cost = _job_cost(start, stop)
    bodies = _job_bodies(s.worker_jobs, start, stop)
    log(
        f"  {s.worker_jobs} {WORKER_TASK} jobs [{start}, {stop}), kernel {chosen}: "
        f"{1000 * cost:.1f} ms each in-process"
    )
    wt = WorkerThroughput(
        settings={
            "task": WORKER_TASK,
            "args": {"start": start, "stop": stop},
            "jobs_per_run": s.worker_jobs,
            "rounds": s.worker_rounds,
            "kernel_impl": chosen,
            "kernel_impl_env": os.environ.get("NSQJOBS_KERNEL_IMPL", ""),
            "job_seconds_in_process_median": round(cost, 5),
            "executor": "thread",
            "log_level": "WARNING",
            "poll_interval_s": s.drain_poll_s,
            "envelope_bytes": len(bodies[0]),
        }
    )
    for r in range(s.worker_rounds):
        order = list(SETUPS) if r % 2 == 0 else list(reversed(SETUPS))
        rnd: dict[str, Any] = {"order": ",".join(order)}
        for setup in order:
            quiet.wait()
            meter = Load.start()
            rnd[setup] = _drain(nsq, setup, f"bench_kernels_{r}_{setup}", bodies, s, log_dir)
            rnd[setup]["other_load"] = meter.stop().to_json()
        one, two = rnd["one_process_c2"], rnd["two_processes_c1"]
        rnd["ratio_two_over_one"] = round(two["jobs_per_s"] / one["jobs_per_s"], 4)
        wt.rounds.append(rnd)
        log(
            f"  worker round {r + 1}: 1 process x 2 threads {one['jobs_per_s']:.1f} jobs/s, "
            f"2 processes x 1 {two['jobs_per_s']:.1f}, ratio {rnd['ratio_two_over_one']:.3f} "
            f"(other processes: {one['other_load']['others_cores']} and "
            f"{two['other_load']['others_cores']} cores)"
        )
    return wt
