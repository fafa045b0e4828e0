"""The PostgreSQL store's schema and its hot statements (nsqjobs.ledger.postgres runs them)."""

from __future__ import annotations

from typing import Final

# Versioned migrations: MIGRATIONS[n] takes the schema from version n to n + 1 (the row of
# schema_version). Append only; never edit one that has shipped. The columns are the SQLite
# store's (times are Unix seconds), plus: ``redrive_reason``, why the relay is to publish the
# job next (NULL: nsqd's acknowledgement never recorded, "unpublished"); ``result_recorded``,
# the job's result is in (a dead letter's companion failed result is recorded once).
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE jobs (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            task TEXT NOT NULL,
            args TEXT NOT NULL,
            envelope BYTEA NOT NULL,
            status TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            accepted_at DOUBLE PRECISION NOT NULL,
            published_at DOUBLE PRECISION,
            finished_at DOUBLE PRECISION,
            attempts INTEGER NOT NULL DEFAULT 0,
            worker TEXT,
            result TEXT,
            error TEXT,
            dead_reason TEXT,
            dead_at DOUBLE PRECISION,
            due_at DOUBLE PRECISION,
            sent_at DOUBLE PRECISION,
            lease_until DOUBLE PRECISION,
            started_at DOUBLE PRECISION,
            redrives INTEGER NOT NULL DEFAULT 0,
            replays INTEGER NOT NULL DEFAULT 0,
            history TEXT,
            runs TEXT,
            redrive_reason TEXT,
            result_recorded BOOLEAN NOT NULL DEFAULT FALSE
        )""",
        "CREATE INDEX jobs_by_status ON jobs (status, seq)",
        "CREATE INDEX jobs_by_task ON jobs (task, seq)",
        "CREATE INDEX jobs_unfinished ON jobs (sent_at) WHERE status IN ('queued', 'running')",
        # The relay's claims look only at jobs with no acknowledged publish: few, in steady state.
        "CREATE INDEX jobs_unpublished ON jobs (seq) "
        "WHERE published_at IS NULL AND status IN ('queued', 'running')",
        "CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

# The order nsqjobs.ledger.sqlite._record reads.
COLUMNS: Final = (
    "id, task, args, status, created_at, accepted_at, published_at, finished_at, attempts, "
    "worker, result, error, dead_reason, dead_at, seq, due_at, started_at, redrives, replays, "
    "history, runs"
)

# Accepted jobs, one array per column: the ids that were new (ON CONFLICT waits for another
# gateway's uncommitted insert of the same id, then skips it).
ACCEPT: Final = (
    "INSERT INTO jobs (id, task, args, envelope, status, created_at, accepted_at, due_at, "
    "sent_at, redrive_reason) SELECT u.id, u.task, u.args, u.envelope, 'queued', u.created_at, "
    "u.accepted_at, u.due_at, u.sent_at, u.reason FROM unnest($1::text[], $2::text[], "
    "$3::text[], $4::bytea[], $5::float8[], $6::float8[], $7::float8[], $8::float8[], "
    "$9::text[]) AS u(id, task, args, envelope, created_at, accepted_at, due_at, sent_at, "
    "reason) ON CONFLICT (id) DO NOTHING RETURNING id"
)

# nsqd's acknowledgements: (ids, times).
MARK_PUBLISHED: Final = (
    "UPDATE jobs AS j SET published_at = u.at FROM unnest($1::text[], $2::float8[]) AS u(id, at) "
    "WHERE j.id = u.id AND j.published_at IS NULL"
)

# Results, one array per field (ids unique): recorded when the job has no terminal outcome yet,
# or is dead and this is the failed result that goes with its dead letter (the job stays dead).
RECORD_RESULT: Final = (
    "UPDATE jobs AS j SET "
    "status = CASE WHEN j.status = 'dead' THEN 'dead' ELSE u.status END, "
    "result = u.result, error = COALESCE(j.error, u.error), attempts = u.attempts, "
    "worker = u.worker, finished_at = COALESCE(j.finished_at, u.finished_at), "
    "result_recorded = TRUE, lease_until = NULL "
    "FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[], "
    "$7::float8[]) AS u(id, status, result, error, attempts, worker, finished_at) "
    "WHERE j.id = u.id AND NOT j.result_recorded "
    "AND (j.finished_at IS NULL OR (j.status = 'dead' AND u.status = 'failed')) RETURNING j.id"
)

# The relay's claim ($1 now, $2 grace, $3 horizon, $4 lease, $5 limit): rows another
# gateway's relay holds are skipped; the reason is read before it is cleared.
CLAIM: Final = (
    "WITH c AS (SELECT seq, COALESCE(redrive_reason, 'unpublished') AS reason FROM jobs "
    "WHERE published_at IS NULL AND status IN ('queued', 'running') "
    "AND (sent_at IS NULL OR sent_at < $1 - $2) AND (due_at IS NULL OR due_at < $1 + $3) "
    "AND (lease_until IS NULL OR lease_until <= $1) "
    "ORDER BY seq LIMIT $5 FOR UPDATE SKIP LOCKED) "
    "UPDATE jobs AS j SET sent_at = $1, lease_until = $1 + $4, redrive_reason = NULL, "
    "redrives = j.redrives + CASE WHEN c.reason = 'unpublished' THEN 1 ELSE 0 END "
    "FROM c WHERE j.seq = c.seq "
    "RETURNING j.seq, j.id, j.task, j.envelope, j.due_at, c.reason"
)
