"""The ledger's database as the chaos suite sees it: the URL the gateway is given, a way to
read every job's row behind the gateway's back, and (for a server) a way to restart it.

The store is a parameter of every scenario: ``sqlite`` (a file, read with ``sqlite3`` in
read-only mode while the gateway writes: WAL allows it) or ``postgres`` (a private server from
``nsqjobs.testing.start_postgres``, read with its ``psql``).
"""

from __future__ import annotations

import sqlite3
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

from nsqjobs import testing
from nsqjobs.testing import HarnessError, MissingBinary

from bench.chaos.check import LedgerRow

STORES = ("sqlite", "postgres")
_QUERY = (
    "SELECT id, status, finished_at, worker, attempts, redrives, published_at, sent_at FROM jobs"
)


class Ledger(Protocol):
    """The ledger's storage under test."""

    name: str
    url: str

    def rows(self) -> list[LedgerRow]:
        """Every job's row as stored now ([] before the gateway created the schema)."""
        ...

    def restart(self) -> None:
        """Stop the database and start it again (a server only)."""
        ...


def _row(values: tuple[Any, ...]) -> LedgerRow:
    job_id, status, finished_at, worker, attempts, redrives, published_at, sent_at = values
    return LedgerRow(
        id=str(job_id),
        status=str(status),
        finished_at=_float(finished_at),
        worker=None if worker in (None, "") else str(worker),
        attempts=int(attempts or 0),
        redrives=int(redrives or 0),
        published_at=_float(published_at),
        sent_at=_float(sent_at),
    )


def _float(value: Any) -> float | None:
    return None if value in (None, "") else float(value)


class SqliteLedger:
    """A SQLite file in the run's directory."""

    name = "sqlite"

    def __init__(self, work: Path) -> None:
        self.path = work / "ledger.sqlite3"
        self.url = f"sqlite:///{self.path}"  # an absolute path: sqlite:////...

    def rows(self) -> list[LedgerRow]:
        """Read-only, so a read never holds a write lock the gateway waits for."""
        if not self.path.exists():
            return []
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        except sqlite3.Error as exc:
            raise HarnessError(f"cannot open {self.path}: {exc}") from exc
        try:
            return [_row(r) for r in conn.execute(_QUERY)]
        except sqlite3.Error as exc:
            if "no such table" in str(exc):
                return []
            raise HarnessError(f"cannot read {self.path}: {exc}") from exc
        finally:
            conn.close()

    def restart(self) -> None:
        """An embedded file has no server to restart."""
        raise HarnessError("the sqlite ledger has no server to restart: use --store postgres")

    def __repr__(self) -> str:
        return f"SqliteLedger({self.path})"


class PostgresLedger:
    """A private PostgreSQL server (``nsqjobs.testing.start_postgres``), read with its psql."""

    name = "postgres"

    def __init__(self, stack: ExitStack, work: Path) -> None:
        start = getattr(testing, "start_postgres", None)
        if start is None:
            raise MissingBinary(
                "nsqjobs.testing.start_postgres is not there yet (the PostgreSQL ledger is "
                "being built): the postgres store cannot run"
            )
        self.server: Any = start(work, stack)
        self.url = str(self.server.url())

    def rows(self) -> list[LedgerRow]:
        """The jobs table, one unaligned line per row (a job id holds no ``|``)."""
        try:
            out = str(self.server.psql(_QUERY))
        except HarnessError as exc:
            if 'relation "jobs" does not exist' in str(exc):
                return []
            raise
        return [_row(tuple(line.split("|"))) for line in out.splitlines() if line]

    def restart(self) -> None:
        """A fast shutdown (clients disconnected, everything written out), then a start on
        the same port and data directory."""
        self.server.restart()


def open_ledger(store: str, stack: ExitStack, work: Path) -> Ledger:
    """The ledger of kind ``store`` (one of `STORES`)."""
    if store == "sqlite":
        return SqliteLedger(work)
    if store == "postgres":
        return PostgresLedger(stack, work)
    raise HarnessError(f"unknown store {store!r} (one of {', '.join(STORES)})")
