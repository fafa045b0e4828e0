"""The local stack (`make run`) and the metrics exposition, checked with real tools."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from nsqjobs.testing import Daemon, Nsq, free_port, http, need_binary, ping, wait_for

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


@pytest.mark.slow
def test_make_run_starts_the_stack_and_stops_it_on_ctrl_c(tmp_path: Path) -> None:
    need_binary("nsqd")
    ports = {
        name: str(free_port())
        for name in (
            "NSQJOBS_NSQD_TCP_PORT",
            "NSQJOBS_NSQD_HTTP_PORT",
            "NSQJOBS_LOOKUPD_TCP_PORT",
            "NSQJOBS_LOOKUPD_HTTP_PORT",
            "NSQJOBS_NSQADMIN_PORT",
            "NSQJOBS_GATEWAY_PORT",
            "NSQJOBS_WORKER1_PORT",
            "NSQJOBS_WORKER2_PORT",
        )
    }
    data_dir = tmp_path / "stack-data"
    env = {**os.environ, **ports, "DATA_DIR": str(data_dir), "NSQJOBS_LOOKUPD_POLL_INTERVAL": "1"}
    log_path = tmp_path / "make-run.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "run"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    gateway = f"http://127.0.0.1:{ports['NSQJOBS_GATEWAY_PORT']}"
    try:
        urls = [
            gateway,
            *(
                f"http://127.0.0.1:{ports[w]}"
                for w in ("NSQJOBS_WORKER1_PORT", "NSQJOBS_WORKER2_PORT")
            ),
        ]
        for url in urls:

            def ready(url: str = url) -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"make run exited:\n{log_path.read_text()}")
                return ping(url + "/readyz")

            wait_for(ready, 90, f"{url}/readyz", interval=0.2)
        assert ping(f"http://127.0.0.1:{ports['NSQJOBS_NSQADMIN_PORT']}/ping")
        banner = log_path.read_text()
        assert f"gateway      http://127.0.0.1:{ports['NSQJOBS_GATEWAY_PORT']}" in banner
        assert "curl -s -XPOST" in banner
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
        assert results["primes.count"] == 78498
        assert abs(results["pi.estimate"]["estimate"] - 3.14) < 0.05
        assert sum(results["julia.tile"]["histogram"]) == 32 * 24
        assert 0 < results["diffusion.run"]["mean"] < 1
        started = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        proc.wait(20)
        stopped_in = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    log = log_path.read_text(errors="replace")
    assert stopped_in < 15, log
    assert log.count("worker stopped in") == 2 and "gateway stopped in" in log, log
    assert _processes_mentioning(str(data_dir)) == []
    assert _processes_mentioning(f"--worker-port {ports['NSQJOBS_WORKER1_PORT']}") == []
    assert all(not ping(url + "/healthz") for url in urls)
