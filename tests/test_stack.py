"""The local stack (`make run`) and the metrics exposition, checked with real tools."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from nsqjobs.testing import (
    Daemon,
    DeadlineExceeded,
    Nsq,
    free_port,
    http,
    need_binary,
    ping,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


def test_metrics_pass_promtool(nsq: Nsq, daemons: Callable[..., Daemon]) -> None:
    promtool = need_binary("promtool", hint="apt-get install prometheus")
    gw = daemons("gateway", nsq)
    worker = daemons("worker", nsq)
    status, _, _ = http("POST", gw.url + "/v1/jobs?wait=10", {"task": "noop", "args": {}})
    assert status == 200
    http("POST", gw.url + "/v1/jobs", {"task": "nope", "args": {}})
    for daemon in (gw, worker):
        _, _, text = http("GET", daemon.url + "/metrics")
        check = subprocess.run(
            [promtool, "check", "metrics"],
            input=str(text),
            text=True,
            capture_output=True,
            timeout=30,
        )
        assert check.returncode == 0, check.stdout + check.stderr
    assert worker.metric("nsqjobs_jobs_received_total", task="noop") == 1
    assert worker.metric("nsqjobs_job_duration_seconds_count", task="noop", status="succeeded") == 1
    assert worker.metric("nsqjobs_jobs_in_progress", task="noop") == 0
    assert gw.metric("nsqjobs_publish_duration_seconds_count", command="pub") == 1


def _wait_status(url: str, expected: str) -> None:
    def reached() -> bool:
        _, _, record = http("GET", url)
        return isinstance(record, dict) and record.get("status") == expected

    wait_for(reached, 10, f"{url} to be {expected}")


def _processes_mentioning(needle: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def _free_port_run(n: int) -> int:
    """The first of ``n`` consecutive free ports (local workers listen on base + i)."""
    for _ in range(50):
        base = free_port()
        if base + n < 65536 and all(_port_free(base + i) for i in range(1, n)):
            return base
    raise AssertionError(f"no {n} consecutive free ports")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _stack_env(tmp_path: Path, **extra: str) -> tuple[dict[str, str], dict[str, str]]:
    ports = {
        name: str(free_port())
        for name in (
            "NSQJOBS_NSQD_TCP_PORT",
            "NSQJOBS_NSQD_HTTP_PORT",
            "NSQJOBS_LOOKUPD_TCP_PORT",
            "NSQJOBS_LOOKUPD_HTTP_PORT",
            "NSQJOBS_NSQADMIN_PORT",
            "NSQJOBS_GATEWAY_PORT",
        )
    }
    ports["NSQJOBS_WORKER_PORT"] = str(_free_port_run(int(extra.get("NSQJOBS_WORKERS", "2"))))
    env = {
        # The stack's own ledger default (SQLite in DATA_DIR) is under test, not the caller's.
        **{k: v for k, v in os.environ.items() if k != "NSQJOBS_LEDGER_URL"},
        **ports,
        "DATA_DIR": str(tmp_path / "stack-data"),
        "NSQJOBS_LOOKUPD_POLL_INTERVAL": "1",
        **extra,
    }
    return env, ports


# The stack, not the setup, is under test: never let `make run` reinstall the venv.
MAKE_RUN = ["make", "--no-print-directory", "-o", ".venv/.installed", "run"]


class Launched(NamedTuple):
    """A `make run` started in the background by :func:`_launch`."""

    env: dict[str, str]
    ports: dict[str, str]
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    gateway: str


def _launch(tmp_path: Path, workers: int) -> Launched:
    """`make run` with ``workers`` workers on free ports, its data in ``tmp_path``: started."""
    env, ports = _stack_env(tmp_path, NSQJOBS_WORKERS=str(workers))
    log_path = tmp_path / "make-run.log"
    proc = _start_make_run(env, log_path)
    gateway = f"http://127.0.0.1:{ports['NSQJOBS_GATEWAY_PORT']}"
    return Launched(env, ports, tmp_path / "stack-data", log_path, proc, gateway)


def _start_make_run(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`make run` in the background, in a session of its own, its output to ``log_path``."""
    with open(log_path, "wb") as out:
        return subprocess.Popen(
            MAKE_RUN,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_ready(proc: subprocess.Popen[bytes], log_path: Path, url: str) -> None:
    """Wait for ``url``/readyz, failing at once (with the log) if `make run` exits."""

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"make run exited:\n{log_path.read_text()}")
        return ping(url + "/readyz")

    wait_for(ready, 90, f"{url}/readyz", interval=0.2)


def _make_run_to_the_end(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`make run` that is expected to stop by itself (a program that cannot start)."""
    return subprocess.run(
        MAKE_RUN,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        start_new_session=True,
    )


@pytest.mark.slow
def test_make_run_starts_the_stack_and_stops_it_on_ctrl_c(tmp_path: Path) -> None:
    need_binary("nsqd")
    env, ports, data_dir, log_path, proc, gateway = _launch(tmp_path, workers=3)
    worker_ports = [int(ports["NSQJOBS_WORKER_PORT"]) + i for i in range(3)]
    try:
        urls = [gateway, *(f"http://127.0.0.1:{port}" for port in worker_ports)]
        for url in urls:
            _wait_ready(proc, log_path, url)
        assert ping(f"http://127.0.0.1:{ports['NSQJOBS_NSQADMIN_PORT']}/ping")
        banner = log_path.read_text()
        assert f"gateway      http://127.0.0.1:{ports['NSQJOBS_GATEWAY_PORT']}" in banner
        assert "curl -s -XPOST" in banner
        assert f"ledger       sqlite:///{data_dir}/ledger.sqlite3" in banner
        # supervisorctl works against the running stack, and sees NSQJOBS_WORKERS workers
        # (RUNNING once up for startsecs, which may be after /readyz answers).
        expected = {
            "app:gateway": "RUNNING",
            "app:worker1": "RUNNING",
            "app:worker2": "RUNNING",
            "app:worker3": "RUNNING",
            "nsq:nsqadmin": "RUNNING",
            "nsq:nsqd": "RUNNING",
            "nsq:nsqlookupd": "RUNNING",
            "watchdog": "RUNNING",
        }
        seen: list[str] = []

        def all_running() -> bool:
            ctl = subprocess.run(
                ["make", "--no-print-directory", "-o", ".venv/.installed", "ctl"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            seen[:] = [ctl.stdout + ctl.stderr]
            lines = [line.split() for line in ctl.stdout.splitlines() if line.strip()]
            return dict(line[:2] for line in lines if len(line) >= 2) == expected

        try:
            wait_for(all_running, 15, "supervisorctl to show every program RUNNING", interval=0.5)
        except DeadlineExceeded:
            raise AssertionError(seen) from None
        jobs = [
            ("primes.count", {"start": 0, "stop": 10**6}),
            ("pi.estimate", {"samples": 100_000, "seed": 1}),
            (
                "julia.tile",
                {
                    "width": 32,
                    "height": 24,
                    "x_min": -1.5,
                    "x_max": 1.5,
                    "y_min": -1.0,
                    "y_max": 1.0,
                    "c_re": -0.8,
                    "c_im": 0.156,
                    "max_iter": 100,
                },
            ),
            ("diffusion.run", {"n": 32, "steps": 10, "d": 1.0, "dt": 0.2, "seed": 3}),
        ]
        results = {}
        for task, args in jobs:
            status, _, body = http(
                "POST", gateway + "/v1/jobs?wait=30", {"task": task, "args": args}
            )
            assert status == 200 and body["status"] == "succeeded", body
            results[task] = body["result"]
            # The ledger is on (SQLite in the data directory): the job can be read by id, with
            # its outcome once the ledger read it (its own channel: maybe after ?wait= answered).
            _wait_status(f"{gateway}/v1/jobs/{body['id']}", "succeeded")
        assert results["primes.count"] == 78498
        assert abs(results["pi.estimate"]["estimate"] - 3.14) < 0.05
        assert sum(results["julia.tile"]["histogram"]) == 32 * 24
        assert 0 < results["diffusion.run"]["mean"] < 1
        assert (data_dir / "ledger.sqlite3").is_file()
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        proc.wait(20)
        stopped_in = time.monotonic() - started
    finally:
        if proc.poll() is None:
            # supervisord's programs have process groups of their own: a SIGKILL of make's
            # group would orphan them, so stop the stack the graceful way first.
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    log = log_path.read_text(errors="replace")
    assert stopped_in < 15, log
    assert log.count("worker stopped in") == 3 and "gateway stopped in" in log, log
    assert _processes_mentioning(str(data_dir)) == []
    assert _processes_mentioning("--worker-id worker1") == []
    assert all(not ping(url + "/healthz") for url in urls)


@pytest.mark.slow
def test_make_run_stops_with_the_reason_when_a_daemon_cannot_start(tmp_path: Path) -> None:
    need_binary("nsqd")
    env, _ = _stack_env(tmp_path, NSQJOBS_TASK_MODULE="no_such_task_module")
    data_dir = tmp_path / "stack-data"
    started = time.monotonic()
    proc = _make_run_to_the_end(env)
    took = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    # The last thing `make run` says is which daemon could not start, and why, on one line.
    reason = (
        "could not start: nsqjobs {}: task module 'no_such_task_module' failed to import: "
        "ModuleNotFoundError: No module named 'no_such_task_module'"
    )
    stopped = [line for line in proc.stderr.splitlines() if line.startswith("make run: stopped:")]
    assert len(stopped) == 1, out
    assert any(
        stopped[0] == f"make run: stopped: {name} {reason.format(kind)}"
        for name, kind in [("gateway", "gateway"), ("worker1", "worker"), ("worker2", "worker")]
    ), out
    assert "Traceback" not in out, out
    assert took < 60, (took, out)
    assert _processes_mentioning(str(data_dir)) == []


@pytest.mark.slow
def test_make_run_stops_the_stack_on_sigterm_to_make_alone(tmp_path: Path) -> None:
    # `kill <pid of make>` reaches make only (not its process group, as Ctrl-C does): make
    # passes it to the recipe's shell, which must hand it to supervisord, not die and orphan it.
    need_binary("nsqd")
    env, _, data_dir, log_path, proc, gateway = _launch(tmp_path, workers=1)
    try:
        _wait_ready(proc, log_path, gateway)
        # A second `make run` on the same data directory says so, in one line.
        again = subprocess.run(
            MAKE_RUN, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert again.returncode != 0, again.stdout + again.stderr
        assert "still running" in again.stderr and "make ctl CMD=shutdown" in again.stderr
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(20)
    log = log_path.read_text(errors="replace")
    assert "gateway stopped in" in log and "worker stopped in" in log, log

    def all_gone() -> bool:
        return _processes_mentioning(str(data_dir)) == []

    wait_for(all_gone, 10, "every process of the stack to end")
    assert not ping(gateway + "/healthz")


@pytest.mark.slow
def test_make_run_names_the_port_an_nsq_daemon_could_not_take(tmp_path: Path) -> None:
    need_binary("nsqd")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        env, _ = _stack_env(tmp_path, NSQJOBS_NSQD_TCP_PORT=busy)
        proc = _make_run_to_the_end(env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    stopped = [line for line in proc.stderr.splitlines() if line.startswith("make run: stopped:")]
    assert len(stopped) == 1, out
    assert stopped[0].startswith("make run: stopped: nsqd could not start: "), out
    assert f"127.0.0.1:{busy}" in stopped[0] and "address already in use" in stopped[0], out
    assert _processes_mentioning(str(tmp_path / "stack-data")) == []


@pytest.mark.parametrize("port", ["abc", "0", "65536", "12345678901234567890", ""])
def test_make_run_refuses_a_port_that_is_not_a_port(tmp_path: Path, port: str) -> None:
    env, _ = _stack_env(tmp_path, NSQJOBS_WORKER_PORT=port)
    proc = subprocess.run(MAKE_RUN, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = f"make run: NSQJOBS_WORKER_PORT must be a port number (1-65535), got '{port}'"
    assert message in proc.stderr, proc.stderr
