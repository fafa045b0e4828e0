"""The Python client of the gateway's HTTP API (httpx; no tornado, pynsq or numba)::

    from nsqjobs import Client

    with Client() as client:  # NSQJOBS_GATEWAY_URL, NSQJOBS_API_TOKEN
        print(client.submit("primes.count", {"start": 0, "stop": 10**6}).result(timeout=30))

:class:`Client` blocks, :class:`AsyncClient` awaits; both pool keep-alive connections, retry
what may pass with the same job id, and raise one exception class per problem ``type``.
``Client.sender()`` gives a :class:`Sender`: single-job submits that return at once, sent in
batches by a background thread, with every refusal reported by its ``flush``.
"""

from nsqjobs.api import JobOutcome, WaitAnswer
from nsqjobs.client.aio import AsyncClient, AsyncJob
from nsqjobs.client.core import DEFAULT_URL, RetryPolicy
from nsqjobs.client.problems import (
    PROBLEMS,
    AlreadyFinished,
    BadQuery,
    BadRequest,
    CancelNotAnnounced,
    DuplicateId,
    Forbidden,
    GatewayError,
    GatewayUnreachable,
    HeadersTooLarge,
    IdConflict,
    Internal,
    InvalidArguments,
    LedgerUnavailable,
    MalformedJson,
    MessageTooLarge,
    MethodNotAllowed,
    NotDead,
    NotFound,
    NotImplementedProblem,
    OutcomeUnknown,
    PartiallyAccepted,
    PayloadTooLarge,
    RequestTimeout,
    Unauthorized,
    Unavailable,
    UnknownJob,
    UnknownTask,
    UnsupportedMediaType,
)
from nsqjobs.client.sender import NotAccepted, Sender, SenderStopped
from nsqjobs.client.sync import Client, Job
from nsqjobs.errors import TaskFailed

__all__ = [
    "DEFAULT_URL",
    "PROBLEMS",
    "AlreadyFinished",
    "AsyncClient",
    "AsyncJob",
    "BadQuery",
    "BadRequest",
    "CancelNotAnnounced",
    "Client",
    "DuplicateId",
    "Forbidden",
    "GatewayError",
    "GatewayUnreachable",
    "HeadersTooLarge",
    "IdConflict",
    "Internal",
    "InvalidArguments",
    "Job",
    "JobOutcome",
    "LedgerUnavailable",
    "MalformedJson",
    "MessageTooLarge",
    "MethodNotAllowed",
    "NotAccepted",
    "NotDead",
    "NotFound",
    "NotImplementedProblem",
    "OutcomeUnknown",
    "PartiallyAccepted",
    "PayloadTooLarge",
    "RequestTimeout",
    "RetryPolicy",
    "Sender",
    "SenderStopped",
    "TaskFailed",
    "Unauthorized",
    "Unavailable",
    "UnknownJob",
    "UnknownTask",
    "UnsupportedMediaType",
    "WaitAnswer",
]
