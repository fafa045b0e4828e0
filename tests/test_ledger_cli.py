"""The ledger's commands (``nsqjobs status|result|jobs|dlq|cancel``), run as the real CLI against
a real gateway with a SQLite ledger, nsqd and a worker: output, exit statuses, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from nsqjobs.names import ENV_API_TOKEN, ENV_GATEWAY_URL
from nsqjobs.testing import Daemon, Nsq, http, nsqjobs_command, run_cli, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
TOKEN = "cli-token-0123456789abcdef"


def cli(gateway: Daemon | None, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``nsqjobs ARGS`` with the gateway's URL and token in the environment."""
    base = {**os.environ, ENV_API_TOKEN: TOKEN, **env}
    if gateway is not None:
        base[ENV_GATEWAY_URL] = gateway.url
    return run_cli(*args, env=base, timeout=60)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, command: str) -> str:
    """Check for exit status ``code`` and a one-line reason; the reason."""
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"nsqjobs {command}: "), proc.stderr
    return proc.stderr


def recorded(gateway: Daemon, job_id: str, status: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        code, _, body = http(
            "GET", f"{gateway.url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        return body if code == 200 and body["status"] == status else None

    return wait_for(check, 30, f"job {job_id} {status}")


def submit(gateway: Daemon, job_id: str, task: str, args: str = "{}") -> None:
    done = cli(gateway, "submit", task, "--id", job_id, "--args", args)
    assert done.returncode == 0, done.stderr


def test_status_result_jobs_dlq_and_cancel(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path
) -> None:
    gateway = daemons(
        "gateway",
        nsq,
        NSQJOBS_LEDGER_URL=f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
        NSQJOBS_API_TOKENS=TOKEN,
    )
    # Queued, with no worker yet: status shows it, result times out (3), cancel cancels.
    submit(gateway, "c1", "noop")
    shown = cli(gateway, "status", "c1")
    assert shown.returncode == 0 and "status    queued" in shown.stdout, shown.stdout
    assert json.loads(cli(gateway, "status", "c1", "--json").stdout)["task"] == "noop"
    reason = one_line_error(cli(gateway, "result", "c1", "--wait", "0.3"), 3, "result")
    assert "still queued after 0.3s" in reason
    done = cli(gateway, "cancel", "c1")
    assert done.returncode == 0 and done.stdout == "cancelled c1\n"
    one_line_error(cli(gateway, "result", "c1"), 1, "result")

    worker = daemons("worker", nsq, NSQJOBS_MAX_ATTEMPTS="1")
    submit(gateway, "p1", "primes.count", '{"start": 0, "stop": 100}')
    done = cli(gateway, "result", "p1", "--wait", "30")
    assert done.returncode == 0 and json.loads(done.stdout) == 25, done.stderr
    assert "result    25" in cli(gateway, "status", "p1").stdout
    reason = one_line_error(cli(gateway, "cancel", "p1"), 1, "cancel")
    assert "409" in reason and "succeeded" in reason

    for i in range(3):
        submit(gateway, f"d{i}", "debug.fail", '{"mode": "error"}')
    submit(gateway, "t1", "debug.throws")
    done = cli(gateway, "result", "d0", "--wait", "30")
    assert done.returncode == 1 and "dead (max_attempts, DebugFailure" in done.stderr
    for job_id in ("d1", "d2", "t1"):
        recorded(gateway, job_id, "dead")

    # Listings: a table, JSON, filters, pages.
    table = cli(gateway, "jobs", "--status", "dead")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["ID", "TASK", "STATUS", "ATTEMPTS", "ACCEPTED", "FINISHED", "ERROR"]
    assert [r.split()[0] for r in rows] == ["d0", "d1", "d2", "t1"]
    assert "DebugFailure: debug.fail asked to fail" in rows[0]
    page = json.loads(cli(gateway, "jobs", "--task", "debug.fail", "--limit", "2", "--json").stdout)
    assert [j["id"] for j in page["jobs"]] == ["d0", "d1"] and page["next_cursor"]
    more = cli(gateway, "jobs", "--limit", "2")
    assert "more: --all, or --cursor" in more.stderr and len(more.stdout.splitlines()) == 3
    every = cli(gateway, "jobs", "--limit", "2", "--all", "--json")
    assert [j["id"] for j in json.loads(every.stdout)["jobs"]] == [
        "c1",
        "p1",
        "d0",
        "d1",
        "d2",
        "t1",
    ]
    listed = cli(gateway, "dlq", "list", "--task", "debug.throws")
    assert listed.stdout.splitlines()[0].split()[:3] == ["ID", "TASK", "REASON"]
    assert listed.stdout.splitlines()[1].split()[:3] == ["t1", "debug.throws", "not_retryable"]

    # Replay by id and by task; the relay publishes replayed jobs (the worker is paused while
    # a replayed job must still be queued).
    worker.pause()
    done = cli(gateway, "dlq", "replay", "d0")
    assert done.returncode == 0 and done.stdout == "replayed 1: d0\n"
    assert recorded(gateway, "d0", "queued")["replays"] == 1
    worker.resume()
    assert len(recorded(gateway, "d0", "dead")["runs"]) == 1
    worker.pause()
    done = cli(gateway, "dlq", "replay", "--task", "debug.fail", "--limit", "2")
    assert done.stdout == "replayed 2: d0 d1\n"

    # Purge needs --yes; by id, then by task.
    reason = one_line_error(cli(gateway, "dlq", "purge", "d2"), 2, "dlq")
    assert "--yes" in reason
    assert cli(gateway, "dlq", "purge", "d2", "--yes").stdout == "purged 1: d2\n"
    assert cli(gateway, "dlq", "purge", "--task", "debug.throws", "--yes").stdout == "purged 1\n"
    assert cli(gateway, "dlq", "list").stderr == "no dead letters\n"
    one_line_error(cli(gateway, "dlq", "purge", "d2", "--yes"), 1, "dlq")
    # Several ids: each is tried, and each failure is its own line.
    both = cli(gateway, "dlq", "replay", "d2", "nobody")
    assert both.returncode == 1 and both.stdout == "", both
    lines = both.stderr.splitlines()
    assert len(lines) == 2 and "'d2'" in lines[0] and "'nobody'" in lines[1], lines
    worker.resume()
    assert len(recorded(gateway, "d1", "dead")["runs"]) == 1
    assert worker.alive()

    # Errors: unknown id, bad token, bad filter, unreachable gateway; one line each.
    reason = one_line_error(cli(gateway, "status", "nobody"), 1, "status")
    assert "404" in reason and "nobody" in reason
    one_line_error(cli(gateway, "result", "nobody", "--wait", "1"), 4, "result")
    reason = one_line_error(cli(gateway, "jobs", **{ENV_API_TOKEN: "wrong"}), 1, "jobs")
    assert "403" in reason
    refused = cli(gateway, "jobs", "--limit", "0")  # a usage error now, never sent
    assert refused.returncode == 2 and "--limit: not an integer from 1 to 1000" in refused.stderr
    reason = one_line_error(cli(gateway, "jobs", "--token", "also-wrong"), 1, "jobs")
    assert "403" in reason

    # A reader that went away (`nsqjobs jobs | head`): a quiet end, as on SIGPIPE.
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {**os.environ, ENV_API_TOKEN: TOKEN, ENV_GATEWAY_URL: gateway.url}
    try:
        piped = subprocess.run(
            [*nsqjobs_command(), "jobs", "--json"],
            env=env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert (piped.returncode, piped.stderr) == (141, ""), piped.stderr


def test_usage_errors_exit_2_and_an_unreachable_gateway_1(tmp_path: Path) -> None:
    nowhere = {ENV_GATEWAY_URL: "http://127.0.0.1:9"}
    bad = [
        ["dlq"],
        ["jobs", "--status", "nope"],
        ["result"],
        ["dlq", "replay"],
        ["result", "x", "--wait", "nan"],
        ["submit", "noop", "--wait", "inf"],
        ["submit", "noop", "--wait", "-1"],
        ["submit", "noop", "--id", ""],
        ["status", "a/b"],
        ["cancel", ".."],
        ["dlq", "purge", "x/y", "--yes"],
    ]
    for argv in bad:
        proc = cli(None, *argv, **nowhere)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr
    one_line_error(cli(None, "dlq", "replay", "--task", "t", "--all", **nowhere), 2, "dlq")
    for args in ('{"a": NaN}', '{"a": 1e400}', "{bad", "[" * 5000 + "]" * 5000):
        reason = one_line_error(cli(None, "submit", "noop", "--args", args, **nowhere), 2, "submit")
        assert "--args is not valid JSON" in reason, reason
    for url in ("http://[::1", "localhost:8080", "http://"):
        reason = one_line_error(cli(None, "submit", "noop", **{ENV_GATEWAY_URL: url}), 2, "submit")
        assert "is not a URL" in reason, (url, reason)
    reason = one_line_error(cli(None, "jobs", **nowhere), 1, "jobs")
    assert "cannot reach the gateway at http://127.0.0.1:9" in reason
    one_line_error(cli(None, "result", "x", **nowhere), 4, "result")
