"""The scenarios, as data: how many jobs at what rate, which faults when, against which store.

``full()`` is ``make chaos``; ``short()`` is the same scenarios with small counts, run by
``tests/test_chaos.py`` in ``make test``. Both go through the same runner (``bench.chaos.run``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from bench.chaos.cluster import Setup

# The task every chaos job runs: it appends its key to the executions log, then sleeps.
TASK = "debug.chaos"
FaultKind = Literal[
    "kill_worker", "kill_nsqd", "stop_nsqd", "kill_gateway", "restart_ledger", "pause_workers"
]
# nsqd's default --mem-queue-size: a backlog beyond it goes to disk.
NSQD_MEM_QUEUE_SIZE = 10000


@dataclass(frozen=True)
class Fault:
    """One fault, ``at_s`` seconds after the first job was due; a stop lasts ``hold_s``."""

    at_s: float
    kind: FaultKind
    hold_s: float = 0.0


@dataclass(frozen=True)
class Plant:
    """The self-test's planted defects (see ``bench.chaos.selftest``): ``lose`` jobs accepted
    and then emptied out of nsqd, ``rerun`` jobs published once more behind the gateway's
    back, ``rewrite`` recorded outcomes changed in the ledger's file."""

    lose: int = 0
    rerun: int = 0
    rewrite: int = 0


@dataclass(frozen=True)
class Scenario:
    """One chaos run."""

    name: str
    title: str
    jobs: int
    rate: float
    job_seconds: float = 0.01
    faults: tuple[Fault, ...] = ()
    setup: Setup = field(default_factory=Setup)
    store: str = "sqlite"
    # After the last answer: wait at most drain_s for every accepted job's outcome, and stop
    # early when nothing moved for stall_s with nsqd empty (what is missing then stays lost).
    # stall_s outlasts the relay's grace (30 s) plus its claim lease (15 s: a killed gateway's
    # claims keep other relays off those jobs that long) plus a poll.
    drain_s: float = 180.0
    stall_s: float = 60.0
    give_up_s: float = 60.0
    # The deep backlog's target: no re-drive at all.
    no_redrives: bool = False
    plant: Plant | None = None

    @property
    def submit_s(self) -> float:
        """How long the submissions take at the steady rate."""
        return self.jobs / self.rate

    def faults_of(self, kind: FaultKind) -> int:
        """How many faults of ``kind``."""
        return sum(1 for f in self.faults if f.kind == kind)

    def worker_faults(self) -> int:
        """How many times a worker's held jobs (at most ``concurrency``) may run again: once
        per worker kill, and per paused worker once per message timeout the pause lasted
        (nsqd takes the held jobs back, then sends the stopped worker as many again; 2 s to
        spare: a job was delivered a little before the pause)."""
        timeout = self.setup.msg_timeout_s
        rounds = sum(
            int((f.hold_s + 2) // timeout) for f in self.faults if f.kind == "pause_workers"
        )
        return self.faults_of("kill_worker") + rounds * self.setup.workers

    def nsqd_on_disk(self) -> bool:
        """Whether nsqd may hold this run's jobs on disk (and re-deliver some after a crash)."""
        for arg in self.setup.nsqd_args:
            if arg.startswith("--mem-queue-size="):
                return int(arg.split("=", 1)[1]) < self.jobs
        return self.jobs > NSQD_MEM_QUEUE_SIZE

    def fault_text(self) -> str:
        """The faults, counted, for the report."""
        names = {
            "kill_worker": "worker SIGKILL",
            "kill_nsqd": "nsqd SIGKILL",
            "stop_nsqd": "nsqd SIGSTOP",
            "kill_gateway": "gateway SIGKILL",
            "restart_ledger": "ledger DB restart",
            "pause_workers": "workers SIGSTOP",
        }
        parts = []
        for kind, label in names.items():
            matching = [f for f in self.faults if f.kind == kind]
            if matching:
                hold = f" {matching[0].hold_s:g}s" if matching[0].hold_s else ""
                parts.append(f"{len(matching)}x {label}{hold}")
        return ", ".join(parts) or "none"

    def to_json(self) -> dict[str, Any]:
        """The settings, for chaos.json."""
        doc = dataclasses.asdict(self)
        doc["setup"]["gateway_env"] = dict(self.setup.gateway_env)
        doc["setup"]["worker_env"] = dict(self.setup.worker_env)
        return doc


def _spread(kind: FaultKind, n: int, start: float, end: float, hold: float = 0.0) -> list[Fault]:
    """``n`` faults evenly spread over [start, end]."""
    if n == 1:
        return [Fault(start, kind, hold)]
    step = (end - start) / (n - 1)
    return [Fault(round(start + i * step, 2), kind, hold) for i in range(n)]


def _scale(scenario: Scenario, factor: float) -> Scenario:
    """Fewer (or more) jobs at the same rate; faults keep their share of the submit time."""
    if factor == 1:
        return scenario
    jobs = max(50, int(scenario.jobs * factor))
    ratio = jobs / scenario.jobs
    faults = tuple(dataclasses.replace(f, at_s=round(f.at_s * ratio, 2)) for f in scenario.faults)
    return dataclasses.replace(scenario, jobs=jobs, faults=faults)


# nsqd SIGSTOPs outlast the gateway's publish timeout (its default is 5 s).
STOP_S = 7.0
# The deep backlog's relay grace: every job waits longer than this before a worker runs it.
BACKLOG_GRACE_S = 10.0


def full(store: str = "sqlite", scale: float = 1.0) -> list[Scenario]:
    """``make chaos``: each fault on its own, then all of them in one run."""
    backlog_jobs, backlog_rate = 8000, 400.0
    backlog_hold = backlog_jobs / backlog_rate + BACKLOG_GRACE_S + 5
    ledger_restart = [Fault(13.0, "restart_ledger"), Fault(27.0, "restart_ledger")]
    combined = [
        *_spread("kill_worker", 6, 4.0, 46.0),
        Fault(12.0, "kill_nsqd"),
        Fault(20.0, "stop_nsqd", STOP_S),
        Fault(31.0, "kill_gateway"),
        Fault(38.0, "kill_nsqd"),
    ]
    if store == "postgres":
        combined.append(Fault(26.0, "restart_ledger"))
    scenarios = [
        Scenario(
            "worker_kill",
            "20,000 jobs, 20 worker SIGKILLs (each worker started again)",
            20000,
            400.0,
            faults=tuple(_spread("kill_worker", 20, 2.0, 48.0)),
        ),
        Scenario(
            "nsqd_kill",
            "3 nsqd SIGKILLs and restarts, default nsqd flags",
            5000,
            125.0,
            job_seconds=0.02,
            faults=tuple(_spread("kill_nsqd", 3, 10.0, 30.0)),
        ),
        Scenario(
            "nsqd_kill_mem0",
            "3 nsqd SIGKILLs and restarts, --mem-queue-size=0",
            5000,
            125.0,
            job_seconds=0.02,
            faults=tuple(_spread("kill_nsqd", 3, 10.0, 30.0)),
            setup=Setup(nsqd_args=("--mem-queue-size=0",)),
        ),
        Scenario(
            "nsqd_stop",
            f"nsqd SIGSTOPped {STOP_S:g}s (past the 5s publish timeout), twice",
            5000,
            125.0,
            faults=tuple(_spread("stop_nsqd", 2, 8.0, 26.0, STOP_S)),
        ),
        Scenario(
            "gateway_kill",
            "gateway SIGKILLed and started again, 3 times",
            5000,
            125.0,
            faults=tuple(_spread("kill_gateway", 3, 10.0, 30.0)),
        ),
        Scenario(
            "ledger_restart",
            "the ledger's PostgreSQL server restarted, twice",
            5000,
            125.0,
            faults=tuple(ledger_restart),
            store="postgres",  # the one store with a server to restart
        ),
        Scenario(
            "deep_backlog",
            f"{backlog_jobs:,} jobs queued behind SIGSTOPped workers for longer than the "
            f"relay's grace ({BACKLOG_GRACE_S:g}s), no fault: no re-drive allowed",
            backlog_jobs,
            backlog_rate,
            faults=(Fault(0.0, "pause_workers", backlog_hold),),
            # nsqd's default message timeout, longer than the pause: held jobs stay held.
            setup=Setup(
                msg_timeout_s=60, gateway_env={"NSQJOBS_LEDGER_GRACE_S": f"{BACKLOG_GRACE_S:g}"}
            ),
            no_redrives=True,
        ),
        Scenario(
            "combined",
            "all of it in one run: worker, nsqd and gateway SIGKILLs, an nsqd SIGSTOP"
            + (", a ledger restart" if store == "postgres" else ""),
            10000,
            200.0,
            faults=tuple(sorted(combined, key=lambda f: f.at_s)),
        ),
    ]
    return [
        _scale(s if s.name == "ledger_restart" else dataclasses.replace(s, store=store), scale)
        for s in scenarios
    ]


# The long deep backlog: each job's run time, so that 2 workers x 8 slots (64 jobs/s) take
# about 13 minutes over 50,000 jobs submitted in the first two.
LONG_BACKLOG_JOB_S = 0.25


def long(store: str = "sqlite") -> list[Scenario]:
    """The issue's deep backlog at full size (``--long``, about 14 minutes): 50,000 jobs
    queued behind slow workers (a quarter of a second each), the last waiting about 11
    minutes, with the relay's default grace and no fault: no re-drive allowed. (Workers
    SIGSTOPped for that long are not a backlog but a fault: their nsqd connections go stale
    and nsqd takes their jobs back, and a job they were running overruns its time limit.)"""
    jobs, rate = 50000, 400.0
    return [
        Scenario(
            "deep_backlog_long",
            f"{jobs:,} jobs queued behind slow workers ({LONG_BACKLOG_JOB_S:g}s a job, "
            "2 x 8 slots: about 11 minutes in the queue for the last), no fault: no "
            "re-drive allowed",
            jobs,
            rate,
            job_seconds=LONG_BACKLOG_JOB_S,
            store=store,
            drain_s=1200.0,
            no_redrives=True,
        )
    ]


# The short runs: the relay's grace and the publish timeout made short so the runs are.
SHORT_GATEWAY = {"NSQJOBS_LEDGER_GRACE_S": "3", "NSQJOBS_PUBLISH_TIMEOUT_S": "1"}


# The short scenarios tests/test_chaos.py runs (about two minutes in all; ledger_restart needs
# PostgreSQL); the others run with ``python -m bench.chaos --short``.
IN_TESTS = ("selftest", "combined", "nsqd_kill_mem0", "deep_backlog", "ledger_restart")


def short(store: str = "sqlite") -> list[Scenario]:
    """The ``make test`` sizes: the same scenarios, a few seconds of jobs each."""
    quick = Setup(gateway_env=SHORT_GATEWAY)
    # stall_s: the 3 s grace, the relay's 15 s claim lease, polls.
    common: dict[str, Any] = {"store": store, "setup": quick, "drain_s": 60.0, "stall_s": 25.0}
    return [
        Scenario(
            "selftest",
            "planted defects: 20 jobs emptied out of nsqd, 10 run twice, 5 outcomes rewritten",
            300,
            150.0,
            plant=Plant(lose=20, rerun=10, rewrite=5),
            **{**common, "stall_s": 4.0},
        ),
        Scenario(
            "worker_kill",
            "1,500 jobs, 3 worker SIGKILLs",
            1500,
            250.0,
            faults=tuple(_spread("kill_worker", 3, 1.0, 5.0)),
            **common,
        ),
        Scenario(
            "nsqd_kill",
            "3 nsqd SIGKILLs and restarts, default flags",
            1000,
            125.0,
            job_seconds=0.02,
            faults=tuple(_spread("kill_nsqd", 3, 1.5, 6.5)),
            **common,
        ),
        Scenario(
            "nsqd_kill_mem0",
            "3 nsqd SIGKILLs and restarts, --mem-queue-size=0",
            1000,
            125.0,
            job_seconds=0.02,
            faults=tuple(_spread("kill_nsqd", 3, 1.5, 6.5)),
            **{**common, "setup": dataclasses.replace(quick, nsqd_args=("--mem-queue-size=0",))},
        ),
        Scenario(
            "nsqd_stop",
            "nsqd SIGSTOPped 2s (past a 1s publish timeout), twice",
            1000,
            125.0,
            faults=tuple(_spread("stop_nsqd", 2, 1.0, 5.0, 2.0)),
            **common,
        ),
        Scenario(
            "gateway_kill",
            "gateway SIGKILLed and started again",
            1000,
            125.0,
            faults=(Fault(3.0, "kill_gateway"),),
            **common,
        ),
        Scenario(
            "ledger_restart",
            "the ledger's PostgreSQL server restarted",
            1000,
            125.0,
            faults=(Fault(3.0, "restart_ledger"),),
            **{**common, "store": "postgres"},
        ),
        Scenario(
            "combined",
            "all of it: 2 worker SIGKILLs, 2 nsqd SIGKILLs, an nsqd SIGSTOP, a gateway SIGKILL",
            1500,
            150.0,
            faults=(
                Fault(1.0, "kill_worker"),
                Fault(2.5, "kill_nsqd"),
                Fault(4.0, "stop_nsqd", 2.0),
                Fault(7.0, "kill_gateway"),
                Fault(8.0, "kill_worker"),
                Fault(9.0, "kill_nsqd"),
            ),
            **common,
        ),
        Scenario(
            "deep_backlog",
            "1,000 jobs queued behind SIGSTOPped workers for longer than a 3s grace",
            1000,
            400.0,
            # Every job waits past the grace; the held ones are back before the 10s timeout.
            faults=(Fault(0.0, "pause_workers", 2.5 + 3.0 + 1.5),),
            no_redrives=True,
            **common,
        ),
    ]
