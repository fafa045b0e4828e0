"""The ledger's database as the chaos suite sees it: the URL the gateway is given, a way to
read every job's row behind the gateway's back, an audit of recorded outcomes, and (for a
server) a way to restart it.

The audit is a trigger the suite adds to the gateway's ``jobs`` table once the gateway has
made it: every UPDATE that changes a terminal outcome (its status, finish time or worker) adds
a row to ``chaos_audit``, in the same transaction. Reads of the table every second or two
would miss an outcome changed and changed back between two reads; the trigger misses none.
The one change it lets through is the product's own completion of an outcome: a ``failed``
result made ``dead`` by the dead letter of the same attempt (same worker and time).

The store is a parameter of every scenario: ``sqlite`` (a file, read with ``sqlite3`` in
read-only mode while the gateway writes: WAL allows it) or ``postgres`` (a private server from
``nsqjobs.testing.start_postgres``, read with its ``psql``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
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


# A terminal outcome changed (OLD and NEW as a row trigger names them; IS NOT is "distinct
# from" in SQLite, and PostgreSQL is given the same text with IS DISTINCT FROM).
_REWRITE = (
    "OLD.status NOT IN ('queued', 'running') AND (NEW.finished_at IS NOT OLD.finished_at "
    "OR NEW.worker IS NOT OLD.worker OR (NEW.status IS NOT OLD.status "
    "AND NOT (OLD.status = 'failed' AND NEW.status = 'dead')))"
)
_AUDIT_TABLE = "CREATE TABLE IF NOT EXISTS chaos_audit (id TEXT NOT NULL, was TEXT, now TEXT)"
_AUDIT_READ = "SELECT id, was, now FROM chaos_audit"


class Ledger(Protocol):
    """The ledger's storage under test."""

    name: str
    url: str

    def rows(self) -> list[LedgerRow]:
        """Every job's row as stored now ([] before the gateway created the schema)."""
        ...

    def audit(self) -> None:
        """Add the audit trigger (once the gateway made its tables)."""
        ...

    def rewrites(self) -> dict[str, tuple[str, str]]:
        """Every terminal outcome the audit saw change: id -> (was, now), the first change."""
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


def _first_changes(rows: Iterable[Sequence[Any]]) -> dict[str, tuple[str, str]]:
    changes: dict[str, tuple[str, str]] = {}
    for job_id, was, now in rows:
        changes.setdefault(str(job_id), (str(was), str(now)))
    return changes


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

    def audit(self) -> None:
        """A write of the schema, waiting its turn behind the gateway's commits."""
        outcome = (
            "{0}.status || '@' || ifnull({0}.finished_at, '') || '@' || ifnull({0}.worker, '')"
        )
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_AUDIT_TABLE)
            conn.execute(
                "CREATE TRIGGER IF NOT EXISTS chaos_audit_outcome AFTER UPDATE ON jobs "
                f"WHEN {_REWRITE} BEGIN INSERT INTO chaos_audit VALUES "
                f"(OLD.id, {outcome.format('OLD')}, {outcome.format('NEW')}); END"
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise HarnessError(f"cannot add the audit trigger to {self.path}: {exc}") from exc
        finally:
            conn.close()

    def rewrites(self) -> dict[str, tuple[str, str]]:
        """Read-only, as :meth:`rows`."""
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        try:
            return _first_changes(conn.execute(_AUDIT_READ))
        except sqlite3.Error as exc:
            raise HarnessError(f"cannot read the audit of {self.path}: {exc}") from exc
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

    def audit(self) -> None:
        """A trigger function and its trigger, in one psql run."""
        outcome = "concat_ws('@', {0}.status, {0}.finished_at, {0}.worker)"
        self.server.psql(
            f"{_AUDIT_TABLE}; "
            "CREATE OR REPLACE FUNCTION chaos_audit_outcome() RETURNS trigger "
            "LANGUAGE plpgsql AS $$ BEGIN INSERT INTO chaos_audit VALUES "
            f"(OLD.id, {outcome.format('OLD')}, {outcome.format('NEW')}); RETURN NULL; END $$; "
            "DROP TRIGGER IF EXISTS chaos_audit_outcome ON jobs; "
            "CREATE TRIGGER chaos_audit_outcome AFTER UPDATE ON jobs FOR EACH ROW WHEN ("
            + _REWRITE.replace(" IS NOT ", " IS DISTINCT FROM ")
            + ") EXECUTE FUNCTION chaos_audit_outcome()"
        )

    def rewrites(self) -> dict[str, tuple[str, str]]:
        """The audit table, one unaligned line per change."""
        out = str(self.server.psql(_AUDIT_READ))
        return _first_changes(tuple(line.split("|")) for line in out.splitlines() if line)

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
