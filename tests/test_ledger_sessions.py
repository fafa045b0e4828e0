"""Jobs recorded as published in the write that records them (gateway sessions): a gateway
SIGKILLed before nsqd acknowledged its publishes leaves them to the next gateway on the ledger,
which re-drives them from the dead session's heartbeat, long before the relay's grace."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nsqjobs.names import LEDGER_CHANNEL, RESULTS_TOPIC
from nsqjobs.testing import Daemon, Nsq, http, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


class Proxy:
    """A TCP proxy to nsqd that can be frozen: from then on what the gateway sends is
    dropped (nsqd never gets those publishes) and nothing is answered."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.frozen = threading.Event()
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.frozen.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        # One side gone: so is the other (nsqd requeues what it sent a dead gateway).
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed.set()
        for s in self.sockets:
            s.close()


@pytest.fixture
def proxy(nsq: Nsq) -> Iterator[Proxy]:
    p = Proxy(nsq.nsqd_tcp)
    yield p
    p.close()


def post(url: str, body: object) -> None:
    """POST in a thread whose answer nobody reads (the gateway is killed meanwhile)."""
    with contextlib.suppress(OSError):
        http("POST", url, body, timeout=5.0)


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_a_gateway_killed_before_nsqd_acknowledged_leaves_no_job_behind(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path, proxy: Proxy
) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = {
        "NSQJOBS_LEDGER_URL": f"sqlite:///{path}",
        "NSQJOBS_LEDGER_POLL_S": "0.2",
        # Far beyond the test: only the dead session's evidence can publish the jobs in time.
        "NSQJOBS_LEDGER_GRACE_S": "3600",
    }
    first = daemons(
        "gateway",
        nsq,
        NSQJOBS_NSQD_TCP_ADDRESS=proxy.address,
        NSQJOBS_PUBLISH_TIMEOUT_S="30",
        **ledger,
    )
    wait_for(lambda: rows(path, "SELECT 1 FROM sessions"), 20, "the gateway's session")
    # A gateway's relay takes every job sent in nsqd's first second (start_time is truncated
    # to the second) as sent to an nsqd that restarted: "before" is sent after it.
    start = nsq.stats()["start_time"]
    wait_for(lambda: time.time() > start + 1.5, 5, "nsqd's first second past")
    assert http("POST", f"{first.url}/v1/jobs", {"id": "before", "task": "noop"})[0] == 202
    # Settled (acknowledged): once a heartbeat's bound is past it, no re-drive takes it.
    sent = rows(path, "SELECT sent_at FROM jobs WHERE id = 'before'")[0][0]
    wait_for(lambda: rows(path, f"SELECT 1 FROM sessions WHERE low > {sent}"), 20, "a bound")

    proxy.frozen.set()  # from now on nsqd gets nothing from this gateway
    ids = [f"j{i}" for i in range(20)]
    posts = [
        threading.Thread(
            target=post, args=(f"{first.url}/v1/jobs", {"id": i, "task": "noop"}), daemon=True
        )
        for i in ids
    ]
    batch = {"jobs": [{"id": f"b{i}", "task": "noop"} for i in range(30)]}
    posts.append(
        threading.Thread(target=post, args=(f"{first.url}/v1/jobs/batch", batch), daemon=True)
    )
    for t in posts:
        t.start()
    ids += [j["id"] for j in batch["jobs"]]

    def recorded_as_published() -> bool:
        got = rows(path, "SELECT COUNT(*) FROM jobs WHERE published_at IS NOT NULL")
        return got[0][0] == len(ids) + 1

    # Recorded as published at once: nsqd's acknowledgement would need no write.
    wait_for(recorded_as_published, 20, "every job recorded as published")
    first.proc.kill()  # SIGKILL while every publish waits for nsqd
    first.proc.wait(10)
    assert nsq.message_count("jobs") == 1  # "before" alone reached nsqd

    second = daemons("gateway", nsq, NSQJOBS_PUBLISH_TIMEOUT_S="1", **ledger)
    ledger_channel = (RESULTS_TOPIC, LEDGER_CHANNEL)
    wait_for(lambda: nsq.channel(*ledger_channel), 20, "the ledger's channel on results")
    daemons("worker", nsq)

    def all_done() -> bool:
        done = rows(path, "SELECT COUNT(*) FROM jobs WHERE status = 'succeeded'")
        return done[0][0] == len(ids) + 1

    wait_for(all_done, 40, "every recorded job run, and its outcome recorded")
    redriven = rows(path, "SELECT id, redrives FROM jobs WHERE redrives > 0")
    assert sorted(str(i) for i, _ in redriven) == sorted(ids)  # not the acknowledged one
    assert {n for _, n in redriven} == {1}
    handled = rows(path, "SELECT COUNT(*) FROM sessions WHERE handled_at IS NOT NULL")
    assert handled == [(1,)]
    assert second.metric("nsqjobs_ledger_redrives_total", reason="unpublished") == len(ids)
