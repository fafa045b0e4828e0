"""Issue 11: the Python client (``nsqjobs.Client``, ``nsqjobs.AsyncClient``) against a real
gateway, nsqd and worker (a SQLite ledger where the test needs one): every problem type as its
exception, retries that keep the job's id (the job runs once), ``map`` in order with bounded
jobs in flight, sync and async; and ``POST /v1/jobs/wait``, the route that waits for many."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from nsqjobs import AsyncClient, Client, InvalidArgumentsError, UnknownTaskError
from nsqjobs.client import (
    PROBLEMS,
    AlreadyFinished,
    BadQuery,
    BadRequest,
    DuplicateId,
    Forbidden,
    GatewayError,
    GatewayUnreachable,
    IdConflict,
    InvalidArguments,
    MalformedJson,
    MethodNotAllowed,
    NotDead,
    NotFound,
    OutcomeUnknown,
    PayloadTooLarge,
    RetryPolicy,
    TaskFailed,
    Unauthorized,
    UnknownJob,
    UnknownTask,
    UnsupportedMediaType,
    core,
)
from nsqjobs.client.core import check
from nsqjobs.client.problems import problem_error
from nsqjobs.errors import ConfigError
from nsqjobs.names import (
    ENV_API_TOKEN,
    ENV_DEBUG_EXECUTIONS_LOG,
    ENV_GATEWAY_URL,
    MAX_WAIT_IDS,
)
from nsqjobs.testing import Daemon, Nsq, free_port, http, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parent.parent
TOKEN = "client-token-0123456789abcdef"
HEAVY = ("tornado", "nsq", "numba", "httptools", "uvloop", "prometheus_client", "asyncpg")


def stack(
    nsq: Nsq,
    daemons: Callable[..., Daemon],
    tmp_path: Path,
    *,
    ledger: bool = True,
    **env: str,
) -> tuple[Daemon, Daemon]:
    """A gateway (with a SQLite ledger unless told not to) and a worker."""
    if ledger:
        env["NSQJOBS_LEDGER_URL"] = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    gateway = daemons("gateway", nsq, **env)
    worker = daemons("worker", nsq, **{ENV_DEBUG_EXECUTIONS_LOG: str(tmp_path / "runs.log")})
    return gateway, worker


def executions(tmp_path: Path, key: str) -> int:
    """How often ``debug.chaos`` ran with ``key``."""
    log = tmp_path / "runs.log"
    return log.read_text().split().count(key) if log.exists() else 0


# -- no stack ---------------------------------------------------------------------------------


def test_the_client_imports_without_the_runtime(tmp_path: Path) -> None:
    # PYTHONPATH stays: the interpreter must load this tree's nsqjobs, not an installed one.
    code = textwrap.dedent(
        f"""
        import json, sys
        import nsqjobs
        light = "httpx" not in sys.modules
        from nsqjobs import Client, AsyncClient
        from nsqjobs.client import InvalidArguments
        with Client("http://127.0.0.1:9") as client:
            pass
        heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        print(json.dumps([light, heavy, Client.__module__, AsyncClient.__module__]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    light, heavy, sync, aio = json.loads(done.stdout)
    assert light, "`import nsqjobs` alone loaded httpx"
    assert heavy == []
    assert (sync, aio) == ("nsqjobs.client.sync", "nsqjobs.client.aio")


def test_a_class_for_every_problem_type_the_runtime_answers() -> None:
    # Every slug in the source: Problem(status, "slug", ...) and the HTTP layer's own table.
    source = "\n".join(
        p.read_text()
        for p in (ROOT / "service" / "nsqjobs").rglob("*.py")
        if "client" not in p.parts
    )
    slugs = set(re.findall(r'Problem\(\s*\d{3},\s*"([a-z-]+)"', source))
    slugs |= set(re.findall(r'\d{3}: \("([a-z-]+)",', source))
    assert {"outcome-unknown", "invalid-arguments", "headers-too-large"} <= slugs
    assert slugs == set(PROBLEMS), slugs ^ set(PROBLEMS)
    for slug, cls in PROBLEMS.items():
        body = {"type": f"urn:nsqjobs:problem:{slug}", "status": 400, "detail": "why"}
        body["errors"] = [{"field": "args.n", "message": "bad"}]
        error = problem_error(400, body, "2")
        assert type(error) is cls and error.slug == slug
        assert (error.status, error.detail, error.retry_after) == (400, "why", 2.0)
        assert [(e.field, e.message) for e in error.errors] == [("args.n", "bad")]
    assert issubclass(InvalidArguments, InvalidArgumentsError)
    assert issubclass(UnknownTask, UnknownTaskError)
    # An unknown type, or no problem at all: the root class, still with the status.
    other = problem_error(418, {"type": "urn:x:teapot", "detail": "short and stout"})
    assert type(other) is GatewayError and other.status == 418
    assert type(problem_error(500, "<html>")) is GatewayError
    # A proxy's 502-504 (no problem of ours): no replica reached, tried again.
    for status in (502, 503, 504):
        proxy = problem_error(status, "<html>")
        assert type(proxy) is GatewayUnreachable and proxy.status == status and proxy.retryable


def test_url_and_token_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_GATEWAY_URL, "http://gw.example:8081/")
    monkeypatch.setenv(ENV_API_TOKEN, "from-the-environment")
    with Client() as client:
        assert (client.url, client.token) == ("http://gw.example:8081", "from-the-environment")
    with Client("http://other:1", "given") as client:
        assert (client.url, client.token) == ("http://other:1", "given")
    monkeypatch.delenv(ENV_GATEWAY_URL)
    monkeypatch.delenv(ENV_API_TOKEN)
    with Client() as client:
        assert (client.url, client.token) == ("http://127.0.0.1:8080", "")


def test_an_unreachable_gateway_is_retried_until_the_deadline() -> None:
    port = free_port()  # nothing listens there
    with Client(f"http://127.0.0.1:{port}", retry=RetryPolicy(deadline_s=0.5)) as client:
        started = time.monotonic()
        with pytest.raises(GatewayUnreachable) as caught:
            client.submit("noop", {})
        took = time.monotonic() - started
    assert 0.4 < took < 5, took
    assert caught.value.status == 0 and f"127.0.0.1:{port}" in str(caught.value)


def test_a_wait_gives_up_on_an_unreachable_gateway_by_its_own_timeout() -> None:
    # The retry policy alone would try for 30 s: the caller's timeout ends the retries sooner.
    port = free_port()  # nothing listens there
    with Client(f"http://127.0.0.1:{port}") as client:
        job = client.job("some-job")
        for call in (lambda: job.result(timeout=0.5), lambda: client.wait(["a"], timeout=0.5)):
            started = time.monotonic()
            with pytest.raises(GatewayUnreachable):
                call()
            took = time.monotonic() - started
            assert took < 5, took


def test_a_client_refuses_bad_numbers_when_made() -> None:
    bad: list[dict[str, Any]] = [
        {"timeout_s": None},
        {"timeout_s": 0},
        {"timeout_s": float("nan")},
        {"long_poll_s": -1},
        {"long_poll_s": float("inf")},
        {"max_connections": 0},
        {"max_connections": 2.5},
    ]
    for kwargs in bad:
        with pytest.raises(ConfigError, match=next(iter(kwargs))):
            Client("http://127.0.0.1:1", **kwargs)
        with pytest.raises(ConfigError, match=next(iter(kwargs))):
            AsyncClient("http://127.0.0.1:1", **kwargs)


# -- against a real stack ---------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_the_readmes_client_examples_run_as_written(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    # Each ```python block of the README's "Python client" section, as a user would paste it,
    # against a local stack with the ledger (status and cancel need it).
    gateway, _ = stack(nsq, daemons, tmp_path)
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Python client")
    section = readme[start : readme.index("\n## ", start + 5)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) >= 2
    env = {**os.environ, ENV_GATEWAY_URL: gateway.url}
    for block in blocks:
        done = subprocess.run(
            [sys.executable, "-c", block], env=env, capture_output=True, text=True, timeout=150
        )
        assert done.returncode == 0, block + done.stderr[-3000:]


def test_every_reachable_problem_becomes_its_exception(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway, _ = stack(nsq, daemons, tmp_path, NSQJOBS_API_TOKENS=TOKEN)
    with Client(gateway.url, "") as anonymous, pytest.raises(Unauthorized) as no_token:
        anonymous.submit("noop", {})
    assert no_token.value.status == 401
    with Client(gateway.url, "wrong-token-0123456789") as stranger, pytest.raises(Forbidden):
        stranger.submit("noop", {})
    client = Client(gateway.url, TOKEN)
    with pytest.raises(UnknownTaskError) as unknown:  # caught as the runtime's own error
        client.submit("no.such.task", {})
    assert isinstance(unknown.value, UnknownTask) and unknown.value.task == "no.such.task"
    with pytest.raises(InvalidArgumentsError) as invalid:
        client.submit("primes.count", {"start": 5, "stop": -1})
    assert isinstance(invalid.value, InvalidArguments) and invalid.value.status == 422
    assert [e.field for e in invalid.value.errors] == ["args.stop"]
    with pytest.raises(UnknownJob) as no_job:
        client.job("never-submitted").status()
    assert no_job.value.job_id == "never-submitted"
    done = client.submit("noop", {"n": 1}, id="finished-1")
    assert done.result(timeout=30) == {"n": 1} and done.status() == "succeeded"
    with pytest.raises(AlreadyFinished):
        done.cancel()
    with pytest.raises(IdConflict) as conflict:
        client.submit("noop", {"n": 2}, id="finished-1")
    assert conflict.value.errors
    with pytest.raises(NotDead):
        client.request("POST", "/v1/dead-letters/finished-1/replay")
    with pytest.raises(DuplicateId):
        twice = {"task": "noop", "args": {}, "id": "twin"}
        client.request("POST", "/v1/jobs/batch", body={"jobs": [twice, twice]})
    with pytest.raises(NotFound):
        client.request("GET", "/v1/no-such-route")
    with pytest.raises(MethodNotAllowed):
        client.request("PUT", "/v1/tasks")
    with pytest.raises(BadQuery):
        client.request("GET", "/v1/jobs", params={"limit": 0})
    with pytest.raises(BadRequest):
        client.request("POST", "/v1/jobs", body={"task": "noop"}, params={"wait": "soon"})
    with pytest.raises(PayloadTooLarge):
        client.request("POST", "/v1/jobs", body={"task": "noop", "args": {"x": "y" * 2**21}})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=gateway.url, headers=auth) as raw:
        with pytest.raises(MalformedJson):
            check(
                core.Reply.of(
                    raw.post("/v1/jobs", content=b"{", headers={"Content-Type": "application/json"})
                )
            )
        with pytest.raises(UnsupportedMediaType):
            check(
                core.Reply.of(
                    raw.post("/v1/jobs", content=b"{}", headers={"Content-Type": "text/plain"})
                )
            )
    failed = client.submit("debug.throws", {})
    with pytest.raises(TaskFailed) as task_failed:
        failed.result(timeout=30)
    assert task_failed.value.job_id == failed.id
    assert task_failed.value.error_type == "DebugPermanentFailure"
    assert task_failed.value.status in ("failed", "dead")
    client.close()


class LoseTheFirstAnswer(httpx.BaseTransport):
    """Sends every request on; the first ``POST /v1/jobs`` reaches the gateway, but its answer
    is replaced by ``fault`` (a lost connection, or a 503 outcome-unknown)."""

    def __init__(self, fault: str) -> None:
        self.inner = httpx.HTTPTransport()
        self.fault = fault
        self.submissions: list[str] = []

    def close(self) -> None:
        self.inner.close()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.method != "POST" or request.url.path != "/v1/jobs":
            return response
        self.submissions.append(json.loads(request.content)["id"])
        if len(self.submissions) > 1:
            return response
        response.read()
        response.close()
        if self.fault == "connection":
            raise httpx.ReadError("connection reset after the request was sent", request=request)
        problem = {
            "type": "urn:nsqjobs:problem:outcome-unknown",
            "title": "Service Unavailable",
            "status": 503,
            "detail": "nsqd did not answer in time",
        }
        return httpx.Response(
            503,
            json=problem,
            headers={"Content-Type": "application/problem+json", "Retry-After": "0"},
        )


@pytest.mark.parametrize("fault", ["connection", "outcome-unknown"])
def test_a_lost_answer_is_retried_with_the_same_id_and_the_job_runs_once(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path, fault: str
) -> None:
    gateway, _ = stack(nsq, daemons, tmp_path)
    transport = LoseTheFirstAnswer(fault)
    with Client(gateway.url, transport=transport) as client:
        job = client.submit("debug.chaos", {"key": f"lost-{fault}"})
        assert job.result(timeout=30) == {"key": f"lost-{fault}"}
    assert transport.submissions == [job.id, job.id]
    assert executions(tmp_path, f"lost-{fault}") == 1
    # Without retries the fault is the caller's.
    expected = GatewayUnreachable if fault == "connection" else OutcomeUnknown
    lossy = LoseTheFirstAnswer(fault)
    with (
        Client(gateway.url, transport=lossy, retry=RetryPolicy(0)) as once,
        pytest.raises(expected),
    ):
        once.submit("debug.chaos", {"key": "not-retried"})


class CountRefusals(httpx.BaseTransport):
    """Counts the connections refused (nobody listening yet)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.refused = 0

    def close(self) -> None:
        self.inner.close()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return self.inner.handle_request(request)
        except httpx.ConnectError:
            self.refused += 1
            raise


def test_a_gateway_that_comes_up_late_gets_the_job_once(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    port = free_port()
    transport = CountRefusals()
    answer: list[Any] = []

    def submit() -> None:
        url = f"http://127.0.0.1:{port}"
        with Client(url, retry=RetryPolicy(deadline_s=60), transport=transport) as client:
            job = client.submit("debug.chaos", {"key": "late"}, id="late-gateway")
            answer.append((job.id, job.result(timeout=60)))

    thread = threading.Thread(target=submit)
    thread.start()
    try:
        wait_for(lambda: transport.refused >= 2, 10, "the client to find no gateway, twice")
        stack(nsq, daemons, tmp_path, NSQJOBS_GATEWAY_PORT=str(port))
    finally:
        thread.join(90)
    assert answer == [("late-gateway", {"key": "late"})]
    assert executions(tmp_path, "late") == 1


def counting(items: list[Any], consumed: list[int]) -> Iterator[Any]:
    """``items``, counting in ``consumed[0]`` how many were taken."""
    for item in items:
        consumed[0] += 1
        yield item


def test_map_yields_in_order_with_bounded_jobs_in_flight(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway, _ = stack(nsq, daemons, tmp_path, ledger=False)
    # Later inputs finish sooner: order is the client's work, not the workers'.
    args = [{"seconds": 0.08 - (i % 4) * 0.02} for i in range(24)]
    consumed = [0]
    in_flight: list[int] = []
    with Client(gateway.url) as client:
        results: list[Any] = []
        for result in client.map("debug.sleep", counting(args, consumed), max_in_flight=5):
            in_flight.append(consumed[0] - len(results))  # submitted, not yet yielded
            results.append(result)
        assert results == [{"slept": a["seconds"]} for a in args]
        assert max(in_flight) == 5, in_flight
        # The first failure raises at its turn; the results before it were yielded.
        got: list[Any] = []
        with pytest.raises(TaskFailed):
            for result in client.map("debug.throws", [{}], max_in_flight=2):
                got.append(result)
        assert got == []
        seen = list(client.map("noop", [{"i": i} for i in range(2500)], max_in_flight=1200))
        assert seen == [{"i": i} for i in range(2500)]
    # Waiting took long polls of many ids, not a request per job.
    waits = sum(
        gateway.metric("nsqjobs_http_requests_total", route=route, method="POST", status="200")
        for route in ("/v1/jobs/wait",)
    )
    assert 0 < waits < 2500 / 4, waits


def test_submit_many_sends_batches_and_waits_for_all(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway, _ = stack(nsq, daemons, tmp_path, ledger=False)
    with Client(gateway.url) as client:
        jobs = client.submit_many("noop", ({"i": i} for i in range(2100)), chunk_size=1000)
        assert len({job.id for job in jobs}) == 2100
        answer = client.wait([job.id for job in jobs], timeout=60)
    assert not answer.pending and not answer.unknown and answer.ledger is False
    assert sorted(o.result["i"] for o in answer.done) == list(range(2100))
    batches = gateway.metric(
        "nsqjobs_http_requests_total", route="/v1/jobs/batch", method="POST", status="202"
    )
    assert batches == 3


@pytest.mark.parametrize("ledger", [False, True], ids=["no-ledger", "ledger"])
def test_run_answers_in_one_request_and_falls_back_to_waiting(
    nsq: Nsq,
    daemons: Callable[..., Daemon],
    tmp_path: Path,
    ledger: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway, _ = stack(nsq, daemons, tmp_path, ledger=ledger)
    with Client(gateway.url) as client:
        assert client.run("primes.count", {"start": 0, "stop": 1000}, timeout=30) == 168
        posts = gateway.metric(
            "nsqjobs_http_requests_total", route="/v1/jobs", method="POST", status="200"
        )
        assert posts == 1  # the result came back with the submission
        with pytest.raises(TaskFailed):
            client.run("debug.throws", {}, timeout=30)
        with pytest.raises(TimeoutError):
            client.run("debug.sleep", {"seconds": 5}, timeout=0.3)
        # Longer than the request's wait (made short here): the rest is a wait for the job.
        monkeypatch.setattr(core, "LONG_POLL_S", 0.2)
        assert client.run("debug.sleep", {"seconds": 0.5}, timeout=30) == {"slept": 0.5}
        monkeypatch.undo()

    async def main() -> None:
        async with AsyncClient(gateway.url) as aclient:
            assert await aclient.run("noop", {"n": 1}, timeout=30) == {"n": 1}

    asyncio.run(main())


def test_the_async_client(nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path) -> None:
    gateway, _ = stack(nsq, daemons, tmp_path)

    async def main() -> None:
        async with AsyncClient(gateway.url) as client:
            job = await client.submit("primes.count", {"start": 0, "stop": 1000}, id="a-1")
            assert await job.result(timeout=30) == 168
            assert await job.status() == "succeeded"
            consumed = [0]
            in_flight = []
            results: list[Any] = []
            async for result in client.map(
                "noop", counting([{"i": i} for i in range(40)], consumed), max_in_flight=7
            ):
                in_flight.append(consumed[0] - len(results))
                results.append(result)
            assert results == [{"i": i} for i in range(40)] and max(in_flight) == 7
            jobs = await client.submit_many("noop", [{"k": k} for k in range(5)])
            first = await client.wait([j.id for j in jobs], timeout=30, return_when="first")
            assert first.done
            with pytest.raises(InvalidArguments):
                await client.submit("primes.count", {"start": "zero"})
            with pytest.raises(UnknownTask):
                await client.submit("nope.nope", {})
            failing = await client.submit("debug.throws", {})
            with pytest.raises(TaskFailed):
                await failing.result(timeout=30)
            slow = await client.submit("debug.sleep", {"seconds": 30})
            with pytest.raises(TimeoutError):
                await slow.result(timeout=0.3)
            assert (await slow.cancel())["status"] == "cancelled"
            with pytest.raises(TaskFailed) as cancelled:
                await slow.result(timeout=30)
            assert cancelled.value.status == "cancelled"

    asyncio.run(main())


# -- POST /v1/jobs/wait -----------------------------------------------------------------------


def wait(gateway: Daemon, body: Any, **kw: Any) -> tuple[int, dict[str, str], Any]:
    return http("POST", gateway.url + "/v1/jobs/wait", body, **kw)


@pytest.mark.parametrize("ledger", [False, True], ids=["no-ledger", "ledger"])
def test_the_wait_route_first_all_and_timeouts(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path, ledger: bool
) -> None:
    gateway, _ = stack(nsq, daemons, tmp_path, ledger=ledger)
    with Client(gateway.url) as client:
        fast = client.submit("noop", {"n": 1}, id="fast")
        assert fast.result(timeout=30) == {"n": 1}
        client.submit("debug.sleep", {"seconds": 1.0}, id="slow")
        client.submit("debug.sleep", {"seconds": 30}, id="stuck")
    # A job that finished before the wait: from the ledger, or from the results the gateway
    # saw lately (without one).
    code, _, answer = wait(gateway, {"ids": ["fast"]})
    assert code == 200 and [o["id"] for o in answer["done"]] == ["fast"]
    assert answer["ledger"] is ledger and answer["done"][0]["result"] == {"n": 1}
    # first: answers as soon as one is done (here at once: "fast").
    code, _, answer = wait(
        gateway, {"ids": ["slow", "fast", "stuck"], "timeout_s": 10, "return_when": "first"}
    )
    assert [o["id"] for o in answer["done"]] == ["fast"]
    assert answer["pending"] == ["slow", "stuck"]
    # all, with a timeout: "slow" comes in during the wait, "stuck" does not.
    started = time.monotonic()
    code, _, answer = wait(gateway, {"ids": ["slow", "stuck", "slow"], "timeout_s": 2.5})
    took = time.monotonic() - started
    assert code == 200 and 2.4 < took < 10, took
    assert [o["id"] for o in answer["done"]] == ["slow"] and answer["pending"] == ["stuck"]
    assert answer["done"][0]["status"] == "succeeded"
    # An id nobody submitted: the ledger says unknown at once; without one it stays pending.
    started = time.monotonic()
    code, _, answer = wait(gateway, {"ids": ["nobody"], "timeout_s": 1})
    if ledger:
        assert answer["unknown"] == ["nobody"] and time.monotonic() - started < 1
    else:
        assert answer["pending"] == ["nobody"] and answer["unknown"] == []


def test_the_wait_route_takes_up_to_the_gateways_own_max_wait(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    # --max-wait-s may be up to an hour: the body's timeout_s is held to it, not to 60 s.
    gateway, _ = stack(nsq, daemons, tmp_path, NSQJOBS_MAX_WAIT_S="120")
    code, _, answer = wait(gateway, {"ids": ["never-submitted"], "timeout_s": 90})
    assert code == 200 and answer["unknown"] == ["never-submitted"], answer  # at once
    code, _, answer = wait(gateway, {"ids": ["x"], "timeout_s": 121})
    assert code == 422 and "at most 120" in answer["detail"], answer


def test_the_wait_route_refuses_bad_input_with_a_4xx(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway = daemons("gateway", nsq, NSQJOBS_MAX_WAIT_S="5")
    bad: list[tuple[Any, int, str, str]] = [
        ({"ids": []}, 422, "invalid-arguments", "body.ids"),
        ({"ids": ["x"] * (MAX_WAIT_IDS + 1)}, 422, "invalid-arguments", "body.ids"),
        ({"ids": ["x"], "timeout_s": 6}, 422, "invalid-arguments", "body.timeout_s"),
        ({"ids": ["x"], "timeout_s": -1}, 422, "invalid-arguments", "body.timeout_s"),
        ({"ids": ["x"], "return_when": "some"}, 422, "invalid-arguments", "body.return_when"),
        ({"ids": ["not an id"]}, 422, "invalid-arguments", "body.ids[0]"),
        ({"ids": ["x"], "extra": 1}, 422, "invalid-arguments", "body.extra"),
        ({"ids": "x"}, 422, "invalid-arguments", "body.ids"),
        ([1, 2], 422, "invalid-arguments", "body"),
    ]
    for body, status, slug, field in bad:
        code, headers, answer = wait(gateway, body)
        assert (code, answer["type"]) == (status, f"urn:nsqjobs:problem:{slug}"), (body, answer)
        assert headers["Content-Type"] == "application/problem+json"
        assert field in [e["field"] for e in answer["errors"]], (body, answer)
    code, _, answer = wait(gateway, None, raw=b'{"ids": ["a"], "ids": ["b"]}')
    assert code == 422 and "repeats key" in answer["detail"]
    code, _, answer = wait(gateway, None, raw=b'{"ids": [')
    assert code == 400 and answer["type"].endswith(":malformed-json")
    code, _, answer = wait(
        gateway, None, raw=b'{"ids": ["a"]}', headers={"Content-Type": "text/plain"}
    )
    assert code == 415
    code, _, answer = http("GET", gateway.url + "/v1/jobs/wait")
    assert code == 405 and answer["type"].endswith(":method-not-allowed")
    code, _, answer = http("POST", gateway.url + "/v1/jobs/wait?timeout_s=1", {"ids": ["a"]})
    assert code == 400
    assert "internal error" not in gateway.log()


def test_a_job_called_wait_is_still_a_job(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    # With the ledger, /v1/jobs/wait is also the path of the job whose id is "wait".
    gateway, _ = stack(nsq, daemons, tmp_path)
    with Client(gateway.url) as client:
        job = client.submit("noop", {"w": 1}, id="wait")
        assert job.result(timeout=30) == {"w": 1}
        assert job.info()["id"] == "wait" and job.status() == "succeeded"
        with pytest.raises(AlreadyFinished):
            job.cancel()


def test_cli_result_waits_through_the_wait_route(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    from nsqjobs.testing import run_cli

    gateway, _ = stack(nsq, daemons, tmp_path)
    with Client(gateway.url) as client:
        client.submit("debug.sleep", {"seconds": 0.5}, id="cli-slow")
    env = {**os.environ, ENV_GATEWAY_URL: gateway.url}
    started = time.monotonic()
    done = run_cli("result", "cli-slow", "--wait", "20", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"slept": 0.5} and time.monotonic() - started < 15
    waits = gateway.metric(
        "nsqjobs_http_requests_total", route="/v1/jobs/wait", method="POST", status="200"
    )
    assert waits >= 1
