"""``nsqjobs exporter`` against a real nsqd and nsqlookupd: what a scrape shows is nsqd's state."""

from __future__ import annotations

import ast
import json
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from nsqjobs.config import NsqConfig, env_var
from nsqjobs.testing import (
    Daemon,
    HarnessError,
    Nsq,
    free_port,
    http,
    need_binary,
    spawn,
    wait_for,
    wait_ready,
)

from tests.dashboards import start_exporter

pytestmark = pytest.mark.integration
LABEL_NAMES = {"node", "topic", "channel", "lookupd", "version", "daemon"}


class Consumer:
    """A raw NSQ consumer that holds messages (no FIN) so they stay in flight."""

    def __init__(self, nsqd_tcp: str, topic: str, channel: str, msg_timeout_ms: int) -> None:
        host, _, port = nsqd_tcp.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.sendall(b"  V2")
        identify = json.dumps({"msg_timeout": msg_timeout_ms}).encode()
        self.sock.sendall(b"IDENTIFY\n" + struct.pack(">i", len(identify)) + identify)
        self._expect_ok()
        self.sock.sendall(f"SUB {topic} {channel}\n".encode())
        self._expect_ok()

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise HarnessError("nsqd closed the connection")
            data += chunk
        return data

    def frame(self) -> tuple[int, bytes]:
        """The next frame that is not a heartbeat."""
        while True:
            size, kind = struct.unpack(">ii", self._read(8))
            body = self._read(size - 4)
            if (kind, body) != (0, b"_heartbeat_"):
                return kind, body
            self.sock.sendall(b"NOP\n")

    def _expect_ok(self) -> None:
        kind, body = self.frame()
        if (kind, body) != (0, b"OK"):
            raise HarnessError(f"nsqd answered {kind} {body!r}")

    def take(self, n: int) -> list[bytes]:
        """RDY n, and the ids of the n messages nsqd sends."""
        self.sock.sendall(f"RDY {n}\n".encode())
        ids: list[bytes] = []
        while len(ids) < n:
            kind, body = self.frame()
            if kind != 2:
                raise HarnessError(f"expected a message, got {kind} {body!r}")
            ids.append(body[10:26])
        self.sock.sendall(b"RDY 0\n")
        return ids

    def requeue(self, msg_id: bytes, delay_ms: int) -> None:
        """REQ one message with a delay (it becomes deferred)."""
        self.sock.sendall(b"REQ " + msg_id + f" {delay_ms}\n".encode())

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


def _samples(exporter: Daemon) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): float(s.value)
        for family in exporter.metrics()
        for s in family.samples
    }


def _value(exporter: Daemon, name: str, **labels: str) -> float | None:
    return _samples(exporter).get((name, frozenset(labels.items())))


def test_queues_channels_and_clients_as_nsqd_reports_them(
    nsq: Nsq, stack: ExitStack, tmp_path: Path
) -> None:
    # Only nsqlookupd is given: the node is found through /nodes.
    exporter = start_exporter(nsq, tmp_path, stack, {env_var(NsqConfig, "nsqd_http_address"): ""})
    node = nsq.nsqd_http
    nsq.create_channel("jobs", "workers")
    nsq.post("/channel/create", topic="jobs", channel="slow")
    nsq.mpub("jobs", [b"job %d" % i for i in range(6)])
    ch = {"node": node, "topic": "jobs", "channel": "workers"}

    def seen(name: str, labels: dict[str, str], value: float) -> bool:
        return _value(exporter, name, **labels) == value

    # Collected on scrape: what was published a moment ago is there at once, no poll interval.
    assert _value(exporter, "nsqjobs_nsqd_topic_messages_total", node=node, topic="jobs") == 6
    assert _value(exporter, "nsqjobs_nsqd_channel_depth", **ch) == 6
    assert _value(exporter, "nsqjobs_nsqd_up", node=node) == 1
    assert _value(exporter, "nsqjobs_nsqd_nodes") == 1
    assert _value(exporter, "nsqjobs_nsqd_lookupd_up", lookupd=nsq.lookupd_http) == 1

    workers = Consumer(nsq.nsqd_tcp, "jobs", "workers", msg_timeout_ms=60_000)
    slow = Consumer(nsq.nsqd_tcp, "jobs", "slow", msg_timeout_ms=1000)
    stack.callback(workers.close)
    stack.callback(slow.close)
    taken = workers.take(3)
    workers.requeue(taken[0], 60_000)
    slow.take(1)  # never finished: nsqd times it out after a second
    wait_for(lambda: seen("nsqjobs_nsqd_channel_deferred", ch, 1), 10, "a deferred message")
    assert _value(exporter, "nsqjobs_nsqd_channel_in_flight", **ch) == 2
    assert _value(exporter, "nsqjobs_nsqd_channel_requeued_total", **ch) == 1
    assert _value(exporter, "nsqjobs_nsqd_channel_depth", **ch) == 3
    assert _value(exporter, "nsqjobs_nsqd_channel_clients", **ch) == 1
    assert _value(exporter, "nsqjobs_nsqd_channel_messages_total", **ch) == 6
    slow_ch = {**ch, "channel": "slow"}
    wait_for(
        lambda: seen("nsqjobs_nsqd_channel_timed_out_total", slow_ch, 1), 15, "a timed-out message"
    )
    samples = _samples(exporter)
    # Bounded labels only, and nsqjobs_nsqd_* names (plus the build info every daemon has).
    for name, labels in samples:
        assert name.startswith("nsqjobs_nsqd_") or name == "nsqjobs_build_info", name
        assert {k for k, _ in labels} <= LABEL_NAMES, (name, labels)

    promtool = need_binary("promtool", hint="apt-get install prometheus")
    _, _, text = http("GET", exporter.url + "/metrics")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=str(text), text=True, capture_output=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr

    # nsqd gone: it unregisters from nsqlookupd, so the next scrape no longer lists it.
    nsq.stop_nsqd()
    wait_for(lambda: seen("nsqjobs_nsqd_nodes", {}, 0), 10, "nsqd leaving the export")
    assert _value(exporter, "nsqjobs_nsqd_up", node=node) is None
    assert _value(exporter, "nsqjobs_nsqd_channel_depth", **ch) is None


def test_reads_nsqd_directly_without_lookupd(nsq: Nsq, stack: ExitStack, tmp_path: Path) -> None:
    exporter = start_exporter(
        nsq, tmp_path, stack, {env_var(NsqConfig, "lookupd_http_address"): ""}
    )
    nsq.create_channel("jobs", "workers")
    nsq.mpub("jobs", [b"a", b"b"])
    ch = {"node": nsq.nsqd_http, "topic": "jobs", "channel": "workers"}
    assert _value(exporter, "nsqjobs_nsqd_channel_depth", **ch) == 2
    assert _value(exporter, "nsqjobs_nsqd_nodes") == 1
    # Ephemeral channels (a gateway's results channel, a worker's cancels one: named after a
    # process) are one series per topic, summed: restarts and replicas add none.
    consumers = [
        Consumer(nsq.nsqd_tcp, "results", f"gateway_h_{i}_ab#ephemeral", 60_000) for i in (1, 2)
    ]
    try:
        eph = {"node": nsq.nsqd_http, "topic": "results", "channel": "#ephemeral"}
        assert _value(exporter, "nsqjobs_nsqd_channel_clients", **eph) == 2
        assert not [
            labels
            for (_, labels) in _samples(exporter)
            if ("channel", "gateway_h_1_ab#ephemeral") in labels
        ]
    finally:
        for consumer in consumers:
            consumer.close()
    # Not ready once nsqd is gone: /readyz says why.
    nsq.stop_nsqd()
    status, _, body = http("GET", exporter.url + "/readyz")
    assert status == 503
    assert body["problems"] == [f"nsqd {nsq.nsqd_http} does not answer /ping"]
    started = time.monotonic()
    assert _value(exporter, "nsqjobs_nsqd_up", node=nsq.nsqd_http) == 0
    assert time.monotonic() - started < 5


def test_exporter_imports_point_to_nsq_observability_and_config_only() -> None:
    room = Path(__file__).resolve().parent.parent / "service" / "nsqjobs" / "exporter"
    ours = set()
    for path in room.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                ours.add(node.module)
            elif isinstance(node, ast.Import):
                ours.update(alias.name for alias in node.names)
    ours = {m for m in ours if m.startswith("nsqjobs")}
    allowed = (
        *("nsqjobs.exporter", "nsqjobs.nsq", "nsqjobs.observability", "nsqjobs.config"),
        # The leaves everything may import: names, the version, the error tree.
        *("nsqjobs.names", "nsqjobs.version", "nsqjobs.errors"),
    )
    assert ours and all(m.startswith(allowed) for m in ours), sorted(ours)


def test_a_second_nsqd_is_found_through_lookupd(nsq: Nsq, stack: ExitStack, tmp_path: Path) -> None:
    exporter = start_exporter(nsq, tmp_path, stack)
    assert _value(exporter, "nsqjobs_nsqd_nodes") == 1
    # Another nsqd registering with the same nsqlookupd: the next scrape reads it too.
    lookupd_tcp = next(a for a in nsq.nsqd_argv if a.startswith("--lookupd-tcp-address="))
    tcp, http_port = free_port(), free_port()
    data = tmp_path / "nsqd2"
    data.mkdir()
    second = spawn(
        [
            nsq.nsqd_argv[0],
            f"--tcp-address=127.0.0.1:{tcp}",
            f"--http-address=127.0.0.1:{http_port}",
            lookupd_tcp,
            "--broadcast-address=127.0.0.1",
            f"--data-path={data}",
        ],
        tmp_path / "nsqd2.log",
        stack=stack,
    )
    wait_ready(second, f"http://127.0.0.1:{http_port}/ping", 15.0)
    status, _, _ = http("POST", f"http://127.0.0.1:{http_port}/pub?topic=other", raw=b"x")
    assert status == 200
    node = f"127.0.0.1:{http_port}"

    def second_seen() -> bool:
        return _value(exporter, "nsqjobs_nsqd_topic_depth", node=node, topic="other") == 1

    wait_for(second_seen, 15, "the second nsqd's topic in the export")
    assert _value(exporter, "nsqjobs_nsqd_nodes") == 2
    assert _value(exporter, "nsqjobs_nsqd_up", node=node) == 1
    assert _value(exporter, "nsqjobs_nsqd_up", node=nsq.nsqd_http) == 1
