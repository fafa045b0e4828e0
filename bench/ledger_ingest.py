"""Ingest with the job ledger on: ``python -m bench --only ledger_ingest``.

Four arms in one run, the order rotating every round, all on one nsqd: a gateway with a SQLite
ledger, a gateway with a PostgreSQL ledger, a gateway with no ledger, and nsqd's own HTTP
publish. Single jobs: ``POST /v1/jobs`` against ``POST /pub`` (hey -c 32); batches of 1000:
``POST /v1/jobs/batch`` against ``POST /mpub`` (hey -c 4), as in the pipeline benchmarks 1 and 2.
Targets with SQLite: single >= 0.25 of /pub, batch >= 0.4 of /mpub; PostgreSQL is held to the
same figures; the gateway without a ledger is the reference of each row (the ledger's cost).

Both ledgers are durable and on disk, not tmpfs: SQLite in WAL mode with synchronous=FULL,
PostgreSQL (nsqjobs.testing.start_postgres) with fsync and synchronous_commit on. Their tables
grow over the run (nothing is pruned), as a real ledger's would. Between two runs the page
cache is written back (sync), so no arm pays for the writes of the one before it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from nsqjobs.names import DEFAULT_QUEUE
from nsqjobs.testing import Nsq, start_postgres

from bench import hey, payloads
from bench.procs import log, start_gateway
from bench.results_model import Comparison, Round
from bench.scenarios import GATEWAY_TOPICS, JSON, MPUB_TOPIC, PUB_TOPIC, Settings

SINGLE_TARGET = 0.25
BATCH_TARGET = 0.4
LEDGERS = ("sqlite", "postgres")


@dataclass(frozen=True)
class Arm:
    """One side: where hey POSTs what."""

    name: str
    url: str
    body: Path


def _rotate(
    arms: list[Arm], *, concurrency: int, seconds: float, warmup_s: float, rounds: int, nsq: Nsq
) -> list[tuple[str, dict[str, hey.HeyResult]]]:
    """hey every arm once per round, the first arm rotating; topics emptied after each run."""
    cleanup = [DEFAULT_QUEUE, PUB_TOPIC, MPUB_TOPIC]
    for arm in arms:  # untimed warm-up of every side (the ledgers' first pages, too)
        hey.run(arm.url, arm.body, concurrency=concurrency, seconds=warmup_s, content_type=JSON)
    for topic in cleanup:
        nsq.delete_topic(topic)
    out = []
    for r in range(rounds):
        order = arms[r % len(arms) :] + arms[: r % len(arms)]
        got = {}
        for arm in order:
            got[arm.name] = hey.run(
                arm.url, arm.body, concurrency=concurrency, seconds=seconds, content_type=JSON
            )
            for topic in cleanup:
                nsq.delete_topic(topic)
            # The ledgers share one disk: write back what this arm left dirty now, untimed,
            # rather than during the next arm's commits.
            os.sync()
        out.append((",".join(a.name for a in order), got))
        log(
            f"  round {r + 1}: "
            + ", ".join(f"{a.name} {got[a.name].ok_per_s:,.0f}/s" for a in arms)
        )
    return out


def _comparisons(
    kind: str,
    runs: list[tuple[str, dict[str, hey.HeyResult]]],
    *,
    per_request: int,
    baseline: str,
    target: float,
    settings: dict[str, object],
) -> list[Comparison]:
    """One comparison per ledger against the nsqd arm, the gateway without a ledger as the
    reference."""
    unit = "req/s" if per_request == 1 else "jobs/s"
    what = "POST /v1/jobs (noop)" if per_request == 1 else f"POST /v1/jobs/batch ({per_request})"
    out = []
    for ledger in LEDGERS:
        c = Comparison(
            key=f"ledger_{ledger}_{kind}",
            title=f"{'Single job' if per_request == 1 else 'Batch of 1000'} with a "
            f"{'SQLite' if ledger == 'sqlite' else 'PostgreSQL'} ledger vs nsqd {baseline}",
            unit=unit,
            subject=f"nsqjobs gateway {what} with --ledger-url {ledger}, 2xx answers",
            baseline=f"nsqd POST {baseline}, 200 answers",
            reference="the same gateway without a ledger (what the ledger costs)",
            target=target,
            settings=settings,
            notes=[
                "All four arms (SQLite ledger, PostgreSQL ledger, no ledger, nsqd) run in one "
                "rotation each round.",
                "The ledger records every job durably before it is published (one transaction "
                "per event-loop turn, group commit), as published already (a gateway session "
                "covers a crash): nothing is written when nsqd acknowledges it.",
            ],
        )
        for order, got in runs:
            subject, base, ref = got[ledger], got["nsqd"], got["no_ledger"]
            c.rounds.append(
                Round(
                    subject=subject.ok_per_s * per_request,
                    baseline=base.ok_per_s * per_request,
                    reference=ref.ok_per_s * per_request,
                    order=order,
                    subject_failed=subject.failed,
                    baseline_failed=base.failed,
                    detail={
                        "subject_status": {str(k): v for k, v in subject.statuses.items()},
                        "subject_errors": subject.errors,
                    },
                )
            )
        out.append(c)
    return out


def ledger_ingest(nsq: Nsq, s: Settings, work: Path) -> list[Comparison]:
    """Start the three gateways and PostgreSQL, run single jobs then batches."""
    with ExitStack() as stack:
        # On disk, where a durable commit costs what it costs (the work dir is on tmpfs).
        disk = Path(tempfile.mkdtemp(prefix="nsqjobs-bench-ledger-"))
        stack.callback(shutil.rmtree, disk, ignore_errors=True)
        disk.chmod(0o755)  # PostgreSQL runs as another user when we are root
        log("starting PostgreSQL")
        pg = start_postgres(disk, stack)
        pg_url = pg.create_database("ledger")
        gateways = {
            "sqlite": start_gateway(
                stack,
                nsq,
                work,
                GATEWAY_TOPICS,
                name="gateway-sqlite",
                extra=["--ledger-url", f"sqlite:///{disk / 'ledger.sqlite3'}"],
            ),
            "postgres": start_gateway(
                stack,
                nsq,
                work,
                GATEWAY_TOPICS,
                name="gateway-postgres",
                extra=["--ledger-url", pg_url],
            ),
            "no_ledger": start_gateway(stack, nsq, work, GATEWAY_TOPICS, name="gateway-plain"),
        }
        submit = payloads.write(work / "ledger-submit.json", payloads.submit_body())
        env = payloads.write(work / "ledger-envelope.json", payloads.envelope())
        n = payloads.BATCH_SIZE
        batch = payloads.write(work / "ledger-batch.json", payloads.batch_body(n))
        mpub = payloads.write(work / "ledger-mpub.txt", payloads.mpub_body(n))
        common = {"tool": "hey", "rounds": s.rounds, "gateway_processes": 1}

        log("ledger_ingest: single jobs")
        single = _rotate(
            [
                *(Arm(k, f"{u}/v1/jobs", submit) for k, u in gateways.items()),
                Arm("nsqd", nsq.url("/pub", topic=PUB_TOPIC), env),
            ],
            concurrency=s.single_concurrency,
            seconds=s.single_seconds,
            warmup_s=s.warmup_seconds,
            rounds=s.rounds,
            nsq=nsq,
        )
        log("ledger_ingest: batches")
        batches = _rotate(
            [
                *(Arm(k, f"{u}/v1/jobs/batch", batch) for k, u in gateways.items()),
                Arm("nsqd", nsq.url("/mpub", topic=MPUB_TOPIC), mpub),
            ],
            concurrency=s.batch_concurrency,
            seconds=s.batch_seconds,
            warmup_s=s.warmup_seconds,
            rounds=s.rounds,
            nsq=nsq,
        )
        rows = pg.psql("SELECT count(*) FROM jobs", "ledger").strip()
        log(f"ledger_ingest: {rows} jobs in the PostgreSQL ledger at the end")
    return [
        *_comparisons(
            "single",
            single,
            per_request=1,
            baseline="/pub",
            target=SINGLE_TARGET,
            settings={
                **common,
                "seconds_per_run": s.single_seconds,
                "concurrency": s.single_concurrency,
            },
        ),
        *_comparisons(
            "batch",
            batches,
            per_request=n,
            baseline="/mpub",
            target=BATCH_TARGET,
            settings={
                **common,
                "seconds_per_run": s.batch_seconds,
                "concurrency": s.batch_concurrency,
            },
        ),
    ]
