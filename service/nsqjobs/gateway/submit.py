"""Accepting jobs, in one place: decide the id, validate, record, publish. The gateway's job
routes call nothing else, for single jobs, ``?wait=`` jobs and batches alike.

Two steps, so a ``?wait=`` request can listen for the result between them (a fast result is not
missed): :meth:`Acceptor.build` decides the id and validates; :meth:`Acceptor.publish` records
(the ``recorder`` hook, where the job ledger will write) and publishes. A job is accepted only
when nsqd has acknowledged it; anything rejected publishes nothing. Whatever nsqd would refuse
(a message over its ``--max-msg-size``, an MPUB over its ``--max-body-size``) is refused here
first, before the first publish, so one client's request never costs the shared connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from nsqjobs import wire
from nsqjobs.api import BatchJob, SubmitRequest
from nsqjobs.errors import (
    FieldError,
    InvalidArgumentsError,
    JobTooLarge,
    NsqjobsError,
    PublishError,
    UnknownTaskError,
)
from nsqjobs.gateway.bodies import integral_floats
from nsqjobs.ledger import Accepted, JobRecord, held
from nsqjobs.ledger.session import Session
from nsqjobs.names import MAX_DELAY_MS, MAX_LEDGER_DELAY_S, NSQD_MAX_BODY_SIZE
from nsqjobs.nsq.publisher import Publisher
from nsqjobs.observability.metrics import GatewayMetrics
from nsqjobs.registry import Registry, Task

# Records jobs (and, for a session, its id; their encoded envelopes) before they are
# published: None (all recorded), or per job what the ledger already had under its id
# (``nsqjobs.ledger.Store.record_accepted``).
Recorder = Callable[
    [list[wire.JobEnvelope], str | None, Sequence[bytes]],
    Awaitable[Sequence[Accepted] | None],
]
# Told the ids nsqd acknowledged, after a recorder recorded them.
Published = Callable[[list[str]], object]
# A validated job, ready to publish: its task (for the queue topic) and its envelope.
Built = tuple[Task, wire.JobEnvelope]
# No job recorded as published (see Acceptor.session).
_NONE: frozenset[str] = frozenset()
# nsqd's defaults for --max-msg-size and --max-body-size.
NSQD_MAX_MSG_SIZE = 1024 * 1024


class DuplicateIds(InvalidArgumentsError):
    """Two jobs of one batch name the same id (a conflict between valid jobs: 409)."""


class JobExists(NsqjobsError):
    """The job's id was accepted before, with the same task and args, and published: nothing
    is published again (answered 200 with the job as recorded)."""

    def __init__(self, record: JobRecord) -> None:
        super().__init__(f"job {record.id!r} exists")
        self.record = record


class IdConflict(NsqjobsError):
    """An id the ledger holds for another task or other args (409); ``fields`` name them."""

    def __init__(self, fields: list[str]) -> None:
        super().__init__(", ".join(fields))
        self.fields = fields


class BatchPartlyPublished(PublishError):
    """A batch spanning queues failed after the MPUBs of some queues were acknowledged."""

    def __init__(self, cause: PublishError, published: list[str], unpublished: list[str]) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.published = published
        self.unpublished = unpublished


class Acceptor:
    """Turns validated requests into envelopes on their queue topics."""

    def __init__(
        self,
        registry: Registry,
        publisher: Publisher,
        metrics: GatewayMetrics,
        recorder: Recorder | None = None,
        *,
        published: Published | None = None,
        session: Session | None = None,
        max_msg_size: int = NSQD_MAX_MSG_SIZE,
        max_body_size: int = NSQD_MAX_BODY_SIZE,
    ) -> None:
        self.registry = registry
        self.publisher = publisher
        self.metrics = metrics
        self.recorder = recorder
        self.published = published
        # With a session, the ledger records the jobs published now as published in the same
        # write (nothing written at nsqd's acknowledgement; a failure is marked unpublished).
        self.session = session
        # nsqd defers a message an hour at most; the ledger holds longer delays (held jobs).
        self.max_delay_s = MAX_DELAY_MS / 1000 if recorder is None else MAX_LEDGER_DELAY_S
        # nsqd's limits (the gateway reads the live values at start).
        self.max_msg_size = max_msg_size
        self.max_body_size = max_body_size

    # -- one job --------------------------------------------------------------------------------

    def build(
        self,
        req: SubmitRequest | BatchJob,
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
        args = req.args
        try:
            task.validate(args, where=f"{where}args")
        except InvalidArgumentsError:
            # 1547.0 where the schema says integer is an integer (JSON Schema's rule): sent as
            # 1547, so the worker's strict validation takes it too.
            fixed = integral_floats(args)
            if fixed is args:
                raise
            task.validate(fixed, where=f"{where}args")
            args = fixed
        due_at = None
        if req.delay_ms or req.run_at is not None:
            due_at = self._due_at(req, where, created_at)
        expires_s = req.expires_s
        if due_at is not None and expires_s is not None and expires_s <= due_at - created_at:
            # Certain to be dead-lettered as expired without running: refused instead.
            raise InvalidArgumentsError(
                [
                    FieldError(
                        f"{where or 'body.'}expires_s",
                        f"the job would expire ({expires_s:g} s after acceptance) before it "
                        f"is due ({due_at - created_at:.3g} s after): give a longer expires_s",
                    )
                ]
            )
        return task, wire.JobEnvelope(
            id=req.id or job_id or wire.new_job_id(),
            task=task.name,
            args=args,
            created_at=created_at,
            timeout_s=task.time_limit_s,
            deadline=None if req.expires_s is None else created_at + req.expires_s,
            due_at=due_at,
        )

    def _due_at(self, req: SubmitRequest | BatchJob, where: str, created_at: float) -> float | None:
        """When a delayed job is due (None: now); raises InvalidArgumentsError for a delay
        longer than nsqd defers without the ledger, or than the ledger holds with it."""
        if req.run_at is not None:
            field, due_at = "run_at", req.run_at
            if due_at <= created_at:
                return None
        else:
            field, due_at = "delay_ms", created_at + req.delay_ms / 1000
        ahead = due_at - created_at
        if ahead <= self.max_delay_s:
            return due_at
        if self.recorder is None:
            limit = f"<= {MAX_DELAY_MS}" if field == "delay_ms" else "at most 3600 s ahead"
            message = (
                f"Expected {limit} (nsqd defers a message at most an hour); longer delays are "
                "held by the job ledger: start the gateway with a ledger (NSQJOBS_LEDGER_URL)"
            )
        else:
            message = f"is {ahead:.3g} s ahead; the ledger holds at most {MAX_LEDGER_DELAY_S} s"
        raise InvalidArgumentsError([FieldError(f"{where or 'body.'}{field}", message)])

    @staticmethod
    def delay_ms(env: wire.JobEnvelope) -> int:
        """The DPUB delay of a built job (0: publish now)."""
        if env.due_at is None:
            return 0
        return max(0, round((env.due_at - env.created_at) * 1000))

    def _held(self, env: wire.JobEnvelope) -> bool:
        # As the store judges it (held() reads the job alone): never both published here and
        # by the relay, never published by neither.
        return self.recorder is not None and held(env)

    def encode(self, env: wire.JobEnvelope, where: str = "") -> bytes:
        """The envelope's bytes; :class:`JobTooLarge` when nsqd would refuse them."""
        body = wire.encode(env)
        if len(body) > self.max_msg_size:
            raise JobTooLarge(
                f"{where or 'the job'}: its envelope is {len(body)} bytes, over nsqd's "
                f"--max-msg-size of {self.max_msg_size}",
                self.max_msg_size,
                f"{where}args" if where else "args",
            )
        return body

    def publish(
        self,
        task: Task,
        env: wire.JobEnvelope,
        delay_ms: int | None = None,
        *,
        fresh_id: bool = False,
    ) -> asyncio.Future[wire.JobEnvelope]:
        """Record and publish a built job; the future resolves to the envelope once nsqd
        acknowledged it (or, for a delay beyond nsqd's, once the ledger recorded it: its relay
        publishes it when due), or to the error. ``delay_ms`` defaults to the job's own.

        A plain job without a recorder needs no coroutine: its future is the publish itself.
        With ``fresh_id`` (the id was made here, so no job in the ledger can have it) a plain job
        is recorded and published side by side, also without a coroutine (:class:`_Fresh`).
        Raises :class:`JobTooLarge` at once when nsqd would refuse the envelope.
        """
        body = self.encode(env)
        if delay_ms is None:
            delay_ms = self.delay_ms(env) if env.due_at is not None else 0
        if fresh_id and self.session is not None and not delay_ms and env.due_at is None:
            return _Fresh(self, self.session, task, env, body).done
        if self.recorder is not None or self.session is not None or delay_ms:
            return asyncio.ensure_future(self._record_and_publish(task, env, body, delay_ms))
        done: asyncio.Future[wire.JobEnvelope] = asyncio.get_running_loop().create_future()
        acked = self.publisher.enqueue(task.queue, body)
        acked.add_done_callback(functools.partial(self._acked, task, env, done))
        return done

    def submit(self, req: SubmitRequest) -> asyncio.Future[wire.JobEnvelope]:
        """:meth:`build` then :meth:`publish`, for callback code: validation errors raise now."""
        task, env = self.build(req)
        return self.publish(task, env)

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

    async def _recorded(
        self, envelopes: list[wire.JobEnvelope], bodies: Sequence[bytes]
    ) -> tuple[Sequence[Accepted] | None, int, frozenset[str]]:
        """The recorder's answers, the session's epoch, and the ids recorded as published
        (settled later by :meth:`_settle`); every other job is settled now."""
        session = self.session
        if session is None:
            assert self.recorder is not None
            return await self.recorder(envelopes, None, bodies), 0, _NONE
        epoch, recorded = session.record(envelopes, bodies)
        try:
            answers = await recorded
        except BaseException:
            session.settle(epoch, len(envelopes))
            raise
        optimistic = frozenset(e.id for e, a in zip(envelopes, answers, strict=True) if a.published)
        session.settle(epoch, len(envelopes) - len(optimistic))
        return answers, epoch, optimistic

    async def _settle(self, epoch: int, optimistic: frozenset[str], acked: list[str]) -> None:
        """After the publishes: jobs recorded as published and acknowledged are settled; the
        others (failed, unknown, or never sent) are marked unpublished, before the error
        answers (a retry with the same id then publishes again). The rest of ``acked`` is
        noted as published."""
        session = self.session
        if optimistic and session is not None:
            done = [i for i in acked if i in optimistic]
            session.settle(epoch, len(done))
            failed = optimistic.difference(done)
            if failed:
                with contextlib.suppress(NsqjobsError):
                    await session.unpublished(epoch, list(failed))
            acked = [i for i in acked if i not in optimistic]
        if self.published is not None and acked:
            self.published(acked)

    async def _record_and_publish(
        self, task: Task, env: wire.JobEnvelope, body: bytes, delay_ms: int
    ) -> wire.JobEnvelope:
        epoch, optimistic = 0, _NONE
        if self.recorder is not None or self.session is not None:
            answers, epoch, optimistic = await self._recorded([env], [body])
            if answers:
                _check_existing(answers, [env], single=True)
            if self._held(env):  # recorded: the ledger's relay publishes it when due
                self.metrics.accepted(task.name)
                return env
        try:
            if delay_ms:
                await self.publisher.dpub(task.queue, delay_ms, body)
            else:
                await self.publisher.pub(task.queue, body)
        except BaseException:
            if optimistic and self.session is not None:
                # Handed to the ledger before the error answers: a retry's record comes after.
                self.session.unpublished(epoch, [env.id])
            raise
        self.metrics.accepted(task.name)
        if optimistic and self.session is not None:
            self.session.settle(epoch, 1)
        elif self.published is not None:
            self.published([env.id])
        return env

    # -- a batch --------------------------------------------------------------------------------

    def build_batch(self, reqs: list[BatchJob]) -> list[Built]:
        """:meth:`build` every job, collecting every error, so one bad job rejects them all."""
        built: list[Built] = []
        errors: list[FieldError] = []
        duplicates: list[FieldError] = []
        seen: set[str] = set()
        ids, created_at = wire.new_job_ids(len(reqs)), wire.now()
        for i, req in enumerate(reqs):
            where = f"jobs[{i}]."
            if req.id is not None:
                if req.id in seen:
                    duplicates.append(FieldError(f"{where}id", f"id {req.id!r} is taken earlier"))
                seen.add(req.id)
            try:
                built.append(self.build(req, where, ids[i], created_at))
            except UnknownTaskError as exc:
                errors.append(FieldError(f"{where}task", str(exc)))
            except InvalidArgumentsError as exc:
                errors.extend(exc.errors)
        if errors:
            raise InvalidArgumentsError(errors + duplicates)
        if duplicates:
            raise DuplicateIds(duplicates)
        return built

    def encode_batch(self, built: list[Built]) -> tuple[dict[str, list[bytes]], list[bytes]]:
        """Each queue's MPUB bodies, in request order, and every job's body in ``built``'s
        order (for the ledger); :class:`JobTooLarge` when nsqd would refuse a message or a
        queue's MPUB, so nothing of the batch is published."""
        by_topic: dict[str, list[bytes]] = {}
        limit, encode = self.max_msg_size, wire.encode
        every = [encode(env) for _, env in built]
        for (task, env), body in zip(built, every, strict=True):
            if len(body) > limit:
                i = next(n for n, (_, e) in enumerate(built) if e is env)
                self.encode(env, f"jobs[{i}].")  # raises, naming the job
            bodies = by_topic.get(task.queue)
            if bodies is None:
                by_topic[task.queue] = [body]
            else:
                bodies.append(body)
        for topic, bodies in by_topic.items():
            size = 4 + 4 * len(bodies) + sum(map(len, bodies))  # MPUB: count, then size + body
            if size > self.max_body_size:
                raise JobTooLarge(
                    f"the batch's jobs for queue {topic!r} make an MPUB of {size} bytes, over "
                    f"nsqd's --max-body-size of {self.max_body_size}; send fewer or smaller jobs",
                    self.max_body_size,
                    "jobs",
                )
        return by_topic, every

    async def publish_batch(self, built: list[Built]) -> list[wire.JobEnvelope]:
        """Check sizes, record all, then one atomic MPUB per queue topic; the envelopes in
        request order.

        Everything that can be checked is checked before the first MPUB. A batch spanning
        queues is still one MPUB per queue: when a later one fails after an earlier one was
        acknowledged, :class:`BatchPartlyPublished` says which ids nsqd has.
        """
        by_topic, bodies = self.encode_batch(built)
        envelopes = [env for _, env in built]
        epoch, optimistic = 0, _NONE
        if self.recorder is not None or self.session is not None:
            answers, epoch, optimistic = await self._recorded(envelopes, bodies)
            if answers:
                skip = _check_existing(answers, envelopes, single=False)
                if skip:  # published before: not again
                    built = [b for b in built if b[1].id not in skip]
                    by_topic = self.encode_batch(built)[0]
        acked: list[str] = []
        try:
            await self._publish_recorded(built, by_topic, acked)
        finally:
            await self._settle(epoch, optimistic, acked)
        return envelopes

    async def _publish_recorded(
        self, built: list[Built], by_topic: dict[str, list[bytes]], acked: list[str]
    ) -> None:
        """The MPUBs and DPUBs of a recorded batch; ``acked`` gets the ids nsqd has."""
        later = [b for b in built if b[1].due_at is not None]
        if later:  # each on its own (an MPUB has no delay), or held by the ledger
            built = [b for b in built if b[1].due_at is None]
            by_topic = self.encode_batch(built)[0]
        done: list[str] = []
        for topic, bodies in by_topic.items():
            try:
                await self.publisher.mpub(topic, bodies)
            except PublishError as exc:
                if not done:
                    raise
                published = set(done)
                self._count_accepted([b for b in built if b[0].queue in published])
                acked += [env.id for task, env in built if task.queue in published]
                unpublished = [env.id for task, env in built if task.queue not in published]
                unpublished += [env.id for _, env in later]  # not sent yet
                raise BatchPartlyPublished(exc, list(acked), unpublished) from exc
            done.append(topic)
        if later:
            await self._publish_later(built, later, acked)
        self._count_accepted(built + [b for b in later if self._held(b[1])])
        acked += [env.id for _, env in built]

    def _count_accepted(self, built: list[Built]) -> None:
        """Count jobs nsqd acknowledged (or the ledger holds), by task: those of a batch
        that failed in part too (a retry skips them as published already)."""
        for name, count in Counter(task.name for task, _ in built).items():
            self.metrics.accepted(name, count)

    async def _publish_later(
        self, published: list[Built], later: list[Built], acked: list[str]
    ) -> None:
        """DPUB a batch's delayed jobs (held ones are the relay's); adds the acknowledged
        ones to ``published``; :class:`BatchPartlyPublished` when any failed (``acked`` then
        has every id nsqd has)."""
        delayed = [b for b in later if not self._held(b[1])]
        answers = await asyncio.gather(
            *(self.publisher.dpub(t.queue, self.delay_ms(e), wire.encode(e)) for t, e in delayed),
            return_exceptions=True,
        )
        failed = [e.id for (_, e), a in zip(delayed, answers, strict=True) if a is not None]
        published += [b for b, a in zip(delayed, answers, strict=True) if a is None]
        if not failed:
            return
        error = next(a for a in answers if a is not None)
        cause = error if isinstance(error, PublishError) else PublishError(str(error))
        acked += [e.id for _, e in published]
        held = [b for b in later if self._held(b[1])]
        self._count_accepted(published + held)
        accepted = list(acked) + [e.id for _, e in held]
        if not accepted:
            raise cause
        raise BatchPartlyPublished(cause, accepted, failed) from cause

    async def accept_batch(self, reqs: list[BatchJob]) -> list[wire.JobEnvelope]:
        """:meth:`build_batch` then :meth:`publish_batch`."""
        return await self.publish_batch(self.build_batch(reqs))


def _check_existing(
    answers: Sequence[Accepted], envelopes: list[wire.JobEnvelope], *, single: bool
) -> set[str]:
    """The ids to leave unpublished (accepted and published before); raises
    :class:`IdConflict`, or for a single job (``POST /v1/jobs``, not a batch of one)
    :class:`JobExists`.

    A job recorded but never known to be published (its publish failed, or is still under
    way) is published again: at least once, and the ledger keeps the first outcome; unless it
    is finished already (cancelled before it was ever published, say).
    """
    conflicts = [i for i, a in enumerate(answers) if a.kind == "conflict"]
    if conflicts:
        if single:
            raise IdConflict(["id"])
        raise IdConflict([f"jobs[{i}].id" for i in conflicts])
    now = wire.now()
    skip = {
        a.existing.id
        for a in answers
        if a.kind == "same"
        and a.existing is not None
        and (
            a.existing.published_at is not None
            or a.existing.finished_at is not None
            # held: the relay publishes it when due
            or (a.existing.due_at is not None and a.existing.due_at - now > MAX_DELAY_MS / 1000)
        )
    }
    record = answers[0].existing
    if skip and single and record is not None:
        raise JobExists(record)
    return skip


class _Fresh:
    """One job with an id made by this gateway, recorded in the ledger and published to nsqd
    side by side: an id nobody chose cannot exist, so the ledger has nothing to refuse, and
    the answer waits for both (the record durable, nsqd's OK). Were the gateway to die between
    the two, a job published but not recorded was never answered 202 (it runs, its outcome
    unknown to the ledger), and one recorded but not published is its session's to re-drive.
    """

    __slots__ = (
        "acceptor",
        "done",
        "env",
        "epoch",
        "errors",
        "optimistic",
        "pending",
        "session",
        "task",
    )

    def __init__(
        self, acceptor: Acceptor, session: Session, task: Task, env: wire.JobEnvelope, body: bytes
    ) -> None:
        self.acceptor = acceptor
        self.session = session
        self.task = task
        self.env = env
        self.done: asyncio.Future[wire.JobEnvelope] = asyncio.get_running_loop().create_future()
        self.optimistic = False  # recorded as published (settled once nsqd acknowledged)
        self.errors: list[BaseException] = []  # the record's, then the publish's
        self.pending = 2
        self.epoch, recorded = session.record([env], [body])
        recorded.add_done_callback(self._recorded)
        acceptor.publisher.enqueue(task.queue, body).add_done_callback(self._acked)

    def _recorded(self, recorded: asyncio.Future[list[Accepted]]) -> None:
        error = _error(recorded)
        if error is None:
            self.optimistic = recorded.result()[0].published
        else:
            self.errors.insert(0, error)
        if not self.optimistic:
            self.session.settle(self.epoch, 1)
        self._one_done()

    def _acked(self, acked: asyncio.Future[None]) -> None:
        error = _error(acked)
        if error is not None:
            self.errors.append(error)
        self._one_done()

    def _one_done(self) -> None:
        self.pending -= 1
        if self.pending:
            return
        acceptor, session, env, done = self.acceptor, self.session, self.env, self.done
        if self.optimistic:
            if self.errors:  # recorded as published, but nsqd did not take it: say so first
                session.unpublished(self.epoch, [env.id])
            else:
                session.settle(self.epoch, 1)
        if done.done():  # the caller gave up
            return
        if self.errors:
            done.set_exception(self.errors[0])
            return
        if not self.optimistic and acceptor.published is not None:
            acceptor.published([env.id])
        acceptor.metrics.accepted(self.task.name)
        done.set_result(env)


def _error(fut: asyncio.Future[Any]) -> BaseException | None:
    """A done future's exception (a cancellation as CancelledError), or None."""
    return asyncio.CancelledError() if fut.cancelled() else fut.exception()
