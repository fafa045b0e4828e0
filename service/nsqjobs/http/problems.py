"""Errors answered as RFC 9457 ``application/problem+json``: the one renderer every route uses.

A :class:`Problem` carries a status, a stable ``type`` slug, a detail, extra body members and
extra headers (``Allow`` on a 405). :func:`render_problem` turns it into status, headers and
body; the raw delegates (``nsqjobs.http.responses``) and the tornado handlers
(``nsqjobs.http.handlers``) both write what it returns.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

import msgspec
import tornado.web

from nsqjobs.errors import (
    InvalidArgumentsError,
    JobTooLarge,
    PublishError,
    PublishTimeout,
    UnknownTaskError,
)
from nsqjobs.names import PROBLEM_CONTENT_TYPE
from nsqjobs.registry import validation_errors

PROBLEM_TYPE_PREFIX = "urn:nsqjobs:problem:"
INTERNAL_DETAIL = "internal error (see the server log)"

_json = msgspec.json.Encoder()


class Problem(tornado.web.HTTPError):
    """An error answered as problem+json with a stable ``type``.

    A ``tornado.web.HTTPError``, so raising one in a RequestHandler sets its status; ``extra``
    become members of the body, ``headers`` headers of the answer.
    """

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(status, detail)
        self.slug = slug
        self.detail = detail
        self.extra = extra
        self.headers = headers or {}


def problem_body(status: int, slug: str, detail: str, extra: dict[str, Any]) -> bytes:
    """The problem+json document for one error."""
    return _json.encode(
        {
            "type": PROBLEM_TYPE_PREFIX + slug,
            "title": HTTPStatus(status).phrase,
            "status": status,
            "detail": detail,
            **extra,
        }
    )


def render_problem(problem: Problem) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the answer to ``problem``: what every route writes."""
    status = problem.status_code
    headers = {"Content-Type": PROBLEM_CONTENT_TYPE, **problem.headers}
    if status == 503:
        headers.setdefault("Retry-After", "1")
    return status, headers, problem_body(status, problem.slug, problem.detail, problem.extra)


def method_not_allowed(method: str, allowed: Iterable[str]) -> Problem:
    """The 405 for ``method``, naming the allowed methods in ``Allow`` (RFC 9110 asks for it)."""
    allow = ", ".join(allowed)
    detail = f"{method} not allowed; use {allow}" if allow else f"{method} not allowed"
    return Problem(405, "method-not-allowed", detail, headers={"Allow": allow})


def internal_error() -> Problem:
    """The 500 for anything unexpected (the server logs the details, the client gets none)."""
    return Problem(500, "internal", INTERNAL_DETAIL)


def as_problem(exc: BaseException) -> Problem | None:
    """The problem a domain error is answered with; None for anything unexpected."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, UnknownTaskError):
        return Problem(404, "unknown-task", str(exc), task=exc.task)
    if isinstance(exc, InvalidArgumentsError):
        return Problem(422, "invalid-arguments", str(exc), errors=validation_errors(exc))
    if isinstance(exc, JobTooLarge):
        message = str(exc)
        return Problem(
            413,
            "message-too-large",
            message,
            limit=exc.limit,
            errors=[{"field": exc.field, "message": message}],
        )
    if isinstance(exc, PublishTimeout):
        return Problem(
            503,
            "outcome-unknown",
            f"nsqd did not answer in time ({exc}): the job may or may not have been stored. "
            "Resubmitting with the same `id` is safe once the gateway deduplicates ids; until "
            "then a resubmission may run the job twice",
        )
    if isinstance(exc, PublishError):
        return Problem(503, "unavailable", f"no nsqd accepted the job: {exc}")
    return None


def status_problem(status: int, exc: BaseException | None, method: str) -> Problem:
    """The problem for an error status tornado raised itself (``HTTPError``), or an exception."""
    problem = as_problem(exc) if exc is not None else None
    if problem is not None:
        return problem
    if status >= 500:
        return internal_error()
    if status == 404:
        return Problem(404, "not-found", "no such resource")
    if status == 405:
        return Problem(405, "method-not-allowed", f"{method} not allowed")
    message = exc.log_message if isinstance(exc, tornado.web.HTTPError) else None
    return Problem(status, "bad-request", message or "bad request")
