"""How busy the rest of the shared machine was over a section, and waiting for it to be quiet."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Any

from bench.kernels.specs import Settings


def _proc_stat() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _own_cpu() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        total += r.ru_utime + r.ru_stime
    return total


@dataclass
class Load:
    """Cores kept busy by other processes (and stolen by the hypervisor) over a section.

    The machine is shared: this says how much of it the figures of that section could use.
    """

    wall0: float
    stat0: tuple[float, float] | None
    own0: float
    wall_s: float = 0.0
    others_cores: float | None = None
    steal_cores: float | None = None

    @classmethod
    def start(cls) -> Load:
        """Start measuring now."""
        return cls(time.monotonic(), _proc_stat(), _own_cpu())

    def stop(self) -> Load:
        """Stop measuring; returns itself."""
        self.wall_s = time.monotonic() - self.wall0
        stat1 = _proc_stat()
        if self.stat0 is not None and stat1 is not None and self.wall_s > 0:
            busy = stat1[0] - self.stat0[0] - (_own_cpu() - self.own0)
            self.others_cores = max(0.0, busy / self.wall_s)
            self.steal_cores = (stat1[1] - self.stat0[1]) / self.wall_s
        return self

    def text(self) -> str:
        """For progress lines: empty when unknown."""
        if self.others_cores is None:
            return ""
        return f" (other processes: {self.others_cores:.2f} cores, steal {self.steal_cores:.2f})"

    def cell(self) -> str:
        """For the report's tables."""
        return "-" if self.others_cores is None else f"{self.others_cores:.2f}"

    def to_json(self) -> dict[str, Any]:
        """Machine-readable figures."""
        return {
            "wall_s": round(self.wall_s, 2),
            "others_cores": None if self.others_cores is None else round(self.others_cores, 3),
            "steal_cores": None if self.steal_cores is None else round(self.steal_cores, 3),
        }


class Quiet:
    """A budget of time to spend waiting for the other processes to leave both cores free.

    Figures that need both cores (thread scaling, the two worker setups) are worthless while
    another process keeps a core busy: such rounds are redone, or a drain waits, until the
    budget is spent; after that they count as they are, and the report shows their load.
    """

    def __init__(self, s: Settings) -> None:
        self.threshold = s.quiet_cores
        self.left_s = s.quiet_budget_s
        self.redone = 0

    def quiet(self, load: Load) -> bool:
        """Whether a section ran without much else on the machine (unknown counts as quiet)."""
        return load.others_cores is None or load.others_cores <= self.threshold

    def retry(self, load: Load) -> bool:
        """After a noisy round: whether to redo it (waiting for quiet first, from the budget)."""
        if self.quiet(load) or self.left_s <= 0:
            return False
        self.redone += 1
        self.wait()
        return True

    def wait(self, window_s: float = 0.5) -> None:
        """Sample the machine in short windows until it is quiet or the budget is spent."""
        while self.left_s > 0:
            started = time.monotonic()
            meter = Load.start()
            time.sleep(window_s)
            load = meter.stop()
            self.left_s -= time.monotonic() - started
            if self.quiet(load):
                return
