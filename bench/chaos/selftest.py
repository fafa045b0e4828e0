"""The checker checked: defects planted on purpose in a real run, which it must find exactly.

- ``lose``: with the workers stopped, jobs are accepted (202, recorded, published), then
  emptied out of nsqd's channel (``/channel/empty``, an operator's mistake no re-drive
  can see: nsqd did not restart). Exactly these must be reported lost.
- ``rerun``: finished jobs' envelopes are published once more straight to nsqd. Exactly these
  must show one duplicate execution each, one duplicate result on the witness channel, and
  one duplicate outcome ignored by the ledger.
- ``rewrite``: recorded outcomes are changed in the ledger's file, and some of them changed
  back at once (no read of the ledger could see that: only its audit trigger does). Exactly
  these must be reported as duplicate recorded outcomes (SQLite only).
"""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

from nsqjobs import wire
from nsqjobs.names import DEFAULT_QUEUE, WORKER_CHANNEL
from nsqjobs.testing import HarnessError, wait_for

from bench.chaos.ledger import SqliteLedger
from bench.chaos.scenarios import TASK

if TYPE_CHECKING:
    from bench.chaos.run import Run


class Plants:
    """Plants the scenario's defects into ``run`` and remembers which ids got which."""

    def __init__(self, run: Run) -> None:
        if run.scenario.plant is None:
            raise HarnessError("a self-test needs a plant")
        self.run = run
        self.plant = run.scenario.plant
        self.planted: dict[str, list[str]] = {"lost": [], "rerun": [], "rewritten": []}

    def before(self) -> None:
        """Accept jobs no worker sees, then empty them out of nsqd."""
        run, n = self.run, self.plant.lose
        if not n:
            return
        cluster = run.cluster
        run.event(cluster.stop_workers())
        doomed = [f"{run.scenario.name}-doomed-{i:04d}" for i in range(n)]
        run.submit(doomed, rate=200.0)
        accepted = [i for i in doomed if run.submitted[i].state == "accepted"]
        wait_for(lambda: cluster.queued_in_nsqd() == len(accepted), 30, "the doomed jobs in nsqd")
        cluster.nsq.post("/channel/empty", topic=DEFAULT_QUEUE, channel=WORKER_CHANNEL)
        wait_for(lambda: cluster.queued_in_nsqd() == 0, 30, "nsqd's channel emptied")
        run.event(f"planted: {len(accepted)} accepted jobs emptied out of nsqd")
        run.event(cluster.start_workers())
        self.planted["lost"] = accepted

    def after(self) -> None:
        """Run finished jobs once more; rewrite recorded outcomes."""
        run = self.run
        run.tick(force=True)
        done = sorted(
            i
            for i, s in run.submitted.items()
            if s.state == "accepted"
            and i not in self.planted["lost"]
            and (row := run.watch.rows.get(i)) is not None
            and row.terminal
            and run.executions.runs.get(i) == 1
        )
        rerun = done[: self.plant.rerun]
        if rerun:
            before = run.executions.total()
            for job_id in rerun:
                args = {"key": job_id, "seconds": run.scenario.job_seconds}
                env = wire.JobEnvelope(id=job_id, task=TASK, args=args, created_at=wire.now())
                run.cluster.nsq.post("/pub", wire.encode(env), topic=DEFAULT_QUEUE)
            run.event(f"planted: {len(rerun)} finished jobs published again behind the gateway")
            wait_for(
                lambda: run.executions.total() >= before + len(rerun), 30, "the re-runs to run"
            )
            run.drain(30.0, 3.0)
            self.planted["rerun"] = rerun
        rewrite = done[len(rerun) : len(rerun) + self.plant.rewrite]
        if rewrite and isinstance(run.ledger, SqliteLedger):
            conn = sqlite3.connect(run.ledger.path, timeout=10)
            try:
                with conn:
                    conn.executemany(
                        "UPDATE jobs SET finished_at = finished_at + 1000 WHERE id = ?",
                        [(i,) for i in rewrite],
                    )
                back = rewrite[: len(rewrite) // 2]
                with conn:  # before any read of the ledger
                    conn.executemany(
                        "UPDATE jobs SET finished_at = finished_at - 1000 WHERE id = ?",
                        [(i,) for i in back],
                    )
            finally:
                conn.close()
            run.event(
                f"planted: {len(rewrite)} recorded outcomes rewritten in the ledger's file, "
                f"{len(back)} of them changed back"
            )
            self.planted["rewritten"] = rewrite
        run.watch.read(run.ledger.rows())
