"""One scenario from start to verdict: start the cluster, submit at the steady rate while the
faults happen on schedule, drain, read every witness, judge.

Progress goes to ``log`` every few seconds; nothing here sleeps to synchronise: every wait is
a poll of a condition with a deadline.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nsqjobs.testing import HarnessError, MissingBinary, temp_dir

from bench.chaos import selftest
from bench.chaos.check import Bound, LedgerWatch, Submitted, Verdict, judge
from bench.chaos.client import Submitter
from bench.chaos.cluster import Cluster
from bench.chaos.ledger import open_ledger
from bench.chaos.observe import ExecutionLog, MetricsWatch, OutcomeTail
from bench.chaos.scenarios import TASK, Fault, Scenario

TICK_S = 0.25
METRICS_EVERY_S = 1.0
LEDGER_EVERY_S = 3.0


@dataclass
class Result:
    """What one scenario came to (``verdict`` None: it could not run; ``error`` says why)."""

    scenario: Scenario
    verdict: Verdict | None = None
    error: str | None = None
    duration_s: float = 0.0
    submit_s: float = 0.0
    drain_s: float = 0.0
    drained: bool = False
    relay: bool = False
    nsq_version: str = "?"
    events: list[str] = field(default_factory=list)
    planted: dict[str, list[str]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Targets met (and for the deep backlog, no re-drive); for the self-test: exactly the
        planted defects found."""
        v = self.verdict
        if v is None:
            return False
        if self.scenario.plant is not None:
            return not self.missed_plants()
        return v.passed and not (self.scenario.no_redrives and v.redrives)

    def missed_plants(self) -> list[str]:
        """How what the checker found differs from what was planted (the self-test)."""
        v, planted = self.verdict, self.planted
        if v is None:
            return ["no verdict"]
        rerun = planted.get("rerun", [])
        found = {
            "lost": (sorted(v.lost), sorted(planted.get("lost", []))),
            "ran twice": (sorted(v.ran_twice), sorted(rerun)),
            "rewritten": (sorted(v.duplicate_recorded), sorted(planted.get("rewritten", []))),
            "duplicate results": (v.duplicate_results, len(rerun)),
            "outcomes ignored": (v.duplicate_outcomes_ignored, len(rerun)),
        }
        return [f"{k}: found {a}, planted {b}" for k, (a, b) in found.items() if a != b]

    def summary(self) -> str:
        """The scenario's one line."""
        s = self.scenario
        head = f"chaos {s.name} [{s.store}]"
        if self.verdict is None:
            return f"{head}: could not run: {self.error}"
        verdict = "PASS" if self.passed else "FAIL"
        if self.scenario.plant is not None:
            verdict = ("found exactly the planted defects: " if self.passed else "") + verdict
        return f"{head}: {self.verdict.summary()}; {self.duration_s:.0f}s: {verdict}"

    def to_json(self) -> dict[str, Any]:
        """For chaos.json."""
        return {
            "scenario": self.scenario.to_json(),
            "faults": self.scenario.fault_text(),
            "passed": self.passed,
            "error": self.error,
            "duration_s": round(self.duration_s, 1),
            "submit_s": round(self.submit_s, 1),
            "drain_s": round(self.drain_s, 1),
            "drained": self.drained,
            "relay_present": self.relay,
            "nsq_version": self.nsq_version,
            "verdict": None if self.verdict is None else self.verdict.to_json(),
            "events": self.events,
            "planted": {k: len(v) for k, v in self.planted.items()},
        }


class Run:
    """The running scenario: its cluster and witnesses, shared with the self-test's plants."""

    def __init__(self, scenario: Scenario, stack: ExitStack, log: Callable[[str], None]) -> None:
        self.scenario = scenario
        self.log = log
        self.began = time.monotonic()
        self.work = work = temp_dir(stack, f"nsqjobs-chaos-{scenario.name}-")
        self.ledger = open_ledger(scenario.store, stack, work)
        self.cluster = Cluster(stack, work, scenario.setup, self.ledger)
        self.ledger.audit()  # the gateway is ready: its tables are made
        self.tail = OutcomeTail(self.cluster.nsq.nsqd_tcp)
        self.tail.start()
        stack.callback(self.tail.stop)
        self.executions = ExecutionLog(self.cluster.executions)
        self.watch = LedgerWatch()
        self.metrics = MetricsWatch()
        self.events: list[str] = []
        self.submitted: dict[str, Submitted] = {}
        self.retried = 0
        self._last_metrics = 0.0
        self._last_ledger = 0.0

    def body(self, job_id: str) -> dict[str, object]:
        """The job posted for ``job_id``."""
        return {
            "id": job_id,
            "task": TASK,
            "args": {"key": job_id, "seconds": self.scenario.job_seconds},
        }

    def event(self, text: str) -> None:
        """A fault or a step, logged and kept for the report."""
        stamp = time.monotonic() - self.began
        self.events.append(f"{stamp:.1f}s {text}")
        self.log(f"{self.scenario.name}: {text}")

    def submit(self, ids: list[str], rate: float, faults: tuple[Fault, ...] = ()) -> float:
        """Submit ``ids`` at ``rate`` while ``faults`` happen; returns the seconds it took."""
        client = Submitter(
            self.cluster.gateway.url, ids, self.body, rate, give_up_s=self.scenario.give_up_s
        )
        actions = _timeline(faults)
        client.start()
        last_progress = time.monotonic()
        while not client.done() or actions:
            now = time.monotonic() - client.started
            while actions and actions[0][0] <= now:
                _, _, act = actions.pop(0)
                self.event(_do(self.cluster, act))
            self.tick()
            if time.monotonic() - last_progress >= 5.0:
                last_progress = time.monotonic()
                p = client.progress
                self.log(
                    f"{self.scenario.name} {now:5.1f}s: sent {p.sent}/{len(ids)}, accepted "
                    f"{p.accepted}, in flight {p.in_flight}, retries {p.retries}, "
                    f"executions {self.executions.total()}, outcomes seen "
                    f"{sum(self.tail.counts().values())}, faults left {len(actions)}"
                )
            time.sleep(TICK_S)  # the pace of this poll loop
        client.stop()
        self.submitted.update(client.results)
        for s in client.results.values():
            # Publishes that may have been stored, then tried again: each can store it twice.
            tries = s.answers if s.state != "accepted" else s.answers[:-1]
            self.retried += sum(1 for a in tries if a != "refused")
        return (client.finished or time.monotonic()) - client.started

    def tick(self, force: bool = False) -> None:
        """Scrape the gateway's metrics and read the ledger, each at its own pace."""
        now = time.monotonic()
        if force or now - self._last_metrics >= METRICS_EVERY_S:
            self._last_metrics = now
            self.metrics.scrape(self.cluster.gateway)
            for event in self.cluster.supervise():
                self.event(event)
        if force or now - self._last_ledger >= LEDGER_EVERY_S:
            self._last_ledger = now
            try:
                rows = self.ledger.rows()
            except HarnessError as exc:  # the database is being restarted: read next time
                self.log(f"{self.scenario.name}: ledger not read: {exc}")
            else:
                self.watch.read(rows)

    def drain(self, deadline_s: float, stall_s: float) -> bool:
        """Wait until every accepted job has a recorded outcome and nsqd holds nothing more
        for the workers or the witnesses; give up at ``deadline_s``, or once nothing moved for
        ``stall_s`` with nsqd empty. True when drained."""
        accepted = [i for i, s in self.submitted.items() if s.state == "accepted"]
        start = last_move = last_log = time.monotonic()
        last: tuple[int, int, int] | None = None
        quiet = 0
        while True:
            self.tick(force=True)
            left = len(self.watch.unfinished(accepted))
            queued = self.cluster.queued_in_nsqd()
            pending = self.cluster.outcomes_pending()
            runs = self.executions.total()
            state = (left, runs, sum(self.tail.counts().values()))
            empty = queued == 0 and pending == 0
            quiet = quiet + 1 if empty and state == last else 0
            if state != last:
                last_move = time.monotonic()
                last = state
            if left == 0 and quiet >= 2:
                return True
            waited = time.monotonic() - start
            if empty and time.monotonic() - last_move > stall_s:
                self.event(f"drain: nothing moved for {stall_s:g}s, {left} accepted unfinished")
                return False
            if waited > deadline_s:
                self.event(f"drain: deadline {deadline_s:g}s passed, {left} accepted unfinished")
                return False
            if time.monotonic() - last_log >= 5.0:
                last_log = time.monotonic()
                self.log(
                    f"{self.scenario.name} draining {waited:4.0f}s: {left} accepted unfinished, "
                    f"{queued} queued in nsqd, {pending} outcomes pending, {runs} executions"
                )
            time.sleep(1.0)  # the pace of this poll loop

    def verdict(self) -> Verdict:
        """Judge what the witnesses saw."""
        self.tick(force=True)
        self.watch.audited = self.ledger.rewrites()
        s = self.scenario
        bound = Bound(
            worker_faults=s.worker_faults(),
            concurrency=s.setup.concurrency,
            retried_publishes=self.retried,
            requeued_results=self.cluster.requeued_results(),
            nsqd_kills_on_disk=s.faults_of("kill_nsqd") if s.nsqd_on_disk() else 0,
        )
        return judge(
            self.submitted,
            self.watch,
            self.executions.read(),
            self.tail.counts(),
            duplicate_outcomes_ignored=sum(
                self.metrics.total("nsqjobs_ledger_duplicate_outcomes_total").values()
            ),
            redrives_by_reason=self.metrics.total("nsqjobs_ledger_redrives_total"),
            bound=bound,
        )


def _timeline(faults: tuple[Fault, ...]) -> list[tuple[float, str, str]]:
    """Each fault as timed actions: a stop is a stop and, ``hold_s`` later, a continue."""
    actions: list[tuple[float, str, str]] = []
    for f in faults:
        if f.kind == "stop_nsqd":
            actions += [(f.at_s, f.kind, "pause_nsqd"), (f.at_s + f.hold_s, f.kind, "resume_nsqd")]
        elif f.kind == "pause_workers":
            actions += [
                (f.at_s, f.kind, "pause_workers"),
                (f.at_s + f.hold_s, f.kind, "resume_workers"),
            ]
        else:
            actions.append((f.at_s, f.kind, f.kind))
    return sorted(actions, key=lambda a: a[0])


def _do(cluster: Cluster, act: str) -> str:
    method: Callable[[], str] = getattr(cluster, act)
    return method()


def run(scenario: Scenario, log: Callable[[str], None], keep_failed: Path | None = None) -> Result:
    """Run one scenario; errors of the harness become a result that says it could not run.
    ``keep_failed``: where a failed run's directory (logs, ledger file, executions) is kept."""
    result = Result(scenario)
    began = time.monotonic()
    try:
        with ExitStack() as stack:
            r = Run(scenario, stack, log)
            result.nsq_version = r.cluster.nsq.version
            ids = [f"{scenario.name}-{i:06d}" for i in range(scenario.jobs)]
            plants = selftest.Plants(r) if scenario.plant else None
            if plants is not None:
                plants.before()
            log(
                f"{scenario.name}: {scenario.jobs} jobs at {scenario.rate:g}/s, faults: "
                f"{scenario.fault_text()}"
            )
            result.submit_s = r.submit(ids, scenario.rate, scenario.faults)
            drain_began = time.monotonic()
            result.drained = r.drain(scenario.drain_s, scenario.stall_s)
            if plants is not None:
                plants.after()
            result.drain_s = time.monotonic() - drain_began
            result.verdict = r.verdict()
            result.relay = r.metrics.relay_seen
            result.events = r.events
            if plants is not None:
                result.planted = plants.planted
            if keep_failed is not None and not result.passed:
                kept = keep_failed / scenario.name
                shutil.rmtree(kept, ignore_errors=True)
                shutil.copytree(r.work, kept, ignore=shutil.ignore_patterns("*.diskqueue.*"))
                log(f"{scenario.name}: failed; its logs and files are kept in {kept}")
            log(f"{scenario.name}: stopping")
    except MissingBinary:
        raise  # a test skips (or fails under CI); the command line reports it
    except HarnessError as exc:
        result.error = str(exc)
    result.duration_s = time.monotonic() - began
    return result
