"""The asyncio client: :class:`AsyncClient` and its job handle :class:`AsyncJob` (the same API
as :mod:`nsqjobs.client.sync`, awaited)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from datetime import timedelta
from types import TracebackType
from typing import Any, Literal

import httpx
import msgspec

from nsqjobs import wire
from nsqjobs.api import JobOutcome, WaitAnswer
from nsqjobs.client import core
from nsqjobs.client.problems import GatewayError, PartiallyAccepted
from nsqjobs.names import MAX_BATCH_JOBS

ReturnWhen = Literal["first", "all"]
_encode = msgspec.json.Encoder().encode
_JSON = {"Content-Type": "application/json"}


class AsyncJob:
    """A submitted job: its ``id``, and how to ask about it (``status`` and ``cancel`` need the
    gateway's job ledger; ``result`` works with or without one)."""

    __slots__ = ("_client", "id", "task")

    def __init__(self, client: AsyncClient, job_id: str, task: str) -> None:
        self._client = client
        self.id = job_id
        self.task = task

    def __repr__(self) -> str:
        return f"AsyncJob(id={self.id!r}, task={self.task!r})"

    async def info(self) -> dict[str, Any]:
        """The job as the ledger records it (``GET /v1/jobs/{id}``)."""
        record: dict[str, Any] = core.json_of(
            await self._client.request("GET", core.job_path(self.id))
        )
        return record

    async def status(self) -> str:
        """``queued``, ``running``, ``succeeded``, ``failed``, ``dead`` or ``cancelled``."""
        return str((await self.info())["status"])

    async def outcome(self, timeout: float | None = None) -> JobOutcome | None:
        """How the job ended, waiting up to ``timeout`` seconds (None: as long as it takes);
        None if it has not finished by then."""
        wait = await self._client.wait([self.id], timeout=timeout, return_when="all")
        if wait.unknown:
            raise core.unknown_job(self.id)
        return wait.done[0] if wait.done else None

    async def result(self, timeout: float | None = None) -> Any:
        """The job's result, waiting up to ``timeout`` seconds (None: as long as it takes).

        :class:`~nsqjobs.errors.TaskFailed` if it failed, died or was cancelled;
        :class:`TimeoutError` if it has not finished in time.
        """
        outcome = await self.outcome(timeout)
        if outcome is None:
            raise TimeoutError(f"job {self.id} has not finished after {timeout:g}s")
        return core.outcome_value(outcome)

    async def cancel(self) -> dict[str, Any]:
        """Cancel the job if it has not finished (``DELETE /v1/jobs/{id}``): the job as now
        recorded; :class:`~nsqjobs.client.AlreadyFinished` if it had."""
        record: dict[str, Any] = core.json_of(
            await self._client.request("DELETE", core.job_path(self.id))
        )
        return record


class AsyncClient:
    """A gateway's API over pooled keep-alive connections (httpx), on one event loop.

    ``url`` and ``token`` default to ``NSQJOBS_GATEWAY_URL`` and ``NSQJOBS_API_TOKEN``.
    Failures the gateway says may pass (no answer, 503, 408) are retried as ``retry`` says; a
    job's id is made before its first try, so each retry sends the same id. ``timeout_s``
    bounds each request (plus its long poll, when it waits).
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        retry: core.RetryPolicy | None = None,
        max_connections: int = 16,
        long_poll_s: float = core.LONG_POLL_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url, self.token = core.settings(url, token)
        core.check_limits(timeout_s, long_poll_s, max_connections)
        self.timeout_s = timeout_s
        self.retry = retry or core.RetryPolicy()
        self.long_poll_s = long_poll_s
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=core.headers(self.token),
            timeout=core.request_timeout(timeout_s),
            limits=core.limits(max_connections),
            transport=transport,
        )

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        long_poll_s: float = 0.0,
        until: float | None = None,
    ) -> core.Reply:
        """One API call, retried as :attr:`retry` says; the 2xx answer, or the problem's
        exception (:class:`~nsqjobs.client.GatewayError` and its subclasses). ``until``: a
        monotonic time retries stop at too (a wait's timeout: no retry outlasts the caller's)."""
        retrier = core.Retrier(self.retry, until)
        content = None if body is None else _encode(body)
        timeout = core.request_timeout(self.timeout_s, long_poll_s)
        while True:
            try:
                response = core.Reply.of(
                    await self._http.request(
                        method,
                        path,
                        content=content,
                        params=params,
                        headers=_JSON if content is not None else None,
                        timeout=timeout,
                    )
                )
                core.check(response)
                return response
            except httpx.RequestError as exc:  # no answer, or one that cannot be read
                error: GatewayError = core.unreachable(self.url, exc)
                error.__cause__ = exc
            except GatewayError as exc:
                error = exc
            pause = retrier.delay(error)
            if pause is None:
                raise error
            await asyncio.sleep(pause)

    async def submit(
        self,
        task: str,
        args: Any = None,
        *,
        id: str | None = None,
        delay: float | timedelta | None = None,
        expires: float | timedelta | None = None,
    ) -> AsyncJob:
        """Submit one job (``delay`` and ``expires`` in seconds); its handle once accepted."""
        job_id = id or wire.new_job_id()  # made before the first try: retries send the same
        await self.request(
            "POST", "/v1/jobs", body=core.job_body(task, args, job_id, delay, expires)
        )
        return AsyncJob(self, job_id, task)

    async def run(
        self, task: str, args: Any = None, *, id: str | None = None, timeout: float | None = None
    ) -> Any:
        """Submit one job and wait for its result in the same request (see ``Client.run``)."""
        call = core.run_call(task, args, id, timeout, self.long_poll_s)
        response = await self.request(
            "POST", "/v1/jobs", body=call.body, params=call.params, long_poll_s=call.wait
        )
        outcome = core.answered_outcome(response)
        if outcome is not None:
            return core.outcome_value(outcome)
        return await AsyncJob(self, call.job_id, task).result(timeout=call.left)

    async def submit_many(
        self, task: str, args: Iterable[Any], *, chunk_size: int = MAX_BATCH_JOBS
    ) -> list[AsyncJob]:
        """Submit a job of ``task`` per item of ``args`` through ``POST /v1/jobs/batch``,
        ``chunk_size`` (at most 1000) per request; their handles, in order. A chunk refused
        raises its error with ``accepted``: the handles of the earlier chunks' jobs, which run."""
        jobs: list[AsyncJob] = []
        for chunk in core.args_chunks(args, chunk_size):
            ids = wire.new_job_ids(len(chunk))
            body = core.batch_body(task, chunk, ids)
            while body["jobs"]:
                try:
                    await self.request("POST", "/v1/jobs/batch", body=body)
                    break
                except PartiallyAccepted as exc:  # send again only what was not stored
                    left = set(exc.unaccepted_ids)
                    body = {"jobs": [j for j in body["jobs"] if j["id"] in left]}
                except GatewayError as exc:
                    exc.accepted = jobs
                    raise
            jobs += [AsyncJob(self, i, task) for i in ids]
        return jobs

    def job(self, job_id: str) -> AsyncJob:
        """The handle of a job submitted before (by id)."""
        return AsyncJob(self, job_id, "")

    async def wait(
        self, ids: Iterable[str], *, timeout: float | None = 0.0, return_when: ReturnWhen = "all"
    ) -> WaitAnswer:
        """Wait up to ``timeout`` seconds (None: as long as it takes) until the first or all of
        the jobs ``ids`` finished, in long polls of ``POST /v1/jobs/wait``; what is known then."""
        progress = core.WaitProgress(list(ids), return_when)
        deadline = core.deadline_of(timeout)
        while True:
            poll = core.poll_s(deadline, self.long_poll_s)
            response = await self.request(
                "POST",
                "/v1/jobs/wait",
                body=core.wait_body(progress.next_ids(), poll, return_when),
                long_poll_s=poll,
                until=deadline,
            )
            progress.take(core.wait_answer(response))
            left = core.left_s(deadline)
            if progress.enough() or (left is not None and left <= 0):
                return progress.answer()

    async def map(
        self,
        task: str,
        args: Iterable[Any],
        *,
        max_in_flight: int = 32,
        timeout: float | None = None,
    ) -> AsyncIterator[Any]:
        """Run ``task`` on every item of ``args``; the results in input order, with at most
        ``max_in_flight`` jobs submitted and not yet yielded. The first job that did not
        succeed raises :class:`~nsqjobs.errors.TaskFailed` when its turn comes;
        :class:`TimeoutError` when ``timeout`` seconds pass first."""
        state = core.MapState(args, max_in_flight)
        deadline = core.deadline_of(timeout)
        while not state.finished:
            fresh = state.to_submit()
            if fresh:
                state.submitted([job.id for job in await self.submit_many(task, fresh)])
            ready = False
            for outcome in state.ready():
                ready = True
                yield core.outcome_value(outcome)
            if ready or state.finished:
                continue
            left = core.left_s(deadline)
            if left is not None and left <= 0:
                raise TimeoutError(f"map of {task} not finished after {timeout:g}s")
            state.record(await self.wait(state.waiting_for(), timeout=left, return_when="first"))
