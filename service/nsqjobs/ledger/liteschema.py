"""The SQLite ledger's schema: versioned migrations, applied when a store opens the file, and
what its columns and partial indexes mean to the statements that read them."""

from __future__ import annotations

import logging
import sqlite3
from typing import Final

from nsqjobs.ledger.rows import COLUMNS
from nsqjobs.ledger.store import LedgerError

log = logging.getLogger("nsqjobs.ledger")

# Unfinished and not known to be in nsqd: the relay's work (the partial index's condition, which
# a query must repeat word for word for SQLite to use the index).
UNPUBLISHED: Final = "published_at IS NULL AND status IN ('queued', 'running')"

# A job the relay may claim (given :stale, :now): not claimed by a relay, and past the accept
# path's grace (or never sent: a long delay or a replay); or a relay's claim that expired.
CLAIMABLE: Final = (
    f"{UNPUBLISHED} AND ((lease_until IS NULL AND (sent_at IS NULL OR sent_at < :stale)) "
    "OR lease_until <= :now)"
)
# sent_at of a job published to an nsqd that restarted since (redrive_sent_before): the relay
# publishes it at once, and reports it as an nsqd_restart re-drive.
SENT_TO_LOST_NSQD: Final = 0.0
# sent_at of a job recorded as published by a gateway session that died (redrive_lost_sessions):
# the relay publishes it at once, and reports it as an unpublished re-drive.
SENT_BY_LOST_GATEWAY: Final = 1.0
# Finished jobs that retention prunes (dead ones stay until replayed or purged).
PRUNABLE: Final = "('succeeded', 'failed', 'cancelled')"
# A job's row as this store selects it: the record's columns, then the envelope (index 21).
# ``args`` is '' for a job recorded since schema 3: its envelope holds them, and storing them
# twice cost every accept an encoding and the row its size.
ROW_COLUMNS: Final = f"{COLUMNS}, envelope"

# Versioned migrations: MIGRATIONS[n] takes a database from version n to n + 1 (the version is
# SQLite's user_version). Append only; never edit one that has shipped.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            task TEXT NOT NULL,
            args TEXT NOT NULL,
            envelope BLOB NOT NULL,
            status TEXT NOT NULL,
            created_at REAL NOT NULL,
            accepted_at REAL NOT NULL,
            published_at REAL,
            finished_at REAL,
            attempts INTEGER NOT NULL DEFAULT 0,
            worker TEXT,
            result TEXT,
            error TEXT,
            dead_reason TEXT,
            dead_at REAL
        )""",
        "CREATE INDEX jobs_by_status ON jobs (status, seq)",
        "CREATE INDEX jobs_by_task ON jobs (task, seq)",
    ),
    (
        # When a delayed job is due; when its latest publish was sent (a job sent before an
        # nsqd's start_time was held by the nsqd that restarted); the relay's claim; a worker's
        # started event; re-drive and replay counts; failed attempts (JSON list of
        # wire.Attempt); earlier runs, one JSON object per replay.
        "ALTER TABLE jobs ADD COLUMN due_at REAL",
        "ALTER TABLE jobs ADD COLUMN sent_at REAL",
        "ALTER TABLE jobs ADD COLUMN lease_until REAL",
        "ALTER TABLE jobs ADD COLUMN started_at REAL",
        "ALTER TABLE jobs ADD COLUMN redrives INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN replays INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN history TEXT",
        "ALTER TABLE jobs ADD COLUMN runs TEXT",
        "UPDATE jobs SET sent_at = accepted_at",
        "CREATE INDEX jobs_unfinished ON jobs (sent_at) WHERE status IN ('queued', 'running')",
        "CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL",
    ),
    (
        # What the relay looks for every poll: unfinished jobs with no acknowledged publish
        # (a few in flight, plus long delays waiting to come due), without scanning a backlog.
        f"CREATE INDEX jobs_unpublished ON jobs (due_at, seq) WHERE {UNPUBLISHED}",
        # Delayed unfinished jobs by when they are due: the oldest-unfinished gauge reads the
        # first without counting the rest.
        "CREATE INDEX jobs_delayed ON jobs (due_at) "
        "WHERE due_at IS NOT NULL AND status IN ('queued', 'running')",
        # Gateway sessions (Store.beat_session): a job the accept path recorded as published
        # before nsqd acknowledged it names its session (its id); a session whose
        # heartbeat stopped has its jobs sent since its ``low`` re-driven, once.
        "ALTER TABLE jobs ADD COLUMN session TEXT",
        """CREATE TABLE sessions (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL,
            low REAL NOT NULL,
            ended_at REAL,
            handled_at REAL
        )""",
    ),
    (
        # When the ledger recorded a job's outcome (its own clock; finished_at is the
        # worker's): retention counts from it, so an outcome the ledger takes in late (its
        # readers behind by more than the retention) is not pruned at once.
        "ALTER TABLE jobs ADD COLUMN recorded_at REAL",
        "UPDATE jobs SET recorded_at = finished_at WHERE finished_at IS NOT NULL",
        "CREATE INDEX jobs_recorded ON jobs (recorded_at) WHERE recorded_at IS NOT NULL",
        "DROP INDEX jobs_finished",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations the database lacks, each in its own transaction; its version."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"the ledger's schema is version {version}, newer than this nsqjobs knows "
            f"({SCHEMA_VERSION}): run a newer nsqjobs"
        )
    for n in range(version, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[n]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {n + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        log.info("ledger: schema migrated to version %d", n + 1)
    return SCHEMA_VERSION
