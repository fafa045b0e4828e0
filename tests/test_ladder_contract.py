"""The ladder's executors as concurrent.futures users expect them, without a stack: the nsq
rung on a client that never reaches a gateway (its futures stay pending), the inline rung."""

from __future__ import annotations

import concurrent.futures
import gc
import logging
import threading
import uuid
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import pytest
from nsqjobs import InvalidArgumentsError, executor
from nsqjobs.client import Client, RetryPolicy
from nsqjobs.errors import TaskFailed
from nsqjobs.ladder.nsq import NsqExecutor
from nsqjobs.names import BUILTIN_TASK_MODULE, DEBUG_TASK_MODULE
from nsqjobs.registry import Registry, task
from nsqjobs.testing import alive, free_port, wait_for

pytestmark = pytest.mark.timeout(60)


class FakeClient:
    """What the nsq rung asks of its Client; the gateway URL goes nowhere (the rung's
    background long polls fail and are tried again), and a task named ``slow`` is held in its
    submit until ``gate`` opens."""

    def __init__(self) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.token = ""
        self.timeout_s = 1.0
        self.retry = RetryPolicy(0)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def submit(self, name: str, args: Any) -> Any:
        if name == "slow":
            self.entered.set()
            assert self.gate.wait(10)
        return SimpleNamespace(id=uuid.uuid4().hex)

    def submit_many(self, name: str, args: list[Any]) -> list[Any]:
        return [self.submit(name, a) for a in args]

    def close(self) -> None:
        pass


def nsq_executor() -> tuple[NsqExecutor, FakeClient]:
    client = FakeClient()
    ex = NsqExecutor(
        client=cast(Client, client), task_modules=(BUILTIN_TASK_MODULE,), long_poll_s=0.2
    )
    return ex, client


def test_a_slow_send_holds_no_lock_other_futures_need() -> None:
    ex, client = nsq_executor()
    try:
        first = ex.submit("noop", {})
        sender = threading.Thread(target=ex.submit, args=("slow", {}))
        sender.start()
        assert client.entered.wait(5)
        # Cancelling runs the future's callbacks, which take the executor's lock.
        canceller = threading.Thread(target=first.cancel)
        canceller.start()
        canceller.join(3)
        assert not canceller.is_alive() and first.cancelled()
        client.gate.set()
        sender.join(10)
    finally:
        client.gate.set()
        ex.shutdown(cancel_futures=True)


def test_a_second_shutdown_with_wait_waits_for_the_first() -> None:
    ex, _ = nsq_executor()
    fut = ex.submit("noop", {})
    ex.shutdown(wait=False)  # a thread waits for fut, then frees the rung
    waiting = threading.Thread(target=ex.shutdown)
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive()  # fut has not ended: nothing is freed yet
    fut.cancel()
    waiting.join(10)
    assert not waiting.is_alive() and not ex._waiter._thread.is_alive()


def test_a_gateway_away_leaves_futures_pending_and_a_cancel_logs_nothing_critical(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ex, _ = nsq_executor()
    try:
        with caplog.at_level(logging.WARNING):
            fut = ex.submit("noop", {})
            wait_for(
                lambda: "cannot ask about" in caplog.text, 10, "a long poll to fail at least once"
            )
            done, _ = concurrent.futures.wait([fut], timeout=1.5)
            assert not done  # its job runs on, as far as anyone knows: the future waits
            fut.cancel()
            wait_for(lambda: not ex._waiter._futures, 10, "the waiter to forget the future")
        assert not [r for r in caplog.records if r.levelno >= logging.CRITICAL], caplog.text
    finally:
        ex.shutdown(cancel_futures=True)


def test_bad_calls_raise_what_every_rung_raises() -> None:
    ex, _ = nsq_executor()
    try:
        with pytest.raises(TypeError, match="its name or a registered Task"):
            ex.submit(5, {})  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentsError):
            ex.submit("not.registered.here", object())
        with pytest.raises(ValueError, match="max_in_flight"):
            ex.map("noop", [{}], max_in_flight=0)
    finally:
        ex.shutdown()
    with pytest.raises(ValueError, match="workers"):
        NsqExecutor(client=cast(Client, FakeClient()), workers=0)


def test_an_executor_dropped_without_shutdown_frees_its_thread() -> None:
    ex, _ = nsq_executor()
    thread = ex._waiter._thread
    assert thread.is_alive()
    del ex
    gc.collect()
    wait_for(lambda: not thread.is_alive(), 10, "the waiter's thread to end")


def test_inline_takes_workers_1_and_a_tasks_exit_fails_its_future() -> None:
    with pytest.raises(ValueError, match="one job at a time"):
        executor("inline", workers=2)
    with executor("inline", workers=1, task_modules=(BUILTIN_TASK_MODULE, DEBUG_TASK_MODULE)) as ex:
        reg = Registry()  # a task that calls sys.exit(), as a task may

        @task("exits", target=reg)
        def exits(args: dict[str, Any]) -> None:
            raise SystemExit(3)

        with pytest.raises(TaskFailed, match="SystemExit"):
            ex.submit(reg.get("exits"), {}).result()


def test_a_process_pool_dropped_without_shutdown_ends_its_children() -> None:
    ex = executor("processes", workers=1, task_modules=(BUILTIN_TASK_MODULE,))
    assert ex.submit("noop", {"a": 1}).result(timeout=30) == {"a": 1}
    pids = ex.child_pids()  # type: ignore[attr-defined]
    assert pids
    del ex
    gc.collect()
    wait_for(lambda: not any(alive(p) for p in pids), 15, "the pool's child to end")


class CountArgs(msgspec.Struct, forbid_unknown_fields=True):
    n: int


def test_map_validates_its_window_before_sending_any_job() -> None:
    ran: list[int] = []
    reg = Registry()

    @task("count", target=reg)
    def count(args: CountArgs) -> int:
        ran.append(args.n)
        return args.n

    with executor("inline", task_modules=(BUILTIN_TASK_MODULE,)) as ex:
        with pytest.raises(InvalidArgumentsError):
            ex.map(reg.get("count"), [{"n": 1}, {"n": 2}, {"n": "three"}], max_in_flight=3)
        assert ran == []  # the bad third refused them all, before the first ran
        assert list(ex.map(reg.get("count"), [{"n": 1}, {"n": 2}])) == [1, 2]
