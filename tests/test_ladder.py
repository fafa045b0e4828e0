"""The ladder's local rungs: inline, processes and a real IPython Parallel cluster run the same
tasks, give the same results and raise the same errors; map keeps order within its bound;
shutdown frees what a rung started; an engine killed mid-job fails its job or has it retried.

One cluster serves the module's conformance tests (started here, reached through its connection
file); the engine-kill tests start their own through the executor, since they lose an engine.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nsqjobs import InvalidArgumentsError, UnknownTaskError, executor
from nsqjobs.errors import ConfigError, TaskFailed
from nsqjobs.ladder import TaskExecutor, normalise, prepare
from nsqjobs.names import BUILTIN_TASK_MODULE, DEBUG_TASK_MODULE, ENV_DEBUG_EXECUTIONS_LOG
from nsqjobs.testing import alive, wait_for

from tests.conftest import IN_CI

MODULES = (BUILTIN_TASK_MODULE, DEBUG_TASK_MODULE)
LOCAL_RUNGS = ("inline", "processes", "ipyparallel")

# The same jobs on every rung, from no-op to a few ms of sieve.
JOBS: list[tuple[str, dict[str, Any]]] = [
    ("noop", {}),
    ("noop", {"pair": [1, 2], "nested": {"x": None, "y": 1.5}, "text": "é"}),
    ("primes.count", {"start": 0, "stop": 1_000}),
    ("primes.count", {"start": 10**6, "stop": 10**6 + 10**5}),
    ("primes.count", {"start": 0, "stop": 2 * 10**6}),
    ("primes.count", {"start": 5, "stop": 5}),
    ("pi.estimate", {"samples": 20_000, "seed": 11}),
]


def need_ipyparallel() -> None:
    """Skip on a laptop without the ``ladder`` extra; fail in CI, where make venv installs it."""
    if importlib.util.find_spec("ipyparallel") is None:
        message = "ipyparallel is not installed: pip install -e '.[ladder]' (make venv does)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local IPython Parallel cluster of 2 engines, started and stopped here: its client
    connection file."""
    need_ipyparallel()
    import ipyparallel as ipp

    started = ipp.Cluster(n=2, profile_dir=str(tmp_path_factory.mktemp("ipp")), log_level=30)
    started.start_cluster_sync()
    try:
        yield started.controller.connection_files["client"]
        # The executor connected to it, and leaves it running at its shutdown.
        client = started.connect_client_sync()
        try:
            assert client[:].apply_sync(os.getpid)
        finally:
            client.close()
    finally:
        started.stop_cluster_sync()


@pytest.fixture(scope="module")
def rungs(request: pytest.FixtureRequest) -> Iterator[dict[str, TaskExecutor]]:
    """One executor per local rung, made on first use and shut down at the module's end."""
    made: dict[str, TaskExecutor] = {}

    class Lazy(dict[str, TaskExecutor]):
        def __missing__(self, kind: str) -> TaskExecutor:
            if kind == "ipyparallel":
                url_file = request.getfixturevalue("cluster")
                made[kind] = executor(kind, url_file=url_file, workers=2, task_modules=MODULES)
            elif kind == "processes":
                made[kind] = executor(kind, workers=2, task_modules=MODULES)
            else:
                made[kind] = executor(kind, task_modules=MODULES)
            self[kind] = made[kind]
            return made[kind]

    yield Lazy()
    for ex in made.values():
        ex.shutdown()


@pytest.fixture(params=LOCAL_RUNGS)
def rung(request: pytest.FixtureRequest, rungs: dict[str, TaskExecutor]) -> TaskExecutor:
    """Each local rung in turn."""
    return rungs[request.param]


def reference(task: str, args: dict[str, Any]) -> Any:
    """What the inline rung returns, the reference for every other."""
    with executor("inline", task_modules=MODULES) as ex:
        return ex.submit(task, args).result()


@pytest.mark.timeout(90)
def test_every_rung_returns_the_inline_results(rung: TaskExecutor) -> None:
    futures = [rung.submit(task, args) for task, args in JOBS]
    results = [f.result(timeout=60) for f in futures]
    assert results == [reference(task, args) for task, args in JOBS]
    assert results[2] == 168 and results[4] == 148_933
    assert results[1] == {"pair": [1, 2], "nested": {"x": None, "y": 1.5}, "text": "é"}
    assert rung.workers == (1 if rung.kind == "inline" else 2)


@pytest.mark.timeout(60)
def test_a_failing_task_fails_its_future_with_task_failed(rung: TaskExecutor) -> None:
    fut = rung.submit("debug.fail", {"mode": "error"})
    with pytest.raises(TaskFailed) as raised:
        fut.result(timeout=30)
    assert (raised.value.error_type, raised.value.message) == (
        "DebugFailure",
        "debug.fail asked to fail",
    )
    assert raised.value.status == "failed"
    assert raised.value.__cause__ is not None  # the task's exception, or ipyparallel's report
    unencodable = rung.submit("debug.unencodable", {})
    with pytest.raises(TaskFailed) as raised:
        unencodable.result(timeout=30)
    assert raised.value.error_type == "ResultNotEncodable"
    assert rung.submit("noop", {"still": "works"}).result(timeout=30) == {"still": "works"}


BAD: list[tuple[str, Any, type[Exception]]] = [
    ("no.such.task", {}, UnknownTaskError),
    ("primes.count", {"start": 0}, InvalidArgumentsError),
    ("primes.count", {"start": 10, "stop": 1}, InvalidArgumentsError),
    ("primes.count", {"start": 0, "stop": 10, "step": 1}, InvalidArgumentsError),
    ("primes.count", [0, 10], InvalidArgumentsError),
    ("pi.estimate", {"samples": 0, "seed": 1}, InvalidArgumentsError),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("task", "args", "error"), BAD)
def test_validation_raises_the_same_errors_in_the_caller(
    rung: TaskExecutor, task: str, args: Any, error: type[Exception]
) -> None:
    with pytest.raises(error) as raised:
        rung.submit(task, args)
    with pytest.raises(error) as expected:
        prepare(task, args)
    assert str(raised.value) == str(expected.value)
    with pytest.raises(error):
        rung.map(task, [args])


def test_prepare_takes_typed_arguments_and_integral_floats() -> None:
    from nsqjobs_tasks.builtin import PrimesCountArgs

    found, plain = prepare("primes.count", PrimesCountArgs(start=1, stop=10))
    assert plain == {"start": 1, "stop": 10} and not isinstance(found, str)
    assert prepare("primes.count", {"start": 0, "stop": 1e3})[1] == {"start": 0, "stop": 1000}
    assert prepare("elsewhere.task", {"a": (1, 2)}, accept_unknown=True) == (
        "elsewhere.task",
        {"a": [1, 2]},
    )
    assert normalise({1: (2, 3)}) == {"1": [2, 3]}


@pytest.mark.timeout(90)
def test_map_keeps_input_order_and_bounds_jobs_in_flight(rung: TaskExecutor) -> None:
    # Larger ranges first: on 2 workers the later, smaller jobs tend to end first.
    spans = [4 * 10**5, 3 * 10**5, 10**5, 10**3, 10, 2 * 10**5, 10**4, 1, 5 * 10**4, 0]
    argses = [{"start": 10**6, "stop": 10**6 + s} for s in spans]
    taken = 0

    def arguments() -> Iterator[dict[str, int]]:
        nonlocal taken
        for args in argses:
            taken += 1
            yield args

    limit = 3
    results = []
    for k, result in enumerate(rung.map("primes.count", arguments(), max_in_flight=limit), 1):
        # Submitted and not yet yielded: at most `limit`, and the window is kept full.
        assert taken == min(len(argses), k - 1 + limit)
        results.append(result)
    assert results == [reference("primes.count", a) for a in argses]
    assert list(rung.map("noop", [])) == []


@pytest.mark.timeout(60)
def test_map_raises_the_first_failure_in_its_turn(rung: TaskExecutor) -> None:
    key = f"{rung.kind}-{uuid.uuid4().hex[:8]}"  # debug.flaky counts calls per key and process
    argses = [{"key": f"{key}-a", "fails": 0}, {"key": f"{key}-b", "fails": 1}]
    results = rung.map("debug.flaky", [*argses, {"key": f"{key}-c", "fails": 0}])
    assert next(results) == {"calls": 1}
    with pytest.raises(TaskFailed) as raised:
        next(results)
    assert raised.value.error_type == "DebugFailure"


@pytest.mark.timeout(60)
def test_map_timeout_counts_from_the_call(rung: TaskExecutor) -> None:
    results = rung.map("debug.sleep", [{"seconds": 0.0}, {"seconds": 1.0}], timeout=0.5)
    if rung.kind == "inline":  # the caller ran both already: nothing to wait for
        assert list(results) == [{"slept": 0.0}, {"slept": 1.0}]
        return
    assert next(results) == {"slept": 0.0}
    with pytest.raises(TimeoutError):
        next(results)


@pytest.mark.timeout(60)
def test_unknown_kind_and_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="inline, processes, ipyparallel, nsq"):
        executor("threads")
    with pytest.raises(ValueError, match="workers"):
        executor("processes", workers=0)
    with executor("inline") as ex, pytest.raises(ValueError, match="max_in_flight"):
        ex.map("noop", [{}], max_in_flight=0)


@pytest.mark.timeout(90)
def test_processes_shutdown_cancels_and_stops_its_children() -> None:
    with executor("processes", workers=1, task_modules=MODULES) as ex:
        pids = ex.child_pids()  # type: ignore[attr-defined]
        assert len(pids) == 1 and all(alive(pid) for pid in pids)
        first = ex.submit("debug.sleep", {"seconds": 0.3})
        queued = [ex.submit("noop", {"i": i}) for i in range(5)]
        ex.shutdown(cancel_futures=True)
        assert all(f.cancelled() for f in queued)
        assert first.done()
        with pytest.raises(RuntimeError, match="after shutdown"):
            ex.submit("noop", {})
    wait_for(lambda: not any(alive(pid) for pid in pids), 10, "the child process to end")


@pytest.mark.timeout(90)
def test_processes_a_dying_child_fails_its_job_and_is_replaced() -> None:
    with executor("processes", workers=2, task_modules=MODULES) as ex:
        with pytest.raises(TaskFailed) as raised:
            ex.submit("debug.fail", {"mode": "crash"}).result(timeout=30)
        assert raised.value.status == "lost"
        assert [ex.submit("noop", {"i": i}) for i in range(4)][-1].result(timeout=30) == {"i": 3}


@pytest.mark.timeout(60)
def test_inline_context_manager_and_shutdown() -> None:
    with executor("inline", task_modules=MODULES) as ex:
        assert ex.submit("noop", {"a": 1}).result() == {"a": 1}
        assert ex.kind == "inline" and "running" in repr(ex)
    assert "shut down" in repr(ex)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit("noop", {})


@pytest.mark.timeout(90)
def test_ipyparallel_a_cancel_in_a_done_callback_returns(rungs: dict[str, TaskExecutor]) -> None:
    # A future's done-callbacks run on ipyparallel's I/O thread: a cancel made there must not
    # wait for the engines' replies to its abort (which that thread would have to read).
    ex = rungs["ipyparallel"]
    busy = [ex.submit("debug.sleep", {"seconds": 1.0}) for _ in range(ex.workers)]
    queued = ex.submit("noop", {"q": 1})
    cancelled = threading.Event()

    def cancel_queued(_: concurrent.futures.Future[Any]) -> None:
        queued.cancel()
        cancelled.set()

    busy[0].add_done_callback(cancel_queued)
    assert busy[0].result(timeout=30) == {"slept": 1.0}
    assert cancelled.wait(10)
    for fut in busy[1:]:
        fut.result(timeout=30)
    assert ex.submit("noop", {"after": 1}).result(timeout=30) == {"after": 1}


@pytest.mark.timeout(90)
def test_ipyparallel_a_job_an_engine_began_is_running_and_cannot_be_cancelled(
    rungs: dict[str, TaskExecutor],
) -> None:
    ex = rungs["ipyparallel"]
    busy = [ex.submit("debug.sleep", {"seconds": 1.5}) for _ in range(ex.workers)]
    queued = ex.submit("noop", {"q": 2})  # every engine is busy: it waits in the scheduler
    wait_for(lambda: all(f.running() for f in busy), 30, "the engines to begin their jobs")
    assert not queued.running()
    assert not busy[0].cancel()  # as with the stdlib's executors: it runs on
    assert not busy[0].cancelled() and busy[0].running()
    assert queued.cancel() and queued.cancelled()
    assert [f.result(timeout=30) for f in busy] == [{"slept": 1.5}] * len(busy)
    assert not busy[0].running() and not busy[0].cancel()  # done


# -- the engine-kill tests: a cluster each, started by the executor --------------------------


def _kill_the_busy_engine(ex: TaskExecutor, log: Path, key: str) -> int:
    """Once the job ``key`` has started (its line in ``log``), SIGKILL the engine running it."""
    wait_for(lambda: log.exists() and key in log.read_text().split(), 30, f"{key} to start")
    client = ex.client  # type: ignore[attr-defined]
    status = client.queue_status()
    busy = [eid for eid in client.ids if status[eid]["tasks"] > 0]
    assert len(busy) == 1, status
    pid: int = ex.engine_pids[busy[0]]  # type: ignore[attr-defined]
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.timeout(120)
def test_ipyparallel_engine_killed_mid_job_fails_the_future(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_ipyparallel()
    log = tmp_path / "executions.log"
    monkeypatch.setenv(ENV_DEBUG_EXECUTIONS_LOG, str(log))  # the engines inherit it
    with executor("ipyparallel", workers=2, task_modules=MODULES) as ex:
        pids = list(ex.engine_pids.values())  # type: ignore[attr-defined]
        fut = ex.submit("debug.chaos", {"key": "doomed", "seconds": 60})
        _kill_the_busy_engine(ex, log, "doomed")
        with pytest.raises(TaskFailed) as raised:
            fut.result(timeout=60)
        assert (raised.value.status, raised.value.error_type) == ("lost", "EngineError")
        assert type(raised.value.__cause__).__name__ == "RemoteError"
        assert ex.submit("noop", {"after": 1}).result(timeout=30) == {"after": 1}
    # It started the cluster: shutdown stopped the engines (and the controller).
    wait_for(lambda: not any(alive(pid) for pid in pids), 30, "the engines to stop")


@pytest.mark.timeout(120)
def test_ipyparallel_engine_killed_mid_job_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_ipyparallel()
    log = tmp_path / "executions.log"
    monkeypatch.setenv(ENV_DEBUG_EXECUTIONS_LOG, str(log))
    with executor("ipyparallel", workers=2, task_modules=MODULES, retries=1) as ex:
        fut = ex.submit("debug.chaos", {"key": "survivor", "seconds": 1.0})
        killed = _kill_the_busy_engine(ex, log, "survivor")
        assert fut.result(timeout=60) == {"key": "survivor"}
        assert log.read_text().split() == ["survivor", "survivor"]  # ran twice, ended once
        assert killed not in ex.engine_pids.values() or not alive(killed)  # type: ignore[attr-defined]
        # A task that raises is not retried: retries are for lost engines only.
        with pytest.raises(TaskFailed):
            ex.submit("debug.flaky", {"key": "once", "fails": 1}).result(timeout=30)


@pytest.mark.timeout(30)
def test_ipyparallel_options_are_checked() -> None:
    need_ipyparallel()
    with pytest.raises(ConfigError, match="one of"):
        executor("ipyparallel", profile="a", url_file="b")
    with pytest.raises(ConfigError, match="retries"):
        executor("ipyparallel", url_file="b", retries=-1)


def test_futures_are_concurrent_futures() -> None:
    with executor("inline") as ex:
        fut = ex.submit("noop", None)
        assert isinstance(fut, concurrent.futures.Future) and fut.result() == {}
        assert isinstance(ex, concurrent.futures.Executor)


@pytest.mark.timeout(120)
def test_the_ladder_benchmark_runs_quick_on_the_local_rungs(tmp_path: Path) -> None:
    from bench import ladder

    tiny = ladder.Settings(rounds=1, max_exponent=4, budget_s=0.02, min_jobs=2, max_jobs=40)
    code = ladder.run(True, tmp_path, "test", kinds=("inline", "processes"), settings=tiny)
    assert code == 0
    doc = json.loads((tmp_path / "ladder.json").read_text())
    assert doc["rungs"]["processes"]["status"] == "ran"
    assert set(doc["rungs"]["processes"]["cells"]) == {"noop", "primes 10^3", "primes 10^4"}
    text = (tmp_path / "ladder.md").read_text()
    assert "| noop |" in text and "## Crossovers" in text and "## Target" in text
    assert (tmp_path / "ladder.png").read_bytes().startswith(b"\x89PNG")
