"""Jobs/s of a CPU-bound task through the docker compose stack with 1, 2 and 4 worker replicas.

``python -m bench.compose``: builds the image, starts the stack (every service but Grafana) under
a project name of its own, and for each replica count submits ``primes.count`` chunks through the
published gateway port (nginx in front of two gateway replicas), as many in flight as there are
worker slots times two, and times them.
Each replica runs one executor slot (``NSQJOBS_CONCURRENCY=1``), so replicas are the parallelism.
The stack is always taken down (``down -v``). Stand-in images (``deploy/standins/``) are used
when they exist locally, as in the tests. Figures go to ``bench/results/compose.md``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "compose.md"
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
CHUNK = 500_000_000  # numbers per primes.count job (about 0.3 s of one core)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _standins() -> dict[str, str]:
    chosen = {}
    for line in (ROOT / "deploy" / "standins" / "standins.env").read_text().splitlines():
        if line and not line.startswith("#"):
            var, _, image = line.partition("=")
            found = subprocess.run(["docker", "image", "inspect", image], capture_output=True)
            if found.returncode == 0:
                chosen[var] = image
    return chosen


def _job(gateway: str, index: int) -> float:
    body = (
        f'{{"task":"primes.count","args":{{"start":{index * CHUNK},"stop":{(index + 1) * CHUNK}}}}}'
    )
    req = urllib.request.Request(
        gateway + "/v1/jobs?wait=60",
        data=body.encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=70) as resp:
        answer = resp.read()
    if b'"succeeded"' not in answer:
        raise RuntimeError(answer.decode())
    return time.monotonic()


def main() -> int:
    """Run the measurement; write the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=48, help="jobs per replica count")
    parser.add_argument("--replicas", default="1,2,4", help="replica counts")
    opts = parser.parse_args()
    project = f"nsqjobs-bench-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSQJOBS_")}
    env.update(
        _standins(),
        NSQJOBS_IMAGE=f"{project}:latest",
        GATEWAY_PORT=str(port),
        PROMETHEUS_PORT=str(_free_port()),
        NSQADMIN_PORT=str(_free_port()),
        NSQJOBS_CONCURRENCY="1",
    )
    gateway = f"http://127.0.0.1:{port}"

    def compose(*args: str) -> None:
        subprocess.run(
            ["docker", "compose", "-p", project, *args],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            timeout=600,
        )

    rows = []
    try:
        compose("build", "gateway")
        compose("up", "--detach", "--wait", *SERVICES)
        _job(gateway, 0)  # warm-up: kernels compiled/loaded in a replica
        for n in (int(x) for x in opts.replicas.split(",")):
            compose("up", "--detach", "--wait", "--scale", f"worker={n}", *SERVICES)
            # Warm every replica, then time the run.
            with ThreadPoolExecutor(max_workers=2 * n) as pool:
                list(pool.map(lambda i: _job(gateway, i), range(2 * n)))
                began = time.monotonic()
                ends = list(pool.map(lambda i: _job(gateway, i), range(opts.jobs)))
            wall = max(ends) - began
            rows.append((n, opts.jobs / wall, wall))
            print(f"{n} replica(s): {opts.jobs / wall:.2f} jobs/s", file=sys.stderr)
    finally:
        subprocess.run(
            ["docker", "compose", "-p", project, "down", "--volumes"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=300,
        )
        subprocess.run(["docker", "image", "rm", "-f", f"{project}:latest"], capture_output=True)
    base = rows[0][1]
    lines = [
        "# Compose: jobs/s of a CPU-bound task by worker replicas",
        "",
        f"`python -m bench.compose`: {opts.jobs} `primes.count` jobs of {CHUNK:,} numbers each "
        f"through the published gateway (`?wait=60`), 2 per replica in flight; each replica "
        f"one slot (`NSQJOBS_CONCURRENCY=1`). Machine: {os.cpu_count()} CPUs.",
        "",
        "| worker replicas | jobs/s | speed-up | wall s |",
        "|---:|---:|---:|---:|",
        *(f"| {n} | {rate:.2f} | {rate / base:.2f}x | {wall:.1f} |" for n, rate, wall in rows),
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
