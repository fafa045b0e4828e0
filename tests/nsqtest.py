"""Test helpers: real nsqd/nsqlookupd on free ports, daemons as subprocesses, a tiny NSQ reader.

The reader speaks the NSQ TCP protocol directly (not through pynsq) so tests check what is
really on a topic, independently of the code under test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = bool(os.environ.get("CI"))


def need_binary(name: str) -> str:
    """Path of an NSQ binary (in .bin/ or on PATH); skip without it, but fail under CI."""
    for candidate in (ROOT / ".bin" / name, shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    message = f"{name} not found: run `make nsq`"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def http(
    method: str,
    url: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request; returns (status, headers, parsed JSON or text)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, rh, payload = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, rh, payload = exc.code, dict(exc.headers), exc.read()
    try:
        return status, rh, json.loads(payload)
    except ValueError:
        return status, rh, payload.decode("utf-8", "replace")


def ping(url: str) -> bool:
    """True when ``url`` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


@dataclass
class Nsq:
    """A running nsqlookupd + nsqd pair."""

    nsqd_tcp: str
    nsqd_http: str
    lookupd_http: str
    data_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        """nsqd's /stats as JSON."""
        _, _, body = http("GET", f"http://{self.nsqd_http}/stats?format=json")
        assert isinstance(body, dict)
        return body

    def topic(self, name: str) -> dict[str, Any] | None:
        """Stats of one topic, or None if it does not exist."""
        for t in self.stats()["topics"]:
            if t["topic_name"] == name:
                return dict(t)
        return None

    def message_count(self, topic: str) -> int:
        """Messages ever published to ``topic``."""
        t = self.topic(topic)
        return int(t["message_count"]) if t else 0

    def channel(self, topic: str, channel: str) -> dict[str, Any] | None:
        """Stats of one channel."""
        t = self.topic(topic)
        for c in (t or {}).get("channels", []):
            if c["channel_name"] == channel:
                return dict(c)
        return None

    def create_channel(self, topic: str, channel: str) -> None:
        """Create topic and channel so every message published from now on is kept for us."""
        for path in (
            f"/topic/create?topic={topic}",
            f"/channel/create?topic={topic}&channel={channel}",
        ):
            status, _, body = http("POST", f"http://{self.nsqd_http}{path}", raw=b"")
            assert status == 200, body

    def env(self) -> dict[str, str]:
        """NSQJOBS_* variables pointing a daemon at this pair."""
        return {
            "NSQJOBS_NSQD_TCP_ADDRESS": self.nsqd_tcp,
            "NSQJOBS_NSQD_HTTP_ADDRESS": self.nsqd_http,
            "NSQJOBS_LOOKUPD_HTTP_ADDRESS": self.lookupd_http,
        }


@contextmanager
def nsq_pair(msg_timeout: str = "60s") -> Iterator[Nsq]:
    """Start nsqlookupd and nsqd on free ports with a temporary data directory."""
    nsqd_bin, lookupd_bin = need_binary("nsqd"), need_binary("nsqlookupd")
    data = Path(tempfile.mkdtemp(prefix="nsqjobs-test-"))
    lt, lh, nt, nh = free_port(), free_port(), free_port(), free_port()
    pair = Nsq(f"127.0.0.1:{nt}", f"127.0.0.1:{nh}", f"127.0.0.1:{lh}", data)
    try:
        pair.procs.append(
            spawn(
                [
                    lookupd_bin,
                    f"--tcp-address=127.0.0.1:{lt}",
                    f"--http-address=127.0.0.1:{lh}",
                    "--broadcast-address=127.0.0.1",
                ],
                data / "nsqlookupd.log",
            )
        )
        pair.procs.append(
            spawn(
                [
                    nsqd_bin,
                    f"--tcp-address=127.0.0.1:{nt}",
                    f"--http-address=127.0.0.1:{nh}",
                    f"--lookupd-tcp-address=127.0.0.1:{lt}",
                    "--broadcast-address=127.0.0.1",
                    f"--data-path={data}",
                    f"--msg-timeout={msg_timeout}",
                ],
                data / "nsqd.log",
            )
        )
        wait_for(lambda: ping(f"http://127.0.0.1:{lh}/ping"), 10, "nsqlookupd /ping")
        wait_for(lambda: ping(f"http://127.0.0.1:{nh}/ping"), 10, "nsqd /ping")
        yield pair
    finally:
        for proc in reversed(pair.procs):
            stop_process(proc)
        shutil.rmtree(data, ignore_errors=True)


def spawn(argv: list[str], log_path: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    """Start a process with stdout and stderr going to ``log_path``."""
    with open(log_path, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, **kwargs)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@dataclass
class Daemon:
    """An ``nsqjobs`` daemon started as a subprocess, with its log file."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        """Base URL of its HTTP server."""
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        """Everything it logged so far."""
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """A sample value from its /metrics (0 when absent)."""
        _, _, text = http("GET", self.url + "/metrics")
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in str(text).splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            metric, _, rest = key.partition("{")
            got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
            if metric == name and got == want:
                return float(value)
        return 0.0


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``nsqjobs ARGS`` to completion (``python -m nsqjobs.cli``), capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "nsqjobs.cli", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def start_daemon(kind: str, nsq: Nsq, tmp: Path, *, ready: bool = True, **env: str) -> Daemon:
    """Run ``nsqjobs gateway|worker`` against ``nsq``; waits for /readyz unless told not to."""
    port = free_port()
    port_var = "NSQJOBS_GATEWAY_PORT" if kind == "gateway" else "NSQJOBS_WORKER_PORT"
    full_env = {
        **os.environ,
        **nsq.env(),
        port_var: str(port),
        "NSQJOBS_DEBUG_TASKS": "1",
        "NSQJOBS_LOOKUPD_POLL_INTERVAL": "1",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    log_path = tmp / f"{kind}-{port}.log"
    proc = spawn([sys.executable, "-m", "nsqjobs.cli", kind], log_path, cwd=ROOT, env=full_env)
    daemon = Daemon(proc, port, log_path)
    if ready:

        def is_ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{kind} exited {proc.returncode}:\n{daemon.log()}")
            return ping(daemon.url + "/readyz")

        wait_for(is_ready, 30, f"{kind} /readyz")
    return daemon


class Tail:
    """A minimal NSQ consumer over raw TCP: SUB, RDY, collect bodies, FIN."""

    def __init__(self, nsqd_tcp: str, topic: str, channel: str) -> None:
        host, _, port = nsqd_tcp.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.buf = b""
        self.sock.sendall(b"  V2")
        self.sock.sendall(f"SUB {topic} {channel}\n".encode())
        kind, data = self._frame(5.0)
        assert (kind, data) == (0, b"OK"), (kind, data)
        self.sock.sendall(b"RDY 2500\n")

    def _read(self, n: int, deadline: float) -> bytes | None:
        while len(self.buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                raise ConnectionError("nsqd closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _frame(self, timeout: float) -> tuple[int, bytes]:
        deadline = time.monotonic() + timeout
        head = self._read(8, deadline)
        if head is None:
            return -1, b""
        size, kind = struct.unpack(">ii", head)
        body = self._read(size - 4, time.monotonic() + 10)
        assert body is not None
        return kind, body

    def collect(self, n: int, timeout: float) -> list[bytes]:
        """Read until ``n`` messages arrived or ``timeout`` passed; FIN each one."""
        deadline = time.monotonic() + timeout
        bodies: list[bytes] = []
        while len(bodies) < n and time.monotonic() < deadline:
            kind, data = self._frame(deadline - time.monotonic())
            if kind == 0 and data == b"_heartbeat_":
                self.sock.sendall(b"NOP\n")
            elif kind == 2:
                msg_id, body = data[10:26], data[26:]
                self.sock.sendall(b"FIN " + msg_id + b"\n")
                bodies.append(body)
            elif kind == 1:
                raise AssertionError(f"nsqd error: {data!r}")
        return bodies

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()
