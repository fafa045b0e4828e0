"""Processes and NSQ plumbing for the benchmarks: free ports, daemons that are always stopped.

Everything listens on 127.0.0.1 on ports the kernel hands out, and every daemon is checked to be
the one we started (another nsqd may already hold a well-known port on a shared machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


class BenchError(RuntimeError):
    """A benchmark could not run (a daemon did not start, a deadline passed)."""


def log(message: str) -> None:
    """Progress, on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(
    check: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.05
) -> T:
    """Poll ``check`` until it returns something truthy, or raise at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    *,
    content_type: str | None = None,
    timeout_s: float = 5.0,
) -> tuple[int, bytes]:
    """One HTTP request; returns the status and the body (errors included)."""
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def ping(url: str) -> bool:
    """True when ``url`` answers 200."""
    try:
        return http("GET", url, timeout_s=1.0)[0] == 200
    except OSError:
        return False


def binary(name: str) -> str:
    """An NSQ binary from PATH or .bin/; fails with the command that provides it."""
    found = shutil.which(name) or shutil.which(name, path=str(ROOT / ".bin"))
    if not found:
        raise BenchError(f"{name} not found on PATH or in .bin/: run `make nsq`")
    return found


def nsqjobs_command() -> list[str]:
    """The ``nsqjobs`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "nsqjobs"
    return [str(script)] if script.exists() else [sys.executable, "-m", "nsqjobs.cli"]


@dataclass
class Proc:
    """A daemon we started, its output going to a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of its output, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise with the log tail if the process has exited."""
        if not self.alive():
            raise BenchError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it is still there after ``timeout_s``."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
                return
            except subprocess.TimeoutExpired:
                log(f"{self.name} ignored SIGTERM for {timeout_s:g}s: SIGKILL")
                self.popen.kill()
        self.popen.wait(5.0)


def spawn(
    stack: ExitStack,
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    env: dict[str, str] | None = None,
) -> Proc:
    """Start ``argv``; ``stack`` stops it (SIGTERM, then SIGKILL) when it unwinds."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as out:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
    proc = Proc(name, popen, log_path)
    stack.callback(proc.stop)
    return proc


def wait_ready(proc: Proc, url: str, timeout_s: float) -> None:
    """Wait until ``url`` answers 200 while ``proc`` is still running."""

    def ready() -> bool:
        proc.check_alive()
        return ping(url)

    wait_until(ready, timeout_s, f"{proc.name} at {url}")
    time.sleep(0.1)
    proc.check_alive()  # a daemon that lost a port race exits right away


def temp_dir(stack: ExitStack) -> Path:
    """A temporary directory (on tmpfs when there is one), removed when ``stack`` unwinds."""
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix="nsqjobs-bench-", dir=base))
    stack.callback(shutil.rmtree, path, ignore_errors=True)
    return path


@dataclass
class Nsq:
    """Our nsqlookupd and nsqd."""

    nsqd_tcp: str
    nsqd_http: str
    lookupd_http: str
    version: str

    def url(self, path: str, **query: str) -> str:
        """A URL of nsqd's HTTP API."""
        qs = urllib.parse.urlencode(query)
        return f"http://{self.nsqd_http}{path}" + (f"?{qs}" if qs else "")

    def post(self, path: str, body: bytes = b"", **query: str) -> None:
        """POST to nsqd's HTTP API; raise unless it answers 200."""
        status, answer = http("POST", self.url(path, **query), body, timeout_s=30.0)
        if status != 200:
            raise BenchError(f"nsqd {path} {query}: {status} {answer[:200]!r}")

    def create_channel(self, topic: str, channel: str) -> None:
        """Create a topic and a channel, so every message published from now on is kept."""
        self.post("/topic/create", topic=topic)
        self.post("/channel/create", topic=topic, channel=channel)

    def delete_topic(self, topic: str) -> None:
        """Delete a topic with its messages (nothing if it does not exist)."""
        http("POST", self.url("/topic/delete", topic=topic), b"", timeout_s=30.0)

    def mpub(self, topic: str, bodies: Sequence[bytes], per_request: int = 1000) -> None:
        """Publish ``bodies`` with newline-separated MPUBs of ``per_request`` messages."""
        for i in range(0, len(bodies), per_request):
            self.post("/mpub", b"\n".join(bodies[i : i + per_request]), topic=topic)

    def message_count(self, topic: str) -> int:
        """Messages ever published to ``topic`` (0 if it does not exist)."""
        _, raw = http("GET", self.url("/stats", format="json", topic=topic))
        for t in json.loads(raw).get("topics") or []:
            if t["topic_name"] == topic:
                return int(t["message_count"])
        return 0

    def channel_stats(self, topic: str, channel: str) -> dict[str, Any] | None:
        """nsqd's stats of one channel, or None if it does not exist."""
        _, raw = http("GET", self.url("/stats", format="json", topic=topic, channel=channel))
        for t in json.loads(raw).get("topics") or []:
            if t["topic_name"] == topic:
                for c in t["channels"]:
                    if c["channel_name"] == channel:
                        return dict(c)
        return None


def start_nsq(stack: ExitStack, work_dir: Path) -> Nsq:
    """nsqlookupd and nsqd on free ports with a temporary data path; stopped by ``stack``."""
    lookupd_tcp, lookupd_http = free_port(), free_port()
    nsqd_tcp, nsqd_http = free_port(), free_port()
    lookupd = spawn(
        stack,
        "nsqlookupd",
        [
            binary("nsqlookupd"),
            f"--tcp-address=127.0.0.1:{lookupd_tcp}",
            f"--http-address=127.0.0.1:{lookupd_http}",
            "--broadcast-address=127.0.0.1",
        ],
        work_dir,
    )
    wait_ready(lookupd, f"http://127.0.0.1:{lookupd_http}/ping", 15.0)
    data = work_dir / "nsqd-data"
    data.mkdir()
    started = time.time()
    nsqd = spawn(
        stack,
        "nsqd",
        [
            binary("nsqd"),
            f"--tcp-address=127.0.0.1:{nsqd_tcp}",
            f"--http-address=127.0.0.1:{nsqd_http}",
            f"--lookupd-tcp-address=127.0.0.1:{lookupd_tcp}",
            "--broadcast-address=127.0.0.1",
            f"--data-path={data}",
        ],
        work_dir,
    )
    wait_ready(nsqd, f"http://127.0.0.1:{nsqd_http}/ping", 15.0)
    _, raw = http("GET", f"http://127.0.0.1:{nsqd_http}/info")
    info = json.loads(raw)
    if info.get("tcp_port") != nsqd_tcp or info.get("start_time", 0) < int(started) - 1:
        raise BenchError(f"the nsqd on port {nsqd_http} is not the one just started: {info}")
    return Nsq(
        nsqd_tcp=f"127.0.0.1:{nsqd_tcp}",
        nsqd_http=f"127.0.0.1:{nsqd_http}",
        lookupd_http=f"127.0.0.1:{lookupd_http}",
        version=str(info.get("version", "?")),
    )


def gateway_argv(nsq: Nsq, port: int) -> list[str]:
    """The command line of one quiet ``nsqjobs gateway`` on ``port``."""
    return [
        *nsqjobs_command(),
        "gateway",
        "--nsqd-tcp-address",
        nsq.nsqd_tcp,
        "--nsqd-http-address",
        nsq.nsqd_http,
        "--lookupd-http-address",
        nsq.lookupd_http,
        "--gateway-port",
        str(port),
        "--log-level",
        "WARNING",
    ]


def start_gateway(
    stack: ExitStack, nsq: Nsq, log_dir: Path, topics: Sequence[str], name: str = "gateway"
) -> str:
    """One ``nsqjobs gateway`` process; returns its base URL once /readyz answers 200.

    ``topics`` are created first, so that nsqlookupd knows the results topic before the
    gateway's results reader first asks it (otherwise readiness waits for the next poll).
    """
    for topic in topics:
        nsq.post("/topic/create", topic=topic)
    port = free_port()
    proc = spawn(
        stack,
        name,
        gateway_argv(nsq, port),
        log_dir,
    )
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, f"{base}/readyz", 60.0)
    return base


def worker_argv(
    nsq: Nsq, *, concurrency: int, queue: str, channel: str, lookupd: bool, port: int
) -> list[str]:
    """The command line of one ``nsqjobs worker``."""
    return [
        *nsqjobs_command(),
        "worker",
        "--nsqd-tcp-address",
        nsq.nsqd_tcp,
        "--nsqd-http-address",
        nsq.nsqd_http,
        "--lookupd-http-address",
        nsq.lookupd_http if lookupd else "",
        "--worker-port",
        str(port),
        "--concurrency",
        str(concurrency),
        "--queues",
        queue,
        "--channel",
        channel,
        "--log-level",
        "WARNING",
    ]
