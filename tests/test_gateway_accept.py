"""One accept path for single jobs, ``?wait=`` jobs and batches: ids, deadlines, and recording
before publishing, checked on the envelopes nsqd really holds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, cast

import pytest
from nsqjobs import wire
from nsqjobs.api import BatchJob, SubmitRequest
from nsqjobs.errors import JobTooLarge, PublishError, PublishTimeout
from nsqjobs.gateway.submit import Acceptor, BatchPartlyPublished, DuplicateIds
from nsqjobs.nsq.publisher import Publisher
from nsqjobs.observability.metrics import GatewayMetrics
from nsqjobs.registry import Registry, task
from nsqjobs.testing import Daemon, Nsq, Tail, http
from prometheus_client import CollectorRegistry

NOOP = {"task": "noop", "args": {}}


def envelopes(tail: Tail, n: int) -> dict[str, wire.JobEnvelope]:
    """The next ``n`` job envelopes on the tailed topic, by id."""
    bodies = tail.collect(n, 10.0)
    assert len(bodies) == n, bodies
    jobs = [wire.decode_job(body) for body in bodies]
    return {job.id: job for job in jobs}


@pytest.mark.integration
def test_every_kind_of_submission_decides_ids_and_deadlines_alike(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[[Nsq, str, str], Tail]
) -> None:
    gw = daemons("gateway", nsq)
    tail = tails(nsq, "jobs", "audit")  # subscribed first: every job from now on is kept
    jobs = gw.url + "/v1/jobs"

    status, _, plain = http("POST", jobs, {**NOOP, "expires_s": 120})
    assert status == 202 and plain["id"]
    # No worker runs, so ?wait= times out into a 202: with the client's id, or with a new one.
    status, _, mine = http("POST", jobs + "?wait=0.05", {**NOOP, "id": "client-1"})
    assert (status, mine["id"]) == (202, "client-1")
    status, _, theirs = http("POST", jobs + "?wait=0.05", {**NOOP, "expires_s": 30})
    assert status == 202 and theirs["id"] not in (plain["id"], "client-1")
    batch: list[dict[str, Any]] = [
        {"task": "noop", "args": {"i": i}} | ({"id": f"mine-{i}"} if i % 2 else {})
        for i in range(6)
    ]
    batch[4]["expires_s"] = 60
    status, _, answer = http("POST", gw.url + "/v1/jobs/batch", {"jobs": batch})
    assert status == 202
    ids: list[str] = answer["ids"]
    assert [ids[1], ids[3], ids[5]] == ["mine-1", "mine-3", "mine-5"]
    assert len(set(ids) | {plain["id"], "client-1", theirs["id"]}) == 9

    held = envelopes(tail, 9)
    assert set(held) == {*ids, plain["id"], "client-1", theirs["id"]}
    # Batch ids are answered in request order.
    assert [held[job_id].args for job_id in ids] == [{"i": i} for i in range(6)]
    # expires_s becomes the envelope's deadline, single or batched; absent, there is none.
    for job_id, expires in ((plain["id"], 120), (theirs["id"], 30), (ids[4], 60)):
        env = held[job_id]
        assert env.deadline == pytest.approx(env.created_at + expires), env
    assert held["client-1"].deadline is None and held[ids[0]].deadline is None


@pytest.mark.integration
def test_wait_with_a_client_id_answers_the_result_of_that_id(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[[Nsq, str, str], Tail]
) -> None:
    tail = tails(nsq, "jobs", "audit")
    daemons("worker", nsq)
    gw = daemons("gateway", nsq)
    status, _, result = http(
        "POST", gw.url + "/v1/jobs?wait=20", {"task": "noop", "args": {"n": 1}, "id": "known-7"}
    )
    assert status == 200, result
    assert (result["id"], result["status"], result["result"]) == ("known-7", "succeeded", {"n": 1})
    status, _, result = http("POST", gw.url + "/v1/jobs?wait=20", NOOP)
    assert status == 200 and result["status"] == "succeeded"
    assert set(envelopes(tail, 2)) == {"known-7", result["id"]}


# -- the accept path as a unit, on a fake publisher ------------------------------------------------


class FakePublisher:
    """Records what would be published, in order, with every ``recorder`` call interleaved."""

    def __init__(self, log: list[tuple[str, Any]]) -> None:
        self.log = log

    def enqueue(self, topic: str, body: bytes) -> asyncio.Future[None]:
        self.log.append(("pub", wire.decode_job(body).id))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def pub(self, topic: str, body: bytes) -> None:
        self.log.append(("pub", wire.decode_job(body).id))

    async def dpub(self, topic: str, delay_ms: int, body: bytes) -> None:
        self.log.append(("dpub", wire.decode_job(body).id))

    async def mpub(self, topic: str, bodies: list[bytes]) -> None:
        self.log.append(("mpub", [wire.decode_job(b).id for b in bodies]))


def make_acceptor(log: list[tuple[str, Any]], *, record: bool) -> Acceptor:
    reg = Registry()

    @task("demo.echo", target=reg)
    def echo(args: dict[str, Any]) -> dict[str, Any]:
        return args

    async def recorder(
        envs: list[wire.JobEnvelope], session: str | None, bodies: Sequence[bytes]
    ) -> None:
        assert [wire.decode_job(b) for b in bodies] == envs
        log.append(("record", [env.id for env in envs]))

    publisher = cast(Publisher, FakePublisher(log))
    metrics = GatewayMetrics(CollectorRegistry())
    return Acceptor(reg, publisher, metrics, recorder if record else None)


def test_the_accept_path_records_before_it_publishes() -> None:
    log: list[tuple[str, Any]] = []
    acceptor = make_acceptor(log, record=True)

    async def scenario() -> None:
        one = await acceptor.submit(SubmitRequest(task="demo.echo", id="a"))
        later = await acceptor.submit(SubmitRequest(task="demo.echo", delay_ms=5))
        many = await acceptor.accept_batch(
            [BatchJob(task="demo.echo"), BatchJob(task="demo.echo", id="b")]
        )
        assert one.id == "a" and many[1].id == "b"
        assert log == [
            ("record", ["a"]),
            ("pub", "a"),
            ("record", [later.id]),
            ("dpub", later.id),
            ("record", [many[0].id, "b"]),
            ("mpub", [many[0].id, "b"]),
        ]

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert (
        acceptor.metrics.registry.get_sample_value(
            "nsqjobs_jobs_accepted_total", {"task": "demo.echo"}
        )
        == 4
    )


def test_the_plain_hot_path_publishes_without_a_coroutine() -> None:
    log: list[tuple[str, Any]] = []
    acceptor = make_acceptor(log, record=False)

    async def scenario() -> None:
        accepted = acceptor.submit(SubmitRequest(task="demo.echo", expires_s=5))
        assert not isinstance(accepted, asyncio.Task)  # the publish's own future
        env = await accepted
        assert env.deadline == pytest.approx(env.created_at + 5)
        assert log == [("pub", env.id)]
        with pytest.raises(DuplicateIds):
            acceptor.build_batch([BatchJob(task="demo.echo", id="x")] * 2)
        assert log == [("pub", env.id)]  # a rejected batch publishes nothing

    asyncio.run(asyncio.wait_for(scenario(), 10))


# -- issue 8: sizes before publishing, and what a batch spanning queues leaves behind ------------


class FailingPublisher(FakePublisher):
    """MPUBs to ``fail`` raise ``error``; the rest are recorded."""

    def __init__(self, log: list[tuple[str, Any]], fail: str, error: PublishError) -> None:
        super().__init__(log)
        self.fail = fail
        self.error = error

    async def mpub(self, topic: str, bodies: list[bytes]) -> None:
        if topic == self.fail:
            raise self.error
        await super().mpub(topic, bodies)


def two_queue_acceptor(publisher: FakePublisher) -> Acceptor:
    reg = Registry()

    @task("demo.first", queue="first", target=reg)
    def first(args: dict[str, Any]) -> None: ...

    @task("demo.second", queue="second", target=reg)
    def second(args: dict[str, Any]) -> None: ...

    return Acceptor(
        reg, cast(Publisher, publisher), GatewayMetrics(CollectorRegistry()), max_msg_size=2048
    )


@pytest.mark.parametrize("error", [PublishError("closed"), PublishTimeout("no answer")])
def test_a_batch_failing_after_its_first_queue_says_which_ids_nsqd_has(error: PublishError) -> None:
    log: list[tuple[str, Any]] = []
    acceptor = two_queue_acceptor(FailingPublisher(log, "second", error))
    jobs = [
        BatchJob(task="demo.first", id="a"),
        BatchJob(task="demo.second", id="b"),
        BatchJob(task="demo.first", id="c"),
    ]

    async def scenario() -> None:
        with pytest.raises(BatchPartlyPublished) as caught:
            await acceptor.accept_batch(jobs)
        assert (caught.value.published, caught.value.unpublished) == (["a", "c"], ["b"])
        assert caught.value.cause is error
        assert log == [("mpub", ["a", "c"])]
        # The jobs nsqd has are counted accepted (a retry skips them as published).
        accepted = acceptor.metrics.jobs_accepted
        assert accepted.labels("demo.first").value == 2
        assert accepted.labels("demo.second").value == 0

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_sizes_are_checked_before_the_first_publish() -> None:
    log: list[tuple[str, Any]] = []
    acceptor = two_queue_acceptor(FakePublisher(log))
    acceptor.max_body_size = 4096
    big = BatchJob(task="demo.second", args={"pad": "x" * 3000})

    async def scenario() -> None:
        with pytest.raises(JobTooLarge) as caught:  # one message over nsqd's --max-msg-size
            await acceptor.accept_batch([BatchJob(task="demo.first"), big])
        assert (caught.value.limit, caught.value.field) == (2048, "jobs[1].args")
        with pytest.raises(JobTooLarge) as caught:  # the second queue's MPUB over its body size
            await acceptor.accept_batch(
                [BatchJob(task="demo.first")]
                + [BatchJob(task="demo.second", args={"pad": "x" * 1500})] * 3
            )
        assert (caught.value.limit, caught.value.field) == (4096, "jobs")
        with pytest.raises(JobTooLarge):  # a single job, before its PUB
            acceptor.submit(SubmitRequest(task="demo.first", args={"pad": "x" * 3000}))
        assert log == []
        env = await acceptor.submit(SubmitRequest(task="demo.first", delay_ms=1500))
        assert env.due_at == pytest.approx(env.created_at + 1.5)  # when a delayed job is due

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_a_listener_hears_its_result_in_the_turn_it_arrives(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from types import SimpleNamespace

    from nsqjobs.config import GatewayConfig
    from nsqjobs.gateway.waiting import Outcome, ResultWaiter

    def result(job_id: str, value: int) -> SimpleNamespace:
        env = wire.ResultEnvelope(
            id=job_id,
            task="noop",
            status="succeeded",
            result=value,
            attempts=1,
            worker="w",
            started_at=0.0,
            finished_at=0.0,
            duration_s=0.0,
        )
        return SimpleNamespace(id=b"m", body=wire.encode(env))

    def broken(outcome: Outcome) -> None:
        raise RuntimeError("a listener's bug")

    async def scenario() -> tuple[list[Any], Any]:
        waiter = ResultWaiter(GatewayConfig(), GatewayMetrics(CollectorRegistry()))
        heard: list[Any] = []
        fut = waiter.register("j1")
        waiter.listen("j1", broken)
        waiter.listen("j1", heard.append)
        waiter.listen("j2", heard.append)
        waiter.forget("j2", heard.append)
        waiter._on_message(result("j1", 7))
        heard_at_once = [o.result for o in heard]  # no loop turn has run since
        waiter._on_message(result("j2", 8))  # nobody listens any more
        await asyncio.sleep(0)
        return heard_at_once + [o.result for o in heard], fut.result()

    heard, awaited = asyncio.run(scenario())
    assert heard == [7, 7]  # once, at once; the forgotten listener heard nothing
    assert awaited.result == 7  # the future beside them still resolves
    assert "a listener of j1 failed" in caplog.text
