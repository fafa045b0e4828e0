"""Celery on Redis (broker and result backend), prefork pool of 2: ``celery -A`` this module."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from celery import Celery, group
from nsqjobs.testing import wait_for

from bench.peers import jobs
from bench.peers.base import Mode, Peer, Task, WorkerRun, console_script, dist_version
from bench.peers.base import start_worker_process as start

REDIS_ENV = "NSQJOBS_BENCH_REDIS_URL"
_redis = os.environ.get(REDIS_ENV, "redis://127.0.0.1:6379/0").rpartition("/")[0]
# The broker in database 0, results in database 1 (so each can be flushed and counted alone).
app = Celery("bench", broker=f"{_redis}/0", backend=f"{_redis}/1")
app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"])


@app.task(name="mark")
def mark(seq: int) -> int:
    """The no-op job, its result stored."""
    return jobs.mark(seq)


@app.task(name="mark_quiet", ignore_result=True)
def mark_quiet(seq: int) -> int:
    """The no-op job, its result not stored."""
    return jobs.mark(seq)


@app.task(name="primes")
def primes(seq: int) -> int:
    """The CPU-bound job."""
    return jobs.primes(seq)


@dataclass
class CeleryPeer(Peer):
    """Celery's producer: ``delay()``, or a ``group`` for bulk."""

    url: str = ""

    def __post_init__(self) -> None:
        base = self.url.rpartition("/")[0]
        app.conf.update(broker_url=f"{base}/0", result_backend=f"{base}/1")

    def version(self) -> str:
        return dist_version("celery")

    def _task(self, task: Task, results: bool) -> Any:
        return primes if task == "primes" else (mark if results else mark_quiet)

    def submit(self, task: Task, seqs: Sequence[int], *, results: bool, bulk: bool) -> list[Any]:
        fn = self._task(task, results)
        if bulk:
            return list(group(fn.s(i) for i in seqs).apply_async().results)
        return [fn.delay(i) for i in seqs]

    def start_worker(self, stack: ExitStack, mode: Mode, run: WorkerRun) -> None:
        argv = [console_script("celery"), "-A", __name__, "worker", "-P", "prefork", "-c", "2"]
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"]
        proc = start(stack, f"celery-{mode}", argv, run, **{REDIS_ENV: self.url})

        def answers() -> bool | None:
            proc.check_alive()
            return bool(app.control.ping(timeout=0.5)) or None

        wait_for(answers, 60.0, "the Celery worker to answer a ping")

    def submit_wait(self, seq: int, timeout: float) -> Any:
        return mark.delay(seq).get(timeout=timeout)

    def results_stored(self, handles: Sequence[Any]) -> int:
        backend = app.backend
        keys = [backend.get_key_for_task(h.id) for h in handles]
        found = 0
        for i in range(0, len(keys), 1000):
            found += sum(v is not None for v in backend.client.mget(keys[i : i + 1000]))
        return found

    def flush(self) -> None:
        app.backend.client.flushall()

    def close(self) -> None:
        app.close()


def peer(redis_url: str) -> Peer:
    """The Celery peer on the Redis at ``redis_url``."""
    return CeleryPeer(
        key="celery",
        label="Celery",
        broker="Redis (broker and results)",
        settings={
            "pool": "prefork, 2 processes (-c 2), prefetch multiplier 4 (default)",
            "acks": "early (default: acks_late off)",
            "results": "Redis backend, JSON; without: ignore_result=True",
            "flags": "--without-gossip --without-mingle --without-heartbeat",
            "bulk": "group(...).apply_async() (Celery has no bulk publish)",
            "wait": "AsyncResult.get() (Redis pub/sub)",
        },
        url=redis_url,
    )
