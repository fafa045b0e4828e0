"""The ledger's relay: the store's re-drive, claim, retention and stats methods; the relay with
a moved clock and a fake publisher; and the whole pipeline (gateway with the ledger, real nsqd,
worker) through an nsqd SIGKILL, a deep backlog, a job never published, long delays and
retention."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from nsqjobs import wire
from nsqjobs.api import BatchJob, SubmitRequest
from nsqjobs.config import GatewayConfig, load
from nsqjobs.errors import ConfigError, InvalidArgumentsError
from nsqjobs.gateway.submit import Acceptor, BatchPartlyPublished
from nsqjobs.ledger import SqliteStore
from nsqjobs.ledger.relay import Relay
from nsqjobs.ledger.session import Session
from nsqjobs.names import MAX_DELAY_MS
from nsqjobs.nsq.publisher import Publisher
from nsqjobs.observability.metrics import GatewayMetrics, LedgerMetrics
from nsqjobs.registry import Registry, task
from nsqjobs.testing import Daemon, Nsq, http, wait_for
from prometheus_client import CollectorRegistry

T = TypeVar("T")
HOUR = MAX_DELAY_MS / 1000


def run(path: Path, body: Callable[[SqliteStore], Awaitable[T]], **kw: Any) -> T:
    """Open a store on ``path``, run ``body`` in an event loop, close the store."""

    async def main() -> T:
        store = SqliteStore(path, **kw)
        try:
            return await asyncio.wait_for(body(store), 20)
        finally:
            store.close()

    return asyncio.run(main())


def job(job_id: str, task: str = "noop", due_at: float | None = None) -> wire.JobEnvelope:
    return wire.JobEnvelope(id=job_id, task=task, args={}, created_at=wire.now(), due_at=due_at)


def result(job_id: str, finished_at: float, status: str = "succeeded") -> wire.ResultEnvelope:
    return wire.ResultEnvelope(
        id=job_id,
        task="noop",
        status=status,  # type: ignore[arg-type]
        attempts=1,
        worker="w1",
        started_at=finished_at - 1,
        finished_at=finished_at,
        duration_s=1.0,
    )


def letter(job_id: str, at: float) -> wire.DeadLetter:
    error = wire.ErrorInfo(type="ValueError", message="bad")
    return wire.DeadLetter(reason="max_attempts", error=error, worker="w1", at=at, job=job(job_id))


def sql(path: Path, statement: str, *params: Any) -> None:
    """Change the ledger's file behind the store's back (what another gateway would do)."""
    conn = sqlite3.connect(path)
    try:
        conn.execute(statement, params)
        conn.commit()
    finally:
        conn.close()


# -- the store --------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_claims_respect_the_grace_the_lease_and_the_horizon(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        now = wire.now()
        kw: dict[str, Any] = {"grace_s": 30.0, "horizon_s": 60.0, "lease_s": 10.0, "limit": 100}
        await store.record_accepted(
            [job("plain"), job("soon", due_at=now + 600), job("later", due_at=now + 2 * HOUR)]
        )
        # The accept path may still be publishing: nothing within the grace; "later" is held.
        assert await store.claim_unpublished(now=now + 1, **kw) == []
        record = await store.get("later")
        assert record is not None and record.published_at is None
        # Past the grace: the job the accept path gave up on. "soon" (DPUB'd by the accept
        # path, not acknowledged) waits in the ledger until its horizon.
        (plain,) = await store.claim_unpublished(now=now + 31, **kw)
        assert (plain.id, plain.reason, plain.delay_ms, plain.task) == (
            "plain",
            "unpublished",
            0,
            "noop",
        )
        assert wire.decode_job(plain.body).id == "plain"
        # Claimed: no one else takes it until the lease ends, then it is tried again.
        assert await store.claim_unpublished(now=now + 32, **kw) == []
        again = await store.claim_unpublished(now=now + 42, **kw)
        assert [(c.id, c.reason) for c in again] == [("plain", "unpublished")]
        await store.mark_published(["plain"])
        # Coming due: published with what is left of the delay.
        due = await store.claim_unpublished(now=now + 560, **kw)
        assert [(c.id, c.reason) for c in due] == [("soon", "unpublished")]
        assert 39_000 <= due[0].delay_ms <= 40_000
        await store.mark_published(["soon"])
        held = await store.claim_unpublished(now=now + 2 * HOUR - 30, **kw)
        assert [(c.id, c.reason) for c in held] == [("later", "due")]
        assert 29_000 <= held[0].delay_ms <= 30_000
        # Past due: no delay left.
        sql(store.path, "UPDATE jobs SET sent_at = NULL, lease_until = NULL WHERE id = 'later'")
        late = await store.claim_unpublished(now=now + 3 * HOUR, **kw)
        assert [(c.id, c.delay_ms) for c in late] == [("later", 0)]
        record = await store.get("plain")
        assert record is not None and record.redrives == 2 and record.published_at is not None

    run(tmp_path / "l.sqlite3", body)


@pytest.mark.timeout(30)
def test_a_restart_re_drives_unfinished_jobs_sent_before_it_and_nothing_else(
    tmp_path: Path,
) -> None:
    async def body(store: SqliteStore) -> None:
        kw: dict[str, Any] = {"grace_s": 30.0, "horizon_s": 60.0, "lease_s": 10.0, "limit": 2}
        await store.record_accepted([job(f"j{i}") for i in range(5)])
        await store.mark_published([f"j{i}" for i in range(5)])
        await store.record_result(result("j0", wire.now()))  # finished: never re-driven
        sent = wire.now()
        # An nsqd that started before these were sent lost none of them.
        assert await store.redrive_sent_before(sent - 100) == 0
        assert await store.redrive_sent_before(sent + 1) == 4
        assert await store.redrive_sent_before(sent + 1) == 0  # once per loss
        # Claimed at once (no grace: the nsqd is known to have lost them), oldest first.
        first = await store.claim_unpublished(now=sent + 2, **kw)
        second = await store.claim_unpublished(now=sent + 2, **kw)
        assert [c.id for c in first + second] == ["j1", "j2", "j3", "j4"]
        assert {c.reason for c in first + second} == {"nsqd_restart"}
        # A replayed job (as the api's replay leaves it) is claimed at once, as a replay.
        sql(
            store.path,
            "UPDATE jobs SET published_at = NULL, sent_at = NULL, replays = 1 WHERE id = 'j0'",
        )
        sql(store.path, "UPDATE jobs SET status = 'queued', finished_at = NULL WHERE id = 'j0'")
        (replayed,) = await store.claim_unpublished(now=sent + 3, **kw)
        assert (replayed.id, replayed.reason) == ("j0", "replay")
        record = await store.get("j1")
        assert record is not None and record.redrives == 1

    run(tmp_path / "l.sqlite3", body)


@pytest.mark.timeout(30)
def test_retention_prunes_finished_jobs_but_not_dead_ones(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        await store.record_accepted([job(f"j{i}") for i in range(6)])
        for i in range(4):
            await store.record_result(result(f"j{i}", 1000.0 + i))
        await store.record_dead_letter(letter("j4", 1000.0))
        # Recorded now: nothing is old enough, whatever the workers' finished_at says.
        assert await store.prune_finished(wire.now() - 60, 100) == 0
        # As if the ledger had recorded each when it finished: pruned in that order.
        sql(store.path, "UPDATE jobs SET recorded_at = finished_at")
        assert await store.prune_finished(1002.0, 100) == 2  # j0, j1
        assert await store.prune_finished(5000.0, 1) == 1  # the limit holds
        assert await store.prune_finished(5000.0, 100) == 1
        left = [j.id for j in (await store.list_jobs()).jobs]
        assert left == ["j4", "j5"]  # dead, and unfinished

    run(tmp_path / "l.sqlite3", body)


@pytest.mark.timeout(30)
def test_stats_count_by_status_and_the_oldest_runnable_job(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        empty = await store.stats()
        assert set(empty.by_status.values()) == {0} and empty.oldest_unfinished_at is None
        now = wire.now()
        await store.record_accepted([job("far", due_at=now + 3 * HOUR)])
        # Only a job not yet due: "oldest" lies ahead (its age is 0).
        far = await store.stats()
        assert far.oldest_unfinished_at == pytest.approx(now + 3 * HOUR)
        await store.record_accepted([job("a"), job("b"), job("c")])
        await store.record_result(result("a", now))
        await store.record_result(result("b", now, "failed"))
        stats = await store.stats()
        assert stats.by_status == {
            "queued": 2,
            "running": 0,
            "succeeded": 1,
            "failed": 1,
            "dead": 0,
            "cancelled": 0,
        }
        assert (
            stats.oldest_unfinished_at is not None and now <= stats.oldest_unfinished_at < now + 5
        )

    run(tmp_path / "l.sqlite3", body)


@pytest.mark.timeout(30)
def test_the_first_terminal_outcome_wins(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        await store.record_accepted([job("a"), job("b"), job("c")])
        # A failed result, then the dead letter of the same attempt: one outcome, dead.
        assert await store.record_result(result("a", 1000.0, "failed")) == "recorded"
        assert await store.record_dead_letter(letter("a", 1000.0)) == "recorded"
        a = await store.get("a")
        assert a is not None and (a.status, a.finished_at, a.dead_at) == ("dead", 1000.0, 1000.0)
        # A success first: a later dead letter (another delivery) is a duplicate.
        assert await store.record_result(result("b", 1000.0)) == "recorded"
        assert await store.record_dead_letter(letter("b", 1000.0)) == "duplicate"
        # A dead letter first: a failed result from another run is a duplicate, and so is a
        # success.
        assert await store.record_dead_letter(letter("c", 1000.0)) == "recorded"
        assert await store.record_result(result("c", 1500.0, "failed")) == "duplicate"
        assert await store.record_result(result("c", 1600.0)) == "duplicate"
        c = await store.get("c")
        assert c is not None and (c.status, c.finished_at, c.result) == ("dead", 1000.0, None)

    run(tmp_path / "l.sqlite3", body)


@pytest.mark.timeout(30)
def test_every_commit_is_timed(tmp_path: Path) -> None:
    seen: list[float] = []

    async def body(store: SqliteStore) -> None:
        await asyncio.gather(*(store.record_accepted([job(f"j{i}")]) for i in range(50)))
        await store.mark_published(["j1"])

    run(tmp_path / "l.sqlite3", body, observe_write=seen.append)
    assert len(seen) == 2 and all(0 < s < 5 for s in seen)


# -- the relay, with a fake publisher and a clock that moves ----------------------------------


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int, str]] = []  # topic, delay_ms, job id
        self.fail = False

    def connected(self) -> int:
        return 1

    def enqueue(self, topic: str, body: bytes) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail:
            fut.set_exception(ConnectionError("nsqd is down"))
        else:
            self.sent.append((topic, 0, wire.decode_job(body).id))
            fut.set_result(None)
        return fut

    async def dpub(self, topic: str, delay_ms: int, body: bytes) -> None:
        if self.fail:
            raise ConnectionError("nsqd is down")
        self.sent.append((topic, delay_ms, wire.decode_job(body).id))

    async def pub(self, topic: str, body: bytes) -> None:
        await self.enqueue(topic, body)

    async def mpub(self, topic: str, bodies: list[bytes]) -> None:
        self.sent.extend((topic, 0, wire.decode_job(body).id) for body in bodies)


class Clock:
    def __init__(self) -> None:
        self.now = wire.now()

    def __call__(self) -> float:
        return self.now


def noop_registry() -> Registry:
    tasks = Registry()

    @task("noop", target=tasks)
    def noop(args: dict[str, Any]) -> None:
        return None

    return tasks


def relay_for(
    store: SqliteStore, start_times: dict[str, int], clock: Clock, **kw: Any
) -> tuple[Relay, FakePublisher, CollectorRegistry]:
    registry = CollectorRegistry()

    async def read_start_time(address: str, timeout_s: float) -> int:
        return start_times[address]

    publisher = FakePublisher()
    relay = Relay(
        store,
        publisher,
        noop_registry(),
        LedgerMetrics(registry),
        list(start_times),
        clock=clock,
        read_start_time=read_start_time,
        **{"grace_s": 5.0, "lease_s": 10.0, "prune_every_s": 0.0, **kw},
    )
    return relay, publisher, registry


def redrives(registry: CollectorRegistry, reason: str) -> float:
    return registry.get_sample_value("nsqjobs_ledger_redrives_total", {"reason": reason}) or 0.0


@pytest.mark.timeout(30)
def test_a_backlog_is_never_re_driven_but_a_restart_re_drives_it(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        clock = Clock()
        start_times = {"nsqd:4151": int(clock.now) - 10}
        relay, publisher, metrics = relay_for(store, start_times, clock)
        await store.record_accepted([job(f"j{i}") for i in range(30)])
        await store.mark_published([f"j{i}" for i in range(30)])
        # Ten minutes of backlog, polled every second: no evidence of loss, no re-drive.
        for _ in range(5):
            clock.now += 120
            await relay.tick()
        assert publisher.sent == [] and relay.problem is None
        assert sum(redrives(metrics, r) for r in ("nsqd_restart", "unpublished", "due")) == 0
        age = metrics.get_sample_value("nsqjobs_ledger_oldest_unfinished_age_seconds")
        assert age is not None and age >= 590
        assert metrics.get_sample_value("nsqjobs_ledger_jobs", {"status": "queued"}) == 30
        # nsqd restarted: every unfinished job is published again, once.
        await store.record_result(result("j0", clock.now))
        start_times["nsqd:4151"] = int(clock.now) + 1
        clock.now += 2
        await relay.tick()
        assert sorted(i for _, _, i in publisher.sent) == sorted(f"j{i}" for i in range(1, 30))
        assert {(t, d) for t, d, _ in publisher.sent} == {("jobs", 0)}
        assert redrives(metrics, "nsqd_restart") == 29 and redrives(metrics, "unpublished") == 0
        for _ in range(3):
            clock.now += 60
            await relay.tick()
        assert len(publisher.sent) == 29
        record = await store.get("j5")
        assert record is not None and record.published_at is not None and record.redrives == 1

    run(tmp_path / "l.sqlite3", body)


@pytest.mark.timeout(30)
def test_failed_publishes_unknown_tasks_and_long_delays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(store: SqliteStore) -> None:
        clock = Clock()
        relay, publisher, metrics = relay_for(store, {}, clock, horizon_s=60.0)
        await store.record_accepted(
            [
                job("lost"),
                job("alien", task="no.such.task"),
                job("later", due_at=clock.now + 2 * HOUR),
            ]
        )
        await relay.tick()
        assert publisher.sent == []  # within the grace
        publisher.fail = True
        clock.now += 6
        with caplog.at_level(logging.WARNING, "nsqjobs.ledger"):
            await relay.tick()
        assert "1 of 1 publish(es) failed" in caplog.text
        assert caplog.text.count("no.such.task") == 1
        publisher.fail = False
        clock.now += 5  # the claim has not expired yet
        await relay.tick()
        assert publisher.sent == []
        clock.now += 6
        with caplog.at_level(logging.WARNING, "nsqjobs.ledger"):
            await relay.tick()
        assert publisher.sent == [("jobs", 0, "lost")] and redrives(metrics, "unpublished") == 1
        assert caplog.text.count("no.such.task") == 1  # said once
        alien = await store.get("alien")
        assert alien is not None and alien.status == "queued" and alien.published_at is None
        # Two hours on, the held job is published with what is left of its delay.
        clock.now = wire.now() + 2 * HOUR - 20
        await relay.tick()
        assert [(i, 19_000 <= d <= 21_000) for _, d, i in publisher.sent[1:]] == [("later", True)]
        assert redrives(metrics, "due") == 1

    run(tmp_path / "l.sqlite3", body)


@pytest.mark.timeout(30)
def test_the_relay_prunes_past_the_retention_and_wakes_on_a_kick(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        clock = Clock()
        relay, publisher, metrics = relay_for(store, {}, clock, result_ttl_s=3600.0, poll_s=30.0)
        await store.record_accepted([job("done"), job("dead")])
        await store.record_result(result("done", clock.now))
        await store.record_dead_letter(letter("dead", clock.now))
        await relay.tick()
        assert await store.get("done") is not None
        clock.now += 3601
        await relay.tick()
        assert await store.get("done") is None and await store.get("dead") is not None
        assert metrics.get_sample_value("nsqjobs_ledger_jobs", {"status": "dead"}) == 1
        assert metrics.get_sample_value("nsqjobs_ledger_jobs", {"status": "succeeded"}) == 0
        # A replay is published at once: kick() wakes a relay that polls every 30 s.
        ticks = relay.ticks
        relay.start()
        try:
            deadline = time.monotonic() + 10
            while relay.ticks == ticks and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # its first pass, then nothing for 30 s
            sql(
                store.path,
                "UPDATE jobs SET status = 'queued', finished_at = NULL, "
                "published_at = NULL, sent_at = NULL, replays = 1 WHERE id = 'dead'",
            )
            relay.kick()
            # Counted once the publish is acknowledged and noted in the ledger.
            deadline = time.monotonic() + 10
            while not redrives(metrics, "replay") and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert publisher.sent == [("jobs", 0, "dead")] and redrives(metrics, "replay") == 1
        finally:
            await relay.stop()

    run(tmp_path / "l.sqlite3", body)


@pytest.mark.timeout(30)
def test_a_ledger_that_cannot_be_written_makes_the_gateway_unready(tmp_path: Path) -> None:
    async def body(store: SqliteStore) -> None:
        relay, _, _ = relay_for(store, {}, Clock())
        await relay.tick()
        assert relay.problem is None
        store.close()
        await relay.tick()
        assert relay.problem is not None and "closed" in relay.problem

    run(tmp_path / "l.sqlite3", body)


# -- long delays at the accept path ------------------------------------------------------------


def acceptor(ledger: bool) -> tuple[Acceptor, FakePublisher, list[str]]:
    recorded: list[str] = []

    async def recorder(
        envs: list[wire.JobEnvelope], session: str | None, bodies: Sequence[bytes]
    ) -> None:
        assert list(bodies) == [wire.encode(env) for env in envs]
        recorded.extend(env.id for env in envs)

    publisher = FakePublisher()
    accept = Acceptor(
        noop_registry(),
        cast(Publisher, publisher),
        GatewayMetrics(CollectorRegistry()),
        recorder if ledger else None,
    )
    return accept, publisher, recorded


@pytest.mark.timeout(30)
def test_delays_beyond_an_hour_need_the_ledger_which_holds_them() -> None:
    async def scenario() -> None:
        now = wire.now()
        plain, published, _ = acceptor(ledger=False)
        for req, field in (
            (SubmitRequest(task="noop", delay_ms=int(2 * HOUR * 1000)), "body.delay_ms"),
            (SubmitRequest(task="noop", run_at=now + 2 * HOUR), "body.run_at"),
        ):
            with pytest.raises(InvalidArgumentsError) as refused:
                plain.submit(req)
            (error,) = refused.value.errors
            assert error.field == field and "ledger" in error.message
        soon = await plain.submit(SubmitRequest(task="noop", run_at=now + 60))
        past = await plain.submit(SubmitRequest(task="noop", run_at=now - 60))
        assert soon.due_at == now + 60 and past.due_at is None
        assert [(round(d / 1000), i) for _, d, i in published.sent] == [(60, soon.id), (0, past.id)]

        ledger, published, recorded = acceptor(ledger=True)
        held = await ledger.submit(SubmitRequest(task="noop", run_at=now + 2 * HOUR))
        longer = await ledger.submit(SubmitRequest(task="noop", delay_ms=int(3 * HOUR * 1000)))
        assert recorded == [held.id, longer.id] and published.sent == []  # the relay's
        assert held.due_at == now + 2 * HOUR
        with pytest.raises(InvalidArgumentsError, match="at most"):
            ledger.submit(SubmitRequest(task="noop", run_at=now + 400 * 86400))
        # A batch: due now in the MPUB, due soon on its own with DPUB, held not at all.
        jobs = await ledger.accept_batch(
            [
                BatchJob(task="noop", id="now"),
                BatchJob(task="noop", id="soon", run_at=now + 30),
                BatchJob(task="noop", id="far", run_at=now + 2 * HOUR),
            ]
        )
        assert [j.id for j in jobs] == ["now", "soon", "far"]
        assert recorded[2:] == ["now", "soon", "far"]
        assert [(i, round(d / 1000)) for _, d, i in published.sent] == [("now", 0), ("soon", 30)]
        # A DPUB refused: the batch is partly accepted (the MPUB'd and the held jobs).
        published.fail = True
        with pytest.raises(BatchPartlyPublished) as partly:
            await ledger.accept_batch(
                [
                    BatchJob(task="noop", id="now-2"),
                    BatchJob(task="noop", id="soon-2", run_at=now + 30),
                    BatchJob(task="noop", id="far-2", run_at=now + 2 * HOUR),
                ]
            )
        assert (partly.value.published, partly.value.unpublished) == (
            ["now-2", "far-2"],
            ["soon-2"],
        )

    asyncio.run(scenario())


def test_the_relay_settings_are_validated() -> None:
    config = load(GatewayConfig, environ={"NSQJOBS_RESULT_TTL": "60", "NSQJOBS_LEDGER_POLL_S": "2"})
    assert (config.result_ttl, config.ledger_poll_s, config.ledger_grace_s) == (60, 2, 30)
    for environ, message in (
        ({"NSQJOBS_LEDGER_GRACE_S": "1"}, "--ledger-grace-s / NSQJOBS_LEDGER_GRACE_S: must be >="),
        ({"NSQJOBS_LEDGER_POLL_S": "0"}, "NSQJOBS_LEDGER_POLL_S: must be 0.01-60"),
        ({"NSQJOBS_RESULT_TTL": "-1"}, "--result-ttl / NSQJOBS_RESULT_TTL: must be 0"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load(GatewayConfig, environ=environ)


# -- the whole pipeline: gateway with the ledger, real nsqd, worker ----------------------------

FAST = {
    "NSQJOBS_LEDGER_POLL_S": "0.2",
    "NSQJOBS_LEDGER_GRACE_S": "1",
    "NSQJOBS_PUBLISH_TIMEOUT_S": "1",
}


def gateway_with_ledger(daemons: Callable[..., Daemon], nsq: Nsq, path: Path, **env: str) -> Daemon:
    return daemons("gateway", nsq, NSQJOBS_LEDGER_URL=f"sqlite:///{path}", **{**FAST, **env})


def record_of(gateway: Daemon, job_id: str) -> dict[str, Any] | None:
    code, _, body = http("GET", f"{gateway.url}/v1/jobs/{job_id}")
    assert code in (200, 404), body
    return body if code == 200 else None


def outcome(gateway: Daemon, job_id: str, status: str = "succeeded") -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        record = record_of(gateway, job_id)
        return record if record is not None and record["status"] == status else None

    return wait_for(check, 45, f"job {job_id} {status} in the ledger")


def submit(gateway: Daemon, body: dict[str, Any], expect: int = 202) -> dict[str, Any]:
    code, _, answer = http("POST", f"{gateway.url}/v1/jobs", body)
    assert code == expect, answer
    assert isinstance(answer, dict)
    return answer


def redriven(gateway: Daemon, reason: str) -> float:
    return gateway.metric("nsqjobs_ledger_redrives_total", reason=reason)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_jobs_lost_in_an_nsqd_sigkill_are_re_driven_and_all_run(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway = gateway_with_ledger(daemons, nsq, tmp_path / "ledger.sqlite3")
    worker = daemons("worker", nsq)
    worker.pause()  # the jobs wait in nsqd's memory (two of them in flight to the worker)
    ids = [f"k{i}" for i in range(20)]
    for job_id in ids:
        submit(gateway, {"id": job_id, "task": "noop"})
    assert nsq.message_count("jobs") == 20
    nsq.stop_nsqd(kill=True)
    nsq.start_nsqd()  # same ports, same data directory: its memory is gone
    worker.resume()
    for job_id in ids:
        outcome(gateway, job_id)
    # Every job the worker had not finished was published again, for the restart alone.
    assert 18 <= redriven(gateway, "nsqd_restart") <= 20
    assert redriven(gateway, "unpublished") == redriven(gateway, "due") == 0
    assert nsq.message_count("jobs") >= 18


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_a_backlog_behind_a_paused_worker_is_not_re_driven(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway = gateway_with_ledger(daemons, nsq, tmp_path / "ledger.sqlite3")
    worker = daemons("worker", nsq)
    worker.pause()
    ids = [f"b{i}" for i in range(20)]
    for job_id in ids:
        submit(gateway, {"id": job_id, "task": "noop"})
    # The relay polls on while the backlog is three graces old.
    age = "nsqjobs_ledger_oldest_unfinished_age_seconds"
    wait_for(lambda: gateway.metric(age) >= 3, 30, "a backlog three seconds old")
    assert gateway.metric("nsqjobs_ledger_jobs", status="queued") == 20
    worker.resume()
    for job_id in ids:
        outcome(gateway, job_id)
    for reason in ("nsqd_restart", "unpublished", "due", "replay"):
        assert redriven(gateway, reason) == 0, reason
    assert nsq.message_count("jobs") == 20
    wait_for(lambda: gateway.metric(age) == 0, 10, "no unfinished job left")


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_jobs_recorded_but_never_published_are_published_by_the_relay(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    path = tmp_path / "ledger.sqlite3"
    # A gateway that died between recording a job and publishing it left this behind.
    run(path, lambda store: store.record_accepted([job("orphan")]))
    gateway = gateway_with_ledger(daemons, nsq, path)
    daemons("worker", nsq)
    assert outcome(gateway, "orphan")["published_at"] is not None
    # nsqd paused past the publish timeout: the accept path gives up (503, outcome unknown).
    assert nsq.nsqd is not None
    nsq.nsqd.pause()
    try:
        submit(gateway, {"id": "stalled", "task": "noop"}, expect=503)
        # A job whose id the gateway makes is recorded and published side by side: the same.
        fresh = submit(gateway, {"task": "noop"}, expect=503)["id"]
    finally:
        nsq.nsqd.resume()
    # They run: from the publish nsqd took in after all, or else from the relay's, past the
    # grace; either way each outcome is recorded once.
    outcome(gateway, "stalled")
    outcome(gateway, fresh)
    assert redriven(gateway, "unpublished") >= 1 and redriven(gateway, "nsqd_restart") == 0


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_long_delays_are_held_in_the_ledger_and_run_when_due(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = daemons("gateway", nsq)
    problem = submit(plain, {"task": "noop", "run_at": time.time() + 2 * HOUR}, expect=422)
    assert "ledger" in problem["detail"] and problem["errors"][0]["field"] == "body.run_at"

    path = tmp_path / "ledger.sqlite3"
    gateway = gateway_with_ledger(daemons, nsq, path)
    run_at = time.time() + 2 * HOUR
    answer = submit(gateway, {"id": "in-2h", "task": "noop", "run_at": run_at})
    assert answer["due_at"] == pytest.approx(run_at)
    answer = submit(gateway, {"id": "in-3h", "task": "noop", "delay_ms": int(3 * HOUR * 1000)})
    assert answer["due_at"] == pytest.approx(time.time() + 3 * HOUR, abs=30)
    both = {"task": "noop", "run_at": run_at, "delay_ms": 5}
    assert submit(gateway, both, expect=422)["errors"][0]["field"] == "body.run_at"
    record = record_of(gateway, "in-2h")
    assert record is not None and record["published_at"] is None
    assert record["due_at"] == pytest.approx(run_at)
    gateway.stop()

    # Accepted an hour ago, due in a few seconds: what a restarted gateway finds in its ledger.
    due = time.time() + 4
    monkeypatch.setattr(wire, "now", lambda: time.time() - HOUR)
    run(path, lambda store: store.record_accepted([job("due-soon", due_at=due)]))
    monkeypatch.undo()
    restarted = gateway_with_ledger(daemons, nsq, path)
    daemons("worker", nsq)
    done = outcome(restarted, "due-soon")
    assert done["finished_at"] >= due - 0.5  # the worker defers a job that comes early
    assert redriven(restarted, "due") == 1
    # The far ones stay in the ledger, unpublished, across the restart.
    assert nsq.message_count("jobs") == 1
    for job_id in ("in-2h", "in-3h"):
        record = record_of(restarted, job_id)
        assert record is not None and record["status"] == "queued"
        assert record["published_at"] is None


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_retention_prunes_finished_jobs_and_keeps_dead_ones(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway = gateway_with_ledger(daemons, nsq, tmp_path / "ledger.sqlite3", NSQJOBS_RESULT_TTL="1")
    daemons("worker", nsq, NSQJOBS_MAX_ATTEMPTS="1")
    submit(gateway, {"id": "ok", "task": "noop"})
    submit(gateway, {"id": "bad", "task": "debug.fail", "args": {"mode": "error"}})
    outcome(gateway, "bad", "dead")
    wait_for(lambda: record_of(gateway, "ok") is None, 30, "the finished job pruned")
    assert outcome(gateway, "bad", "dead")["dead_reason"] == "max_attempts"
    assert gateway.metric("nsqjobs_ledger_jobs", status="dead") == 1


@pytest.mark.timeout(30)
def test_a_job_held_by_the_gateway_is_never_left_marked_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A delay just over nsqd's hour from the job's acceptance is under it by a clock read a
    # few ms later, when the store writes. The store must judge it held as the gateway does
    # (which publishes nothing for a held job), not record it as published in the live
    # session: no relay would ever publish it (a 202, then nothing).
    async def body(store: SqliteStore) -> None:
        session = Session(store)
        assert await store.beat_session(session.id, session.clock() - 1, session.clock())
        publisher = FakePublisher()
        accept = Acceptor(
            noop_registry(),
            cast(Publisher, publisher),
            GatewayMetrics(CollectorRegistry()),
            store.record_accepted,
            session=session,
        )
        created = wire.now()
        env = wire.JobEnvelope(
            id="edge", task="noop", args={}, created_at=created, due_at=created + HOUR + 0.005
        )
        # The store writes 10 ms after the acceptance (a busy writer).
        monkeypatch.setattr(wire, "now", lambda: created + 0.010)
        assert await accept.publish(accept.registry.get("noop"), env) == env
        monkeypatch.undo()
        assert publisher.sent == []
        got = await store.get("edge")
        assert got is not None and got.published_at is None  # the relay's to publish
        assert session.settled
        claimed = await store.claim_unpublished(
            now=created + HOUR - 1, grace_s=0.0, horizon_s=HOUR, lease_s=60.0, limit=10
        )
        assert [c.id for c in claimed] == ["edge"]

    run(tmp_path / "l.sqlite3", body)
