"""Dramatiq on Redis or RabbitMQ, results in Redis: ``dramatiq`` this module."""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend
from nsqjobs.testing import wait_for

from bench.peers import jobs
from bench.peers.base import Mode, Peer, Task, WorkerRun, console_script, dist_version
from bench.peers.base import start_worker_process as start

BROKER_ENV = "NSQJOBS_BENCH_DRAMATIQ_BROKER"  # a redis:// or amqp:// URL
RESULTS_ENV = "NSQJOBS_BENCH_REDIS_URL"


def _broker(url: str, results_url: str) -> dramatiq.Broker:
    broker: dramatiq.Broker
    broker = RabbitmqBroker(url=url) if url.startswith("amqp") else RedisBroker(url=url)
    base = results_url.rpartition("/")[0]
    broker.add_middleware(Results(backend=RedisBackend(url=f"{base}/1")))
    return broker


_url = os.environ.get(BROKER_ENV, "redis://127.0.0.1:6379/0")
_results = os.environ.get(RESULTS_ENV, "redis://127.0.0.1:6379/0")
dramatiq.set_broker(_broker(_url, _results))


@dramatiq.actor(actor_name="mark", store_results=True, max_retries=0)
def mark(seq: int) -> int:
    """The no-op job, its result stored."""
    return jobs.mark(seq)


@dramatiq.actor(actor_name="mark_quiet", max_retries=0)
def mark_quiet(seq: int) -> None:
    """The no-op job, its result not stored."""
    jobs.mark(seq)


@dramatiq.actor(actor_name="primes", store_results=True, max_retries=0, time_limit=600_000)
def primes(seq: int) -> int:
    """The CPU-bound job."""
    return jobs.primes(seq)


ACTORS: dict[str, Any] = {"mark": mark, "mark_quiet": mark_quiet, "primes": primes}


@dataclass
class DramatiqPeer(Peer):
    """Dramatiq's producer: ``send()``, or a ``group`` for bulk."""

    url: str = ""
    results_url: str = ""

    def __post_init__(self) -> None:
        self._broker = _broker(self.url, self.results_url)
        # The actors are the module's (the worker's); this peer sends their messages through
        # its own broker, so two Dramatiq peers in one process do not share one.
        for actor in ACTORS.values():
            self._broker.declare_actor(actor)
        self._backend = next(m.backend for m in self._broker.middleware if isinstance(m, Results))

    def version(self) -> str:
        return dist_version("dramatiq")

    def submit(self, task: Task, seqs: Sequence[int], *, results: bool, bulk: bool) -> list[Any]:
        actor = ACTORS[task if task == "primes" or results else "mark_quiet"]
        if bulk:
            messages = [actor.message(i) for i in seqs]
            dramatiq.group(messages, broker=self._broker).run()
            return messages
        return [self._broker.enqueue(actor.message(i)) for i in seqs]

    def start_worker(self, stack: ExitStack, mode: Mode, run: WorkerRun) -> None:
        shape = ["-p", "1", "-t", "8"] if mode == "noop" else ["-p", "2", "-t", "1"]
        argv = [console_script("dramatiq"), __name__, *shape]
        env = {BROKER_ENV: self.url, RESULTS_ENV: self.results_url}
        proc = start(stack, f"{self.key}-{mode}", argv, run, **env)
        want = 1 if mode == "noop" else 2

        def ready() -> bool | None:
            proc.check_alive()
            return proc.log().count("Worker process is ready for action.") >= want or None

        wait_for(ready, 60.0, "Dramatiq's worker processes to be ready")

    def submit_wait(self, seq: int, timeout: float) -> Any:
        message = self._broker.enqueue(mark.message(seq))
        return message.get_result(backend=self._backend, block=True, timeout=int(timeout * 1000))

    def results_stored(self, handles: Sequence[Any]) -> int:
        client = self._backend.client
        found = 0
        for i in range(0, len(handles), 1000):
            pipe = client.pipeline()
            for m in handles[i : i + 1000]:
                pipe.exists(self._backend.build_message_key(m))
            found += sum(pipe.execute())
        return found

    def flush(self) -> None:
        # A fresh connection per measurement: RabbitMQ drops a blocking pika connection that sat
        # idle past its heartbeat while the other peers ran, and Dramatiq keeps the dead one.
        if isinstance(self._broker, RabbitmqBroker):
            del self._broker.connection  # the next use connects again
        self._broker.flush_all()
        self._backend.client.flushdb()

    def close(self) -> None:
        self._broker.close()


def peer(broker: str, url: str, redis_url: str) -> Peer:
    """Dramatiq on ``broker`` (redis or rabbitmq) at ``url``, results in the Redis."""
    on_rabbit = broker == "rabbitmq"
    return DramatiqPeer(
        key=f"dramatiq-{broker}",
        label=f"Dramatiq ({'RabbitMQ' if on_rabbit else 'Redis'})",
        broker=("RabbitMQ (results: Redis)" if on_rabbit else "Redis (broker and results)"),
        settings={
            "workers": "1 process x 8 threads (default); CPU: 2 processes x 1 thread",
            "prefetch": "default (2 x threads for actors, RabbitMQ QoS alike)",
            "results": "Results middleware, Redis backend; without: store_results off",
            "retries": "max_retries=0 on the bench actors",
            "publish": "broker.enqueue(actor.message()), what send() does (RabbitMQ: no "
            "publisher confirms, the default)",
            "bulk": "group(...).run() (no bulk publish: one send per message)",
            "wait": "message.get_result(block=True) (Redis BLPOP)",
        },
        url=url,
        results_url=redis_url,
    )
