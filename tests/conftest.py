"""Fixtures: a real nsqd/nsqlookupd pair per test, and daemons that are always stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.nsqtest import Daemon, Nsq, Tail, nsq_pair, start_daemon, stop_process


@pytest.fixture
def nsq() -> Iterator[Nsq]:
    """nsqlookupd + nsqd on free ports (default 60 s message timeout)."""
    with nsq_pair() as pair:
        yield pair


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start ``nsqjobs`` daemons; any still running at teardown get SIGTERM, then SIGKILL."""
    started: list[Daemon] = []

    def start(kind: str, nsq: Nsq, **kwargs: object) -> Daemon:
        daemon = start_daemon(kind, nsq, tmp_path, **kwargs)  # type: ignore[arg-type]
        started.append(daemon)
        return daemon

    yield start
    for daemon in reversed(started):
        stop_process(daemon.proc)


@pytest.fixture
def tails() -> Iterator[Callable[[Nsq, str, str], Tail]]:
    """Raw NSQ readers, closed at teardown."""
    opened: list[Tail] = []

    def open_tail(nsq: Nsq, topic: str, channel: str) -> Tail:
        tail = Tail(nsq.nsqd_tcp, topic, channel)
        opened.append(tail)
        return tail

    yield open_tail
    for tail in opened:
        tail.close()
