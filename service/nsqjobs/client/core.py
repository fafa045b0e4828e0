"""What the sync and async clients share, free of I/O: settings, request bodies, how answers
become values or exceptions, the retry schedule, and the bookkeeping of ``map``."""

from __future__ import annotations

import functools
import math
import os
import random
import time
import urllib.parse
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

import httpx
import msgspec

from nsqjobs import wire
from nsqjobs.api import JobOutcome, WaitAnswer
from nsqjobs.client.problems import GatewayError, GatewayUnreachable, UnknownJob, problem_error
from nsqjobs.errors import ConfigError, TaskFailed
from nsqjobs.names import (
    ENV_API_TOKEN,
    ENV_GATEWAY_URL,
    GATEWAY_PORT,
    MAX_BATCH_JOBS,
    MAX_WAIT_IDS,
)

DEFAULT_URL: Final = f"http://127.0.0.1:{GATEWAY_PORT}"
# One long poll waits at most this long (the gateway's --max-wait-s is 60 s by default); a
# longer wait is several of them.
LONG_POLL_S: Final = 20.0
# A request's answer may take its long poll plus this.
ANSWER_MARGIN_S: Final = 10.0
_decode_wait = msgspec.json.Decoder(WaitAnswer).decode


def settings(url: str | None, token: str | None) -> tuple[str, str]:
    """The gateway's base URL and bearer token: the ones given, else ``NSQJOBS_GATEWAY_URL``
    and ``NSQJOBS_API_TOKEN``, else the local stack's gateway and no token."""
    base = url or os.environ.get(ENV_GATEWAY_URL) or DEFAULT_URL
    if not base.startswith(("http://", "https://")):
        raise ConfigError(f"gateway URL {base!r} must start with http:// or https://")
    return base.rstrip("/"), token if token is not None else os.environ.get(ENV_API_TOKEN, "")


def check_limits(timeout_s: float, long_poll_s: float, max_connections: int) -> None:
    """A client's numbers, each checked once when it is made: a clear error now rather than a
    TypeError at its first request."""
    for name, value, least in (("timeout_s", timeout_s, 0.0), ("long_poll_s", long_poll_s, 0.0)):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value <= least:
            raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
    if isinstance(max_connections, bool) or not isinstance(max_connections, int):
        raise ConfigError(f"max_connections must be a whole number, got {max_connections!r}")
    if max_connections < 1:
        raise ConfigError(f"max_connections must be at least 1, got {max_connections}")


def job_path(job_id: str) -> str:
    """``/v1/jobs/{id}``; a character no job id may hold is percent-encoded (the gateway then
    answers that no such job exists, rather than the request line breaking)."""
    return "/v1/jobs/" + urllib.parse.quote(job_id, safe=":")


def headers(token: str) -> dict[str, str]:
    """The headers of every request."""
    out = {"Accept": "application/json"}
    if token:
        out["Authorization"] = f"Bearer {token}"
    return out


def limits(max_connections: int) -> httpx.Limits:
    """Keep-alive pooling: up to ``max_connections``, all of them kept alive between requests."""
    return httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)


def job_body(
    task: str,
    args: Any,
    job_id: str | None,
    delay: float | timedelta | None = None,
    expires: float | timedelta | None = None,
) -> dict[str, Any]:
    """The body of one job (``delay`` and ``expires`` in seconds)."""
    body: dict[str, Any] = {"task": task, "args": {} if args is None else args}
    if job_id is not None:
        body["id"] = job_id
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
        body["delay_ms"] = max(0, round(seconds * 1000))
    if expires is not None:
        body["expires_s"] = expires.total_seconds() if isinstance(expires, timedelta) else expires
    return body


class Reply:
    """An answer as both clients read it, whichever transport carried it: the status, the
    headers (names in lower case), the body, and the URL asked."""

    __slots__ = ("content", "headers", "status_code", "url")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes, url: str):
        self.status_code = status_code
        self.headers = headers
        self.content = content
        self.url = url

    def __repr__(self) -> str:
        return f"<Reply {self.status_code} {self.url}>"

    @classmethod
    def of(cls, response: httpx.Response) -> Reply:
        """httpx's answer as a :class:`Reply` (read already)."""
        return cls(
            response.status_code,
            {k.lower(): v for k, v in response.headers.items()},
            response.content,
            str(response.url),
        )

    @property
    def is_success(self) -> bool:
        """A 2xx answer."""
        return 200 <= self.status_code < 300

    def json(self) -> Any:
        """The body as JSON (:class:`ValueError` if it is not)."""
        try:
            return msgspec.json.decode(self.content)
        except msgspec.DecodeError as exc:
            raise ValueError(str(exc)) from None


def check(response: Reply) -> None:
    """Nothing for a 2xx answer; the problem's exception for anything else."""
    if response.is_success:
        return
    try:
        body = response.json() if response.content else None
    except ValueError:
        body = response.content[:200].decode("utf-8", "replace")
    raise problem_error(response.status_code, body, response.headers.get("retry-after"))


def json_of(response: Reply) -> Any:
    """The JSON of a 2xx answer."""
    try:
        return msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        raise GatewayError(
            response.status_code, f"{response.url} answered with no JSON (not a gateway?)"
        ) from None


def unreachable(url: str, exc: httpx.RequestError) -> GatewayUnreachable:
    """A transport failure as the client's exception."""
    return GatewayUnreachable(0, f"cannot reach the gateway at {url}: {exc!r}")


def wait_answer(response: Reply) -> WaitAnswer:
    """``POST /v1/jobs/wait``'s answer, typed."""
    try:
        return _decode_wait(response.content)
    except msgspec.DecodeError as exc:
        raise GatewayError(response.status_code, f"not a wait answer: {exc}") from None


class WaitProgress:
    """What a wait for several ids has gathered over its long polls."""

    def __init__(self, ids: list[str], return_when: str) -> None:
        self.pending = list(dict.fromkeys(ids))
        self.return_when = return_when
        self.done: list[JobOutcome] = []
        self.unknown: list[str] = []
        self.ledger = False

    def next_ids(self) -> list[str]:
        """The ids of the next long poll."""
        return self.pending[:MAX_WAIT_IDS]

    def take(self, answer: WaitAnswer) -> None:
        """Take one long poll's answer."""
        finished = {o.id for o in answer.done} | set(answer.unknown)
        self.done += answer.done
        self.unknown += answer.unknown
        self.pending = [i for i in self.pending if i not in finished]
        self.ledger = answer.ledger

    def enough(self) -> bool:
        """True once the wait is over (ignoring its deadline)."""
        if self.return_when == "first" and (self.done or self.unknown):
            return True
        return not self.pending

    def answer(self) -> WaitAnswer:
        """Everything gathered, as one answer."""
        return WaitAnswer(
            done=self.done, pending=self.pending, unknown=self.unknown, ledger=self.ledger
        )


def wait_body(ids: list[str], timeout_s: float, return_when: str) -> dict[str, Any]:
    """The body of one long poll."""
    return {"ids": ids, "timeout_s": round(timeout_s, 3), "return_when": return_when}


def unknown_job(job_id: str) -> UnknownJob:
    """The error for an id the gateway's ledger does not hold."""
    return UnknownJob(
        404, f"no job with id {job_id!r} in the ledger", {"id": job_id, "status": 404}
    )


_FINISHED: Final = frozenset(("succeeded", "failed", "dead", "cancelled"))


@dataclass(frozen=True)
class RunCall:
    """What ``run`` sends: one ``POST /v1/jobs?wait=`` holding the job's ``id`` (made here, so
    a retry sends the same), for ``wait`` seconds of ``timeout``; ``left`` is what a job still
    running then may take (None: no limit)."""

    job_id: str
    body: dict[str, Any]
    params: dict[str, str]
    wait: float
    left: float | None


def run_call(
    task: str,
    args: Any,
    job_id: str | None,
    timeout: float | None,
    long_poll_s: float = LONG_POLL_S,
) -> RunCall:
    """The request of ``Client.run`` and ``AsyncClient.run`` (a wait of at most the client's
    ``long_poll_s``: a gateway refuses one over its ``--max-wait-s``)."""
    job_id = job_id or wire.new_job_id()
    wait = long_poll_s if timeout is None else max(0.0, min(timeout, long_poll_s))
    left = None if timeout is None else max(0.0, timeout - wait)
    return RunCall(job_id, job_body(task, args, job_id), {"wait": f"{wait:g}"}, wait, left)


def answered_outcome(response: Reply) -> JobOutcome | None:
    """The outcome a ``?wait=`` submission came back with (200 and a finished job: a result
    envelope, or the ledger's record of an id it had), else None (202, or still running)."""
    if response.status_code != 200:
        return None
    data = json_of(response)
    if not isinstance(data, dict) or data.get("status") not in _FINISHED:
        return None
    return msgspec.convert(data, JobOutcome)


def outcome_value(outcome: JobOutcome) -> Any:
    """The result of a job that succeeded; :class:`TaskFailed` for any other ending."""
    if outcome.status == "succeeded":
        return outcome.result
    error = outcome.error
    if error is None:
        kind, message = ("Cancelled", "the job was cancelled")
        if outcome.status != "cancelled":
            kind, message = ("Unknown", f"the job ended {outcome.status} with no error recorded")
    else:
        kind, message = error.type, error.message
    raise TaskFailed(kind, message, job_id=outcome.id, status=outcome.status)


@dataclass(frozen=True)
class RetryPolicy:
    """How retryable failures (no answer, ``outcome-unknown`` and the other 503s, 408) are
    tried again: after ``first_delay_s``, doubling up to ``max_delay_s`` (with jitter; a
    ``Retry-After`` counts as a floor), until ``deadline_s`` after the first try. A request is
    sent again unchanged, so a job keeps its id: the gateway's ledger answers the job it has.
    ``RetryPolicy(deadline_s=0)`` never retries."""

    deadline_s: float = 30.0
    first_delay_s: float = 0.05
    max_delay_s: float = 2.0

    def __post_init__(self) -> None:
        if self.deadline_s < 0 or self.first_delay_s <= 0 or self.max_delay_s < self.first_delay_s:
            raise ConfigError(
                "RetryPolicy needs deadline_s >= 0 and 0 < first_delay_s <= max_delay_s"
            )


class Retrier:
    """One request's retries: :meth:`delay` says how long to sleep before the next try, or
    None to give up (the error is raised)."""

    def __init__(self, policy: RetryPolicy, until: float | None = None) -> None:
        """``until``: the caller's own monotonic deadline (a wait's timeout), which retries do
        not outlast either."""
        self.policy = policy
        self.deadline = time.monotonic() + policy.deadline_s
        if until is not None:
            self.deadline = min(self.deadline, until)
        self.tries = 0

    def delay(self, error: GatewayError) -> float | None:
        """The pause before trying again after ``error``; None: raise it."""
        self.tries += 1
        if not error.retryable:
            return None
        policy = self.policy
        backoff = min(policy.max_delay_s, policy.first_delay_s * 2 ** (self.tries - 1))
        pause = random.uniform(backoff / 2, backoff)  # jitter
        if error.retry_after is not None:  # a floor, as the README says (the deadline bounds it)
            pause = max(pause, error.retry_after)
        left = self.deadline - time.monotonic()
        if left <= 0:
            return None
        return min(pause, left)


class MapState:
    """The bookkeeping of ``map``: which arguments to submit next, which jobs to wait for, which
    results may be yielded (in input order), with at most ``max_in_flight`` jobs submitted and
    not yet yielded."""

    def __init__(self, args: Iterable[Any], max_in_flight: int) -> None:
        if max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self._args: Iterator[Any] = iter(args)
        self.max_in_flight = max_in_flight
        self._order: deque[str] = deque()
        self._done: dict[str, JobOutcome] = {}
        self._exhausted = False
        self.most_in_flight = 0  # the most jobs in flight at once (for tests and benchmarks)

    def to_submit(self) -> list[Any]:
        """The arguments to submit now (none once the input is exhausted or the window full)."""
        fresh: list[Any] = []
        room = self.max_in_flight - len(self._order)
        while not self._exhausted and len(fresh) < room:
            try:
                fresh.append(next(self._args))
            except StopIteration:
                self._exhausted = True
        return fresh

    def submitted(self, ids: list[str]) -> None:
        """These jobs were accepted, in input order."""
        self._order.extend(ids)
        self.most_in_flight = max(self.most_in_flight, len(self._order))

    def waiting_for(self) -> list[str]:
        """Ids in flight without an outcome yet, oldest first."""
        return [i for i in self._order if i not in self._done][:MAX_WAIT_IDS]

    def record(self, wait: WaitAnswer) -> None:
        """Take a wait's outcomes; an id the ledger does not know is an error."""
        for outcome in wait.done:
            self._done[outcome.id] = outcome
        if wait.unknown:
            raise unknown_job(wait.unknown[0])

    def ready(self) -> Iterator[JobOutcome]:
        """The outcomes that may be yielded now, in input order (each once)."""
        while self._order and self._order[0] in self._done:
            yield self._done.pop(self._order.popleft())

    @property
    def finished(self) -> bool:
        """Every input submitted and every outcome yielded."""
        return self._exhausted and not self._order


@functools.lru_cache(maxsize=64)
def request_timeout(timeout_s: float, long_poll_s: float = 0.0) -> httpx.Timeout:
    """A request's timeout: ``timeout_s`` to connect and write, plus the long poll to read."""
    return httpx.Timeout(timeout_s, read=timeout_s + long_poll_s)


def args_chunks(args: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``args`` in lists of ``size`` (the last one shorter); ``size`` is a ``chunk_size``: at
    least 1 (:class:`ConfigError`), and no more than a batch holds (1000)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"chunk_size must be a whole number, at least 1, got {size!r}")
    size = min(size, MAX_BATCH_JOBS)
    chunk: list[Any] = []
    for item in args:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def batch_body(task: str, chunk: list[Any], ids: list[str]) -> dict[str, Any]:
    """The body of ``POST /v1/jobs/batch`` for one chunk."""
    return {
        "jobs": [
            {"task": task, "args": {} if a is None else a, "id": i}
            for a, i in zip(chunk, ids, strict=True)
        ]
    }


def left_s(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (monotonic), or None for no deadline."""
    return None if deadline is None else deadline - time.monotonic()


def deadline_of(timeout: float | None) -> float | None:
    """The monotonic deadline ``timeout`` seconds from now (None: none)."""
    return None if timeout is None else time.monotonic() + timeout


def poll_s(deadline: float | None, long_poll_s: float) -> float:
    """How long the next long poll waits: the poll's length, or less before a deadline."""
    left = left_s(deadline)
    return long_poll_s if left is None else max(0.0, min(long_poll_s, left))
