"""Accepting a job, in one place: validate, record, publish. The gateway calls nothing else.

A job is accepted only when nsqd has acknowledged it; anything rejected publishes nothing.
The ``recorder`` hook is where the job ledger will write before publishing.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from collections.abc import Awaitable, Callable

from nsqjobs import wire
from nsqjobs.api import SubmitRequest
from nsqjobs.errors import FieldError, InvalidArgumentsError, UnknownTaskError
from nsqjobs.nsq.publisher import Publisher
from nsqjobs.observability.metrics import GatewayMetrics
from nsqjobs.registry import Registry, Task

Recorder = Callable[[list[wire.JobEnvelope]], Awaitable[None]]


class Acceptor:
    """Turns validated requests into envelopes on their queue topics."""

    def __init__(
        self,
        registry: Registry,
        publisher: Publisher,
        metrics: GatewayMetrics,
        recorder: Recorder | None = None,
    ) -> None:
        self.registry = registry
        self.publisher = publisher
        self.metrics = metrics
        self.recorder = recorder

    def build(
        self,
        req: SubmitRequest,
        where: str = "",
        job_id: str | None = None,
        created_at: float | None = None,
    ) -> tuple[Task, wire.JobEnvelope]:
        """Validate one request and build its envelope; raises Unknown/InvalidArguments."""
        if created_at is None:
            created_at = wire.now()
        task = self.registry.get(req.task)
        # Validated, but sent as given: the worker validates the same data again, and the client's
        # JSON is already plain data (no second conversion on the hot path).
        task.validate(req.args, where=f"{where}args")
        return task, wire.JobEnvelope(
            id=req.id or job_id or wire.new_job_id(),
            task=task.name,
            args=req.args,
            created_at=created_at,
            timeout_s=task.time_limit_s,
            deadline=None if req.expires_s is None else created_at + req.expires_s,
        )

    async def accept(self, req: SubmitRequest) -> wire.JobEnvelope:
        """Validate, record and publish one job; returns once nsqd acknowledged it."""
        return await self.submit(req)

    def submit(self, req: SubmitRequest) -> asyncio.Future[wire.JobEnvelope]:
        """:meth:`accept` for callback code: validates now (raising Unknown/InvalidArguments),
        then the future resolves to the envelope once nsqd acknowledged it, or to the error.

        A plain job without a recorder needs no coroutine: its future is the publish itself.
        """
        task, env = self.build(req)
        if self.recorder is not None or req.delay_ms:
            return asyncio.ensure_future(self._record_and_publish(task, env, req.delay_ms))
        done: asyncio.Future[wire.JobEnvelope] = asyncio.get_running_loop().create_future()
        acked = self.publisher.enqueue(task.queue, wire.encode(env))
        acked.add_done_callback(functools.partial(self._acked, task, env, done))
        return done

    def _acked(
        self,
        task: Task,
        env: wire.JobEnvelope,
        done: asyncio.Future[wire.JobEnvelope],
        acked: asyncio.Future[None],
    ) -> None:
        if done.done():  # the caller gave up
            return
        if acked.cancelled():
            done.cancel()
            return
        error = acked.exception()
        if error is not None:
            done.set_exception(error)
            return
        self.metrics.accepted(task.name)
        done.set_result(env)

    async def _record_and_publish(
        self, task: Task, env: wire.JobEnvelope, delay_ms: int
    ) -> wire.JobEnvelope:
        if self.recorder is not None:
            await self.recorder([env])
        body = wire.encode(env)
        if delay_ms:
            await self.publisher.dpub(task.queue, delay_ms, body)
        else:
            await self.publisher.pub(task.queue, body)
        self.metrics.accepted(task.name)
        return env

    def build_batch(self, reqs: list[SubmitRequest]) -> list[tuple[Task, wire.JobEnvelope]]:
        """Validate a whole batch, collecting every error, so one bad job rejects it all."""
        built: list[tuple[Task, wire.JobEnvelope]] = []
        errors: list[FieldError] = []
        seen: set[str] = set()
        ids, created_at = wire.new_job_ids(len(reqs)), wire.now()
        for i, req in enumerate(reqs):
            where = f"jobs[{i}]."
            if req.delay_ms:
                errors.append(
                    FieldError(
                        f"{where}delay_ms",
                        "delays are not supported in a batch (MPUB has none); "
                        "submit delayed jobs one by one",
                    )
                )
                continue
            if req.id is not None:
                if req.id in seen:
                    errors.append(FieldError(f"{where}id", f"duplicate id {req.id!r} in batch"))
                seen.add(req.id)
            try:
                built.append(self.build(req, where, ids[i], created_at))
            except UnknownTaskError as exc:
                errors.append(FieldError(f"{where}task", str(exc)))
            except InvalidArgumentsError as exc:
                errors.extend(exc.errors)
        if errors:
            raise InvalidArgumentsError(errors)
        return built

    async def accept_batch(self, reqs: list[SubmitRequest]) -> list[wire.JobEnvelope]:
        """Validate all, record all, then one atomic MPUB per queue topic."""
        built = self.build_batch(reqs)
        envelopes = [env for _, env in built]
        if self.recorder is not None:
            await self.recorder(envelopes)
        by_topic: dict[str, list[bytes]] = {}
        for task, env in built:
            by_topic.setdefault(task.queue, []).append(wire.encode(env))
        for topic, bodies in by_topic.items():
            await self.publisher.mpub(topic, bodies)
        for name, count in Counter(task.name for task, _ in built).items():
            self.metrics.accepted(name, count)
        return envelopes
