"""Several gateways sharing one PostgreSQL ledger, through the real pipeline: an id accepted by
one gateway is known to the other, outcomes are recorded once whichever gateway reads them, and
a database restart costs the requests made while it is down, nothing more."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from nsqjobs.testing import Daemon, Nsq, Postgres, http, start_postgres, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[Postgres]:
    """A PostgreSQL server of the test's own."""
    with ExitStack() as stack:
        yield start_postgres(tmp_path, stack)


def gateways(daemons: Callable[..., Daemon], nsq: Nsq, url: str, n: int = 2) -> list[Daemon]:
    return [daemons("gateway", nsq, NSQJOBS_LEDGER_URL=url) for _ in range(n)]


def status_of(gateway: Daemon, job_id: str, status: str) -> dict[str, Any]:
    """Poll GET /v1/jobs/{id} on ``gateway`` until the job has ``status``."""

    def check() -> dict[str, Any] | None:
        code, _, body = http("GET", f"{gateway.url}/v1/jobs/{job_id}")
        assert code == 200, body
        return body if body["status"] == status else None

    return wait_for(check, 60, f"job {job_id} {status} on {gateway.url}")


def test_two_gateways_share_ids_and_outcomes(
    nsq: Nsq, daemons: Callable[..., Daemon], postgres: Postgres
) -> None:
    a, b = gateways(daemons, nsq, postgres.create_database("ledger"))
    job = {"id": "shared", "task": "noop", "args": {"n": 1}}
    assert http("POST", f"{a.url}/v1/jobs", job)[0] == 202
    code, _, known = http("POST", f"{b.url}/v1/jobs", job)
    assert code == 200 and known["id"] == "shared", known
    code, _, conflict = http("POST", f"{b.url}/v1/jobs", {**job, "args": {"n": 2}})
    assert code == 409, conflict
    batch = {"jobs": [{"id": f"b{i}", "task": "noop"} for i in range(40)]}
    assert http("POST", f"{b.url}/v1/jobs/batch", batch)[0] == 202

    daemons("worker", nsq)
    done = status_of(b, "shared", "succeeded")
    assert done["attempts"] == 1 and done["published_at"] is not None
    for i in range(40):
        status_of(a, f"b{i}", "succeeded")
    # Each outcome was read by one of the two (one durable channel) and recorded once.
    duplicates = sum(g.metric("nsqjobs_ledger_duplicate_outcomes_total") for g in (a, b))
    assert duplicates == 0
    assert postgres.psql("SELECT count(*) FROM jobs WHERE status = 'succeeded'", "ledger") == "41\n"


def test_a_database_restart_refuses_jobs_meanwhile_then_accepts_them(
    nsq: Nsq, daemons: Callable[..., Daemon], postgres: Postgres
) -> None:
    (gateway,) = gateways(daemons, nsq, postgres.create_database("ledger"), n=1)
    assert http("POST", f"{gateway.url}/v1/jobs", {"id": "before", "task": "noop"})[0] == 202
    postgres.stop()
    code, _, problem = http("POST", f"{gateway.url}/v1/jobs", {"id": "during", "task": "noop"})
    # Not accepted: nothing could be recorded (the API answers 503 for a ledger error).
    assert code >= 500, problem
    postgres.start()
    code, _, body = http("POST", f"{gateway.url}/v1/jobs", {"id": "during", "task": "noop"})
    assert code == 202, body
    daemons("worker", nsq)
    for job_id in ("before", "during"):
        status_of(gateway, job_id, "succeeded")
