"""Issue 11: the ladder's ``nsq`` rung (``NsqExecutor``) against a real gateway, nsqd and worker:
the same results as running the task inline, failures as ``TaskFailed``, validation in the
caller, one background thread that long-polls many ids (no request per job), shutdown."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nsqjobs.errors import InvalidArgumentsError, TaskFailed, UnknownTaskError
from nsqjobs.ladder.base import normalise
from nsqjobs.ladder.nsq import NsqExecutor
from nsqjobs.names import BUILTIN_TASK_MODULE, DEBUG_TASK_MODULE
from nsqjobs.registry import load_task_modules, registry
from nsqjobs.testing import Daemon, Nsq

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CASES: list[tuple[str, Any]] = [
    ("noop", {}),
    ("noop", {"n": 1, "nested": {"list": [1, 2.5, "x"], "none": None}}),
    *(
        ("primes.count", {"start": a, "stop": b})
        for a, b in ((0, 10), (0, 1000), (10**6, 10**6 + 5000))
    ),
]


@pytest.fixture(scope="module", autouse=True)
def tasks() -> None:
    """The tasks the reference runs inline (and the rung validates locally)."""
    load_task_modules([BUILTIN_TASK_MODULE, DEBUG_TASK_MODULE])


def inline(task: str, args: Any) -> Any:
    """The reference: the task run here, its value as it comes back through JSON."""
    return normalise(registry.get(task).run(args))


def stack(nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path, *, ledger: bool) -> Daemon:
    env = {"NSQJOBS_LEDGER_URL": f"sqlite:///{tmp_path / 'ledger.sqlite3'}"} if ledger else {}
    gateway = daemons("gateway", nsq, **env)
    daemons("worker", nsq)
    return gateway


def requests(gateway: Daemon, route: str, method: str) -> float:
    """Answered requests to ``route`` (any status)."""
    return sum(
        s.value
        for f in gateway.metrics()
        for s in f.samples
        if s.name == "nsqjobs_http_requests_total"
        and s.labels.get("route") == route
        and s.labels.get("method") == method
    )


def waiter_threads() -> int:
    return sum(t.name == "nsqjobs-nsq-waiter" for t in threading.enumerate())


@pytest.mark.parametrize("ledger", [False, True], ids=["no-ledger", "ledger"])
def test_the_nsq_rung_gives_the_inline_results(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path, ledger: bool
) -> None:
    gateway = stack(nsq, daemons, tmp_path, ledger=ledger)
    before = waiter_threads()
    with NsqExecutor(gateway.url, workers=2) as ex:
        assert (ex.kind, ex.workers) == ("nsq", 2)
        assert waiter_threads() == before + 1  # one background thread, whatever the load
        futures = [ex.submit(task, args) for task, args in CASES * 20]
        assert [f.result(timeout=60) for f in futures] == [
            inline(task, args) for task, args in CASES * 20
        ]
        ranges = [{"start": 0, "stop": n} for n in range(0, 3000, 37)]
        assert list(ex.map("primes.count", ranges)) == [inline("primes.count", r) for r in ranges]
        assert list(ex.map("noop", [{"i": i} for i in range(300)], max_in_flight=50)) == [
            {"i": i} for i in range(300)
        ]
        # Jobs submitted faster than they finish share long polls: a poll ends when one of
        # its jobs finishes, so there are at most as many as jobs, never a poll per job per
        # turn.
        polls = requests(gateway, "/v1/jobs/wait", "POST")
        burst = [ex.submit("debug.sleep", {"seconds": 0.5}) for _ in range(40)]
        assert [f.result(timeout=60) for f in burst] == [{"slept": 0.5}] * 40
        assert requests(gateway, "/v1/jobs/wait", "POST") - polls <= 40
    assert waiter_threads() == before
    jobs = len(futures) + len(ranges) + 300 + 40
    # Futures resolve from long polls (each ends with an outcome, or after its 20 s): no job
    # is looked up on its own, and there is never more than a poll per job.
    assert requests(gateway, "/v1/jobs/{id}", "GET") == 0
    assert 0 < requests(gateway, "/v1/jobs/wait", "POST") <= jobs


def test_failures_and_validation(nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path) -> None:
    gateway = stack(nsq, daemons, tmp_path, ledger=True)
    with NsqExecutor(gateway.url) as ex:
        failed = ex.submit("debug.throws", {})
        error = failed.exception(timeout=60)
        assert isinstance(error, TaskFailed)
        assert error.error_type == "DebugPermanentFailure" and error.job_id
        with pytest.raises(TaskFailed):
            list(ex.map("debug.throws", [{}, {}]))
        # Registered here: refused in the caller, nothing sent.
        posts = requests(gateway, "/v1/jobs", "POST")
        with pytest.raises(InvalidArgumentsError):
            ex.submit("primes.count", {"start": -1, "stop": 5})
        with pytest.raises(InvalidArgumentsError):
            list(ex.map("primes.count", [{"stop": "x"}]))
        assert requests(gateway, "/v1/jobs", "POST") == posts
        # Not registered here: the gateway refuses, as the runtime's own error types.
        with pytest.raises(UnknownTaskError):
            ex.submit("no.such.task", {})
        # Cancelling a future stops waiting for it; shutdown cancels the rest on request.
        slow = ex.submit("debug.sleep", {"seconds": 30})
        slower = ex.submit("debug.sleep", {"seconds": 30})
        assert slow.cancel() and slow.cancelled()
        ex.shutdown(wait=True, cancel_futures=True)
        assert slower.cancelled()
        with pytest.raises(RuntimeError):
            ex.submit("noop", {})
