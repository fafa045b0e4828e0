"""Hot-path metrics as plain numbers, exposed by one collector when Prometheus scrapes.

An instrument of prometheus_client takes a lock and runs its checks on every update: about a
microsecond each, several times per job or request, on a path that costs tens of microseconds
(a worker's dispatch went 5 % faster without them, measured). A tally is a number the event loop
adds to; :class:`Tallies` reads them all at scrape time and yields the same metric families
(names, labels, types) as the instruments did, without their ``_created`` samples.

Only the thread that owns a tally (the daemon's event loop) may write it; a scrape from another
thread reads numbers, which is safe in CPython.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import TypeVar, cast

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString


class Tally:
    """One counter's or gauge's value for one set of labels: add to ``value``."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0


class HistogramTally:
    """One histogram's buckets for one set of labels (a bucket's bound is inclusive)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: past every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count ``value`` in its bucket and the sum."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Family:
    """A metric's tallies by label values."""

    def __init__(
        self, kind: str, name: str, doc: str, labels: tuple[str, ...], bounds: tuple[float, ...]
    ) -> None:
        self.kind, self.name, self.doc, self.labelnames = kind, name, doc, labels
        self.bounds = bounds
        self.children: dict[tuple[str, ...], Tally | HistogramTally] = {}

    def _child(self, values: tuple[str, ...]) -> Tally | HistogramTally:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        child = self.children.get(values)
        if child is None:
            child = HistogramTally(self.bounds) if self.kind == "histogram" else Tally()
            self.children[values] = child
        return child

    def metric(self, with_samples: bool) -> Metric:
        labels = list(self.labelnames)
        children = list(self.children.items()) if with_samples else []
        if self.kind == "histogram":
            histogram = HistogramMetricFamily(self.name, self.doc, labels=labels)
            names = [*map(floatToGoString, self.bounds), "+Inf"]
            for values, child in children:
                tally = cast(HistogramTally, child)
                running, buckets = 0, []
                for bound, n in zip(names, list(tally.counts), strict=True):
                    running += n
                    buckets.append((bound, float(running)))
                histogram.add_metric(list(values), buckets, tally.sum)
            return histogram
        family = (CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily)(
            self.name, self.doc, labels=labels
        )
        for values, child in children:
            family.add_metric(list(values), cast(Tally, child).value)
        return family


class CounterTallies(_Family):
    """A counter's tallies (``name`` without ``_total``)."""

    def labels(self, *values: str) -> Tally:
        """The tally of these label values (created at zero: it shows before it moves)."""
        return self._child(values)  # type: ignore[return-value]


class GaugeTallies(CounterTallies):
    """A gauge's tallies."""


class HistogramTallies(_Family):
    """A histogram's tallies."""

    def labels(self, *values: str) -> HistogramTally:
        """The tally of these label values (created empty: it shows before it moves)."""
        return self._child(values)  # type: ignore[return-value]


F = TypeVar("F", bound=_Family)


class Tallies:
    """A collector of tallies: add its families, then register it on the daemon's registry
    (which checks their names against every other metric's)."""

    def __init__(self) -> None:
        self._families: list[_Family] = []

    def counter(self, name: str, doc: str, *labels: str) -> CounterTallies:
        """A counter (``name`` ends in ``_total``, as the samples do)."""
        return self._add(CounterTallies("counter", name, doc, labels, ()))

    def gauge(self, name: str, doc: str, *labels: str) -> GaugeTallies:
        """A gauge named ``name``."""
        return self._add(GaugeTallies("gauge", name, doc, labels, ()))

    def histogram(
        self, name: str, doc: str, *labels: str, buckets: tuple[float, ...]
    ) -> HistogramTallies:
        """A histogram named ``name`` with these bucket bounds."""
        return self._add(HistogramTallies("histogram", name, doc, labels, tuple(buckets)))

    def _add(self, family: F) -> F:
        self._families.append(family)
        return family

    def describe(self) -> list[Metric]:
        """The families without samples: the registry checks names with these."""
        return [f.metric(False) for f in self._families]

    def collect(self) -> Iterator[Metric]:
        """Every family with its tallies now."""
        return iter([f.metric(True) for f in self._families])
