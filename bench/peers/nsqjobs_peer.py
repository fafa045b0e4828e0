"""nsqjobs: real nsqd and nsqlookupd, one gateway, ``nsqjobs worker`` processes.

The producer is the Python client ``nsqjobs.Client`` when it imports, else plain httpx on the
same HTTP API (``POST /v1/jobs``, ``/v1/jobs/batch``, ``?wait=``); ``producer`` says which.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from nsqjobs.config import WorkerConfig
from nsqjobs.names import DEFAULT_QUEUE, RESULTS_TOPIC, WORKER_CHANNEL
from nsqjobs.testing import Nsq, free_port, wait_ready

from bench.peers.base import Mode, Peer, Task, WorkerRun, dist_version, import_paths
from bench.peers.base import start_worker_process as start
from bench.peers.nsqjobs_jobs import MARK, PRIMES
from bench.procs import start_gateway, worker_argv

TASK_MODULE = "bench.peers.nsqjobs_jobs"
BATCH = 1000
NOOP_CONCURRENCY = 64


def _default(name: str) -> object:
    """The worker's default setting ``name`` on this checkout."""
    fields = {f.name: f for f in dataclasses.fields(WorkerConfig)}
    return fields[name].default


def _client_class() -> Any:
    """``nsqjobs.Client``, or None before the client is merged."""
    try:
        return getattr(importlib.import_module("nsqjobs"), "Client", None)
    except ImportError:
        return None


@dataclass
class NsqjobsPeer(Peer):
    """The nsqjobs producer: the client's ``submit()``/``submit_many()``, or httpx."""

    nsq: Nsq | None = None
    gateway: str = ""
    _results0: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        client_class = _client_class()
        self._client = client_class(self.gateway) if client_class is not None else None
        self._http = httpx.Client(base_url=self.gateway, timeout=30.0)
        self.producer = (
            "nsqjobs.Client (single: Client.sender().submit(), acceptance awaited by its "
            "flush; blocking Client.submit() measured too; bulk: submit_many; latency: run())"
            if self._client is not None
            else "httpx (nsqjobs.Client not importable): POST /v1/jobs, /v1/jobs/batch, ?wait="
        )

    def version(self) -> str:
        return f"{dist_version('nsqjobs')} (nsqd {self._nsq.version})"

    @property
    def _nsq(self) -> Nsq:
        if self.nsq is None:
            raise RuntimeError("nsqjobs peer without nsqd")
        return self.nsq

    def submit(self, task: Task, seqs: Sequence[int], *, results: bool, bulk: bool) -> list[Any]:
        name = PRIMES if task == "primes" else MARK
        self._results0 = self._nsq.message_count(RESULTS_TOPIC)
        if self._client is not None:
            if bulk:
                return list(self._client.submit_many(name, [{"seq": i} for i in seqs]))
            if self.single_blocks:
                return [self._client.submit(name, {"seq": i}) for i in seqs]
            # One call per job that returns at once; flushed (every job accepted) on exit.
            with self._client.sender() as sender:
                return [sender.submit(name, {"seq": i}) for i in seqs]
        if bulk:
            for k in range(0, len(seqs), BATCH):
                batch = [{"task": name, "args": {"seq": i}} for i in seqs[k : k + BATCH]]
                self._http.post("/v1/jobs/batch", json={"jobs": batch}).raise_for_status()
        else:
            for i in seqs:
                self._http.post("/v1/jobs", json={"task": name, "args": {"seq": i}})
        return list(seqs)

    def start_worker(self, stack: ExitStack, mode: Mode, run: WorkerRun) -> None:
        # noop: one worker, 64 threads (the pipeline bench's setting); cpu: two workers of 1
        # slot each, so pure Python is not held to one core by the GIL.
        shape = [(NOOP_CONCURRENCY, 1), (1, 2)][mode == "cpu"]
        for n in range(shape[1]):
            port = free_port()
            argv = worker_argv(
                self._nsq,
                concurrency=shape[0],
                queue=DEFAULT_QUEUE,
                channel=WORKER_CHANNEL,
                lookupd=False,
                port=port,
            )
            proc = start(stack, f"nsqjobs-{mode}-{n}", [*argv, "--task-module", TASK_MODULE], run)
            wait_ready(proc, f"http://127.0.0.1:{port}/readyz", 60.0)

    def submit_wait(self, seq: int, timeout: float) -> Any:
        if self._client is not None:
            # One request: submitted and answered with the result (?wait=), as at light load.
            return self._client.run(MARK, {"seq": seq}, timeout=timeout)
        answer = self._http.post(
            f"/v1/jobs?wait={timeout:g}", json={"task": MARK, "args": {"seq": seq}}
        )
        answer.raise_for_status()
        return answer.json().get("result")

    def results_stored(self, handles: Sequence[Any]) -> int:
        return self._nsq.message_count(RESULTS_TOPIC) - self._results0

    def flush(self) -> None:
        self._nsq.post("/channel/empty", topic=DEFAULT_QUEUE, channel=WORKER_CHANNEL)

    def close(self) -> None:
        self._http.close()
        if self._client is not None:
            self._client.close()


def peer(stack: ExitStack, nsq: Nsq, work: Path) -> Peer:
    """Start a gateway that knows the bench tasks; the nsqjobs peer."""
    # The gateway inherits this process's environment: it must import the bench's task module.
    os.environ["PYTHONPATH"] = import_paths()
    gateway = start_gateway(
        stack,
        nsq,
        work,
        (DEFAULT_QUEUE, RESULTS_TOPIC),
        name="nsqjobs-gateway",
        extra=["--task-module", TASK_MODULE],
    )
    nsq.create_channel(DEFAULT_QUEUE, WORKER_CHANNEL)
    return NsqjobsPeer(
        key="nsqjobs",
        label="nsqjobs",
        broker="nsqd (results: topic 'results')",
        settings={
            "worker": f"1 nsqjobs worker, thread executor, --concurrency {NOOP_CONCURRENCY}; "
            "CPU: 2 workers x --concurrency 1",
            "delivery": f"the worker's default --delivery {_default('delivery')} (one message "
            "at a time, unbuffered, while the worker keeps up; nsqd batches up to "
            f"--delivery-buffer-ms {_default('delivery_buffer_ms')} under a backlog)",
            "results": "always published to nsqd before FIN (no option to drop them)",
            "bulk": "POST /v1/jobs/batch, 1,000 jobs per request",
            "wait": "?wait= / the client's result()",
        },
        stores_optional=False,
        has_blocking_single=True,
        nsq=nsq,
        gateway=gateway,
    )
