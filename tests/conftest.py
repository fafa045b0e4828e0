"""Fixtures: a real nsqd/nsqlookupd pair per test, and daemons that are always stopped.

A missing binary (`nsqjobs.testing.MissingBinary`, raised in a fixture or a test) skips the test
on a laptop and fails it when ``CI`` is set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Protocol

import pytest
from nsqjobs.testing import BIN_DIR_ENV, Daemon, MissingBinary, Nsq, Tail, nsq_pair, start_daemon

ROOT = Path(__file__).resolve().parent.parent
IN_CI = bool(os.environ.get("CI"))

# `make nsq` builds NSQ into .bin/: look there before PATH, also when pytest runs on its own.
os.environ.setdefault(BIN_DIR_ENV, str(ROOT / ".bin"))


def _missing(exc: MissingBinary) -> None:
    if IN_CI:
        pytest.fail(str(exc), pytrace=False)
    pytest.skip(str(exc))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    except MissingBinary as exc:
        _missing(exc)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    try:
        return (yield)
    except MissingBinary as exc:
        _missing(exc)


class StartDaemon(Protocol):
    """The ``daemons`` fixture: start ``nsqjobs gateway|worker`` against a pair."""

    def __call__(self, kind: str, nsq: Nsq, *, ready: bool = True, **env: str) -> Daemon: ...


@pytest.fixture
def nsq() -> Iterator[Nsq]:
    """nsqlookupd + nsqd on free ports (default 60 s message timeout)."""
    with nsq_pair() as pair:
        yield pair


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[StartDaemon]:
    """Start ``nsqjobs`` daemons; any still running at teardown get SIGTERM, then SIGKILL."""
    started: list[Daemon] = []

    def start(kind: str, nsq: Nsq, *, ready: bool = True, **env: str) -> Daemon:
        daemon = start_daemon(kind, nsq, tmp_path, env, ready=ready, cwd=ROOT)
        started.append(daemon)
        return daemon

    yield start
    for daemon in reversed(started):
        daemon.stop()


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
