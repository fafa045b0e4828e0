"""Every error status of the gateway, each with nothing published to nsqd."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from http.client import HTTPConnection

import pytest
from nsqjobs.testing import Daemon, Nsq, free_port, http

from tests.problem_checks import check_problem as problem

pytestmark = pytest.mark.integration

PRIMES = {"task": "primes.count", "args": {"start": 0, "stop": 10}}


@pytest.fixture(autouse=True, params=["httptools", "tornado"])
def http_server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs under both HTTP layers the gateway can use (--http-server)."""
    monkeypatch.setenv("NSQJOBS_HTTP_SERVER", request.param)
    return str(request.param)


def test_error_statuses_publish_nothing(nsq: Nsq, daemons: Callable[..., Daemon]) -> None:
    gw = daemons("gateway", nsq, NSQJOBS_MAX_BODY_BYTES="4096")
    jobs = gw.url + "/v1/jobs"

    problem(*http("POST", jobs, raw=b'{"task": "noop", '), 400, "malformed-json")
    problem(*http("POST", jobs + "?wait=90", PRIMES), 400, "bad-request")
    problem(*http("POST", jobs + "?wait=soon", PRIMES), 400, "bad-request")
    body = problem(*http("POST", jobs, {"task": "no.such", "args": {}}), 404, "unknown-task")
    assert body["task"] == "no.such"
    problem(*http("GET", gw.url + "/nowhere"), 404, "not-found")
    problem(*http("POST", jobs, raw=b"{" + b" " * 5000 + b"}"), 413, "payload-too-large")
    problem(
        *http(
            "POST",
            jobs,
            raw=b"task=noop",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
        415,
        "unsupported-media-type",
    )
    problem(
        *http("POST", jobs, PRIMES, headers={"Content-Type": "application/json; charset=utf-16"}),
        415,
        "unsupported-media-type",
    )
    # An ASCII label (a subset of UTF-8) passes the header check: the body is what is wrong here.
    ascii_label = {"Content-Type": "application/json; charset=us-ascii"}
    problem(*http("POST", jobs, raw=b'{"task": ', headers=ascii_label), 400, "malformed-json")
    problem(
        *http(
            "POST",
            gw.url + "/v1/jobs/wait",
            {"ids": ["a"], "timeout_s": 0},
            headers={"Content-Type": "application/json; charset=latin-1"},
        ),
        415,
        "unsupported-media-type",
    )
    problem(*http("GET", jobs), 405, "method-not-allowed")
    # A parameter the route does not take is refused, not ignored (a misspelt wait).
    body = problem(*http("POST", jobs + "?wiat=5", PRIMES), 400, "bad-query")
    assert [e["field"] for e in body["errors"]] == ["query.wiat"]
    body = problem(*http("POST", jobs + "/batch?wait=1", {"jobs": [PRIMES]}), 400, "bad-query")
    assert [e["field"] for e in body["errors"]] == ["query.wait"]
    # The routes tornado serves hold bodies to the same limit as the job routes.
    big = b'{"ids": ["a"], "pad": "' + b" " * 5000 + b'"}'
    problem(*http("POST", gw.url + "/v1/jobs/wait", raw=big), 413, "payload-too-large")

    cases = [
        (
            {"task": "primes.count", "args": {"start": "0", "stop": 10}},
            "args.start",
            "Expected `int`, got `str`",
        ),
        ({"task": "primes.count", "args": {"start": 0, "stop": 10**12 + 1}}, "args.stop", "<="),
        ({"task": "primes.count", "args": {"start": 0}}, "args.stop", "missing required field"),
        (
            {"task": "primes.count", "args": {"start": 0, "stop": 1, "x": 1}},
            "args.x",
            "unknown field",
        ),
        (
            {"task": "primes.count", "args": {"start": 5, "stop": 1}},
            "args",
            "start (5) must be <= stop (1)",
        ),
        ({"task": "primes.count", "args": {"start": 0, "stop": 2 * 10**9}}, "args", "<="),
        ({**PRIMES, "delay_ms": 3_600_001}, "body.delay_ms", "<= 3600000"),
        ({**PRIMES, "id": "has space"}, "body.id", "matching regex"),
        # Dot segments: clients rewrite /v1/jobs/.. before sending, so no URL names them.
        # Due after it expires: certain to be dead-lettered unrun, so refused.
        ({**PRIMES, "delay_ms": 5000, "expires_s": 2}, "body.expires_s", "would expire"),
        ({**PRIMES, "id": "."}, "body.id", "matching regex"),
        ({**PRIMES, "id": ".."}, "body.id", "matching regex"),
        ({"args": {}}, "body.task", "missing required field"),
        ({**PRIMES, "priority": 1}, "body.priority", "unknown field"),
    ]
    for request, field, reason in cases:
        body = problem(*http("POST", jobs, request), 422, "invalid-arguments")
        assert body["errors"][0]["field"] == field, (request, body)
        assert reason in body["errors"][0]["message"], (request, body)
    problem(*http("POST", gw.url + "/v1/jobs/batch", {"jobs": []}), 422, "invalid-arguments")
    problem(
        *http("POST", gw.url + "/v1/jobs/batch", {"jobs": [{**PRIMES, "delay_ms": 5}]}),
        422,
        "invalid-arguments",
    )

    body = problem(
        *http("POST", gw.url + "/v1/jobs/batch", {"jobs": [PRIMES, {**PRIMES, "id": ".."}]}),
        422,
        "invalid-arguments",
    )
    assert body["errors"][0]["field"] == "body.jobs[1].id"

    # An id ending in a newline (Python's `$` matches before one), however JSON spells it.
    newline_ids = [b'"x1\\n"', b'"x1\\u000a"', b'"x1\\u000A"']
    for job_id in newline_ids:
        raw = b'{"task": "noop", "id": ' + job_id + b"}"
        body = problem(*http("POST", jobs, raw=raw), 422, "invalid-arguments")
        assert body["errors"][0]["field"] == "body.id", (raw, body)
        raw = b'{"ids": ["ok", ' + job_id + b"]}"
        body = problem(*http("POST", gw.url + "/v1/jobs/wait", raw=raw), 422, "invalid-arguments")
        assert body["errors"][0]["field"] == "body.ids[1]", (raw, body)

    assert nsq.message_count("jobs") == 0
    # Rejections are counted by status; accepted jobs are not.
    assert gw.metric("nsqjobs_jobs_rejected_total", reason="422") == len(cases) + 3 + 3
    assert (
        gw.metric("nsqjobs_http_requests_total", route="/v1/jobs", method="POST", status="404") == 1
    )


# Every route and a method it does not take, with the Allow header the 405 must carry: the job
# routes (the raw delegate), the catalog routes and the observability routes (tornado handlers).
NOT_ALLOWED = [
    ("GET", "/v1/jobs", "POST"),
    ("DELETE", "/v1/jobs", "POST"),
    ("PUT", "/v1/jobs/batch", "POST"),
    ("DELETE", "/v1/tasks", "GET, HEAD"),
    ("POST", "/openapi.json", "GET, HEAD"),
    ("POST", "/healthz", "GET, HEAD"),
    ("PUT", "/readyz", "GET, HEAD"),
    ("POST", "/metrics", "GET, HEAD"),
]


def test_every_405_is_a_problem_naming_the_allowed_methods(
    nsq: Nsq, daemons: Callable[..., Daemon]
) -> None:
    gw = daemons("gateway", nsq)
    for method, path, allow in NOT_ALLOWED:
        data = b"{}" if method in ("POST", "PUT") else None
        status, headers, body = http(method, gw.url + path, raw=data)
        problem(status, headers, body, 405, "method-not-allowed")
        assert headers["Allow"] == allow, (method, path, headers)
        assert method in body["detail"], body
    # HEAD is served wherever GET is (RFC 9110): GET's status and headers, no body.
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/v1/tasks"):
        _, got, _ = http("GET", gw.url + path)
        status, headers, body = http("HEAD", gw.url + path)
        assert (status, body) == (200, ""), path
        assert headers["Content-Type"] == got["Content-Type"], path
    # A route without GET answers HEAD as any other method it does not take.
    status, headers, body = http("HEAD", gw.url + "/v1/jobs")
    assert (status, headers["Allow"], body) == (405, "POST", "")
    assert headers["Content-Type"] == "application/problem+json"
    # urllib never reads a HEAD answer's body: read the bytes, and reuse the connection.
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"HEAD /v1/jobs HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = b""
        while chunk := sock.recv(65536):  # the job routes close after a 405
            raw += chunk
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405") and rest == b"", raw
    conn = HTTPConnection(host, int(port), timeout=10)
    try:
        for _ in range(2):  # a body after the HEAD answer would garble the next answer
            conn.request("HEAD", "/healthz")
            answer = conn.getresponse()
            assert (answer.status, answer.read()) == (200, b"")
            conn.request("GET", "/healthz")
            answer = conn.getresponse()
            assert answer.status == 200 and json.loads(answer.read())
    finally:
        conn.close()
    assert nsq.message_count("jobs") == 0
    # Counted by route template, whichever HTTP stack answered.
    assert (
        gw.metric("nsqjobs_http_requests_total", route="/v1/jobs", method="GET", status="405") == 1
    )
    assert (
        gw.metric("nsqjobs_http_requests_total", route="/metrics", method="POST", status="405") == 1
    )


def test_unknown_paths_are_problems_for_every_method(
    nsq: Nsq, daemons: Callable[..., Daemon]
) -> None:
    gw = daemons("gateway", nsq)
    for method in ("GET", "POST", "PUT", "DELETE", "TRACE"):
        data = b"{}" if method in ("POST", "PUT") else None
        body = problem(*http(method, gw.url + "/v1/nowhere", raw=data), 404, "not-found")
        assert "/v1/nowhere" in body["detail"]
    assert (
        gw.metric("nsqjobs_http_requests_total", route="unmatched", method="GET", status="404") == 1
    )


def test_unavailable_when_no_nsqd_accepts(nsq: Nsq, daemons: Callable[..., Daemon]) -> None:
    dead = f"127.0.0.1:{free_port()}"
    gw = daemons(
        "gateway",
        nsq,
        ready=False,
        NSQJOBS_NSQD_TCP_ADDRESS=dead,
        NSQJOBS_NSQD_HTTP_ADDRESS="",
        NSQJOBS_LOOKUPD_HTTP_ADDRESS="",
    )
    from nsqjobs.testing import ping, wait_for

    wait_for(lambda: ping(gw.url + "/healthz"), 20, "gateway /healthz")
    status, _, ready = http("GET", gw.url + "/readyz")
    assert status == 503 and "no nsqd connection for publishing" in ready["problems"]
    status, headers, body = http("POST", gw.url + "/v1/jobs", PRIMES)
    problem(status, headers, body, 503, "unavailable")
    assert headers["Retry-After"] == "1"
    assert nsq.message_count("jobs") == 0


def test_catalog_and_openapi(nsq: Nsq, daemons: Callable[..., Daemon]) -> None:
    gw = daemons("gateway", nsq)
    status, _, body = http("GET", gw.url + "/v1/tasks")
    assert status == 200
    tasks = {t["name"]: t for t in body["tasks"]}
    assert {"primes.count", "noop", "debug.sleep", "debug.fail"} <= set(tasks)
    schema = tasks["primes.count"]["args_schema"]
    props = schema["$defs"]["PrimesCountArgs"]["properties"]
    assert props["stop"] == {"type": "integer", "minimum": 0, "maximum": 10**12}
    assert tasks["primes.count"]["queue"] == "jobs"
    status, _, doc = http("GET", gw.url + "/openapi.json")
    assert status == 200 and doc["openapi"] == "3.1.0"
    post = doc["paths"]["/v1/jobs"]["post"]
    assert {"200", "202", "400", "404", "413", "415", "422", "503"} <= set(post["responses"])
    assert "primes.count.args" in doc["components"]["schemas"]
    status, _, text = http("GET", gw.url + "/healthz")
    assert status == 200 and text == {"status": "ok"}


def test_chunked_body_over_the_limit_is_refused(nsq: Nsq, daemons: Callable[..., Daemon]) -> None:
    import http.client as httpclient
    import json

    gw = daemons("gateway", nsq, NSQJOBS_MAX_BODY_BYTES="4096")
    conn = httpclient.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        chunks = iter([b'{"task": "noop", "args": {"pad": "', b"x" * 3000, b"x" * 3000, b'"}}'])
        conn.request(
            "POST",
            "/v1/jobs",
            body=chunks,
            encode_chunked=True,
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 413 and body["type"] == "urn:nsqjobs:problem:payload-too-large"
    assert nsq.message_count("jobs") == 0
