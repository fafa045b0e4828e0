"""Dead letters from the ledger (served only with a ledger): list, replay and purge them.

``GET /v1/dead-letters`` lists dead jobs (with their reason and error), ``POST
/v1/dead-letters/{id}/replay`` and ``POST /v1/dead-letters/replay?task=&limit=`` replay them
(each one's run so far is kept in ``runs``; the ledger's relay publishes them again), ``DELETE
/v1/dead-letters/{id}`` and ``DELETE /v1/dead-letters?task=&limit=`` delete them. Reading nsqd's
``dead_letters`` topic would consume it; the ledger keeps every dead job until replayed or purged.
"""

from __future__ import annotations

from typing import Final

from nsqjobs.gateway.queries import MAX_LIMIT
from nsqjobs.gateway.status import LISTING_PARAMETERS, LedgerHandler
from nsqjobs.http.problems import Problem
from nsqjobs.ledger import JobRecord

DEAD_LETTERS_PATTERN: Final = r"/v1/dead-letters"
# Before DEAD_LETTER_PATTERN: a literal path wins over a template (as in OpenAPI).
BULK_REPLAY_PATTERN: Final = r"/v1/dead-letters/replay"
DEAD_LETTER_PATTERN: Final = r"/v1/dead-letters/([^/]+)"
REPLAY_PATTERN: Final = r"/v1/dead-letters/([^/]+)/replay"
FILTER_PARAMETERS: Final = ("task", "limit")


def not_dead(record: JobRecord) -> Problem:
    """The 409 for a job that is not a dead letter."""
    return Problem(
        409,
        "not-dead",
        f"job {record.id!r} is {record.status}, not dead",
        id=record.id,
        job_status=record.status,
    )


class DeadLettersHandler(LedgerHandler):
    """``GET /v1/dead-letters?task=&limit=&cursor=`` lists dead jobs, oldest first;
    ``DELETE /v1/dead-letters?task=&limit=`` purges up to ``limit`` of them."""

    route = "/v1/dead-letters"

    async def get(self) -> None:
        """Answer one page of dead jobs."""
        params = tuple(p for p in LISTING_PARAMETERS if p != "status")
        query = self.query(params, listing="dead", status="dead")
        self.write_json(200, await self.ops.page("dead", query))

    async def delete(self) -> None:
        """Purge dead jobs by filter; answer how many."""
        query = self.query(FILTER_PARAMETERS, default_limit=MAX_LIMIT)
        store = self.ops.store
        purged = await self.ops.call(lambda: store.purge(task=query.task, limit=query.limit))
        self.write_json(200, {"purged": purged})


class DeadLetterHandler(LedgerHandler):
    """``DELETE /v1/dead-letters/{id}``: purge one dead job."""

    route = "/v1/dead-letters/{id}"

    async def delete(self, job_id: str) -> None:
        """Purge it; 404 unknown, 409 not dead."""
        self.query()
        ops = self.ops
        if not await ops.call(lambda: ops.store.purge([job_id])):
            raise not_dead(await ops.known(job_id))
        self.write_json(200, {"purged": 1})


class ReplayHandler(LedgerHandler):
    """``POST /v1/dead-letters/{id}/replay``: run a dead job again, with a fresh history."""

    route = "/v1/dead-letters/{id}/replay"

    async def post(self, job_id: str) -> None:
        """Replay it; answer the job as now recorded (queued)."""
        self.query()
        ops = self.ops
        replayed = await ops.call(lambda: ops.store.replay([job_id]))
        if not replayed:
            raise not_dead(await ops.known(job_id))
        ops.replayed()
        self.write_json(200, replayed[0].view())


class BulkReplayHandler(LedgerHandler):
    """``POST /v1/dead-letters/replay?task=&limit=``: replay up to ``limit`` dead jobs (of
    ``task``), oldest first; answers their ids."""

    route = "/v1/dead-letters/replay"

    async def post(self) -> None:
        """Replay by filter."""
        query = self.query(FILTER_PARAMETERS, default_limit=MAX_LIMIT)
        store = self.ops.store
        replayed = await self.ops.call(lambda: store.replay(task=query.task, limit=query.limit))
        if replayed:
            self.ops.replayed()
        self.write_json(200, {"ids": [r.id for r in replayed]})
