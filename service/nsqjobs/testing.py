"""Run nsqjobs against real NSQ in tests: nsqd/nsqlookupd and daemons on free ports, always stopped.

Like ``tornado.testing``, this ships with the package so applications can test their own tasks
end to end. No runtime module imports it, and it does not import pytest: a missing binary raises
`MissingBinary`, which a test suite's ``conftest.py`` turns into a skip (or a failure under CI).

Everything listens on 127.0.0.1 on ports the kernel hands out; every wait polls a condition
with a deadline. `Tail` speaks the NSQ TCP protocol directly (not through pynsq), so a test
checks what is really on a topic independently of the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from nsqjobs.config import GatewayConfig, NsqConfig, WorkerConfig, env_var
from nsqjobs.names import (
    ENV_BIN_DIR,
    ENV_DEBUG_TASKS,
    READER_OUTPUT_BUFFER_BYTES,
    READER_OUTPUT_BUFFER_TIMEOUT_MS,
)

__all__ = [
    "BIN_DIR_ENV",
    "Daemon",
    "DeadlineExceeded",
    "HarnessError",
    "MissingBinary",
    "Nsq",
    "Postgres",
    "Proc",
    "ProcessExited",
    "Tail",
    "free_port",
    "http",
    "need_binary",
    "nsq_pair",
    "nsqjobs_command",
    "ping",
    "postgres_bin_dir",
    "run_cli",
    "spawn",
    "start_daemon",
    "start_nsq",
    "start_postgres",
    "stop_process",
    "temp_dir",
    "wait_for",
    "wait_ready",
]

T = TypeVar("T")

#: A directory searched for binaries before PATH (``make`` puts the NSQ build in ``.bin/``).
BIN_DIR_ENV = ENV_BIN_DIR


class HarnessError(Exception):
    """The harness could not do what a test asked (a process died, a deadline passed)."""


class MissingBinary(HarnessError):
    """A program the harness needs (nsqd, nsqlookupd, promtool) is not installed."""


class DeadlineExceeded(HarnessError):
    """A condition polled by `wait_for` did not hold before its deadline."""


class ProcessExited(HarnessError):
    """A process we started exited while we waited for it; the message holds its log tail."""


def need_binary(name: str, hint: str = "run `make nsq`") -> str:
    """Path of the program ``name`` from ``$NSQJOBS_BIN_DIR`` or PATH, else `MissingBinary`."""
    bin_dir = os.environ.get(BIN_DIR_ENV)
    found = (shutil.which(name, path=bin_dir) if bin_dir else None) or shutil.which(name)
    if found is None:
        raise MissingBinary(f"{name} not found in ${BIN_DIR_ENV} or on PATH: {hint}")
    return found


def nsqjobs_command() -> list[str]:
    """The ``nsqjobs`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "nsqjobs"
    return [str(script)] if script.exists() else [sys.executable, "-m", "nsqjobs.cli"]


def _ephemeral_low() -> int:
    # The kernel hands out ports from ip_local_port_range to outgoing connections too: a port
    # chosen there can be taken by any client before our daemon binds it (seen in CI runs).
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORTS_FROM: Final = 20000
_PORTS_TO: Final = max(_PORTS_FROM + 1000, min(_ephemeral_low(), 32768))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now, chosen below the kernel's
    ephemeral range so that no outgoing connection takes it before a daemon binds it."""
    for _ in range(200):
        port = random.randrange(_PORTS_FROM, _PORTS_TO)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        chosen: int = s.getsockname()[1]
        return chosen


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy and return that; raise at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def http(
    method: str,
    url: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request (``body`` sent as JSON, or ``raw`` bytes); errors are answers too.

    Returns the status, the headers and the body parsed as JSON, or as text when it is not JSON.
    """
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
        return int(status), rh, json.loads(payload)
    except ValueError:
        return int(status), rh, payload.decode("utf-8", "replace")


def ping(url: str) -> bool:
    """True when ``url`` answers 200 within a second."""
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def temp_dir(stack: ExitStack, prefix: str = "nsqjobs-test-") -> Path:
    """A temporary directory (on tmpfs when there is one), removed when ``stack`` unwinds."""
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    stack.callback(shutil.rmtree, path, ignore_errors=True)
    return path


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout``; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    try:
        return proc.wait(5.0)
    except subprocess.TimeoutExpired:
        return None


@dataclass
class Proc:
    """A process we started, its stdout and stderr going to ``log_path``."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def log(self) -> str:
        """Everything it wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of its output, for error messages."""
        return "\n".join(self.log().splitlines()[-lines:])

    def check_alive(self) -> None:
        """Raise `ProcessExited` with the log tail if the process has exited."""
        if not self.alive():
            raise ProcessExited(
                f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        return stop_process(self.proc, timeout)

    def pause(self, timeout: float = 5.0) -> None:
        """SIGSTOP, then wait until every thread of the process is stopped: the signal is
        delivered asynchronously, and a thread still running could answer one more request."""
        self.proc.send_signal(signal.SIGSTOP)
        wait_for(self.stopped, timeout, f"{self.name} to stop")

    def stopped(self) -> bool:
        """Every thread of the process is stopped by a signal (and stays so until SIGCONT)."""
        return _stopped(self.proc.pid)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self.proc.send_signal(signal.SIGCONT)


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs: it exists and is no zombie (a zombie has ended; only its
    parent has not reaped it yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: it exists
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stopped(pid: int) -> bool:
    # /proc/PID/task/TID/stat: "tid (comm) STATE ..."; T is stopped by a signal.
    tasks = Path(f"/proc/{pid}/task")
    states = []
    for task in tasks.iterdir():
        try:
            states.append(task.joinpath("stat").read_text().rpartition(")")[2].split()[0])
        except (OSError, IndexError):
            continue
    return bool(states) and all(state in ("T", "t") for state in states)


def spawn(
    argv: Sequence[str],
    log_path: Path,
    *,
    name: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stack: ExitStack | None = None,
    uid: int | None = None,
    gid: int | None = None,
) -> Proc:
    """Start ``argv`` with ``env`` over this environment (as ``uid``/``gid`` when given: we
    are root); ``stack`` (if given) stops it."""
    with open(log_path, "ab") as out:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            user=uid,
            group=gid,
            extra_groups=None if uid is None else [],
        )
    proc = Proc(name or Path(argv[0]).name, popen, log_path)
    if stack is not None:
        stack.callback(proc.stop)
    return proc


def wait_ready(proc: Proc, url: str, timeout: float) -> None:
    """Wait until ``url`` answers 200 while ``proc`` still runs."""

    def ready() -> bool:
        proc.check_alive()
        return ping(url)

    wait_for(ready, timeout, f"{proc.name} at {url}")
    proc.check_alive()  # a daemon that lost a port race exits, another answered in its place


@dataclass
class Nsq:
    """A running nsqlookupd + nsqd pair, and nsqd's HTTP API."""

    nsqd_tcp: str
    nsqd_http: str
    lookupd_http: str
    data_dir: Path
    version: str = "?"
    nsqd: Proc | None = field(default=None, repr=False, compare=False)
    nsqd_argv: tuple[str, ...] = field(default=(), repr=False, compare=False)
    stack: ExitStack | None = field(default=None, repr=False, compare=False)

    def stop_nsqd(self, *, kill: bool = False) -> None:
        """Stop nsqd: SIGKILL (a crash) or SIGTERM (a clean stop that flushes its queues)."""
        if self.nsqd is None:
            raise HarnessError("this pair has no nsqd process to stop")
        if kill:
            self.nsqd.proc.kill()
            self.nsqd.proc.wait(10.0)
        else:
            self.nsqd.stop()

    def start_nsqd(self) -> None:
        """Start nsqd again on the same ports and data path (after `stop_nsqd`)."""
        if self.nsqd is None or self.nsqd.alive() or not self.nsqd_argv:
            raise HarnessError("start_nsqd needs a pair whose nsqd was stopped")
        proc = spawn(self.nsqd_argv, self.nsqd.log_path, stack=self.stack)
        self.nsqd = proc
        wait_ready(proc, self.url("/ping"), 15.0)

    def url(self, path: str, **query: str) -> str:
        """A URL of nsqd's HTTP API."""
        qs = urllib.parse.urlencode(query)
        return f"http://{self.nsqd_http}{path}" + (f"?{qs}" if qs else "")

    def post(self, path: str, body: bytes = b"", **query: str) -> None:
        """POST to nsqd's HTTP API; `HarnessError` unless it answers 200."""
        status, _, answer = http("POST", self.url(path, **query), raw=body, timeout=30.0)
        if status != 200:
            raise HarnessError(f"nsqd {path} {query}: {status} {str(answer)[:200]}")

    def stats(self, **query: str) -> dict[str, Any]:
        """nsqd's /stats as JSON (``topic=``, ``channel=`` narrow it down)."""
        _, _, body = http("GET", self.url("/stats", format="json", **query))
        if not isinstance(body, dict):
            raise HarnessError(f"nsqd /stats is not a JSON object: {str(body)[:200]}")
        return body

    def topic(self, name: str) -> dict[str, Any] | None:
        """Stats of one topic, or None if it does not exist."""
        for t in self.stats(topic=name).get("topics") or []:
            if t["topic_name"] == name:
                return dict(t)
        return None

    def channel(self, topic: str, channel: str) -> dict[str, Any] | None:
        """Stats of one channel, or None if it does not exist."""
        for t in self.stats(topic=topic, channel=channel).get("topics") or []:
            if t["topic_name"] == topic:
                for c in t.get("channels") or []:
                    if c["channel_name"] == channel:
                        return dict(c)
        return None

    def message_count(self, topic: str) -> int:
        """Messages ever published to ``topic`` (0 if it does not exist)."""
        t = self.topic(topic)
        return int(t["message_count"]) if t else 0

    def create_channel(self, topic: str, channel: str) -> None:
        """Create a topic and a channel, so every message published from now on is kept."""
        self.post("/topic/create", topic=topic)
        self.post("/channel/create", topic=topic, channel=channel)

    def delete_topic(self, topic: str) -> None:
        """Delete a topic with its messages (nothing if it does not exist)."""
        http("POST", self.url("/topic/delete", topic=topic), raw=b"", timeout=30.0)

    def mpub(self, topic: str, bodies: Sequence[bytes], per_request: int = 1000) -> None:
        """Publish ``bodies`` with newline-separated MPUBs of ``per_request`` messages."""
        for i in range(0, len(bodies), per_request):
            self.post("/mpub", b"\n".join(bodies[i : i + per_request]), topic=topic)

    def env(self) -> dict[str, str]:
        """NSQJOBS_* variables pointing a daemon at this pair."""
        return {
            env_var(NsqConfig, "nsqd_tcp_address"): self.nsqd_tcp,
            env_var(NsqConfig, "nsqd_http_address"): self.nsqd_http,
            env_var(NsqConfig, "lookupd_http_address"): self.lookupd_http,
        }


# A port free a moment ago can be taken before the daemon binds it (another test, a client's
# ephemeral port): start again on other ports, this many times in all.
PORT_RACE_TRIES = 3


def start_nsq(
    stack: ExitStack, work_dir: Path, *, msg_timeout: str = "60s", nsqd_args: Sequence[str] = ()
) -> Nsq:
    """nsqlookupd and nsqd on free ports, data and logs in ``work_dir``; ``stack`` stops them.

    ``nsqd_args`` are more nsqd flags (``--mem-queue-size=0``), kept for `Nsq.start_nsqd`.

    A daemon that lost its port to another process in the moment between our choosing it and
    its binding it is started again on new ports (`PORT_RACE_TRIES` in all).
    """
    for attempt in range(1, PORT_RACE_TRIES + 1):
        with ExitStack() as trial:
            try:
                nsq = _start_nsq_once(trial, work_dir / f"try{attempt}", msg_timeout, nsqd_args)
            except ProcessExited as exc:
                if "address already in use" not in str(exc) or attempt == PORT_RACE_TRIES:
                    raise
                continue
            stack.enter_context(trial.pop_all())
            return dataclasses.replace(nsq, stack=stack)  # later restarts register there
    raise HarnessError("unreachable")  # the loop returns or raises


def _start_nsq_once(
    stack: ExitStack, work_dir: Path, msg_timeout: str, nsqd_args: Sequence[str]
) -> Nsq:
    work_dir.mkdir(parents=True)
    nsqd_bin, lookupd_bin = need_binary("nsqd"), need_binary("nsqlookupd")
    lookupd_tcp, lookupd_http = free_port(), free_port()
    nsqd_tcp, nsqd_http = free_port(), free_port()
    lookupd = spawn(
        [
            lookupd_bin,
            f"--tcp-address=127.0.0.1:{lookupd_tcp}",
            f"--http-address=127.0.0.1:{lookupd_http}",
            "--broadcast-address=127.0.0.1",
        ],
        work_dir / "nsqlookupd.log",
        stack=stack,
    )
    wait_ready(lookupd, f"http://127.0.0.1:{lookupd_http}/ping", 15.0)
    data = work_dir / "nsqd-data"
    data.mkdir()
    started = time.time()
    nsqd_argv = (
        nsqd_bin,
        f"--tcp-address=127.0.0.1:{nsqd_tcp}",
        f"--http-address=127.0.0.1:{nsqd_http}",
        f"--lookupd-tcp-address=127.0.0.1:{lookupd_tcp}",
        "--broadcast-address=127.0.0.1",
        f"--data-path={data}",
        f"--msg-timeout={msg_timeout}",
        *nsqd_args,
    )
    nsqd = spawn(nsqd_argv, work_dir / "nsqd.log", stack=stack)
    wait_ready(nsqd, f"http://127.0.0.1:{nsqd_http}/ping", 15.0)
    # Another nsqd may answer on a port that was free a moment ago: make sure it is ours.
    _, _, info = http("GET", f"http://127.0.0.1:{nsqd_http}/info")
    if (
        not isinstance(info, dict)
        or info.get("tcp_port") != nsqd_tcp
        or info.get("start_time", 0) < int(started) - 1
    ):
        raise HarnessError(f"the nsqd on port {nsqd_http} is not the one just started: {info}")
    return Nsq(
        nsqd_tcp=f"127.0.0.1:{nsqd_tcp}",
        nsqd_http=f"127.0.0.1:{nsqd_http}",
        lookupd_http=f"127.0.0.1:{lookupd_http}",
        data_dir=data,
        version=str(info.get("version", "?")),
        nsqd=nsqd,
        nsqd_argv=nsqd_argv,
        stack=stack,
    )


@contextmanager
def nsq_pair(msg_timeout: str = "60s") -> Iterator[Nsq]:
    """nsqlookupd and nsqd in a temporary directory, stopped and removed on exit."""
    with ExitStack() as stack:
        yield start_nsq(stack, temp_dir(stack), msg_timeout=msg_timeout)


@dataclass
class Daemon(Proc):
    """An ``nsqjobs gateway`` or ``worker`` we started, with its HTTP port."""

    port: int

    @property
    def url(self) -> str:
        """Base URL of its HTTP server."""
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> list[Metric]:
        """Its /metrics, parsed by prometheus_client."""
        _, _, text = http("GET", self.url + "/metrics")
        return list(text_string_to_metric_families(str(text)))

    def metric(self, name: str, **labels: str) -> float:
        """One sample of its /metrics by sample name and exact labels (0 when absent)."""
        for family in self.metrics():
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return 0.0


def start_daemon(
    kind: str,
    nsq: Nsq,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    *,
    ready: bool = True,
    stack: ExitStack | None = None,
    cwd: Path | None = None,
) -> Daemon:
    """Run ``nsqjobs gateway|worker`` against ``nsq`` on a free port; ``env`` overrides settings.

    Waits for /readyz unless ``ready`` is false; ``stack`` (if given) stops it. A daemon that
    lost its port to another process before binding it is started again on another port.
    """
    config = GatewayConfig if kind == "gateway" else WorkerConfig
    port_var = env_var(config, "port")
    for attempt in range(1, PORT_RACE_TRIES + 1):
        port = free_port()
        full_env = {
            **nsq.env(),
            port_var: str(port),
            ENV_DEBUG_TASKS: "1",
            env_var(NsqConfig, "lookupd_poll_interval"): "1",
            "PYTHONUNBUFFERED": "1",
            # No ledger unless the test asks for one, whatever the caller's environment holds
            # (`make run` gives its own stack one).
            env_var(GatewayConfig, "ledger_url"): "",
            **(env or {}),
        }
        log_path = log_dir / f"{kind}-{port}.log"
        proc = spawn([*nsqjobs_command(), kind], log_path, name=kind, env=full_env, cwd=cwd)
        daemon = Daemon(proc.name, proc.proc, log_path, int(full_env[port_var]))
        if not ready:
            break
        try:
            wait_ready(daemon, daemon.url + "/readyz", 30.0)
        except ProcessExited as exc:
            retry = (
                "address already in use" in str(exc).lower()
                and port_var not in (env or {})
                and attempt < PORT_RACE_TRIES
            )
            if not retry:
                if stack is not None:
                    stack.callback(daemon.stop)
                raise
            continue
        break
    if stack is not None:
        stack.callback(daemon.stop)
    return daemon


def run_cli(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``nsqjobs ARGS`` to the end, capturing its output; ``env`` is the whole environment."""
    return subprocess.run(
        [*nsqjobs_command(), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Tail:
    """A minimal NSQ consumer over raw TCP: SUB, RDY, collect bodies, FIN each one."""

    def __init__(self, nsqd_tcp: str, topic: str, channel: str, rdy: int = 2500) -> None:
        host, _, port = nsqd_tcp.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.buf = b""
        try:
            self.sock.sendall(b"  V2")
            # Unbuffered, as the gateway's results reader: without IDENTIFY nsqd holds this
            # consumer's messages up to 250 ms, and a test timing a delivery timed that.
            identify = json.dumps(
                {
                    "output_buffer_size": READER_OUTPUT_BUFFER_BYTES,
                    "output_buffer_timeout": READER_OUTPUT_BUFFER_TIMEOUT_MS,
                }
            ).encode()
            self.sock.sendall(b"IDENTIFY\n" + struct.pack(">l", len(identify)) + identify)
            kind, data = self._frame(5.0)
            if (kind, data) != (0, b"OK"):
                raise HarnessError(f"IDENTIFY: frame {kind} {data!r}")
            self.sock.sendall(f"SUB {topic} {channel}\n".encode())
            kind, data = self._frame(5.0)
            if (kind, data) != (0, b"OK"):
                raise HarnessError(f"SUB {topic} {channel}: frame {kind} {data!r}")
            self.sock.sendall(f"RDY {rdy}\n".encode())
        except BaseException:
            self.sock.close()  # nsqd went away or answered wrong: no socket left behind
            raise

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
        """One frame (type, data), or (-1, b"") when none started before ``timeout``."""
        head = self._read(8, time.monotonic() + timeout)
        if head is None:
            return -1, b""
        size, kind = struct.unpack(">ii", head)
        body = self._read(size - 4, time.monotonic() + 10)
        if body is None:
            raise HarnessError("nsqd sent a partial frame")
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
                raise HarnessError(f"nsqd error: {data!r}")
        return bodies

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()


# -- PostgreSQL (the ledger's shared store) ----------------------------------------------------

POSTGRES_USER: Final = "nsqjobs"
# Debian's postgresql packages keep their programs off PATH, one directory per major version.
_DEBIAN_PG_BINS: Final = "/usr/lib/postgresql/*/bin"
# postgres refuses to run as root: as root the harness runs it as this user.
_PG_RUN_AS: Final = "nobody"
# A unix socket's path must fit in sockaddr_un (108 bytes with the terminating NUL).
_MAX_SOCKET_PATH: Final = 100


def postgres_bin_dir() -> Path:
    """The newest Debian PostgreSQL ``bin`` directory, else the one of ``initdb`` on PATH;
    `MissingBinary` when there is neither."""
    found = [p for p in Path("/").glob(_DEBIAN_PG_BINS.lstrip("/")) if (p / "postgres").exists()]
    if found:
        return max(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).parent / "postgres").exists():
        return Path(initdb).parent
    raise MissingBinary(
        f"PostgreSQL not found in {_DEBIAN_PG_BINS} or on PATH: apt-get install postgresql"
    )


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to run postgres as when we are root, else None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pw = pwd.getpwnam(_PG_RUN_AS)
    except KeyError as exc:
        raise HarnessError(f"running as root, and there is no user {_PG_RUN_AS!r}") from exc
    return pw.pw_uid, pw.pw_gid


def _reachable_by_others(path: Path) -> bool:
    """True when ``path`` and every directory above it let other users through (o+x)."""
    full = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in (full, *full.parents))


@dataclass
class Postgres:
    """A PostgreSQL server of our own (fsync and synchronous_commit on, trust authentication
    on 127.0.0.1 and a unix socket in its own directory), and the means to stop and restart
    it mid-test."""

    port: int
    data_dir: Path
    socket_dir: Path
    bin_dir: Path
    log_path: Path
    run_as: tuple[int, int] | None
    proc: Proc | None = field(default=None, repr=False, compare=False)
    cleanup: list[Path] = field(default_factory=list, repr=False, compare=False)

    def url(self, database: str = "postgres") -> str:
        """A ``postgresql://`` URL of one database of this server."""
        return f"postgresql://{POSTGRES_USER}@127.0.0.1:{self.port}/{database}"

    def alive(self) -> bool:
        """True while the server process runs."""
        return self.proc is not None and self.proc.alive()

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (again, after `stop`) on the same port and data directory; returns
        once it accepts connections."""
        if self.alive():
            raise HarnessError("this PostgreSQL server is running already")
        argv = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-k",
            str(self.socket_dir),
            "-c",
            "listen_addresses=127.0.0.1",
            # Durable commits, as in production: a future resolves only once on disk.
            "-c",
            "fsync=on",
            "-c",
            "synchronous_commit=on",
            "-c",
            "max_connections=200",
        ]
        uid, gid = self.run_as if self.run_as else (None, None)
        self.proc = spawn(argv, self.log_path, name="postgres", uid=uid, gid=gid)
        proc = self.proc

        def ready() -> bool:
            proc.check_alive()
            return self._isready()

        wait_for(ready, timeout, f"postgres on port {self.port}", interval=0.05)

    def _isready(self) -> bool:
        done = subprocess.run(
            [
                str(self.bin_dir / "pg_isready"),
                *("-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", POSTGRES_USER),
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
        )
        return done.returncode == 0

    def stop(self, *, immediate: bool = False, timeout: float = 30.0) -> None:
        """Stop the server: a fast shutdown (SIGINT: clients are disconnected, everything is
        written out), or ``immediate`` (SIGQUIT: like a crash, recovery runs at the next start)."""
        if self.proc is None or not self.proc.alive():
            return
        self.proc.proc.send_signal(signal.SIGQUIT if immediate else signal.SIGINT)
        try:
            self.proc.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.proc.kill()
            self.proc.proc.wait(10.0)

    def restart(self, *, immediate: bool = False) -> None:
        """`stop`, then `start`."""
        self.stop(immediate=immediate)
        self.start()

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with psql (tuples only, unaligned); its output, or `HarnessError`."""
        done = subprocess.run(
            [
                str(self.bin_dir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                POSTGRES_USER,
                "-d",
                database,
                "-c",
                sql,
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise HarnessError(f"psql {sql!r}: {done.stderr.strip()[-500:]}")
        return done.stdout

    def create_database(self, name: str) -> str:
        """Create an empty database; its URL."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        """Stop the server and remove what the harness created outside the caller's directory."""
        self.stop()
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)


def start_postgres(work_dir: Path, stack: ExitStack | None = None) -> Postgres:
    """initdb and start a PostgreSQL server on a free port, data in ``work_dir`` (or, when we
    are root and ``work_dir`` is closed to other users, in a directory of its own); ``stack``
    (if given) stops it.

    postgres refuses to run as root: as root, it runs as ``nobody``. `MissingBinary` when
    PostgreSQL is not installed (Debian: ``apt-get install postgresql``).
    """
    bin_dir = postgres_bin_dir()
    run_as = _run_as()
    base = work_dir / "postgres"
    cleanup: list[Path] = []
    if run_as is not None and not _reachable_by_others(work_dir):
        base = Path(tempfile.mkdtemp(prefix="nsqjobs-pg-"))
        cleanup.append(base)
    base.mkdir(parents=True, exist_ok=True)
    socket_dir = base / "sock"
    if len(str(socket_dir)) + len("/.s.PGSQL.65535") > _MAX_SOCKET_PATH:
        socket_dir = Path(tempfile.mkdtemp(prefix="nsqjobs-pgs-"))
        cleanup.append(socket_dir)
    socket_dir.mkdir(exist_ok=True)
    if run_as is not None:
        for path in (base, socket_dir):
            os.chown(path, *run_as)
    data_dir = base / "data"
    uid, gid = run_as if run_as else (None, None)
    initdb = subprocess.run(
        [
            str(bin_dir / "initdb"),
            "-D",
            str(data_dir),
            "-U",
            POSTGRES_USER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",  # a throwaway cluster: its files need not be synced now
            "--no-instructions",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        user=uid,
        group=gid,
        extra_groups=[] if run_as else None,
    )
    if initdb.returncode != 0:
        for path in cleanup:
            shutil.rmtree(path, ignore_errors=True)
        raise HarnessError(f"initdb failed: {initdb.stderr.strip()[-1000:]}")
    for attempt in range(1, PORT_RACE_TRIES + 1):
        pg = Postgres(
            port=free_port(),
            data_dir=data_dir,
            socket_dir=socket_dir,
            bin_dir=bin_dir,
            log_path=work_dir / "postgres.log",
            run_as=run_as,
            cleanup=cleanup,
        )
        try:
            pg.start()
        except (ProcessExited, DeadlineExceeded) as exc:
            pg.stop()
            if "could not bind" not in str(exc) or attempt == PORT_RACE_TRIES:
                pg.close()
                raise
            continue
        if stack is not None:
            stack.callback(pg.close)
        return pg
    raise HarnessError("unreachable")  # the loop returns or raises
