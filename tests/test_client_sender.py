"""Issue 12: ``Client.sender()``, single-job submits that return at once and are sent in
batches by one background thread, against a real gateway, nsqd and worker: every job accepted
and run once, far fewer requests than jobs, an invalid job reported by ``flush`` without failing
its neighbours, a lost answer retried with the same ids, backpressure, several threads."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from nsqjobs import Client
from nsqjobs.client import (
    GatewayUnreachable,
    IdConflict,
    InvalidArguments,
    Job,
    NotAccepted,
    RetryPolicy,
    Sender,
    SenderStopped,
    UnknownTask,
)
from nsqjobs.errors import ConfigError
from nsqjobs.testing import Daemon, Nsq, free_port

from tests.test_client import stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class Recording(httpx.BaseTransport):
    """Sends every request on and records each job submission as (path, ids, status), status
    0 for an answer lost. ``hold``: the first submission waits for it before going out (so
    the jobs submitted meanwhile gather into one batch). ``lose_first_batch``: the first
    ``POST /v1/jobs/batch`` reaches the gateway, but its answer is lost (a connection reset).
    ``partial_first_batch``: only the first half of the first batch reaches the gateway, and
    the answer says so (503 ``partially-accepted``, as when one queue's MPUB of a batch failed).
    ``fail``: every request raises it (a fault that is no transport error)."""

    def __init__(
        self,
        *,
        hold: threading.Event | None = None,
        lose_first_batch: bool = False,
        partial_first_batch: bool = False,
        fail: Exception | None = None,
    ) -> None:
        self.inner = httpx.HTTPTransport()
        self.hold = hold
        self.lose_first_batch = lose_first_batch
        self.partial_first_batch = partial_first_batch
        self.fail = fail
        self.posts: list[tuple[str, list[str], int]] = []
        self.bodies: dict[str, dict[str, Any]] = {}  # the last body sent, by job id

    def close(self) -> None:
        self.inner.close()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.fail is not None:
            raise self.fail
        path = request.url.path
        if request.method != "POST" or path not in ("/v1/jobs", "/v1/jobs/batch"):
            return self.inner.handle_request(request)
        hold, self.hold = self.hold, None
        if hold is not None:
            assert hold.wait(30), "the test never released the first submission"
        body = json.loads(request.content)
        jobs = body["jobs"] if path == "/v1/jobs/batch" else [body]
        ids = [job["id"] for job in jobs]
        self.bodies.update(zip(ids, jobs, strict=True))
        if path == "/v1/jobs/batch" and self.partial_first_batch:
            self.partial_first_batch = False
            return self._in_part(request, jobs)
        response = self.inner.handle_request(request)
        if path == "/v1/jobs/batch" and self.lose_first_batch:
            self.lose_first_batch = False
            response.read()
            response.close()
            self.posts.append((path, ids, 0))
            raise httpx.ReadError("connection reset after the batch was sent", request=request)
        self.posts.append((path, ids, response.status_code))
        return response

    def _in_part(self, request: httpx.Request, jobs: list[dict[str, Any]]) -> httpx.Response:
        half = len(jobs) // 2
        headers = {k: v for k, v in request.headers.items() if k.lower() != "content-length"}
        part = httpx.Request("POST", request.url, headers=headers, json={"jobs": jobs[:half]})
        answer = self.inner.handle_request(part)
        answer.read()
        answer.close()
        assert answer.status_code == 202
        ids = [job["id"] for job in jobs]
        self.posts.append(("/v1/jobs/batch", ids, 503))
        problem = {
            "type": "urn:nsqjobs:problem:partially-accepted",
            "status": 503,
            "detail": "nsqd acknowledged the jobs of some queues of this batch",
            "accepted_ids": ids[:half],
            "unaccepted_ids": ids[half:],
        }
        return httpx.Response(
            503, json=problem, headers={"Content-Type": "application/problem+json"}
        )

    def batches(self) -> list[list[str]]:
        """The ids of every batch sent, answered or not."""
        return [ids for path, ids, _ in self.posts if path == "/v1/jobs/batch"]


def runs(tmp_path: Path) -> Counter[str]:
    """How often ``debug.chaos`` ran with each key (the worker's executions log)."""
    log = tmp_path / "runs.log"
    return Counter(log.read_text().split() if log.exists() else [])


def all_done(client: Client, jobs: list[Job]) -> dict[str, Any]:
    """Every job's result, by id, waiting up to 60 s; fails if any did not succeed."""
    answer = client.wait([job.id for job in jobs], timeout=60)
    assert not answer.pending and not answer.unknown, (answer.pending, answer.unknown)
    assert {o.status for o in answer.done} == {"succeeded"}
    return {o.id: o.result for o in answer.done}


def chaos_keys_ran_once(tmp_path: Path, keys: list[str]) -> None:
    """Each of ``keys`` ran exactly once (called once their results are in: a job's log line
    is written before its result goes out)."""
    counted = runs(tmp_path)
    assert {k: counted[k] for k in keys} == dict.fromkeys(keys, 1)


# -- no gateway needed --------------------------------------------------------------------------


def test_bad_settings_are_refused() -> None:
    with Client(f"http://127.0.0.1:{free_port()}") as client:
        for bad in ({"max_batch": 0}, {"max_batch": 1001}, {"max_pending": 0}):
            with pytest.raises(ConfigError):
                client.sender(**bad)


def test_submit_after_close_raises_and_close_stops_the_thread() -> None:
    with Client(f"http://127.0.0.1:{free_port()}") as client:
        sender = client.sender()
        assert isinstance(sender, Sender)
        sender.close()
        sender.close()  # twice is fine
        with pytest.raises(SenderStopped, match="closed"):
            sender.submit("noop", {})
        assert not sender._thread.is_alive()
        with client.sender() as inside:
            pass
        with pytest.raises(SenderStopped):
            inside.submit("noop", {})
        # Arguments JSON cannot hold raise in the caller, at once.
        with client.sender() as sender, pytest.raises(TypeError):
            sender.submit("noop", {"x": object()})


def test_jobs_that_cannot_be_sent_are_reported_and_never_lost() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with Client(url, retry=RetryPolicy(deadline_s=0)) as client:
        sender = client.sender()
        jobs = [sender.submit("noop", {"i": i}) for i in range(30)]
        with pytest.raises(NotAccepted) as caught:
            sender.flush(timeout=30)
        assert sorted(i for i, _ in caught.value.failures) == sorted(j.id for j in jobs)
        assert all(isinstance(e, GatewayUnreachable) for _, e in caught.value.failures)
        assert (sender.accepted, sender.refused, sender.pending) == (0, 30, 0)
        sender.flush(timeout=30)  # each failure is reported once
        # A block that raised keeps its exception; what close found is a note on it.
        with pytest.raises(ValueError, match="the block's own") as block, client.sender() as s:
            s.submit("noop", {})
            raise ValueError("the block's own")
        assert any("NotAccepted" in note for note in block.value.__notes__)
        assert not s._thread.is_alive()


def test_a_failure_of_the_thread_surfaces_at_the_next_submit_and_flush() -> None:
    transport = Recording(fail=RuntimeError("a bug"))
    with Client(f"http://127.0.0.1:{free_port()}", transport=transport) as client:
        sender = client.sender()
        job = sender.submit("noop", {})
        with pytest.raises(SenderStopped) as flushed:
            sender.flush(timeout=30)
        assert isinstance(flushed.value.__cause__, RuntimeError)
        assert flushed.value.unsettled_ids == [job.id]
        with pytest.raises(SenderStopped, match="a bug"):
            sender.submit("noop", {})
        with pytest.raises(SenderStopped):
            sender.close()
        assert not sender._thread.is_alive()


# -- against a real stack -----------------------------------------------------------------------


def test_many_single_submits_go_in_few_batches_and_each_job_runs_once(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway, _ = stack(nsq, daemons, tmp_path, ledger=False)
    transport = Recording()
    keys = [f"many-{i}" for i in range(2000)]
    with Client(gateway.url, transport=transport) as client:
        with client.sender() as sender:
            jobs = [sender.submit("debug.chaos", {"key": key}) for key in keys]
            sender.flush(timeout=60)
            assert (sender.accepted, sender.refused, sender.pending) == (2000, 0, 0)
        assert len({job.id for job in jobs}) == 2000
        assert jobs[0].result(timeout=30) == {"key": keys[0]}
        assert jobs[-1].result(timeout=30) == {"key": keys[-1]}
        results = all_done(client, jobs)
    assert [results[job.id] for job in jobs] == [{"key": key} for key in keys]
    chaos_keys_ran_once(tmp_path, keys)
    sent = [i for _, ids, _ in transport.posts for i in ids]
    assert sorted(sent) == sorted(job.id for job in jobs)  # each sent once
    assert {status for _, _, status in transport.posts} <= {202}
    assert len(transport.posts) < 2000 / 10, len(transport.posts)
    assert max(map(len, transport.batches())) > 10


def test_an_invalid_job_is_reported_and_its_neighbours_are_accepted(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway, _ = stack(nsq, daemons, tmp_path, ledger=False)
    release = threading.Event()
    transport = Recording(hold=release)
    keys = [f"good-{i}" for i in range(200)]
    with Client(gateway.url, transport=transport) as client:
        sender = client.sender()
        first = sender.submit("debug.chaos", {"key": "first"})  # held: the rest gathers
        good: list[Job] = []
        for i, key in enumerate(keys):
            good.append(sender.submit("debug.chaos", {"key": key}))
            if i == 50:
                unknown = sender.submit("no.such.task", {})
            if i == 150:
                invalid = sender.submit("primes.count", {"start": "zero", "stop": 10})
            if i == 100:
                delayed = sender.submit("debug.chaos", {"key": "delayed"}, delay=0.2)
        release.set()
        with pytest.raises(NotAccepted) as caught:
            sender.flush(timeout=60)
        failures = dict(caught.value.failures)
        assert sorted(failures) == sorted([unknown.id, invalid.id]), caught.value
        assert isinstance(failures[unknown.id], UnknownTask)
        assert isinstance(failures[invalid.id], InvalidArguments)
        assert [e.field for e in failures[invalid.id].errors] == ["args.start"]
        assert (sender.accepted, sender.refused) == (202, 2)
        sender.close()  # the failures were reported: nothing left to raise
        results = all_done(client, [first, delayed, *good])
    assert [results[j.id] for j in good] == [{"key": key} for key in keys]
    chaos_keys_ran_once(tmp_path, ["first", "delayed", *keys])
    # The batch was refused whole (422), split, and each bad job was finally sent alone.
    assert any(status == 422 for path, _, status in transport.posts if path.endswith("batch"))
    alone = {ids[0]: status for path, ids, status in transport.posts if path == "/v1/jobs"}
    assert (alone[unknown.id], alone[invalid.id]) == (404, 422)
    assert alone[delayed.id] == 202 and transport.bodies[delayed.id]["delay_ms"] == 200
    assert len(transport.posts) < 60, len(transport.posts)


def test_a_lost_batch_answer_is_retried_with_the_same_ids_and_each_job_runs_once(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway, _ = stack(nsq, daemons, tmp_path)  # the ledger dedupes the retried ids
    release = threading.Event()
    transport = Recording(lose_first_batch=True)
    keys = [f"lost-{i}" for i in range(300)]
    with Client(gateway.url, transport=transport) as client:
        taken = client.submit("noop", {"n": 1}, id="taken")
        transport.hold = release
        with client.sender() as sender:
            first = sender.submit("debug.chaos", {"key": "lost-first"})
            jobs = [sender.submit("debug.chaos", {"key": key}) for key in keys]
            # One id twice: never in one batch (the gateway would refuse it as duplicate-id);
            # the ledger takes it once. An id the ledger holds for other args: refused alone.
            twins = [sender.submit("debug.chaos", {"key": "twin"}, id="twin") for _ in (1, 2)]
            conflict = sender.submit("noop", {"n": 2}, id="taken")
            release.set()
            with pytest.raises(NotAccepted) as caught:
                sender.flush(timeout=60)
            assert [(i, type(e)) for i, e in caught.value.failures] == [("taken", IdConflict)]
            assert conflict.id == "taken" and taken.result(timeout=30) == {"n": 1}
        results = all_done(client, [first, *jobs, twins[0]])
    assert [results[job.id] for job in jobs] == [{"key": key} for key in keys]
    chaos_keys_ran_once(tmp_path, ["lost-first", "twin", *keys])
    lost, retried = transport.batches()[:2]
    assert lost == retried and len(lost) > 1
    statuses = [status for path, _, status in transport.posts if path.endswith("batch")]
    assert statuses[:2] == [0, 202]  # lost, then accepted (the ledger had every job)


def test_a_partly_accepted_batch_sends_only_the_rest_again(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway, _ = stack(nsq, daemons, tmp_path, ledger=False)
    release = threading.Event()
    transport = Recording(hold=release, partial_first_batch=True)
    keys = [f"part-{i}" for i in range(400)]
    with Client(gateway.url, transport=transport) as client:
        with client.sender() as sender:
            jobs = [sender.submit("debug.chaos", {"key": key}) for key in keys]
            release.set()
        assert (sender.accepted, sender.refused) == (400, 0)
        all_done(client, jobs)
    chaos_keys_ran_once(tmp_path, keys)
    # The request after the partial answer holds exactly the jobs it named unaccepted.
    at = next(n for n, (_, _, status) in enumerate(transport.posts) if status == 503)
    partial, resent = transport.posts[at][1], transport.posts[at + 1][1]
    assert resent == partial[len(partial) // 2 :] and len(partial) > 1


def test_backpressure_bounds_the_pending_jobs_without_deadlock(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway, _ = stack(nsq, daemons, tmp_path, ledger=False)
    release = threading.Event()
    transport = Recording(hold=release)
    with Client(gateway.url, transport=transport) as client:
        sender = client.sender(max_batch=2, max_pending=5)
        jobs = [sender.submit("noop", {"i": i}) for i in range(5)]  # the first one is held
        assert sender.pending == 5
        blocked = threading.Event()

        def one_more() -> None:
            jobs.append(sender.submit("noop", {"i": 5}))
            blocked.set()

        thread = threading.Thread(target=one_more)
        thread.start()
        # A bounded negative check: the sixth submit waits for room while nothing settles.
        assert not blocked.wait(0.3)
        release.set()
        thread.join(30)
        assert blocked.is_set()
        seen: list[int] = []
        for i in range(6, 300):
            jobs.append(sender.submit("noop", {"i": i}))
            seen.append(sender.pending)
        sender.close()
        assert max(seen) <= 5 and sender.accepted == 300
        results = all_done(client, jobs)
    assert sorted(r["i"] for r in results.values()) == list(range(300))
    assert max(len(ids) for _, ids, _ in transport.posts) == 2


def test_several_threads_submit_through_one_sender(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway, _ = stack(nsq, daemons, tmp_path, ledger=False)
    jobs: list[Job] = []
    errors: list[BaseException] = []
    with Client(gateway.url) as client:
        sender = client.sender(max_pending=500)

        def submit(t: int) -> None:
            try:
                mine = [sender.submit("debug.chaos", {"key": f"t{t}-{i}"}) for i in range(250)]
                jobs.extend(mine)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=submit, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == [] and len(jobs) == 2000
        sender.close()
        assert (sender.accepted, sender.refused) == (2000, 0)
        all_done(client, jobs)
    chaos_keys_ran_once(tmp_path, [f"t{t}-{i}" for t in range(8) for i in range(250)])


def test_a_handle_asks_the_gateway_only_once_its_job_was_sent(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    # With the ledger, the gateway answers "unknown" for an id it does not hold yet: a handle
    # used before its sender sent the job waits for the send instead.
    gateway, _ = stack(nsq, daemons, tmp_path)
    hold = threading.Event()
    with (
        Client(gateway.url, transport=Recording(hold=hold)) as client,
        client.sender() as sender,
    ):
        job = sender.submit("debug.chaos", {"key": "held"})
        with pytest.raises(TimeoutError, match="not yet sent"):
            job.outcome(timeout=0.2)  # the send is held: not UnknownJob
        hold.set()
        assert job.status() in ("queued", "running", "succeeded")
        assert job.result(timeout=30) == {"key": "held"}
        again = sender.submit("debug.chaos", {"key": "at-once"})
        assert again.result(timeout=30) == {"key": "at-once"}  # right after submit
    chaos_keys_ran_once(tmp_path, ["held", "at-once"])
