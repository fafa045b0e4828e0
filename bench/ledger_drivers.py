"""Which PostgreSQL driver the ledger uses, by measurement: ``python -m bench.ledger_drivers``.

psycopg 3 (async) and asyncpg do what the ledger does on its hot path, against one real local
PostgreSQL (fsync and synchronous_commit on, data on disk), side by side in one run, the order
alternating each round:

- ``accept x1``: record one accepted job per transaction (an ``INSERT ... ON CONFLICT DO
  NOTHING RETURNING id``, then a durable COMMIT), one after another: commits per second.
- ``accept x100``: 100 jobs per transaction, as the ledger batches one loop turn, two ways:
  ``executemany`` (the driver pipelines 100 statements) and one ``INSERT ... SELECT FROM
  unnest(arrays)`` statement.
- ``outcome x100``: record 100 results per transaction (``UPDATE ... WHERE id AND finished_at
  IS NULL``), the same two ways.

For each: jobs per second (median of the rounds) and the client's CPU microseconds per job
(the gateway is one process on a busy machine: its CPU is the scarce thing). Figures go to
``bench/results/ledger_drivers.md``; ``--quick`` runs fewer, shorter rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
from nsqjobs import wire
from nsqjobs.ledger.pgsql import MIGRATIONS
from nsqjobs.testing import start_postgres

from bench.procs import ROOT, log
from bench.report import command_line, machine

COLUMNS = "id, task, args, envelope, status, created_at, accepted_at, sent_at"
TYPES = ("text", "text", "text", "bytea", "text", "float8", "float8", "float8")
OUTCOME = (
    "status = %s, result = %s, error = NULL, attempts = %s, worker = %s, finished_at = %s "
    "WHERE id = %s AND finished_at IS NULL"
)
OUTCOME_UNNEST = (
    "UPDATE jobs AS j SET status = u.status, result = u.result, attempts = u.attempts, "
    "worker = u.worker, finished_at = u.finished_at FROM unnest({0}::text[], {1}::text[], "
    "{2}::int[], {3}::text[], {4}::float8[], {5}::text[]) AS u(status, result, attempts, worker, "
    "finished_at, id) WHERE j.id = u.id AND j.finished_at IS NULL RETURNING j.id"
)


def _marks(style: str, n: int) -> list[str]:
    return ["%s"] * n if style == "psycopg" else [f"${i + 1}" for i in range(n)]


def insert_sql(style: str) -> str:
    """One row, answering its id when it was new."""
    marks = ", ".join(_marks(style, len(TYPES)))
    return f"INSERT INTO jobs ({COLUMNS}) VALUES ({marks}) ON CONFLICT (id) DO NOTHING RETURNING id"


def insert_unnest_sql(style: str) -> str:
    """Many rows in one statement, one array per column."""
    arrays = ", ".join(f"{m}::{t}[]" for m, t in zip(_marks(style, len(TYPES)), TYPES, strict=True))
    return (
        f"INSERT INTO jobs ({COLUMNS}) SELECT * FROM unnest({arrays}) "
        "ON CONFLICT (id) DO NOTHING RETURNING id"
    )


def outcome_sql(style: str) -> str:
    """One result."""
    sql = "UPDATE jobs SET " + OUTCOME
    if style == "asyncpg":
        for i in range(1, 7):
            sql = sql.replace("%s", f"${i}", 1)
    return sql


def outcome_unnest_sql(style: str) -> str:
    """Many results in one statement."""
    return OUTCOME_UNNEST.format(*_marks(style, 6))


def job_rows(prefix: str, n: int) -> list[tuple[Any, ...]]:
    """Rows of noop jobs, as the ledger records them."""
    now = wire.now()
    rows = []
    for i in range(n):
        env = wire.JobEnvelope(id=f"{prefix}-{i}", task="noop", args={"n": i}, created_at=now)
        rows.append((env.id, "noop", f'{{"n":{i}}}', wire.encode(env), "queued", now, now, now))
    return rows


def outcome_rows(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """One succeeded result per job."""
    return [("succeeded", "1", 1, "w1", wire.now(), r[0]) for r in rows]


def columns(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows turned into one list per column (the unnest arguments)."""
    return [list(c) for c in zip(*rows, strict=True)]


class Driver:
    """One driver's way of running the workloads."""

    name = ""

    async def connect(self, url: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def accept_one(self, row: tuple[Any, ...]) -> None:
        raise NotImplementedError

    async def accept_many(self, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    async def accept_unnest(self, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    async def outcome_many(self, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    async def outcome_unnest(self, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    async def truncate(self) -> None:
        raise NotImplementedError


class Psycopg(Driver):
    """psycopg 3, AsyncConnection; executemany runs in pipeline mode."""

    name = f"psycopg {version('psycopg')}"

    async def connect(self, url: str) -> None:
        self.conn = await psycopg.AsyncConnection.connect(url)

    async def close(self) -> None:
        await self.conn.close()

    async def accept_one(self, row: tuple[Any, ...]) -> None:
        async with self.conn.transaction(), self.conn.cursor() as cur:
            await cur.execute(insert_sql("psycopg"), row)
            await cur.fetchall()

    async def accept_many(self, rows: list[tuple[Any, ...]]) -> None:
        async with self.conn.transaction(), self.conn.cursor() as cur:
            await cur.executemany(insert_sql("psycopg"), rows, returning=True)

    async def accept_unnest(self, rows: list[tuple[Any, ...]]) -> None:
        async with self.conn.transaction(), self.conn.cursor() as cur:
            await cur.execute(insert_unnest_sql("psycopg"), columns(rows))
            await cur.fetchall()

    async def outcome_many(self, rows: list[tuple[Any, ...]]) -> None:
        async with self.conn.transaction(), self.conn.cursor() as cur:
            await cur.executemany(outcome_sql("psycopg"), rows)

    async def outcome_unnest(self, rows: list[tuple[Any, ...]]) -> None:
        async with self.conn.transaction(), self.conn.cursor() as cur:
            await cur.execute(outcome_unnest_sql("psycopg"), columns(rows))
            await cur.fetchall()

    async def truncate(self) -> None:
        async with self.conn.transaction():
            await self.conn.execute("TRUNCATE jobs")


class Asyncpg(Driver):
    """asyncpg, one connection; statements prepared and cached by asyncpg."""

    name = f"asyncpg {version('asyncpg')}"

    async def connect(self, url: str) -> None:
        self.conn = await asyncpg.connect(url)

    async def close(self) -> None:
        await self.conn.close()

    async def accept_one(self, row: tuple[Any, ...]) -> None:
        async with self.conn.transaction():
            await self.conn.fetch(insert_sql("asyncpg"), *row)

    async def accept_many(self, rows: list[tuple[Any, ...]]) -> None:
        async with self.conn.transaction():
            await self.conn.executemany(insert_sql("asyncpg"), rows)

    async def accept_unnest(self, rows: list[tuple[Any, ...]]) -> None:
        async with self.conn.transaction():
            await self.conn.fetch(insert_unnest_sql("asyncpg"), *columns(rows))

    async def outcome_many(self, rows: list[tuple[Any, ...]]) -> None:
        async with self.conn.transaction():
            await self.conn.executemany(outcome_sql("asyncpg"), rows)

    async def outcome_unnest(self, rows: list[tuple[Any, ...]]) -> None:
        async with self.conn.transaction():
            await self.conn.fetch(outcome_unnest_sql("asyncpg"), *columns(rows))

    async def truncate(self) -> None:
        await self.conn.execute("TRUNCATE jobs")


@dataclass(frozen=True)
class Workload:
    """One hot-path operation, ``per_tx`` jobs in each of ``transactions`` transactions."""

    key: str
    per_tx: int
    run: Callable[[Driver, list[tuple[Any, ...]]], Awaitable[None]]
    outcome: bool = False


WORKLOADS = (
    Workload("accept x1", 1, lambda d, rows: d.accept_one(rows[0])),
    Workload("accept x100, executemany", 100, lambda d, rows: d.accept_many(rows)),
    Workload("accept x100, unnest", 100, lambda d, rows: d.accept_unnest(rows)),
    Workload("outcome x100, executemany", 100, lambda d, rows: d.outcome_many(rows), True),
    Workload("outcome x100, unnest", 100, lambda d, rows: d.outcome_unnest(rows), True),
)


@dataclass
class Figures:
    """Per-round jobs/s and CPU us/job of one driver on one workload."""

    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)


async def _measure(driver: Driver, w: Workload, jobs: int, tag: str) -> tuple[float, float]:
    rows = job_rows(tag, jobs)
    batches = [rows[i : i + w.per_tx] for i in range(0, jobs, w.per_tx)]
    await driver.truncate()
    if w.outcome:  # the jobs exist, unfinished: the results are what is timed
        for batch in batches:
            await driver.accept_unnest(batch)
        batches = [outcome_rows(b) for b in batches]
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in batches:
        await w.run(driver, batch)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return jobs / wall, cpu / jobs * 1e6


async def _run(url: str, rounds: int, scale: int) -> dict[tuple[str, str], Figures]:
    drivers: list[Driver] = [Psycopg(), Asyncpg()]
    for d in drivers:
        await d.connect(url)
    figures: dict[tuple[str, str], Figures] = {}
    try:
        for w in WORKLOADS:
            jobs = (300 if w.per_tx == 1 else 5000) * scale
            for r in range(rounds):
                order = drivers if r % 2 == 0 else drivers[::-1]
                for d in order:
                    rate, cpu = await _measure(d, w, jobs, f"r{r}")
                    f = figures.setdefault((w.key, d.name), Figures())
                    f.rates.append(rate)
                    f.cpu_us.append(cpu)
                    log(f"  {w.key}, {d.name}, round {r + 1}: {rate:,.0f} jobs/s, {cpu:.1f} us/job")
    finally:
        for d in drivers:
            await d.close()
    return figures


def write_markdown(
    path: Path, header: dict[str, Any], figures: dict[tuple[str, str], Figures]
) -> None:
    """The figures for people."""
    lines = [
        "# Ledger drivers: psycopg 3 vs asyncpg on the ledger's hot path",
        "",
        f"- Date: {header['date']}",
        f"- CPU: {header['cpu_model']}, {header['cores']} cores (shared and noisy: compare "
        "the two drivers within a row)",
        f"- Command: `{header['command']}`",
        f"- {header['server']}, data on disk, fsync and synchronous_commit on; Python "
        f"{header['python']}",
        f"- {header['rounds']} rounds, the driver order alternating each round; figures are "
        "medians",
        "",
        "| Workload | Driver | Jobs/s | Client CPU us/job | Jobs/s per round |",
        "|---|---|---:|---:|---|",
    ]
    for (key, name), f in figures.items():
        lines.append(
            f"| {key} | {name} | {statistics.median(f.rates):,.0f} | "
            f"{statistics.median(f.cpu_us):.1f} | {', '.join(f'{r:,.0f}' for r in f.rates)} |"
        )
    lines += [
        "",
        "## Side by side",
        "",
        *verdict(figures),
        "",
        "## Notes",
        "",
        *header["notes"],
        "",
    ]
    path.write_text("\n".join(lines))


def verdict(figures: dict[tuple[str, str], Figures]) -> list[str]:
    """asyncpg against psycopg per workload (from the medians), and which one the figures
    favour on the client's CPU, the gateway's scarce resource."""
    a, p = Asyncpg.name, Psycopg.name
    lines = [
        "| Workload | asyncpg jobs/s ÷ psycopg | psycopg CPU/job ÷ asyncpg |",
        "|---|---:|---:|",
    ]
    cheaper = []
    for w in WORKLOADS:
        fa, fp = figures.get((w.key, a)), figures.get((w.key, p))
        if fa is None or fp is None:
            continue
        speed = statistics.median(fa.rates) / statistics.median(fp.rates)
        cpu = statistics.median(fp.cpu_us) / statistics.median(fa.cpu_us)
        cheaper.append(cpu > 1)
        lines.append(f"| {w.key} | {speed:.2f} | {cpu:.2f} |")
    winner = a if cheaper and all(cheaper) else p if not any(cheaper) else "neither, on every row"
    lines += ["", f"Less client CPU per job on every workload: **{winner}**."]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Start PostgreSQL, run every workload with both drivers, write the figures."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.ledger_drivers")
    parser.add_argument("--quick", action="store_true", help="2 rounds, a fifth of the jobs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    rounds, scale = (2, 1) if args.quick else (4, 2)
    with ExitStack() as stack:
        # On disk, not tmpfs: a durable commit is what is measured.
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nsqjobs-bench-pg-")))
        pg = start_postgres(work, stack)
        server = pg.psql("SHOW server_version").strip()
        for statement in MIGRATIONS[0]:
            pg.psql(statement)
        log(f"PostgreSQL {server} on port {pg.port}")
        figures = asyncio.run(_run(pg.url(), rounds, scale))
    header = {
        **machine(),
        "command": command_line(argv, "bench.ledger_drivers"),
        "server": f"PostgreSQL {server}",
        "rounds": rounds,
        "notes": [
            "- The table is the ledger's own (`nsqjobs.ledger.pgsql.MIGRATIONS`), emptied "
            "before each run; one connection per driver, one run after another.",
            "- accept x1 pays a WAL fsync per commit on both sides; what differs is each "
            "driver's cost per statement and round trip (BEGIN, INSERT, COMMIT).",
            "- unnest (one statement whatever the batch size) is what the store uses for its "
            "merged accepts, publish notes and results.",
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out / "ledger_drivers.md", header, figures)
    log(f"written {args.out / 'ledger_drivers.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
