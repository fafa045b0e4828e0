"""Accepting jobs, in one place: decide the id, validate, record, publish. The gateway's job
routes call nothing else, for single jobs, ``?wait=`` jobs and batches alike.

Two steps, so a ``?wait=`` request can listen for the result between them (a fast result is not
missed): :meth:`Acceptor.build` decides the id and validates; :meth:`Acceptor.publish` records
(the ``recorder`` hook, where the job ledger will write) and publishes. A job is accepted only
when nsqd has acknowledged it; anything rejected publishes nothing.
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
# A validated job, ready to publish: its task (for the queue topic) and its envelope.
Built = tuple[Task, wire.JobEnvelope]


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

    # -- one job --------------------------------------------------------------------------------

    def build(
        self,
        req: SubmitRequest,
        where: str = "",
        job_id: str | None = None,
        created_at: float | None = None,
    ) -> Built:
        """Decide the job's id (the client's, else ``job_id``, else a new one), validate, and
        build the envelope; raises Unknown/InvalidArguments. The only place ids are decided."""
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

    def publish(
        self, task: Task, env: wire.JobEnvelope, delay_ms: int = 0
    ) -> asyncio.Future[wire.JobEnvelope]:
        """Record and publish a built job; the future resolves to the envelope once nsqd
        acknowledged it, or to the error.

        A plain job without a recorder needs no coroutine: its future is the publish itself.
        """
        if self.recorder is not None or delay_ms:
            return asyncio.ensure_future(self._record_and_publish(task, env, delay_ms))
        done: asyncio.Future[wire.JobEnvelope] = asyncio.get_running_loop().create_future()
        acked = self.publisher.enqueue(task.queue, wire.encode(env))
        acked.add_done_callback(functools.partial(self._acked, task, env, done))
        return done

    def submit(self, req: SubmitRequest) -> asyncio.Future[wire.JobEnvelope]:
        """:meth:`build` then :meth:`publish`, for callback code: validation errors raise now."""
        task, env = self.build(req)
        return self.publish(task, env, req.delay_ms)

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

    # -- a batch --------------------------------------------------------------------------------

    def build_batch(self, reqs: list[SubmitRequest]) -> list[Built]:
        """:meth:`build` every job, collecting every error, so one bad job rejects them all."""
        built: list[Built] = []
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

    async def publish_batch(self, built: list[Built]) -> list[wire.JobEnvelope]:
        """Record all, then one atomic MPUB per queue topic; the envelopes in request order."""
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

    async def accept_batch(self, reqs: list[SubmitRequest]) -> list[wire.JobEnvelope]:
        """:meth:`build_batch` then :meth:`publish_batch`."""
        return await self.publish_batch(self.build_batch(reqs))
