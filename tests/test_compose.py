"""The docker compose stack, built and run on a real Docker engine.

One stack per module run, under a project name of its own, always taken down. From the host the
tests talk only to the ports compose publishes on 127.0.0.1 (the nginx proxy in front of the
gateway replicas, Prometheus); anything else (a worker replica's own metrics, one gateway replica,
PostgreSQL) is reached with ``docker compose exec``. Grafana cannot be had here: the stack is
started by naming every other service, and Grafana never runs.

Where Docker Hub cannot be reached, the stand-ins of ``deploy/standins/build.sh`` take the
official images' place (``.ci/run`` builds them); they are used whenever they exist locally.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nsqjobs.testing import DeadlineExceeded, MissingBinary, free_port, http, wait_for

from tests.dashboards import (
    ALL,
    DASHBOARDS,
    FAST_FAILURES,
    check_queries,
    panels,
    query,
    submit_mix,
)

ROOT = Path(__file__).resolve().parent.parent
STANDINS = ROOT / "deploy" / "standins" / "standins.env"
# Every service but grafana (no image here; a bare `up` would fail pulling it).
SERVICES = [
    "nsqlookupd",
    "nsqd",
    "nsqadmin",
    "postgres",
    "gateway",
    "proxy",
    "worker",
    "exporter",
    "prometheus",
]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass
class Project:
    """A compose project of its own name, run with its own environment."""

    project: str
    env: dict[str, str]

    def compose(self, *args: str, timeout: float = 300.0, check: bool = True) -> str:
        """Run ``docker compose -p PROJECT ARGS``; the output, or an assertion with it."""
        done = subprocess.run(
            ["docker", "compose", "-p", self.project, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode:
            raise AssertionError(f"docker compose {' '.join(args)}: {done.stderr}{done.stdout}")
        return done.stdout + done.stderr

    def exec_python(self, service: str, index: int, script: str) -> str:
        """Run ``python3 -c SCRIPT`` in replica ``index`` of ``service``; its output."""
        return self.compose(
            "exec", "-T", "--index", str(index), service, "python3", "-c", script, timeout=30
        )

    def leftovers(self) -> list[tuple[str, list[str]]]:
        """Containers, volumes and networks of the project that still exist."""
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind in (["ps", "-a"], ["volume", "ls"], ["network", "ls"]):
            left = subprocess.run(
                ["docker", *kind, "-q", "--filter", label],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout.split()
            if left:
                found.append((kind[0], left))
        return found


@dataclass
class Stack(Project):
    """A running compose project and its published ports."""

    gateway: str
    prometheus: str
    show: Callable[[str], None]

    def replica_metric(
        self, index: int, name: str, service: str = "worker", port: int = 9101
    ) -> float:
        """Sum of metric ``name`` (all labels) in replica ``index``'s own /metrics."""
        script = (
            "import urllib.request as u;"
            f"print(u.urlopen('http://127.0.0.1:{port}/metrics', timeout=5).read().decode())"
        )
        text = self.exec_python(service, index, script)
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") or line.startswith(name + " ")
        )

    def targets(self, job: str) -> list[dict[str, Any]]:
        """Prometheus's active targets of ``job``."""
        _, _, body = http("GET", self.prometheus + "/api/v1/targets")
        assert isinstance(body, dict)
        return [t for t in body["data"]["activeTargets"] if t["labels"]["job"] == job]


def _docker() -> None:
    if shutil.which("docker") is None:
        raise MissingBinary("docker not found (apt-get install docker.io; .ci/run does it)")
    for args, what in ((["info"], "no Docker engine answers"), (["compose", "version"], "")):
        done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=30)
        if done.returncode:
            raise MissingBinary(
                what
                or "docker compose is missing (.ci/run builds the plugin)"
                + f": {done.stderr.strip()[:200]}"
            )


def _image_env() -> dict[str, str]:
    """The stand-in image names of standins.env, for those that exist locally."""
    chosen = {}
    for line in STANDINS.read_text().splitlines():
        if line and not line.startswith("#"):
            var, _, image = line.partition("=")
            inspect = subprocess.run(
                ["docker", "image", "inspect", image], capture_output=True, timeout=30
            )
            if inspect.returncode == 0:
                chosen[var] = image
    return chosen


def _environment(**settings: str) -> dict[str, str]:
    """This process's environment without NSQJOBS_ variables, stand-ins, and ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSQJOBS_")}
    env.update(_image_env(), **settings)
    return env


@pytest.fixture(scope="module")
def stack(pytestconfig: pytest.Config) -> Iterator[Stack]:
    """Build the images, `up --wait` the stack (2 workers), and always `down -v` it."""
    _docker()
    capture: Any = pytestconfig.pluginmanager.getplugin("capturemanager")

    def show(text: str) -> None:
        # Into the run's output even when the test passes: the CI log shows the containers.
        if capture is None:
            print(text)
            return
        with capture.global_and_fixture_disabled():
            print(text, flush=True)

    project = f"nsqjobs-test-{uuid.uuid4().hex[:8]}"
    gateway_port, prometheus_port = free_port(), free_port()
    env = _environment(
        NSQJOBS_IMAGE=f"{project}:latest",
        GATEWAY_PORT=str(gateway_port),
        PROMETHEUS_PORT=str(prometheus_port),
        NSQADMIN_PORT=str(free_port()),
        NSQJOBS_DEBUG_TASKS="1",
        NSQJOBS_GRACE_S="30",
        **FAST_FAILURES,
    )
    running = Stack(
        project,
        env,
        f"http://127.0.0.1:{gateway_port}",
        f"http://127.0.0.1:{prometheus_port}",
        show,
    )
    try:
        started = time.monotonic()
        show("\n" + running.compose("build", "gateway", timeout=600).strip()[-600:])
        built = time.monotonic()
        running.compose("up", "--detach", "--wait", *SERVICES, timeout=300)
        show(f"compose: build {built - started:.1f} s, up --wait {time.monotonic() - built:.1f} s")
        show(running.compose("ps"))
        yield running
    finally:
        running.compose("down", "--volumes", "--timeout", "60", timeout=120, check=False)
        subprocess.run(
            ["docker", "image", "rm", "-f", f"{project}:latest"], capture_output=True, timeout=60
        )


def _scale(workers: int) -> list[str]:
    """``up`` arguments after the first step: three gateway replicas, ``workers`` workers."""
    return ["--scale", "gateway=3", "--scale", f"worker={workers}"]


def _prime_count(stop: int) -> int:
    sieve = bytearray([1]) * stop
    sieve[:2] = b"\0\0"[:stop]
    for i in range(2, int(stop**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytes(len(range(i * i, stop, i)))
    return sum(sieve)


def _run_jobs(gateway: str, jobs: list[dict[str, Any]], wait: float = 60) -> list[dict[str, Any]]:
    def one(job: dict[str, Any]) -> dict[str, Any]:
        status, _, body = http("POST", f"{gateway}/v1/jobs?wait={wait:g}", job, timeout=wait + 10)
        assert status == 200, (status, body)
        assert isinstance(body, dict)
        return body

    with ThreadPoolExecutor(max_workers=min(32, len(jobs))) as pool:
        return list(pool.map(one, jobs))


# Run in a gateway replica: submit one job to that replica, or read one by id from it (polled
# until it has an outcome); prints the answer's JSON.
_SUBMIT = """
import json, urllib.request as u
req = u.Request("http://127.0.0.1:8080/v1/jobs", data=json.dumps({job}).encode(),
                headers={{"Content-Type": "application/json"}}, method="POST")
print(u.urlopen(req, timeout=10).read().decode())
"""
_READ = """
import json, time, urllib.request as u
deadline = time.monotonic() + 30
while True:
    job = json.load(u.urlopen("http://127.0.0.1:8080/v1/jobs/{id}", timeout=10))
    if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
        break
    time.sleep(0.2)
print(json.dumps(job))
"""


def _gateways_share_the_ledger(stack: Stack) -> None:
    """A job submitted to gateway replica 1 is read by id, with its outcome, from replica 2."""
    job_id = f"compose-{uuid.uuid4().hex[:12]}"
    job = {"id": job_id, "task": "primes.count", "args": {"start": 0, "stop": 30_011}}
    accepted = json.loads(stack.exec_python("gateway", 1, _SUBMIT.format(job=job)))
    assert accepted["id"] == job_id, accepted
    read = json.loads(stack.exec_python("gateway", 2, _READ.format(id=job_id)))
    assert read["id"] == job_id and read["status"] == "succeeded", read
    assert read["result"] == _prime_count(30_011), read
    stack.show(f"gateways: {job_id} submitted to replica 1, read from replica 2: {read['status']}")


def _proxy_skips_a_stopped_gateway(stack: Stack) -> None:
    """With one gateway replica stopped, every job through the proxy still runs."""
    container = f"{stack.project}-gateway-1"
    subprocess.run(["docker", "stop", container], capture_output=True, timeout=60, check=True)
    try:
        stops = [5000 + 7 * i for i in range(20)]
        results = _run_jobs(
            stack.gateway,
            [{"task": "primes.count", "args": {"start": 0, "stop": s}} for s in stops],
        )
        for stop, result in zip(stops, results, strict=True):
            assert result["status"] == "succeeded" and result["result"] == _prime_count(stop)
    finally:
        subprocess.run(["docker", "start", container], capture_output=True, timeout=60)
    stack.compose("up", "--detach", "--wait", *SERVICES)
    stack.show("proxy: 20 jobs ran with gateway replica 1 stopped")


@pytest.mark.timeout(900)
def test_compose_stack(stack: Stack) -> None:
    """Jobs through the proxy to two gateways sharing PostgreSQL, scale workers to 4 and
    gateways to 3, dashboards' queries, drain on scale-down."""
    # 1. Jobs through the published port (nginx, two gateway replicas), every result checked;
    #    both replicas took some, both are scraped.
    stops = [1000 + 997 * i for i in range(100)]
    results = _run_jobs(
        stack.gateway, [{"task": "primes.count", "args": {"start": 0, "stop": s}} for s in stops]
    )
    for stop, result in zip(stops, results, strict=True):
        assert result["status"] == "succeeded" and result["result"] == _prime_count(stop), result
    wait_for(
        lambda: sum(t["health"] == "up" for t in stack.targets("gateway")) == 2,
        timeout=30,
        what="Prometheus lists 2 gateway targets up",
    )

    def accepted_by_gateway() -> list[float] | None:
        ok, series = query(stack.prometheus, "sum by (instance) (nsqjobs_jobs_accepted_total)")
        counts = [float(s["value"][1]) for s in series] if ok else []
        return counts if len(counts) == 2 and sum(counts) >= 100 else None

    per_gateway = wait_for(accepted_by_gateway, timeout=30, what="both gateways' jobs scraped")
    stack.show(f"jobs accepted per gateway replica (Prometheus): {per_gateway}")
    assert all(n > 0 for n in per_gateway), per_gateway
    _gateways_share_the_ledger(stack)
    _proxy_skips_a_stopped_gateway(stack)

    # 2. Four worker replicas, each doing work of its own, each a Prometheus target that is up;
    #    a third gateway, found by the proxy and Prometheus without a reload.
    began = time.monotonic()
    stack.compose("up", "--detach", "--wait", *_scale(workers=4), *SERVICES)
    stack.show(f"compose: --scale worker=4 gateway=3 {time.monotonic() - began:.1f} s")
    stack.show(stack.compose("ps", "worker", "gateway"))
    stops = [50_000 + 1013 * i for i in range(400)]
    results = _run_jobs(
        stack.gateway, [{"task": "primes.count", "args": {"start": 0, "stop": s}} for s in stops]
    )
    for stop, result in zip(stops, results, strict=True):
        assert result["status"] == "succeeded" and result["result"] == _prime_count(stop), result
    done_by = [stack.replica_metric(i, "nsqjobs_jobs_succeeded_total") for i in range(1, 5)]
    stack.show(f"jobs succeeded per replica: {done_by}")
    assert all(n > 0 for n in done_by), done_by
    assert len({r["worker"] for r in results}) == 4
    wait_for(
        lambda: sum(t["health"] == "up" for t in stack.targets("worker")) == 4,
        timeout=60,
        what="Prometheus lists 4 worker targets up",
    )
    stack.show(
        f"prometheus worker targets: {[t['labels']['instance'] for t in stack.targets('worker')]}"
    )
    wait_for(
        lambda: sum(t["health"] == "up" for t in stack.targets("gateway")) == 3,
        timeout=30,
        what="Prometheus lists 3 gateway targets up",
    )
    third = stack.replica_metric(3, "nsqjobs_jobs_accepted_total", "gateway", 8080)
    stack.show(f"jobs accepted by the third gateway replica: {third:.0f}")
    assert third > 0

    # 3. Every dashboard query returns data, failures and dead letters included.
    submit_mix(stack.gateway, rounds=3)
    failures: list[str] = []

    def queries_pass() -> bool:
        failures[:] = check_queries(stack.prometheus, DASHBOARDS, ALL)
        return not failures

    try:
        wait_for(queries_pass, timeout=120, interval=5, what="every dashboard query has data")
    except DeadlineExceeded:
        raise AssertionError("dashboard queries:\n" + "\n".join(failures)) from None
    count = sum(len(panel.expr) for path in DASHBOARDS for panel in panels(path))
    stack.show(f"dashboards: all {count} queries of {len(DASHBOARDS)} dashboards returned data")
    # The ledger panels show the one shared ledger: every job that ran, through either gateway,
    # counted (not once per replica: max), and its commits timed.
    ran = 100 + 1 + 20 + 400

    seen: list[float] = []

    def ledger_counts() -> tuple[float, float] | None:
        ok_jobs, jobs = query(stack.prometheus, 'max(nsqjobs_ledger_jobs{status="succeeded"})')
        ok_writes, writes = query(stack.prometheus, "sum(nsqjobs_ledger_write_seconds_count)")
        if not (ok_jobs and ok_writes and jobs and writes):
            return None
        seen[:] = [float(jobs[0]["value"][1]), float(writes[0]["value"][1])]
        return (seen[0], seen[1]) if seen[0] >= ran and seen[1] > 0 else None

    try:
        succeeded, commits = wait_for(ledger_counts, timeout=30, what="the ledger's gauges")
    except DeadlineExceeded:
        raise AssertionError(
            f"ledger: {ran} succeeded jobs and some commits timed expected, (succeeded, commits)"
            f" = {seen}"
        ) from None
    assert succeeded < 2 * ran, succeeded
    stack.show(f"ledger: {succeeded:.0f} jobs succeeded, {commits:.0f} commits timed")

    # 4. Scale down to 1 while long jobs run: the stopped replicas drain.
    since = str(int(time.time()) - 1)
    long_jobs = [{"task": "debug.sleep", "args": {"seconds": 6}} for _ in range(8)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_run_jobs, stack.gateway, long_jobs)
        wait_for(
            lambda: all(
                stack.replica_metric(i, "nsqjobs_jobs_in_progress") > 0 for i in range(1, 5)
            ),
            timeout=30,
            what="every replica runs a long job",
            interval=0.5,
        )
        began = time.monotonic()
        stack.compose("up", "--detach", "--wait", *_scale(workers=1), *SERVICES)
        stack.show(f"compose: --scale worker=1 (drain) {time.monotonic() - began:.1f} s")
        drained = pending.result(timeout=120)
    assert all(r["status"] == "succeeded" and r["attempts"] == 1 for r in drained), drained
    assert len({r["worker"] for r in drained}) == 4, drained
    events = subprocess.run(
        [
            "docker", "events", "--since", since, "--until", str(int(time.time()) + 1),
            "--filter", f"label=com.docker.compose.project={stack.project}",
            "--filter", "label=com.docker.compose.service=worker",
            "--filter", "event=die", "--format", "{{json .Actor.Attributes}}",
        ],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    died = [json.loads(line) for line in events.splitlines() if line]
    stack.show(f"stopped replicas (name, exit code): {[(d['name'], d['exitCode']) for d in died]}")
    assert len(died) == 3 and all(d["exitCode"] == "0" for d in died), died
    ps = stack.compose("ps", "--format", "{{.Service}}", "worker").split()
    assert ps == ["worker"], ps

    # 5. `down -v` leaves no container, volume or network of the project.
    stack.compose("down", "--volumes", "--timeout", "60", timeout=120)
    assert stack.leftovers() == []
    stack.show(f"compose: down -v left no container, volume or network of {stack.project}")


@pytest.mark.timeout(240)
def test_postgres_keeps_its_data_across_down_and_up() -> None:
    """The ledger's PostgreSQL on its own: healthy, its database and user made from the
    environment, the server run as postgres, and the volume kept by `down` (not `down -v`)."""
    _docker()
    pg = Project(
        f"nsqjobs-test-pg-{uuid.uuid4().hex[:8]}",
        _environment(POSTGRES_USER="ledger_owner", POSTGRES_DB="ledger_db"),
    )

    def sql(statement: str) -> str:
        return pg.compose(
            "exec", "-T", "postgres", "psql", "-U", "ledger_owner", "-d", "ledger_db",
            "-v", "ON_ERROR_STOP=1", "-At", "-c", statement, timeout=30,
        ).strip()  # fmt: skip

    try:
        began = time.monotonic()
        pg.compose("up", "--detach", "--wait", "postgres", timeout=120)
        first_up = time.monotonic() - began
        owner = pg.compose("exec", "-T", "postgres", "stat", "-c", "%U", "/proc/1", timeout=30)
        assert owner.strip() == "postgres", owner
        assert sql("SELECT current_user || ' ' || current_database()") == "ledger_owner ledger_db"
        assert sql("SHOW data_directory") == "/var/lib/postgresql/data"
        sql("CREATE TABLE kept (id text PRIMARY KEY); INSERT INTO kept VALUES ('job-1')")

        pg.compose("down", "--timeout", "30", timeout=120)
        assert [kind for kind, _ in pg.leftovers()] == ["volume"], pg.leftovers()
        began = time.monotonic()
        pg.compose("up", "--detach", "--wait", "postgres", timeout=120)
        second_up = time.monotonic() - began
        assert sql("SELECT id FROM kept") == "job-1"
        print(f"postgres: up --wait {first_up:.1f} s (initdb), {second_up:.1f} s (kept volume)")
    finally:
        pg.compose("down", "--volumes", "--timeout", "30", timeout=120, check=False)
    assert pg.leftovers() == []
