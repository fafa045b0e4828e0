"""nsqjobs.http.problems: one renderer for every error answer, and the observability routes'
errors on a worker's metrics port."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from nsqjobs.errors import (
    FieldError,
    InvalidArgumentsError,
    JobTooLarge,
    PublishError,
    PublishTimeout,
    UnknownTaskError,
)
from nsqjobs.http.problems import (
    Problem,
    as_problem,
    method_not_allowed,
    render_problem,
    status_problem,
)
from nsqjobs.observability.exposition import HealthHandler, MetricsHandler, ReadyHandler
from nsqjobs.testing import Daemon, Nsq, http

from tests.problem_checks import check_problem


def test_render_problem_gives_status_headers_and_body() -> None:
    status, headers, body = render_problem(Problem(422, "invalid-arguments", "bad", errors=[]))
    assert (status, headers) == (422, {"Content-Type": "application/problem+json"})
    assert json.loads(body) == {
        "type": "urn:nsqjobs:problem:invalid-arguments",
        "title": "Unprocessable Entity",
        "status": 422,
        "detail": "bad",
        "errors": [],
    }
    _, headers, _ = render_problem(Problem(503, "unavailable", "later"))
    assert headers["Retry-After"] == "1"


def test_a_405_names_the_allowed_methods_in_a_header_not_the_body() -> None:
    status, headers, body = render_problem(method_not_allowed("PUT", ["GET", "POST"]))
    assert (status, headers["Allow"]) == (405, "GET, POST")
    assert json.loads(body)["detail"] == "PUT not allowed; use GET, POST"
    assert "Allow" not in json.loads(body) and "allow" not in json.loads(body)
    for handler in (HealthHandler, ReadyHandler, MetricsHandler):
        assert handler.allowed_methods() == ["GET", "HEAD"]


def test_domain_errors_map_to_stable_problem_types() -> None:
    unknown = as_problem(UnknownTaskError("no.such"))
    assert unknown is not None and (unknown.status_code, unknown.slug) == (404, "unknown-task")
    assert unknown.extra == {"task": "no.such"}
    invalid = as_problem(InvalidArgumentsError([FieldError("args.n", "must be >= 1")]))
    assert invalid is not None and (invalid.status_code, invalid.slug) == (422, "invalid-arguments")
    assert invalid.extra == {"errors": [{"field": "args.n", "message": "must be >= 1"}]}
    unavailable = as_problem(PublishError("no nsqd"))
    assert unavailable is not None and (unavailable.status_code, unavailable.slug) == (
        503,
        "unavailable",
    )
    # A publish nsqd never answered may have been stored: not the same as "unavailable".
    unknown_outcome = as_problem(PublishTimeout("pub jobs: no answer from nsqd in 5s"))
    assert unknown_outcome is not None
    assert (unknown_outcome.status_code, unknown_outcome.slug) == (503, "outcome-unknown")
    assert "may or may not have been stored" in unknown_outcome.detail
    too_large = as_problem(JobTooLarge("over nsqd's --max-msg-size", 1048576, "args"))
    assert too_large is not None and (too_large.status_code, too_large.slug) == (
        413,
        "message-too-large",
    )
    assert too_large.extra["limit"] == 1048576 and "Retry-After" not in render_problem(too_large)[1]
    assert as_problem(ValueError("a bug")) is None
    internal = status_problem(500, ValueError("a bug"), "GET")
    assert (internal.status_code, internal.slug) == (500, "internal")
    assert "a bug" not in internal.detail  # internals stay in the log


@pytest.mark.integration
def test_worker_metrics_port_answers_405_as_problems(
    nsq: Nsq, daemons: Callable[..., Daemon]
) -> None:
    worker = daemons("worker", nsq)
    for method, path in (("POST", "/metrics"), ("DELETE", "/healthz"), ("PUT", "/readyz")):
        data = b"{}" if method in ("POST", "PUT") else None
        status, headers, body = http(method, worker.url + path, raw=data)
        check_problem(status, headers, body, 405, "method-not-allowed")
        assert headers["Allow"] == "GET, HEAD", (method, path, headers)
