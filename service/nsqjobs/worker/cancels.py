"""The job ids a worker was told are cancelled, bounded in number and in age.

Read on every job the worker receives, so a lookup is one dict lookup; the bounds are kept
when ids are added (cancels are rare next to jobs).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

# A cancel is kept this long, for at most this many ids: a job cancelled longer ago, or pushed
# out by that many later cancels, runs if it still arrives (the ledger ignores its outcome).
MAX_CANCELLED_IDS = 100_000
CANCELLED_TTL_S = 24 * 3600.0


class CancelledIds:
    """Cancelled job ids, oldest first; the oldest go once over ``max_ids`` or ``ttl_s``."""

    def __init__(
        self,
        max_ids: int = MAX_CANCELLED_IDS,
        ttl_s: float = CANCELLED_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_ids < 1 or ttl_s <= 0:
            raise ValueError("CancelledIds needs max_ids >= 1 and ttl_s > 0")
        self.max_ids = max_ids
        self.ttl_s = ttl_s
        self.clock = clock
        self._ids: OrderedDict[str, float] = OrderedDict()

    def add(self, job_id: str) -> bool:
        """Remember ``job_id`` as cancelled now; False if it was already known."""
        now = self.clock()
        ids = self._ids
        known = ids.pop(job_id, None) is not None
        ids[job_id] = now
        self._expire(now)
        while len(ids) > self.max_ids:
            ids.popitem(last=False)
        return not known

    def __contains__(self, job_id: str) -> bool:
        # The hot path: every job received asks, and a miss costs one dict lookup.
        at = self._ids.get(job_id)
        if at is None:
            return False
        if self.clock() - at > self.ttl_s:  # expired since the last add
            del self._ids[job_id]
            return False
        return True

    def __len__(self) -> int:
        return len(self._ids)

    def __bool__(self) -> bool:
        return bool(self._ids)

    def _expire(self, now: float) -> None:
        ids = self._ids
        while ids:
            oldest, at = next(iter(ids.items()))
            if now - at <= self.ttl_s:
                return
            del ids[oldest]
