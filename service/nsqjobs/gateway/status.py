"""``GET /v1/jobs/{id}``: a job as the ledger records it (served only with a ledger)."""

from __future__ import annotations

from typing import Any

from nsqjobs.http.handlers import ProblemHandler
from nsqjobs.http.problems import Problem
from nsqjobs.ledger import Store

JOB_PATTERN = r"/v1/jobs/([^/]+)"


class JobStatusHandler(ProblemHandler):
    """The job's status, attempts, error, result and timestamps; 404 for an unknown id."""

    route = "/v1/jobs/{id}"

    def initialize(self, **kwargs: Any) -> None:
        """Take the ledger's store."""
        self.store: Store = kwargs["store"]

    async def get(self, job_id: str) -> None:
        """Answer the job's record."""
        record = await self.store.get(job_id)
        if record is None:
            raise Problem(404, "unknown-job", f"no job with id {job_id!r} in the ledger", id=job_id)
        self.write_json(200, record.view())
