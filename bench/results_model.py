"""What a benchmark produces: paired rounds of nsqjobs against its baseline, and latencies."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Round:
    """One round: the nsqjobs figure and the baseline figure, measured back to back."""

    subject: float
    baseline: float
    order: str  # the order of the runs, e.g. "gateway,nsqd"
    reference: float | None = None  # an optional third arm, for context only
    subject_failed: int = 0
    baseline_failed: int = 0
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """nsqjobs / baseline."""
        return self.subject / self.baseline if self.baseline > 0 else 0.0


@dataclass
class Comparison:
    """A throughput benchmark: nsqjobs against a bare-NSQ baseline, over alternating rounds."""

    key: str
    title: str
    unit: str
    subject: str
    baseline: str
    target: float
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    reference: str | None = None
    rounds: list[Round] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Median of the per-round ratios."""
        return statistics.median(r.ratio for r in self.rounds) if self.rounds else 0.0

    @property
    def subject_median(self) -> float:
        """Median nsqjobs rate."""
        return statistics.median(r.subject for r in self.rounds) if self.rounds else 0.0

    @property
    def baseline_median(self) -> float:
        """Median baseline rate."""
        return statistics.median(r.baseline for r in self.rounds) if self.rounds else 0.0

    @property
    def reference_median(self) -> float | None:
        """Median rate of the reference arm, if there is one."""
        refs = [r.reference for r in self.rounds if r.reference is not None]
        return statistics.median(refs) if refs else None

    def reference_ratio(self) -> float | None:
        """Median of reference / baseline per round, if there is a reference arm."""
        ratios = [r.reference / r.baseline for r in self.rounds if r.reference and r.baseline]
        return statistics.median(ratios) if ratios else None

    @property
    def passed(self) -> bool:
        """Whether the median ratio meets the target."""
        return bool(self.rounds) and self.ratio >= self.target

    def to_json(self) -> dict[str, Any]:
        """Machine-readable figures."""
        return {
            "title": self.title,
            "unit": self.unit,
            "subject": self.subject,
            "baseline": self.baseline,
            "subject_median": round(self.subject_median, 1),
            "baseline_median": round(self.baseline_median, 1),
            "ratio_median": round(self.ratio, 4),
            "target_ratio": self.target,
            "pass": self.passed,
            **(
                {
                    "reference": self.reference,
                    "reference_median": round(self.reference_median or 0.0, 1),
                    "reference_ratio_median": round(self.reference_ratio() or 0.0, 4),
                }
                if self.reference
                else {}
            ),
            "rounds": [
                {
                    "order": r.order,
                    "subject": round(r.subject, 1),
                    "baseline": round(r.baseline, 1),
                    "ratio": round(r.ratio, 4),
                    **({"reference": round(r.reference, 1)} if r.reference is not None else {}),
                    "subject_failed": r.subject_failed,
                    "baseline_failed": r.baseline_failed,
                    **r.detail,
                }
                for r in self.rounds
            ],
            "settings": self.settings,
            "notes": self.notes,
        }


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


# Issue 12's latency targets for the worker's default at 50 jobs/s: Dramatiq on RabbitMQ's
# figures on this machine.
LATENCY_TARGET_P50_MS = 1.6
LATENCY_TARGET_P99_MS = 2.4


@dataclass
class Latency:
    """Submit-to-result latencies of ``POST /v1/jobs?wait=`` at a fixed light rate."""

    settings: dict[str, Any]
    latencies_s: list[float] = field(default_factory=list)
    sent: int = 0
    timed_out: int = 0  # 202: no result within wait
    failed: int = 0  # transport errors, non-2xx, or a failed result
    notes: list[str] = field(default_factory=list)

    def ms(self, q: float) -> float:
        """A percentile in milliseconds."""
        return 1000 * percentile(self.latencies_s, q)

    def to_json(self) -> dict[str, Any]:
        """Machine-readable figures."""
        return {
            "title": "End-to-end latency, POST /v1/jobs?wait= to result",
            "unit": "ms",
            "sent": self.sent,
            "completed": len(self.latencies_s),
            "timed_out": self.timed_out,
            "failed": self.failed,
            "p50_ms": round(self.ms(50), 2),
            "p90_ms": round(self.ms(90), 2),
            "p99_ms": round(self.ms(99), 2),
            "max_ms": round(self.ms(100), 2),
            "settings": self.settings,
            "notes": self.notes,
        }
