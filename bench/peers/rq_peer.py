"""RQ on Redis: ``rq worker`` with SimpleWorker (jobs in the worker process) or the default
forking Worker (a child per job)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from nsqjobs.testing import wait_for
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.registry import FinishedJobRegistry
from rq.worker import Worker

from bench.peers import jobs
from bench.peers.base import Mode, Peer, Task, WorkerRun, console_script, dist_version
from bench.peers.base import start_worker_process as start

QUEUE = "bench"
RESULT_TTL = 3600


@dataclass
class RqPeer(Peer):
    """RQ's producer: ``enqueue()``, or ``enqueue_many()`` (one pipeline) for bulk."""

    url: str = ""
    worker_class: str = "rq.worker.SimpleWorker"

    def __post_init__(self) -> None:
        self._redis = Redis.from_url(self.url)
        self._queue = Queue(QUEUE, connection=self._redis)

    def version(self) -> str:
        return dist_version("rq")

    def submit(self, task: Task, seqs: Sequence[int], *, results: bool, bulk: bool) -> list[Any]:
        fn = jobs.primes if task == "primes" else jobs.mark
        ttl = RESULT_TTL if results or task == "primes" else 0
        if bulk:
            data = [Queue.prepare_data(fn, (i,), result_ttl=ttl, timeout=600) for i in seqs]
            return list(self._queue.enqueue_many(data))
        return [self._queue.enqueue(fn, i, result_ttl=ttl, job_timeout=600) for i in seqs]

    def start_worker(self, stack: ExitStack, mode: Mode, run: WorkerRun) -> None:
        argv = [console_script("rq"), "worker", "-u", self.url, "-w", self.worker_class]
        argv += ["--logging_level", "WARNING", QUEUE]
        count = 1 if mode == "noop" else 2  # RQ runs one job at a time per worker
        procs = [start(stack, f"{self.key}-{mode}-{n}", argv, run) for n in range(count)]

        def registered() -> bool | None:
            for proc in procs:
                proc.check_alive()
            return Worker.count(connection=self._redis) >= count or None

        wait_for(registered, 60.0, "RQ workers to register")

    def submit_wait(self, seq: int, timeout: float) -> Any:
        job: Job = self._queue.enqueue(jobs.mark, seq, result_ttl=RESULT_TTL)
        result = job.latest_result(timeout=max(1, int(timeout)))
        return None if result is None else result.return_value

    def results_stored(self, handles: Sequence[Any]) -> int:
        return FinishedJobRegistry(queue=self._queue).count

    def flush(self) -> None:
        self._redis.flushall()

    def close(self) -> None:
        self._redis.close()


def peer(redis_url: str, forking: bool) -> Peer:
    """RQ on the Redis at ``redis_url``, with the forking Worker or SimpleWorker."""
    worker = "rq.worker.Worker" if forking else "rq.worker.SimpleWorker"
    return RqPeer(
        key="rq-fork" if forking else "rq",
        label="RQ (forking Worker)" if forking else "RQ (SimpleWorker)",
        broker="Redis",
        settings={
            "worker": f"{worker}: "
            + ("a forked child per job (RQ's default)" if forking else "jobs run in the worker"),
            "slots": "1 worker process (one job at a time); CPU: 2 worker processes",
            "results": f"result_ttl {RESULT_TTL}s; without: result_ttl=0",
            "bulk": "Queue.enqueue_many() (one Redis pipeline)",
            **(
                {"drain": "300 jobs, not 20,000 (a fork per job: tens of jobs/s)"}
                if forking
                else {}
            ),
            "wait": "job.latest_result(timeout) (Redis stream XREAD)",
        },
        enqueue_measured=not forking,  # the same producer as SimpleWorker's
        drain_cap=300 if forking else None,
        url=redis_url,
        worker_class=worker,
    )
