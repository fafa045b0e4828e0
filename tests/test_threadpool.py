"""The worker's thread executor: results, errors, parallelism, cancellation, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from nsqjobs.errors import TaskTimeoutError
from nsqjobs.worker.executors import ThreadExecutor
from nsqjobs.worker.slots import SlotPool


def test_results_and_errors_come_back_as_futures() -> None:
    pool = SlotPool(3)

    def boom(x: int) -> int:
        raise ValueError(f"bad {x}")

    async def main() -> None:
        futs = [pool.submit(pow, i, 2) for i in range(200)]
        assert await asyncio.gather(*futs) == [i * i for i in range(200)]
        with pytest.raises(ValueError, match="bad 7"):
            await pool.submit(boom, 7)
        with pytest.raises(RuntimeError, match="StopIteration"):
            await pool.submit(next, iter(()))

    asyncio.run(main())
    pool.shutdown()


def test_jobs_run_in_parallel_up_to_the_pool_size() -> None:
    pool = SlotPool(4)
    gate = threading.Barrier(4, timeout=10)  # only passes if 4 jobs run at once

    async def main() -> None:
        # Barrier.wait() hands each of the 4 waiting threads a distinct index: 4 ran at once.
        indexes = await asyncio.gather(*(pool.submit(gate.wait) for _ in range(4)))
        assert sorted(indexes) == [0, 1, 2, 3]

    asyncio.run(main())
    pool.shutdown()


def test_cancelled_job_outcome_is_dropped_and_queued_jobs_are_skipped() -> None:
    pool = SlotPool(1)
    started, release = threading.Event(), threading.Event()
    ran: list[int] = []

    def job(n: int) -> int:
        started.set()
        release.wait(10)
        ran.append(n)
        return n

    async def main() -> None:
        first, second = pool.submit(job, 1), pool.submit(job, 2)
        assert await asyncio.to_thread(started.wait, 10)
        first.cancel()  # running: its thread finishes, the result is dropped
        second.cancel()  # queued: never runs
        release.set()
        third = pool.submit(job, 3)
        assert await asyncio.wait_for(third, 10) == 3
        assert first.cancelled() and second.cancelled()

    asyncio.run(main())
    assert ran == [1, 3]
    pool.shutdown()


def test_shutdown_cancels_what_has_not_started_and_stops_threads() -> None:
    pool = SlotPool(1)
    release = threading.Event()

    async def main() -> None:
        running = pool.submit(release.wait, 10)
        deadline = time.monotonic() + 10
        while pool._jobs.qsize() and time.monotonic() < deadline:  # the thread took it
            await asyncio.sleep(0.005)
        queued = pool.submit(time.sleep, 0)
        pool.shutdown()
        assert queued.cancelled()
        with pytest.raises(RuntimeError, match="shut down"):
            pool.submit(time.sleep, 0)
        release.set()
        assert await asyncio.wait_for(running, 10) is True

    asyncio.run(main())
    deadline = time.monotonic() + 10
    while any(t.is_alive() for t in pool._threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.is_alive() for t in pool._threads)


def test_a_call_past_its_limit_fails_but_keeps_its_thread_until_it_returns() -> None:
    pool = SlotPool(1)
    gate = threading.Event()
    released: list[asyncio.Future[object]] = []
    pool.on_release = released.append

    async def main() -> None:
        fut = pool.submit(gate.wait, 10, limit_s=0.05)
        with pytest.raises(TaskTimeoutError, match=r"0\.05s time limit"):
            await fut
        # The future ended; the thread did not: the slot is not free.
        assert (pool.idle(), released) == (0, [])
        gate.set()
        deadline = time.monotonic() + 5
        while not released:
            assert time.monotonic() < deadline, "the thread never came back"
            await asyncio.sleep(0.005)
        assert released == [fut] and pool.idle() == 1
        assert await pool.submit(pow, 3, 2, limit_s=5) == 9  # a timer that never fires

    asyncio.run(main())
    pool.shutdown()


def test_a_timed_out_job_holds_its_thread_only_until_its_call_returns() -> None:
    # The worker asks the executor whether a failed job still takes a slot. The answer must
    # come from the pool, not from the failure: a thread that returned in the same loop turn
    # as its time limit fired (its release handled first) would otherwise be counted as
    # running for ever, and the worker would take one job fewer at a time for good.
    executor = ThreadExecutor(1)
    released: list[asyncio.Future[object]] = []
    executor.on_release = released.append
    gate = threading.Event()

    async def main() -> None:
        ran = executor.pool.submit(gate.wait, 10, limit_s=0.05)
        with pytest.raises(TaskTimeoutError):
            await ran
        assert executor.holds(ran) and executor.idle() == 0  # its thread runs on
        gate.set()
        deadline = time.monotonic() + 10
        while not released and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert released == [ran]
        # Asked after the release (the order the race gives): the slot is free.
        assert not executor.holds(ran) and executor.idle() == 1

    asyncio.run(main())
    executor.shutdown()
