"""The worker daemon: pynsq Readers feeding the job state machine, metrics, drain, serve().

The state machine (:mod:`nsqjobs.worker.jobs`) owns every response to nsqd itself
(``enable_async``), so pynsq never requeues silently or pauses the whole reader with backoff. A
job is FINed only after nsqd acknowledged its result; a retry republishes the envelope (with the
attempt history) after a delay the outcome policy (:mod:`nsqjobs.worker.outcome`) chose.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import tornado.httpserver
import tornado.web
from prometheus_client import CollectorRegistry

from nsqjobs.config import WorkerConfig, default_worker_id, spelled
from nsqjobs.errors import listening
from nsqjobs.names import (
    CANCEL_CHANNEL_PREFIX,
    CANCEL_TOPIC,
    DEAD_LETTER_TOPIC,
    EPHEMERAL_SUFFIX,
    NSQD_MAX_BODY_SIZE,
    READER_OUTPUT_BUFFER_BYTES,
    READER_OUTPUT_BUFFER_TIMEOUT_MS,
    RESULTS_TOPIC,
    STARTED_TOPIC,
    WORKER_OUTPUT_BUFFER_BYTES,
)
from nsqjobs.nsq.admin import create_topics, nsqd_limit
from nsqjobs.nsq.publisher import Publisher
from nsqjobs.nsq.reader import Reader, close_reader, connected_count, unflushed
from nsqjobs.observability.exposition import observability_app
from nsqjobs.observability.metrics import WorkerMetrics
from nsqjobs.observability.worker_hooks import MetricsHook
from nsqjobs.registry import Registry
from nsqjobs.worker.executors import make_executor
from nsqjobs.worker.flow import Flow, SlotReader
from nsqjobs.worker.hooks import Hooks, WorkerHook
from nsqjobs.worker.jobs import Machine

log = logging.getLogger("nsqjobs.worker")

_NOT_IN_CHANNEL_NAMES = re.compile(r"[^A-Za-z0-9_-]+")
# Cancels are few: a small window is plenty, and they never wait for a slot.
CANCEL_MAX_IN_FLIGHT = 100


def cancel_channel(worker_id: str) -> str:
    """This worker process's ephemeral channel on the cancels topic: its id (cut to what nsqd's
    64 characters leave, no dots) and a random part, since replicas may share an id."""
    name = _NOT_IN_CHANNEL_NAMES.sub("_", worker_id)[:32]
    return f"{CANCEL_CHANNEL_PREFIX}_{name}_{os.urandom(4).hex()}{EPHEMERAL_SUFFIX}"


class Worker:
    """Consumes every queue topic of its tasks and runs the jobs in an executor.

    ``hooks`` hear of every job transition after the metrics hook, in order.
    """

    def __init__(
        self,
        config: WorkerConfig,
        tasks: Registry,
        metrics_registry: CollectorRegistry | None = None,
        hooks: Sequence[WorkerHook] = (),
    ) -> None:
        self.config = config
        self.tasks = tasks
        self.worker_id = config.worker_id or default_worker_id()
        self.metrics = WorkerMetrics(metrics_registry or CollectorRegistry())
        self.metrics.slots.set(config.concurrency)
        self.publisher = Publisher(
            config.nsqd_tcp_address, metrics=self.metrics, client_id=self.worker_id
        )
        self.executor = make_executor(config)
        self.hooks = Hooks([MetricsHook(self.metrics), *hooks])
        self.jobs = Machine(
            config, self.worker_id, tasks, self.executor, self.publisher, self.hooks
        )
        self.flow = self.jobs.flow = Flow(
            config.concurrency,
            self.jobs.used,
            adaptive=config.delivery == "adaptive" and config.delivery_buffer_ms > 0,
            switched=self._switched,
        )
        self.readers: list[Any] = self.flow.readers
        self.cancel_reader: Reader | None = None
        self.server: tornado.httpserver.HTTPServer | None = None
        self._toucher: asyncio.Task[None] | None = None

    def queues(self) -> list[str]:
        """The queue topics this worker consumes."""
        return list(self.config.queues) or self.tasks.queues()

    async def start(self) -> None:
        """Create topics, serve metrics, and subscribe (call :func:`warm_up` first)."""
        await self.executor.start()
        await self._read_nsqd_limits()
        queues = self.queues()
        idle = sorted(set(queues) - set(self.tasks.queues()))
        if idle:
            # Consumed all the same (an operator may mean it), but said: a typo in
            # NSQJOBS_QUEUES otherwise looks like a worker that gets no jobs.
            log.warning(
                "no task of this worker uses queue(s) %s (%s): a gateway with these tasks "
                "publishes nothing there, so only jobs published to it directly arrive",
                ",".join(idle),
                spelled(WorkerConfig, "queues"),
            )
        topics = [*queues, RESULTS_TOPIC, DEAD_LETTER_TOPIC, CANCEL_TOPIC]
        if any(task.track_started for task in self.tasks):
            topics.append(STARTED_TOPIC)
        for failure in await create_topics(self.config.nsqd_http_address, topics):
            log.warning("%s (continuing)", failure)
        app = observability_app(self.metrics.registry, self.ready_problems)
        self.server = tornado.httpserver.HTTPServer(app)
        with listening(self.config.host, self.config.port, spelled(WorkerConfig, "host", "port")):
            self.server.listen(self.config.port, self.config.host)
        lookupd = list(self.config.lookupd_http_address)
        self.jobs.accepting = True
        # One reader per queue; the flow gives out RDY across all their connections so that
        # what nsqd may send adds up to the free executor slots.
        buffering = self.config.delivery_buffer_ms
        for queue in queues:
            self.readers.append(
                SlotReader(
                    self.flow,
                    self.worker_id,
                    topic=queue,
                    channel=self.config.channel,
                    message_handler=self.jobs.on_message,
                    nsqd_tcp_addresses=None if lookupd else list(self.config.nsqd_tcp_address),
                    lookupd_http_addresses=lookupd or None,
                    lookupd_poll_interval=self.config.lookupd_poll_interval,
                    max_in_flight=self.config.concurrency,  # pynsq's own RDY logic is off
                    max_tries=0,  # attempts are counted by the state machine, not by pynsq
                    msg_timeout=self.config.msg_timeout_s,
                    # nsqd batches deliveries for up to that long (more jobs per second), unless
                    # the flow keeps the connection eager (adaptive); 0: never batched.
                    output_buffer_size=(
                        WORKER_OUTPUT_BUFFER_BYTES if buffering else READER_OUTPUT_BUFFER_BYTES
                    ),
                    output_buffer_timeout=buffering or READER_OUTPUT_BUFFER_TIMEOUT_MS,
                )
            )
        self.cancel_reader = Reader(
            topic=CANCEL_TOPIC,
            channel=cancel_channel(self.worker_id),
            message_handler=self.jobs.on_cancel,
            nsqd_tcp_addresses=None if lookupd else list(self.config.nsqd_tcp_address),
            lookupd_http_addresses=lookupd or None,
            lookupd_poll_interval=self.config.lookupd_poll_interval,
            max_in_flight=CANCEL_MAX_IN_FLIGHT,
            max_tries=0,
            output_buffer_size=READER_OUTPUT_BUFFER_BYTES,  # a cancel acts at once
            output_buffer_timeout=READER_OUTPUT_BUFFER_TIMEOUT_MS,
        )
        self.flow.start()
        self._toucher = asyncio.ensure_future(self._touch_running())
        log.info(
            "worker %s consuming %s on channel %s with %d %s slot(s); metrics on :%d",
            self.worker_id,
            ",".join(queues),
            self.config.channel,
            self.config.concurrency,
            self.config.executor,
            self.config.port,
        )

    def _switched(self, eager: bool) -> None:
        self.metrics.delivery_switches.labels("eager" if eager else "batched").inc()

    def ready_problems(self) -> list[str]:
        """Empty when the worker can take and finish jobs."""
        problems = []
        if not self.publisher.connected():
            problems.append("no nsqd connection for publishing results")
        for reader in [*self.readers, self.cancel_reader]:
            if reader is not None and not connected_count(reader):
                problems.append(f"not connected to any nsqd for topic {reader.topic}")
        if not self.jobs.accepting:
            problems.append("not accepting jobs (starting or draining)")
        return problems

    async def drain(self) -> int:
        """SIGTERM: RDY 0, let running jobs finish within the grace period, requeue the rest.

        Returns the number of jobs abandoned to nsqd (their executor work may still be running).
        """
        self.jobs.accepting = False
        self.flow.stop()
        running = self.jobs.watch()
        log.info(
            "draining: RDY 0 sent, %d job(s) running, grace %.1fs",
            len(running),
            self.config.grace_s,
        )
        if running:
            await asyncio.wait(running, timeout=self.config.grace_s)
        abandoned = await self.jobs.hand_back()
        if abandoned:
            log.warning("gave back %d unfinished job(s) for another worker", abandoned)
        if self._toucher is not None:
            self._toucher.cancel()
        await self._flush()
        for reader in self.readers:
            close_reader(reader)
        if self.cancel_reader is not None:  # read until now: running jobs could be cancelled
            close_reader(self.cancel_reader)
        self.publisher.close()
        if self.server is not None:
            self.server.stop()
        self.executor.shutdown()
        return abandoned

    async def _read_nsqd_limits(self) -> None:
        # The largest message nsqd takes, from nsqd itself; the setting when it cannot say.
        max_msg_size = await nsqd_limit(
            self.config.nsqd_http_address, "max_msg_size", self.config.nsqd_max_msg_size
        )
        # And the largest body (an MPUB of results coalesced in one loop turn stays under it:
        # nsqd would close the connection over a larger one, cutting off the frames behind).
        max_body_size = await nsqd_limit(
            self.config.nsqd_http_address, "max_body_size", NSQD_MAX_BODY_SIZE
        )
        self.jobs.set_max_msg_size(max_msg_size)
        self.publisher.set_limits(max_msg_size, max_body_size)

    async def _flush(self, timeout_s: float = 2.0) -> None:
        # FIN/REQ are buffered in the IOStream; closing before they are written would drop them.
        deadline = time.monotonic() + timeout_s
        while unflushed(self.readers) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    async def _touch_running(self) -> None:
        # One loop for all jobs: every third of the message timeout, TOUCH what is still running.
        while True:
            await asyncio.sleep(self.config.msg_timeout_s / 3)
            self.jobs.touch_running()


def warm_up(tasks: Registry) -> None:
    """Compile kernels now (Numba caches to disk), so the first job is not the slow one.

    Runs before any connection is made, so a bad kernel choice stops the worker cleanly.
    """
    for task in tasks:
        if task.warm_up is not None:
            started = time.perf_counter()
            task.warm_up()
            log.info("warmed up %s in %.2fs", task.name, time.perf_counter() - started)


async def serve(config: WorkerConfig, tasks: Registry, stop: asyncio.Event) -> int:
    """Run a worker until ``stop`` is set; returns the number of jobs abandoned at shutdown."""
    warm_up(tasks)
    worker = Worker(config, tasks)
    await worker.start()
    await stop.wait()
    started = time.monotonic()
    abandoned = await worker.drain()
    log.info("worker stopped in %.2fs", time.monotonic() - started)
    return abandoned
