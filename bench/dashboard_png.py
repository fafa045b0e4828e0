"""The README's dashboard picture: the overview panels drawn from a real Prometheus.

Starts the local stack of ``tests.dashboards`` (nsqd, nsqlookupd, gateway, two workers, the
exporter, Prometheus scraping every second), drives a minute of jobs with a backlog in the
middle and failures throughout, then draws each overview panel from ``/api/v1/query_range``:
``python -m bench.dashboard_png [OUT.png]`` (default ``bench/results/dashboard.png``).
Grafana itself does not run here: this is the same queries, drawn with matplotlib.
"""

from __future__ import annotations

import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from nsqjobs.testing import Daemon, Nsq, http, nsq_pair, start_daemon, wait_for

from bench.procs import ROOT, log
from tests.dashboards import panels, start_local_stack, submit_mix, substitute

OVERVIEW = ROOT / "deploy" / "grafana" / "dashboards" / "overview.json"
VARIABLES = {"task": ".*", "queue": ".*", "instance": ".*", "__rate_interval": "10s"}


def drive(gateway_url: str, seconds: float, stop: threading.Event) -> None:
    """Steady work, a backlog of one-second jobs in the middle third, failures throughout."""
    started = time.monotonic()
    while not stop.is_set() and (elapsed := time.monotonic() - started) < seconds:
        for _ in range(5):
            http(
                "POST",
                gateway_url + "/v1/jobs",
                {"task": "primes.count", "args": {"start": 0, "stop": 300_000}},
            )
        if seconds / 3 < elapsed < 2 * seconds / 3:
            for _ in range(6):
                http(
                    "POST",
                    gateway_url + "/v1/jobs",
                    {"task": "debug.sleep", "args": {"seconds": 1}},
                )
        if int(elapsed) % 5 == 0:
            submit_mix(gateway_url)
        time.sleep(0.5)  # pacing the load, not synchronisation


def query_range(url: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    """One range query, every 2 s over [start, end]."""
    q = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": 2})
    status, _, body = http("GET", f"{url}/api/v1/query_range?{q}")
    if status != 200:
        raise RuntimeError(f"{expr}: {status} {body}")
    return list(body["data"]["result"])


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` legend format."""
    out = template
    for key, value in labels.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def draw(url: str, start: float, end: float, out: Path) -> None:
    """Every overview panel with queries, in the dashboard's order, four to a row."""
    found = [p for p in panels(OVERVIEW) if p.expr]
    cols = 4
    rows = (len(found) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 4.6, rows * 2.9), squeeze=False)
    fig.patch.set_facecolor("#111217")
    for ax, panel in zip(axes.flat, found, strict=False):
        ax.set_facecolor("#181b1f")
        ax.set_title(f"{panel.title} [{panel.unit}]", color="#d8d9da", fontsize=9, loc="left")
        ax.tick_params(colors="#8e8e8e", labelsize=7)
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        for target in panel.raw["targets"]:
            for series in query_range(url, substitute(target["expr"], VARIABLES), start, end):
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                label = legend(target.get("legendFormat", ""), series["metric"])
                ax.plot(xs, ys, linewidth=1.1, label=label[:40])
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left", framealpha=0.3, ncol=2)
    for ax in list(axes.flat)[len(found) :]:
        ax.set_visible(False)
    fig.suptitle(
        "nsqjobs overview: panels drawn from a real Prometheus (seconds since start)",
        color="#d8d9da",
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor=fig.get_facecolor())
    log(f"wrote {out}")


def _drained(nsq: Nsq) -> bool:
    channel = nsq.channel("jobs", "workers")
    return channel is not None and channel["depth"] == 0 and channel["in_flight_count"] == 0


def main(argv: list[str]) -> int:
    """Run the stack, drive it, draw the picture."""
    out = Path(argv[0]) if argv else ROOT / "bench" / "results" / "dashboard.png"
    with nsq_pair() as nsq, ExitStack() as stack:
        work = Path(nsq.data_dir).parent

        def start(kind: str, pair: Nsq, **env: str) -> Daemon:
            return start_daemon(kind, pair, work, env, stack=stack, cwd=ROOT)

        starter: Callable[..., Daemon] = start
        local = start_local_stack(nsq, work, stack, starter)
        log(f"stack up; Prometheus at {local.prometheus_url}; driving jobs for 60 s")
        begin = time.time()
        stop = threading.Event()
        try:
            drive(local.gateway.url, 60.0, stop)
        finally:
            stop.set()
        wait_for(lambda: _drained(nsq), 120, "the backlog to drain", interval=1.0)
        draw(local.prometheus_url, begin, time.time() + 5, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
