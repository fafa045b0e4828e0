"""The job ledger: every accepted job and its first terminal outcome, by id.

The gateway records a job here before publishing it, and records outcomes read from the
``results`` and ``dead_letters`` topics. Imports point gateway -> ledger, never back.
"""

from nsqjobs.ledger.sqlite import SqliteStore
from nsqjobs.ledger.store import (
    Accepted,
    JobRecord,
    JobStatus,
    LedgerError,
    OutcomeVerdict,
    Page,
    Store,
)

__all__ = [
    "Accepted",
    "JobRecord",
    "JobStatus",
    "LedgerError",
    "OutcomeVerdict",
    "Page",
    "SqliteStore",
    "Store",
]
