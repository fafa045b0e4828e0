"""The job ledger: every accepted job and its first terminal outcome, by id.

The gateway records a job here before publishing it, and records outcomes read from the
``results`` and ``dead_letters`` topics. Imports point gateway -> ledger, never back.
"""

from collections.abc import Callable

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


def open_store(url: str, *, observe_write: Callable[[float], object] | None = None) -> Store:
    """The store a ledger URL names: ``sqlite:///PATH`` (relative to the working directory;
    ``sqlite:////abs/path`` is absolute), or ``postgresql://user@host:port/db`` (also
    ``postgres://``; libpq's URL form, options in the query string). ``observe_write`` is told
    each commit's duration in seconds (from the store's writer thread)."""
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
