"""The gateway's problem+json answers as exceptions: one class per problem ``type``.

Each carries the HTTP status, the server's ``detail``, its field ``errors`` and the whole problem
document. ``invalid-arguments`` is also an :class:`~nsqjobs.errors.InvalidArgumentsError` and
``unknown-task`` an :class:`~nsqjobs.errors.UnknownTaskError`, so ``except`` clauses written for
the local executors work against the service too.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

from nsqjobs.errors import FieldError, InvalidArgumentsError, NsqjobsError, UnknownTaskError

PROBLEM_TYPE_PREFIX: Final = "urn:nsqjobs:problem:"  # as the gateway writes it


class GatewayError(NsqjobsError):
    """The gateway answered an error (``status`` > 0), or could not be reached (0).

    ``slug`` is the stable end of the problem ``type`` (``urn:nsqjobs:problem:<slug>``);
    ``retryable`` says whether the client tries the same request again (same job id).
    """

    slug: ClassVar[str] = ""
    retryable: ClassVar[bool] = False

    def __init__(self, status: int, detail: str, problem: dict[str, Any] | None = None) -> None:
        # Exception's own: the runtime's error classes mixed in below take other arguments.
        Exception.__init__(self, detail)
        self.status = status
        self.detail = detail
        self.problem: dict[str, Any] = problem or {}
        self.type = str(self.problem.get("type", ""))
        raw = self.problem.get("errors")
        self.errors: list[FieldError] = [
            FieldError(str(e.get("field", "")), str(e.get("message", "")))
            for e in (raw if isinstance(raw, list) else [])
            if isinstance(e, dict)
        ]
        self.retry_after: float | None = None  # seconds, from a Retry-After header
        # submit_many: the handles of the jobs accepted before this error (earlier chunks,
        # which run whatever happens to the rest), in order.
        self.accepted: list[Any] = []

    def __str__(self) -> str:
        where = f"gateway answered {self.status}" if self.status else "gateway unreachable"
        fields = "; ".join(f"{e.field}: {e.message}" for e in self.errors)
        return f"{where}: {self.detail}" + (
            f" ({fields})" if fields and fields not in self.detail else ""
        )


class GatewayUnreachable(GatewayError):
    """No answer: the connection was refused, broke, or timed out; or a proxy in front of the
    gateway answered 502, 503 or 504 without a problem of ours (no replica reached). Retried,
    then raised."""

    retryable = True


# -- 400 ------------------------------------------------------------------------------------------


class MalformedJson(GatewayError):
    """400: the body was not JSON, or not UTF-8."""

    slug = "malformed-json"


class BadQuery(GatewayError):
    """400: a bad, repeated or unknown query parameter of a ledger route."""

    slug = "bad-query"


class BadRequest(GatewayError):
    """400: a bad query parameter (``wait``) or malformed HTTP."""

    slug = "bad-request"


# -- 401, 403 -------------------------------------------------------------------------------------


class Unauthorized(GatewayError):
    """401: the gateway needs a bearer token (``token=`` or ``NSQJOBS_API_TOKEN``)."""

    slug = "unauthorized"


class Forbidden(GatewayError):
    """403: the bearer token is not one the gateway accepts."""

    slug = "forbidden"


# -- 404, 405, 408 --------------------------------------------------------------------------------


class UnknownTask(GatewayError, UnknownTaskError):
    """404: the gateway has no such task (``task`` names it)."""

    slug = "unknown-task"

    def __init__(self, status: int, detail: str, problem: dict[str, Any] | None = None) -> None:
        GatewayError.__init__(self, status, detail, problem)
        self.task = str(self.problem.get("task", ""))


class NotFound(GatewayError):
    """404: no such route (the job routes but ``POST`` need the gateway's job ledger)."""

    slug = "not-found"


class UnknownJob(GatewayError):
    """404: the job ledger has no job with this id (``job_id`` names it)."""

    slug = "unknown-job"

    @property
    def job_id(self) -> str:
        """The id asked for."""
        return str(self.problem.get("id", ""))


class MethodNotAllowed(GatewayError):
    """405: the route does not take this method."""

    slug = "method-not-allowed"


class RequestTimeout(GatewayError):
    """408: the request did not reach the gateway in time (tried again)."""

    slug = "request-timeout"
    retryable = True


# -- 409 ------------------------------------------------------------------------------------------


class AlreadyFinished(GatewayError):
    """409: a cancel of a job that has finished (``job_status`` says how)."""

    slug = "already-finished"


class NotDead(GatewayError):
    """409: a replay or purge of a job that is not dead."""

    slug = "not-dead"


class DuplicateId(GatewayError):
    """409: two jobs of one batch have the same id."""

    slug = "duplicate-id"


class IdConflict(GatewayError):
    """409: the ledger holds this id for another task or other arguments."""

    slug = "id-conflict"


# -- 413, 415, 422, 431 ---------------------------------------------------------------------------


class PayloadTooLarge(GatewayError):
    """413: the request body is over the gateway's limit."""

    slug = "payload-too-large"


class MessageTooLarge(GatewayError):
    """413: a job (or one queue's part of a batch) is over nsqd's message size."""

    slug = "message-too-large"


class UnsupportedMediaType(GatewayError):
    """415: the body was not sent as application/json."""

    slug = "unsupported-media-type"


class InvalidArguments(GatewayError, InvalidArgumentsError):
    """422: the body or the task's arguments failed validation (``errors`` names each field)."""

    slug = "invalid-arguments"


class HeadersTooLarge(GatewayError):
    """431: request line and headers over the gateway's limit."""

    slug = "headers-too-large"


# -- 5xx ------------------------------------------------------------------------------------------


class Internal(GatewayError):
    """500: the gateway failed (its log says why)."""

    slug = "internal"


class NotImplementedProblem(GatewayError):
    """501: a transfer coding other than chunked."""

    slug = "not-implemented"


class Unavailable(GatewayError):
    """503: no nsqd took the job (nothing stored), or the gateway is overloaded: tried again."""

    slug = "unavailable"
    retryable = True


class LedgerUnavailable(GatewayError):
    """503: the job ledger could not be read or written (nothing recorded): tried again."""

    slug = "ledger-unavailable"
    retryable = True


class CancelNotAnnounced(GatewayError):
    """503: the cancel is recorded, but workers were not told: the DELETE is tried again."""

    slug = "cancel-not-announced"
    retryable = True


class OutcomeUnknown(GatewayError):
    """503: nsqd did not answer in time, so the job may be stored: tried again with the same
    id (with the job ledger on, the gateway then answers the job it has)."""

    slug = "outcome-unknown"
    retryable = True


class PartiallyAccepted(GatewayError):
    """503: a batch across queues was stored in part: ``accepted_ids`` and
    ``unaccepted_ids`` (``submit_many`` sends the unaccepted ones again)."""

    slug = "partially-accepted"

    @property
    def unaccepted_ids(self) -> list[str]:
        """The ids of the jobs that were not stored."""
        ids = self.problem.get("unaccepted_ids")
        return [str(i) for i in ids] if isinstance(ids, list) else []


PROBLEMS: Final[dict[str, type[GatewayError]]] = {
    cls.slug: cls
    for cls in (
        MalformedJson,
        BadQuery,
        BadRequest,
        Unauthorized,
        Forbidden,
        UnknownTask,
        NotFound,
        UnknownJob,
        MethodNotAllowed,
        RequestTimeout,
        AlreadyFinished,
        NotDead,
        DuplicateId,
        IdConflict,
        PayloadTooLarge,
        MessageTooLarge,
        UnsupportedMediaType,
        InvalidArguments,
        HeadersTooLarge,
        Internal,
        NotImplementedProblem,
        Unavailable,
        LedgerUnavailable,
        CancelNotAnnounced,
        OutcomeUnknown,
        PartiallyAccepted,
    )
}


_PROXY_FAILURES: Final = frozenset({502, 503, 504})


def problem_error(status: int, body: Any, retry_after: str | None = None) -> GatewayError:
    """The exception for an error answer: its problem ``type``'s class, else :class:`GatewayError`
    (a non-problem body, or a type this client does not know)."""
    problem = body if isinstance(body, dict) else {}
    kind = str(problem.get("type", ""))
    cls = GatewayError
    if kind.startswith(PROBLEM_TYPE_PREFIX):
        cls = PROBLEMS.get(kind[len(PROBLEM_TYPE_PREFIX) :], GatewayError)
    elif status in _PROXY_FAILURES:
        # Not the gateway's answer (it writes problem+json): a proxy (nginx in compose) that
        # reached no replica. The request is sent again, as after no answer at all.
        cls = GatewayUnreachable
    detail = problem.get("detail")
    if not isinstance(detail, str):
        detail = f"HTTP {status}" + (f": {str(body)[:200]}" if body else "")
    error = cls(status, detail, problem)
    if retry_after is not None:
        try:
            error.retry_after = max(0.0, float(retry_after))
        except ValueError:
            error.retry_after = None
    return error
