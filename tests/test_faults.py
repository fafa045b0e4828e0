"""nsqd faults under load: killed and restarted, daemons reconnect without waiting for a poll."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import struct
import termios
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from nsqjobs.errors import PublishError, PublishRejected, PublishTimeout
from nsqjobs.nsq.admin import nsqd_limit
from nsqjobs.nsq.publisher import Publisher
from nsqjobs.testing import Daemon, Nsq, http, ping, wait_for

T = TypeVar("T")

pytestmark = pytest.mark.integration

# nsqlookupd is polled only once a minute here: reconnecting must not depend on the poll.
SLOW_POLL = {"NSQJOBS_LOOKUPD_POLL_INTERVAL": "60"}


def _logged(daemon: Daemon, text: str) -> Callable[[], bool]:
    return lambda: text in daemon.log()


def _noop_ok(gw: Daemon) -> bool:
    """One job through the whole pipeline: published, run by a worker, its result waited for."""
    try:
        status, _, body = http(
            "POST", gw.url + "/v1/jobs?wait=1", {"task": "noop", "args": {}}, timeout=5
        )
    except OSError:
        return False
    return status == 200 and body.get("status") == "succeeded"


@pytest.fixture
def load(nsq: Nsq) -> Iterator[Callable[[Daemon], None]]:
    """Submit noop jobs from a thread until the test ends (errors while nsqd is down ignored)."""
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def start(gw: Daemon) -> None:
        def run() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    http("POST", gw.url + "/v1/jobs", {"task": "noop", "args": {}}, timeout=5)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)

    yield start
    stop.set()
    for thread in threads:
        thread.join(10)


@pytest.mark.slow
def test_consumption_resumes_within_seconds_of_nsqd_restart(
    nsq: Nsq, daemons: Callable[..., Daemon], load: Callable[[Daemon], None]
) -> None:
    gw = daemons("gateway", nsq, **SLOW_POLL)
    worker = daemons("worker", nsq, **SLOW_POLL)
    load(gw)
    wait_for(lambda: nsq.message_count("jobs") >= 50, 30, "jobs flowing")
    nsq.stop_nsqd(kill=True)
    wait_for(lambda: not ping(gw.url + "/readyz"), 10, "the gateway to report not ready")
    nsq.start_nsqd()  # returns once nsqd answers /ping
    back = time.monotonic()
    wait_for(lambda: _noop_ok(gw), 6, "a job to run end to end after nsqd came back")
    wait_for(lambda: ping(gw.url + "/readyz"), 3, "the gateway to be ready again")
    wait_for(lambda: ping(worker.url + "/readyz"), 3, "the worker to be ready again")
    elapsed = time.monotonic() - back
    assert elapsed < 6, elapsed
    # Consumption under load resumed too: the restarted nsqd counts the worker's FINs.
    wait_for(lambda: _finished(nsq) >= 20, 10, "the worker to finish jobs of the ongoing load")


def _finished(nsq: Nsq) -> int:
    channel = nsq.channel("jobs", "workers")
    return sum(int(c["finish_count"]) for c in channel["clients"]) if channel else 0


def test_reconnects_log_one_line_per_state_change_and_no_traceback(
    nsq: Nsq, daemons: Callable[..., Daemon]
) -> None:
    gw = daemons("gateway", nsq, **SLOW_POLL)
    worker = daemons("worker", nsq, **SLOW_POLL)
    nsq.stop_nsqd(kill=True)
    for daemon in (gw, worker):
        # A failed reconnect attempt or two, proven by the line that says so.
        wait_for(_logged(daemon, "retrying"), 10, f"{daemon.name} to retry")
    nsq.start_nsqd()
    wait_for(lambda: _noop_ok(gw), 6, "a job to run end to end after nsqd came back")
    for daemon in (gw, worker):
        wait_for(_logged(daemon, "back after"), 5, f"{daemon.name} to say it is back")
        log = daemon.log()
        assert "Traceback" not in log, log
        assert " ERROR " not in log, log
        assert "connection closed" not in log, log  # pynsq's own line, replaced by ours
        lines = log.splitlines()
        lost = [line for line in lines if "lost nsqd" in line]
        retrying = [line for line in lines if "retrying" in line]
        back = [line for line in lines if "back after" in line]
        # One line per connection and state change (the gateway: publisher + results reader;
        # the worker: publisher + one reader per queue), not one per attempt.
        assert lost and len(lost) == len(retrying) == len(back), log
        assert all(" WARNING " in line for line in lost), lost
        assert all(" INFO " in line for line in retrying + back), retrying + back


# The publisher against a real nsqd: refusals, stalls and what may be retried.


def _run(scenario: Callable[[], Coroutine[Any, Any, T]], timeout: float = 30) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(scenario(), timeout)

    return asyncio.run(bounded())


async def _connected(publisher: Publisher, n: int) -> None:
    deadline = time.monotonic() + 10
    while publisher.connected() < n:
        assert time.monotonic() < deadline, "publisher did not connect"
        await asyncio.sleep(0.02)


def test_a_message_over_nsqds_limit_is_refused_unsent_and_the_connection_stays(nsq: Nsq) -> None:
    too_big = b"x" * (1024 * 1024 + 1)  # nsqd's default --max-msg-size is 1 MiB

    async def scenario() -> tuple[list[BaseException | None], bool]:
        publisher = Publisher([nsq.nsqd_tcp], timeout_s=5)
        # What the daemons do at start: nsqd's own limits.
        publisher.set_limits(
            await nsqd_limit([nsq.nsqd_http], "max_msg_size", 1),
            await nsqd_limit([nsq.nsqd_http], "max_body_size", 1),
        )
        try:
            await _connected(publisher, 1)
            (conn,) = publisher._writer.conns.values()
            results = await asyncio.gather(
                publisher.dpub("refusals", 0, too_big),
                publisher.pub("refusals", too_big),
                publisher.mpub("refusals", [b"fits", too_big]),  # all or nothing
                publisher.dpub("refusals", 0, b"good-1"),
                publisher.mpub("refusals", [b"good-2", b"good-3"]),
                publisher.pub("refusals", b"good-4"),
                return_exceptions=True,
            )
            same_conn = list(publisher._writer.conns.values()) == [conn] and conn.connected()
            return [r if isinstance(r, BaseException) else None for r in results], same_conn
        finally:
            publisher.close()

    (*refused, good_1, good_23, good_4), same_conn = _run(scenario)
    for error in refused:
        assert isinstance(error, PublishRejected), error
        assert "E_BAD_MESSAGE" in str(error) and "--max-msg-size of 1048576" in str(error)
    assert [good_1, good_23, good_4] == [None, None, None]
    assert nsq.message_count("refusals") == 4
    assert same_conn  # nothing reached nsqd that would have made it close the connection


def _taken_in(publisher: Publisher, frames: int) -> bool:
    """Whether the publisher's one connection has written ``frames`` frames, and nsqd's socket
    took in every byte (its kernel acknowledges them, even with nsqd stopped)."""
    (conn,) = publisher._writer.conns.values()
    if len(conn.waiting) < frames or conn.stream.writing():
        return False
    unacked = fcntl.ioctl(conn.stream.socket.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return bool(struct.unpack("i", unacked)[0] == 0)


def test_a_refused_frame_fails_alone_and_the_frames_behind_it_are_sent_again(nsq: Nsq) -> None:
    if nsq.nsqd is None:
        raise AssertionError("the pair has an nsqd process")
    nsqd = nsq.nsqd

    async def scenario() -> list[BaseException | None]:
        publisher = Publisher([nsq.nsqd_tcp], timeout_s=5)  # no limits set: nsqd refuses
        try:
            await _connected(publisher, 1)
            # nsqd stopped while the three frames are written, so that it finds them all in one
            # read when it runs again: it answers the first (an empty message) with
            # E_BAD_MESSAGE and closes the connection without handling the two behind it.
            # (Had they arrived after its read, the close would reset the connection and could
            # drop the refusal itself: then all three are honestly "outcome unknown".)
            nsqd.pause()
            try:
                pending = asyncio.gather(
                    publisher.dpub("refusals", 0, b""),
                    publisher.dpub("refusals", 0, b"good-1"),
                    publisher.mpub("refusals", [b"good-2", b"good-3"]),
                    return_exceptions=True,
                )
                deadline = time.monotonic() + 10
                while not _taken_in(publisher, 3):
                    assert time.monotonic() < deadline, "frames not taken in by nsqd's socket"
                    await asyncio.sleep(0.01)
            finally:
                nsqd.resume()
            results = await pending
            return [r if isinstance(r, BaseException) else None for r in results]
        finally:
            publisher.close()

    refused, *others = _run(scenario)
    assert isinstance(refused, PublishRejected), refused
    assert "E_BAD_MESSAGE" in str(refused)
    assert others == [None, None]
    assert nsq.message_count("refusals") == 3


def test_a_publish_timeout_is_not_sent_again_and_a_stalled_nsqd_is_not_ready(nsq: Nsq) -> None:
    if nsq.nsqd is None:
        raise AssertionError("the pair has an nsqd process")
    nsqd = nsq.nsqd
    port = nsq.nsqd_tcp.rpartition(":")[2]
    nsq.create_channel("stalls", "test")

    async def scenario() -> tuple[BaseException | None, int, int]:
        # Two connections to the same nsqd: a retry "on another connection" would store twice.
        publisher = Publisher([nsq.nsqd_tcp, f"localhost:{port}"], timeout_s=0.5)
        try:
            await _connected(publisher, 2)
            nsqd.pause()
            try:
                try:
                    await publisher.pub("stalls", b"maybe-stored")
                    error: BaseException | None = None
                except PublishError as exc:
                    error = exc
                stalled = publisher.connected()
            finally:
                nsqd.resume()
            await _connected(publisher, 2)  # the late OK arrives: healthy again
            return error, stalled, publisher.connected()
        finally:
            publisher.close()

    error, stalled, after = _run(scenario)
    assert isinstance(error, PublishTimeout), error
    assert stalled == 1  # the connection with the overdue answer does not count
    assert after == 2
    assert nsq.message_count("stalls") == 1


def test_an_idle_publisher_writes_a_lone_message_at_once_and_gathers_the_rest(
    nsq: Nsq, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nsqjobs.nsq.conn import BulkConn

    writes: list[bytes] = []
    send_now = BulkConn.send_now

    def spy(conn: BulkConn, data: bytes) -> None:
        writes.append(data)
        send_now(conn, data)

    monkeypatch.setattr(BulkConn, "send_now", spy)

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        publisher = Publisher([nsq.nsqd_tcp], timeout_s=5)
        try:
            await _connected(publisher, 1)
            first = publisher.enqueue("idle", b"lone")
            written_at_once = list(writes)  # no loop turn has run since enqueue
            rest = [publisher.enqueue("idle", b"gathered-%d" % i) for i in range(3)]
            await asyncio.gather(first, *rest)
            return written_at_once, list(writes)
        finally:
            publisher.close()

    at_once, everything = _run(scenario)
    assert [frame[:3] for frame in at_once] == [b"PUB"]
    # The three behind it waited for the end of the turn and went as one MPUB.
    assert [frame[:4] for frame in everything] == [b"PUB ", b"MPUB"]
    assert nsq.message_count("idle") == 4


def test_a_wait_whose_publish_times_out_is_answered_then_not_at_the_wait_s_end(
    nsq: Nsq, daemons: Callable[..., Daemon]
) -> None:
    if nsq.nsqd is None:
        raise AssertionError("the pair has an nsqd process")
    gw = daemons("gateway", nsq, NSQJOBS_PUBLISH_TIMEOUT_S="0.5")
    # Publishing works (no worker runs here: a short wait ends in a 202).
    assert http("POST", gw.url + "/v1/jobs?wait=0.1", {"task": "noop", "args": {}})[0] == 202
    nsq.nsqd.pause()
    try:
        started = time.monotonic()
        status, _, body = http(
            "POST", gw.url + "/v1/jobs?wait=30", {"task": "noop", "args": {}}, timeout=20
        )
        took = time.monotonic() - started
    finally:
        nsq.nsqd.resume()
    assert status == 503, body
    assert body["type"].endswith("outcome-unknown") and body["id"]
    assert took < 10  # by the publish's timeout (0.5 s), not by the wait's 30 s
