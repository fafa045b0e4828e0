"""The job ledger: every accepted job and its first terminal outcome, by id.

The gateway records a job here before publishing it, and records outcomes read from the
``results`` and ``dead_letters`` topics. Imports point gateway -> ledger, never back.
"""

import sys
from collections.abc import Callable
from typing import Final

from nsqjobs.errors import ConfigError
from nsqjobs.ledger.sqlite import SqliteStore
from nsqjobs.ledger.store import (
    STATUSES,
    UNFINISHED,
    Accepted,
    Claimed,
    JobRecord,
    JobStatus,
    LedgerError,
    LedgerStats,
    OutcomeVerdict,
    Page,
    RedriveReason,
    Store,
    held,
)
from nsqjobs.names import LEDGER_POSTGRES_SCHEMES, LEDGER_SQLITE_SCHEME

__all__ = [
    "STATUSES",
    "UNFINISHED",
    "Accepted",
    "Claimed",
    "JobRecord",
    "JobStatus",
    "LedgerError",
    "LedgerStats",
    "OutcomeVerdict",
    "Page",
    "RedriveReason",
    "SqliteStore",
    "Store",
    "held",
    "open_store",
]


# Python's GIL switch interval while a store runs (the default is 5 ms). A store's writer
# thread gives the GIL up for every statement (SQLite) or socket read (PostgreSQL) and must
# take it back from the event loop, which, busy, keeps it up to this long each time: with the
# default, a commit of a few statements waited 10-20 ms for the GIL. Measured on the ingest
# benchmark (single jobs, SQLite): 0.5 ms took it from about 6,500 to about 8,700 accepts/s.
LEDGER_SWITCH_INTERVAL_S: Final = 0.0005


def open_store(url: str, *, observe_write: Callable[[float], object] | None = None) -> Store:
    """The store a ledger URL names: ``sqlite:///PATH`` (relative to the working directory;
    ``sqlite:////abs/path`` is absolute), or ``postgresql://user@host:port/db`` (also
    ``postgres://``; libpq's URL form, options in the query string). ``observe_write`` is told
    each commit's duration in seconds (from the store's writer thread). Lowers the process's
    GIL switch interval to :data:`LEDGER_SWITCH_INTERVAL_S` (never raises it)."""
    if sys.getswitchinterval() > LEDGER_SWITCH_INTERVAL_S:
        sys.setswitchinterval(LEDGER_SWITCH_INTERVAL_S)
    if url.startswith(LEDGER_SQLITE_SCHEME) and len(url) > len(LEDGER_SQLITE_SCHEME):
        return SqliteStore(url.removeprefix(LEDGER_SQLITE_SCHEME), observe_write=observe_write)
    if url.startswith(LEDGER_POSTGRES_SCHEMES):
        # Imported here: a gateway on SQLite never loads the PostgreSQL driver.
        from nsqjobs.ledger.postgres import PostgresStore

        return PostgresStore(url, observe_write=observe_write)
    raise ConfigError(
        f"unsupported ledger URL {url!r} (expected {LEDGER_SQLITE_SCHEME}PATH or "
        "postgresql://user@host:port/database)"
    )
