"""Issue 8, the gateway's input: every bad body, size and fault gets a clear answer before
anything is published, checked against a real nsqd (its /stats hold what was published)."""

from __future__ import annotations

import functools
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nsqjobs import wire
from nsqjobs.api import MAX_ARGS_DEPTH
from nsqjobs.testing import Daemon, Nsq, Tail, http, run_cli, wait_for

from tests.problem_checks import check_problem as problem

pytestmark = pytest.mark.integration

NOOP = {"task": "noop", "args": {"n": 1}}
JSON = {"Content-Type": "application/json"}
ROOT = Path(__file__).resolve().parent.parent
# A second queue topic (tests/gateway_tasks.py), so a batch can span two.
TWO_QUEUES = {
    "NSQJOBS_TASK_MODULE": "nsqjobs_tasks.builtin,tests.gateway_tasks",
    "PYTHONPATH": str(ROOT),
}


@pytest.fixture(params=["httptools", "tornado"])
def layer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run under both HTTP layers the gateway can use (--http-server)."""
    monkeypatch.setenv("NSQJOBS_HTTP_SERVER", request.param)
    return str(request.param)


def post(url: str, raw: bytes, content_type: str = "application/json") -> tuple[int, Any, Any]:
    return http("POST", url, raw=raw, headers={"Content-Type": content_type})


def nested(depth: int) -> bytes:
    """A job whose args nest ``depth`` levels (args itself is level 1)."""
    inner = b"[" * (depth - 1) + b"]" * (depth - 1)
    return b'{"task": "noop", "args": {"a": ' + inner + b"}}"


# -- items 1, 2, 8: bodies -------------------------------------------------------------------------


def test_bad_bodies_are_4xx_naming_the_field_and_publish_nothing(
    layer: str, nsq: Nsq, daemons: Callable[..., Daemon]
) -> None:
    gw = daemons("gateway", nsq)
    single, wait, batch = gw.url + "/v1/jobs", gw.url + "/v1/jobs?wait=1", gw.url + "/v1/jobs/batch"

    # 1. Not UTF-8: 400, never 500; a charset other than UTF-8 is refused from the header (415).
    latin = b'{"task": "noop", "args": {"name": "caf\xe9"}}'
    for url in (single, wait):
        body = problem(*post(url, latin, "application/json"), 400, "malformed-json")
        assert "UTF-8" in body["detail"]
        for charset in ("latin-1", "utf-16", '"ISO-8859-1"'):
            ctype = f"application/json; charset={charset}"
            body = problem(*post(url, latin, ctype), 415, "unsupported-media-type")
            assert "UTF-8" in body["detail"]
        # A UTF-8 label passes the header check: the body itself is then what is wrong.
        for ctype in ("application/json; charset=UTF-8", 'application/json;charset="utf-8"'):
            problem(*post(url, latin, ctype), 400, "malformed-json")
    problem(*post(batch, b'{"jobs": [' + latin + b"]}"), 400, "malformed-json")

    # 2. Nesting: up to the documented limit is a job; one more level, or a thousand, is a 422
    # that names the field (a thousand levels was a RecursionError, a 500).
    for depth in (MAX_ARGS_DEPTH + 1, 985, 5000):
        body = problem(*post(single, nested(depth)), 422, "invalid-arguments")
        assert body["errors"][0]["field"].startswith("args.a[0][0]"), body
        assert f"more than {MAX_ARGS_DEPTH} levels" in body["errors"][0]["message"]
    body = problem(
        *post(batch, b'{"jobs": [' + nested(2) + b", " + nested(1000) + b"]}"),
        422,
        "invalid-arguments",
    )
    assert body["errors"][0]["field"].startswith("jobs[1].args.a[0]"), body

    # 8. A key twice in one object, anywhere: refused, naming it (the last `task` used to win
    # while the first `id` was validated).
    twice = [
        (single, b'{"task": "nope", "task": "noop", "args": {}}', "body.task"),
        (single, b'{"task": "noop", "id": "ab", "id": "cd"}', "body.id"),
        (single, b'{"task": "noop", "args": {"x": 1, "y": {"z": 1, "z": 2}}}', "args.y.z"),
        (wait, b'{"task": "noop", "args": {"x": 1, "x": 1}}', "args.x"),
        (
            batch,
            b'{"jobs": [{"task": "noop"}, {"task": "noop", "args": {"q": 1, "q": 2}}]}',
            "jobs[1].args.q",
        ),
        (batch, b'{"jobs": [{"task": "noop"}], "jobs": [{"task": "noop"}]}', "body.jobs"),
        # The same key spelled with a JSON escape is the same key (the last one used to win).
        (single, b'{"task": "primes.count", "\\u0074ask": "noop"}', "body.task"),
        (single, b'{"task": "noop", "args": {"a": 1, "\\u0061": 2}}', "args.a"),
        (single, b'{"task": "noop", "args": {"a/b": 1, "a\\/b": 2}}', "args.a/b"),
        (wait, b'{"task": "noop", "args": {"\\u00e9": 1, "\xc3\xa9": 2}}', "args.\u00e9"),
    ]
    for url, raw, field in twice:
        body = problem(*post(url, raw), 422, "invalid-arguments")
        assert body["errors"][0]["field"] == field, (raw, body)
        assert "repeats key" in body["errors"][0]["message"]

    # 8. Query numbers are parsed strictly (Python's float() took "1_0" as 10).
    for query in ("wait=1_0", "wait=%201", "wait=inf", "wait=0x1", "wait=1&wait=2", "wait=+1"):
        body = problem(*http("POST", f"{single}?{query}", NOOP), 400, "bad-request")
        assert body["errors"][0]["field"] == "query.wait"

    assert nsq.message_count("jobs") == 0
    # Colons inside strings, and an explicit empty args, are not mistaken for repeated keys.
    status, _, _ = post(single, b'{"task": "noop", "id": "a:b", "args": {}}')
    assert status == 202
    status, _, _ = post(single, b'{"task": "noop", "args": {"url": "http://x:1/", "l": [{}]}}')
    assert status == 202
    assert nsq.message_count("jobs") == 2


def test_integral_floats_are_integers_as_the_schema_says(
    nsq: Nsq, daemons: Callable[..., Daemon], tails: Callable[[Nsq, str, str], Tail]
) -> None:
    tail = tails(nsq, "jobs", "audit")
    gw = daemons("gateway", nsq)
    status, _, one = http(
        "POST", gw.url + "/v1/jobs", {"task": "primes.count", "args": {"start": 0, "stop": 1547.0}}
    )
    assert status == 202, one
    status, _, two = http("POST", gw.url + "/v1/jobs", {**NOOP, "delay_ms": 10.0})
    assert status == 202, two
    status, _, batch = http(
        "POST",
        gw.url + "/v1/jobs/batch",
        {"jobs": [{"task": "pi.estimate", "args": {"samples": 1e3, "seed": 7.0}}]},
    )
    assert status == 202, batch
    jobs = {env.id: env for env in map(wire.decode_job, tail.collect(3, 10.0))}
    # Published as integers, so the worker's strict validation takes them too.
    assert jobs[one["id"]].args == {"start": 0, "stop": 1547}
    assert type(jobs[one["id"]].args["stop"]) is int
    assert jobs[batch["ids"][0]].args == {"samples": 1000, "seed": 7}
    # A fraction is still not an integer.
    problem(
        *http(
            "POST", gw.url + "/v1/jobs", {"task": "primes.count", "args": {"start": 0, "stop": 1.5}}
        ),
        422,
        "invalid-arguments",
    )


# -- items 3, 4: nsqd's size limits, checked before publishing -----------------------------------


def test_jobs_nsqd_would_refuse_are_413_and_cost_other_clients_nothing(
    layer: str, nsq: Nsq, daemons: Callable[..., Daemon]
) -> None:
    # The configured nsqd limits are wrong on purpose: the gateway reads nsqd's live ones.
    gw = daemons(
        "gateway",
        nsq,
        NSQJOBS_MAX_BODY_BYTES=str(8 * 1024 * 1024),
        NSQJOBS_NSQD_MAX_MSG_SIZE=str(64 * 1024 * 1024),
        NSQJOBS_NSQD_MAX_BODY_SIZE=str(64 * 1024 * 1024),
        **TWO_QUEUES,
    )
    assert "--max-msg-size is 1048576, not the configured 67108864" in gw.log()
    jobs, batch = gw.url + "/v1/jobs", gw.url + "/v1/jobs/batch"
    big = {"task": "noop", "args": {"pad": "x" * (1024 * 1024 - 100)}}  # fits 1 MiB, not with
    status, headers, body = http("POST", jobs, big)  # its envelope
    problem(status, headers, body, 413, "message-too-large")
    assert body["limit"] == 1024 * 1024 and "--max-msg-size" in body["detail"]
    assert "Retry-After" not in headers  # permanent: not dressed as a 503
    # The next request (another client's) goes through at once: the connection to nsqd was
    # never handed a frame it would refuse.
    for _ in range(20):
        status, _, _ = http("POST", jobs, NOOP, timeout=5)
        assert status == 202
    assert nsq.message_count("jobs") == 20

    # Every message of a batch fits, but one queue's MPUB is over nsqd's --max-body-size: 413,
    # and the other queue's MPUB (it would have come first) is not published either.
    piece = {"task": "noop", "args": {"pad": "x" * (900 * 1024)}}
    spanning = {"jobs": [{"task": "other.echo", "args": {}}, *[piece] * 6]}
    status, headers, body = http("POST", batch, spanning)
    problem(status, headers, body, 413, "message-too-large")
    assert body["limit"] == 5 * 1024 * 1024 and "'jobs'" in body["detail"]
    body = problem(
        *http("POST", batch, {"jobs": [{"task": "other.echo"}, big]}), 413, "message-too-large"
    )
    assert body["errors"][0]["field"] == "jobs[1].args"
    # 4. Everything that can be checked is checked before the first MPUB: a bad job in the
    # second queue rejects the first queue's jobs too.
    bad = {"jobs": [{"task": "other.echo"}, {"task": "primes.count", "args": {"start": 5}}]}
    problem(*http("POST", batch, bad), 422, "invalid-arguments")
    problem(
        *http(
            "POST",
            batch,
            {"jobs": [{"task": "other.echo", "id": "same"}, {"task": "noop", "id": "same"}]},
        ),
        409,
        "duplicate-id",
    )
    assert nsq.message_count("other") == 0 and nsq.message_count("jobs") == 20
    status, _, ok = http("POST", batch, {"jobs": [{"task": "other.echo"}, NOOP]})
    assert status == 202 and len(ok["ids"]) == 2
    assert nsq.message_count("other") == 1 and nsq.message_count("jobs") == 21


# -- item 16: a publish nsqd does not answer -------------------------------------------------------


def test_a_publish_without_an_answer_is_outcome_unknown(
    nsq: Nsq, daemons: Callable[..., Daemon]
) -> None:
    gw = daemons("gateway", nsq, NSQJOBS_PUBLISH_TIMEOUT_S="0.5")
    status, _, _ = http("POST", gw.url + "/v1/jobs", NOOP)
    assert status == 202
    assert nsq.nsqd is not None
    nsq.nsqd.pause()  # nsqd holds the connection but answers nothing
    try:
        status, headers, body = http("POST", gw.url + "/v1/jobs", {**NOOP, "id": "maybe-1"})
    finally:
        nsq.nsqd.resume()
    problem(status, headers, body, 503, "outcome-unknown")
    assert body["id"] == "maybe-1" and "may or may not have been stored" in body["detail"]
    assert "same `id`" in body["detail"]
    # Which is the truth: nsqd stored it after all.
    wait_for(lambda: nsq.message_count("jobs") == 2, 10, "the unanswered job in nsqd")


# -- item 5: slow clients --------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """The process's resident set size, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def all_closed(socks: list[socket.socket]) -> list[bytes] | None:
    """What the server sent on each of ``socks`` once it closed them all; None before."""
    answers = [closed(sock) for sock in socks]
    return [a for a in answers if a is not None] if None not in answers else None


def closed(sock: socket.socket) -> bytes | None:
    """What the server sent before closing ``sock``; None while it is open."""
    sock.settimeout(0.05)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return None
    return data or b"(closed)"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_slow_clients_are_timed_out_and_their_memory_bounded(
    nsq: Nsq, daemons: Callable[..., Daemon]
) -> None:
    gw = daemons(
        "gateway",
        nsq,
        NSQJOBS_HEADER_TIMEOUT_S="1",
        NSQJOBS_BODY_TIMEOUT_S="2",
        NSQJOBS_IDLE_TIMEOUT_S="1",
        NSQJOBS_MAX_INCOMPLETE_BYTES=str(4 * 1024 * 1024),
    )
    head = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000\r\n\r\n"
    )
    before = rss_kib(gw.proc.pid)
    for _round in range(3):
        started = time.monotonic()
        socks = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(60)]
        try:
            for i, sock in enumerate(socks):
                if i % 3 == 0:
                    sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: t\r\n")  # a head, trickling
                else:
                    sock.sendall(head + b'{"task": "noop", "args": {"pad": "' + b"x" * 200_000)
            answers = wait_for(
                functools.partial(all_closed, socks), 10, "every slow connection closed"
            )
        finally:
            for sock in socks:
                sock.close()
        assert time.monotonic() - started < 6
        statuses = {a.split(b" ", 2)[1] for a in answers if a.startswith(b"HTTP/")}
        # 408 for heads and bodies that stopped; 503 once incomplete bodies hold 4 MiB.
        assert statuses <= {b"408", b"503"} and b"408" in statuses, answers
        assert all(b"application/problem+json" in a for a in answers if a.startswith(b"HTTP/"))
    # 40 bodies of 200 kB a round (8 MB offered, 4 MiB admitted); three rounds do not pile up.
    grown = rss_kib(gw.proc.pid) - before
    assert grown < 40 * 1024, f"RSS grew by {grown} KiB"
    # An idle keep-alive connection is closed after the idle timeout.
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_for(lambda: closed(sock), 5, "the idle connection closed")
    status, _, _ = http("POST", gw.url + "/v1/jobs", NOOP)
    assert status == 202


# -- item 6 and item 20: framing and tokens, on both layers --------------------------------------


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def parse(answer: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


TOKEN = "s3cret-token-0123456789"


def test_framing_and_tokens_are_problems_on_both_layers(
    layer: str, nsq: Nsq, daemons: Callable[..., Daemon]
) -> None:
    gw = daemons("gateway", nsq, NSQJOBS_API_TOKENS=f"other-token-abcdefghij,{TOKEN}")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    job = json.dumps(NOOP).encode()
    head = b"POST /v1/jobs HTTP/1.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
    bearer = f"Authorization: Bearer {TOKEN}\r\n".encode()
    cases = [
        (head + bearer + b"Content-Length: %d\r\n\r\n" % len(job) + job, 400, "bad-request"),
        (
            head + b"Host: t\r\n" + bearer + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
            "not-implemented",
        ),
        (
            head + b"Host: t\r\n" + bearer + b"Transfer-Encoding: identity\r\n\r\n",
            400,
            "bad-request",
        ),
    ]
    for raw, status, slug in cases:
        problem(*parse(raw_request(gw.port, raw)), status, slug)

    # 20. Tokens: every /v1 route needs one; probes and scrapers do not.
    for method, path, body in (
        ("POST", "/v1/jobs", NOOP),
        ("POST", "/v1/jobs/batch", {"jobs": [NOOP]}),
        ("GET", "/v1/tasks", None),
        ("GET", "/v1/nowhere", None),
    ):
        status, headers, answer = http(method, gw.url + path, body)
        problem(status, headers, answer, 401, "unauthorized")
        assert {k.lower(): v for k, v in headers.items()}["www-authenticate"].startswith("Bearer")
        status, headers, answer = http(
            method, gw.url + path, body, headers={"Authorization": "Bearer wrong-token-000000"}
        )
        problem(status, headers, answer, 403, "forbidden")
        status, headers, answer = http(
            method, gw.url + path, body, headers={"Authorization": "Basic abc"}
        )
        problem(status, headers, answer, 401, "unauthorized")
    assert nsq.message_count("jobs") == 0
    assert http("POST", gw.url + "/v1/jobs", NOOP, headers=auth)[0] == 202
    assert http("POST", gw.url + "/v1/jobs/batch", {"jobs": [NOOP]}, headers=auth)[0] == 202
    assert http("GET", gw.url + "/v1/tasks", headers=auth)[0] == 200
    assert http("GET", gw.url + "/v1/nowhere", headers=auth)[0] == 404
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert http("GET", gw.url + path)[0] == 200, path
    assert nsq.message_count("jobs") == 2
    _, _, doc = http("GET", gw.url + "/openapi.json")
    assert doc["paths"]["/v1/jobs"]["post"]["security"] == [{"bearer": []}]
    # `nsqjobs submit` sends NSQJOBS_API_TOKEN.
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSQJOBS_")}
    submit = ["submit", "noop", "--args", "{}", "--gateway-url", gw.url]
    refused = run_cli(*submit, env=env)
    assert refused.returncode != 0 and "401" in refused.stderr, refused
    done = run_cli(*submit, env={**env, "NSQJOBS_API_TOKEN": TOKEN})
    assert done.returncode == 0 and json.loads(done.stdout)["status"] == "queued", done


@pytest.mark.parametrize("server", ["httptools", "tornado"])
def test_a_client_that_leaves_a_wait_ends_it_at_once(
    nsq: Nsq, daemons: Callable[..., Daemon], server: str
) -> None:
    # A ?wait= whose client went away holds nothing until its timeout (the listener, the
    # timer, the ledger polls): a client that times out early and retries would pile them up.
    gw = daemons("gateway", nsq, NSQJOBS_HTTP_SERVER=server)
    body = json.dumps({"task": "noop", "args": {}}).encode()
    head = (
        f"POST /v1/jobs?wait=60 HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    socks = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(5)]
    try:
        for sock in socks:
            sock.sendall(head + body)  # no worker runs: each waits its 60 s
        wait_for(lambda: gw.metric("nsqjobs_result_waiters") == 5, 10, "five waits")
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: gw.metric("nsqjobs_result_waiters") == 0, 10, "the waits to end")
