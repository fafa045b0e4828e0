"""Independent witnesses: a consumer of ``results`` and ``dead_letters`` on its own durable
channel, the executions log the ``debug.chaos`` task appends to, and the gateway's metrics.

The consumer speaks NSQ's TCP protocol directly (``nsqjobs.testing.Tail``), not through the
code under test, and reconnects whenever nsqd goes away (killed, restarted, stopped).
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

from nsqjobs import wire
from nsqjobs.errors import DecodeError
from nsqjobs.names import DEAD_LETTER_TOPIC, RESULTS_TOPIC
from nsqjobs.testing import Daemon, HarnessError, Tail

CHANNEL = "chaos"
OUTCOME_TOPICS = (RESULTS_TOPIC, DEAD_LETTER_TOPIC)


class OutcomeTail:
    """Counts every result and dead letter per job id seen on the ``chaos`` channel."""

    def __init__(self, nsqd_tcp: str) -> None:
        self.nsqd_tcp = nsqd_tcp
        self.seen: Counter[str] = Counter()
        self.undecodable = 0
        self.reconnects = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(topic,), name=f"chaos-{topic}", daemon=True)
            for topic in OUTCOME_TOPICS
        ]

    def start(self) -> None:
        """Start reading (the channels must exist already, so nothing is missed)."""
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop reading."""
        self._stop.set()
        for t in self._threads:
            t.join(15)

    def counts(self) -> Counter[str]:
        """Outcomes seen per id so far."""
        with self._lock:
            return Counter(self.seen)

    def _run(self, topic: str) -> None:
        while not self._stop.is_set():
            try:
                tail = Tail(self.nsqd_tcp, topic, CHANNEL)
            except (OSError, HarnessError):
                self._stop.wait(0.2)  # nsqd is down or stopped: try again shortly
                continue
            try:
                while not self._stop.is_set():
                    self._count(topic, tail.collect(5000, 0.5))
            except (OSError, HarnessError):
                with self._lock:
                    self.reconnects += 1
            finally:
                tail.close()

    def _count(self, topic: str, bodies: list[bytes]) -> None:
        ids: list[str] = []
        for body in bodies:
            try:
                if topic == RESULTS_TOPIC:
                    ids.append(wire.decode_result(body).id)
                else:
                    job = wire.decode_dead_letter(body).job
                    if job is not None:
                        ids.append(job.id)
            except DecodeError:
                with self._lock:
                    self.undecodable += 1
        with self._lock:
            self.seen.update(ids)


class ExecutionLog:
    """The file ``debug.chaos`` appends one line (the job's key) to per execution."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""
        self.runs: Counter[str] = Counter()

    def read(self) -> Counter[str]:
        """Executions per id so far (reads what was appended since the last call)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.runs
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        self.runs.update(line.decode() for line in lines if line)
        return self.runs

    def total(self) -> int:
        """Executions so far."""
        return sum(self.read().values())


class MetricsWatch:
    """The gateway's ledger counters, summed over its lives: a SIGKILLed gateway's counters
    are gone with it, so each life's last scrape is what counts (a lower bound)."""

    COUNTERS = (
        "nsqjobs_ledger_duplicate_outcomes_total",
        "nsqjobs_ledger_redrives_total",
    )

    def __init__(self) -> None:
        self._lives: dict[int, dict[tuple[str, str], float]] = {}
        self.relay_seen = False

    def scrape(self, gateway: Daemon) -> None:
        """One scrape (nothing when the gateway does not answer)."""
        try:
            families = gateway.metrics()
        except (OSError, ValueError):
            return
        values: dict[tuple[str, str], float] = {}
        for family in families:
            if family.name == "nsqjobs_ledger_redrives":
                self.relay_seen = True
            for sample in family.samples:
                if sample.name in self.COUNTERS:
                    values[(sample.name, sample.labels.get("reason", ""))] = sample.value
        if values or gateway.proc.pid not in self._lives:
            self._lives[gateway.proc.pid] = values

    def total(self, name: str) -> dict[str, int]:
        """A counter by label (its ``reason``), summed over every life."""
        out: dict[str, int] = {}
        for values in self._lives.values():
            for (sample, label), value in values.items():
                if sample == name:
                    out[label] = out.get(label, 0) + int(value)
        return out
