"""nsqjobs: a compute job queue on NSQ.

The public import for task authors and client code. Importing it is cheap: msgspec only, never
tornado, pynsq or numba (the daemons load those when they start)::

    from nsqjobs import task, Retry

    @task("reports.render", max_attempts=3, throws=(KeyError,))
    def render(args: RenderArgs) -> dict: ...

``nsqjobs.Client`` and ``nsqjobs.AsyncClient`` (the HTTP client, on httpx) are imported on
first use, so a task module never loads an HTTP library.
"""

import importlib
from typing import TYPE_CHECKING, Any

from nsqjobs.api import Accepted, BatchAccepted, BatchRequest, SubmitRequest
from nsqjobs.errors import (
    ConfigError,
    DecodeError,
    FieldError,
    InvalidArgumentsError,
    NsqjobsError,
    PublishError,
    PublishRejected,
    ResultNotEncodable,
    Retry,
    TaskFailed,
    TaskTimeoutError,
    UnknownTaskError,
)
from nsqjobs.registry import Registry, Task, registry, task
from nsqjobs.version import __version__
from nsqjobs.wire import Attempt, DeadLetter, ErrorInfo, JobEnvelope, ResultEnvelope

if TYPE_CHECKING:
    from nsqjobs.client import AsyncClient, Client
    from nsqjobs.ladder import executor

# Imported on first use (module __getattr__), so `import nsqjobs` stays msgspec-only: a task
# module never loads an HTTP library or a process pool.
_LAZY: dict[str, str] = {
    "Client": "nsqjobs.client",
    "AsyncClient": "nsqjobs.client",
    "executor": "nsqjobs.ladder",
}


def __getattr__(name: str) -> Any:
    """``Client``, ``AsyncClient`` and ``executor``, imported when first asked for."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nsqjobs' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Accepted",
    "AsyncClient",
    "Attempt",
    "BatchAccepted",
    "BatchRequest",
    "Client",
    "ConfigError",
    "DeadLetter",
    "DecodeError",
    "ErrorInfo",
    "FieldError",
    "InvalidArgumentsError",
    "JobEnvelope",
    "NsqjobsError",
    "PublishError",
    "PublishRejected",
    "Registry",
    "ResultEnvelope",
    "ResultNotEncodable",
    "Retry",
    "SubmitRequest",
    "Task",
    "TaskFailed",
    "TaskTimeoutError",
    "UnknownTaskError",
    "__version__",
    "executor",
    "registry",
    "task",
]
