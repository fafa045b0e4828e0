"""The checker: what the client was told, what the ledger recorded and what ran, to a verdict.

Pure functions of the observations, so the tests can hand it known losses and duplicates and
see it find exactly those. Nothing here talks to a process.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# What the client made of one id in the end: a 202 or 200 (the job exists) at some point;
# only "maybe" answers (503, a dropped connection, a timeout) until it gave up; or refused.
SubmitState = Literal["accepted", "unconfirmed", "rejected"]
UNFINISHED = frozenset({"queued", "running"})


@dataclass(frozen=True, slots=True)
class Submitted:
    """One id as the client saw it: every answer in order, and what they came to."""

    id: str
    state: SubmitState
    answers: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LedgerRow:
    """One job as the ledger holds it (the fields a recorded outcome is judged by)."""

    id: str
    status: str
    finished_at: float | None = None
    worker: str | None = None
    attempts: int = 0
    redrives: int = 0
    # For the report on a lost job: when nsqd acknowledged its latest publish, when that was sent.
    published_at: float | None = None
    sent_at: float | None = None

    @property
    def terminal(self) -> bool:
        """True once an outcome is recorded (succeeded, failed, dead or cancelled)."""
        return self.status not in UNFINISHED

    def outcome(self) -> tuple[str, float | None, str | None]:
        """What must never change once terminal: a change means a second recorded outcome."""
        return (self.status, self.finished_at, self.worker)


@dataclass
class LedgerWatch:
    """Reads of the ledger over a run: the final rows, and every terminal outcome that
    changed between two reads (the first terminal outcome must be the one that stays), or
    that the audit trigger saw change (``audited``: every change, read at the end)."""

    rows: dict[str, LedgerRow] = field(default_factory=dict)
    first: dict[str, tuple[str, float | None, str | None]] = field(default_factory=dict)
    rewritten: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    audited: dict[str, tuple[str, str]] = field(default_factory=dict)
    extra_rows: dict[str, int] = field(default_factory=dict)
    reads: int = 0

    def read(self, rows: Iterable[LedgerRow]) -> None:
        """One read of the whole ledger."""
        seen: Counter[str] = Counter()
        latest: dict[str, LedgerRow] = {}
        for row in rows:
            seen[row.id] += 1
            latest[row.id] = row
            if row.terminal:
                now = row.outcome()
                was = self.first.setdefault(row.id, now)
                if was != now and row.id not in self.rewritten:
                    self.rewritten[row.id] = (was, now)
        for job_id, n in seen.items():
            if n > 1:
                self.extra_rows[job_id] = max(n - 1, self.extra_rows.get(job_id, 0))
        self.rows = latest
        self.reads += 1

    def unfinished(self, ids: Iterable[str]) -> list[str]:
        """Of ``ids``, those with no recorded outcome (or no row at all)."""
        rows = self.rows
        return [i for i in ids if (row := rows.get(i)) is None or not row.terminal]


@dataclass(frozen=True, slots=True)
class Bound:
    """What can make a job run more than once in a run, each counted from what happened:
    a worker SIGKILLed or paused past the message timeout holds at most ``concurrency``
    messages; a publish the client retried after an answer that left it unsure stores the
    job once more at most; a job whose result nsqd did not acknowledge in time is requeued by
    its worker (the result may still have been stored); a re-drive publishes it once more; an
    nsqd that keeps messages on disk re-delivers at most ``--sync-every`` (2500) messages
    read since its last sync."""

    worker_faults: int = 0
    concurrency: int = 0
    retried_publishes: int = 0
    requeued_results: int = 0
    redrives: int = 0
    nsqd_kills_on_disk: int = 0
    sync_every: int = 2500

    @property
    def total(self) -> int:
        """The most duplicate executions these events can cause."""
        return (
            self.worker_faults * self.concurrency
            + self.retried_publishes
            + self.requeued_results
            + self.redrives
            + self.nsqd_kills_on_disk * self.sync_every
        )

    def terms(self) -> str:
        """The sum, written out."""
        parts = [
            f"{self.worker_faults}x{self.concurrency} worker",
            f"{self.retried_publishes} retried",
            f"{self.requeued_results} results unacknowledged",
            f"{self.redrives} re-driven",
        ]
        if self.nsqd_kills_on_disk:
            parts.append(f"{self.nsqd_kills_on_disk}x{self.sync_every} nsqd disk")
        return " + ".join(parts)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A run's figures; ``passed``: nothing accepted was lost, no outcome was recorded twice,
    and duplicate executions stayed within their bound."""

    submitted: int
    accepted: int
    accepted_after_retry: int
    unconfirmed: int
    unconfirmed_recorded: int
    rejected: int
    lost: tuple[str, ...]
    lost_rows: tuple[LedgerRow, ...]
    unrecorded: tuple[str, ...]
    executed: int
    never_executed: int
    # From evidence other than the ledger's word: accepted jobs the executions log never saw
    # (an outcome recorded for a job that never ran is a loss too), and jobs the client could
    # not confirm whose ledger row exists but never finished (recorded, so promised to run).
    unrun: tuple[str, ...]
    stuck_unconfirmed: tuple[str, ...]
    duplicate_executions: int
    ran_twice: tuple[str, ...]
    most_runs: int
    phantoms: tuple[str, ...]
    results_seen: int
    duplicate_results: int
    duplicate_recorded: tuple[str, ...]
    duplicate_outcomes_ignored: int
    redrives: int
    redrives_by_reason: dict[str, int]
    bound: Bound
    answers: dict[str, int]

    @property
    def passed(self) -> bool:
        """The targets: 0 lost (by the ledger, and by the executions log), 0 duplicate recorded
        outcomes, duplicates within the bound."""
        return (
            not self.lost
            and not self.unrun
            and not self.stuck_unconfirmed
            and not self.duplicate_recorded
            and not self.phantoms
            and self.duplicate_executions <= self.bound.total
        )

    def summary(self) -> str:
        """One line."""
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.redrives_by_reason.items()))
        return (
            f"accepted {self.accepted} (unconfirmed {self.unconfirmed}), lost {len(self.lost)}"
            + (f" (never ran {len(self.unrun)})" if self.unrun else "")
            + (
                f" (unconfirmed, stuck {len(self.stuck_unconfirmed)})"
                if self.stuck_unconfirmed
                else ""
            )
            + ", "
            f"duplicate recorded outcomes {len(self.duplicate_recorded)}, duplicate executions "
            f"{self.duplicate_executions} (bound {self.bound.total}), duplicate outcomes "
            f"ignored {self.duplicate_outcomes_ignored}, re-drives {self.redrives}"
            + (f" ({reasons})" if reasons else "")
        )

    def to_json(self) -> dict[str, Any]:
        """Figures for chaos.json (ids listed up to 50 per kind)."""
        return {
            "passed": self.passed,
            "submitted": self.submitted,
            "accepted": self.accepted,
            "accepted_after_retry": self.accepted_after_retry,
            "unconfirmed": self.unconfirmed,
            "unconfirmed_recorded": self.unconfirmed_recorded,
            "rejected": self.rejected,
            "lost": len(self.lost),
            "lost_ids": list(self.lost[:50]),
            "lost_rows": [dataclasses.asdict(r) for r in self.lost_rows[:50]],
            "unrecorded": len(self.unrecorded),
            "executed": self.executed,
            "never_executed": self.never_executed,
            "unrun_ids": list(self.unrun[:50]),
            "stuck_unconfirmed_ids": list(self.stuck_unconfirmed[:50]),
            "duplicate_executions": self.duplicate_executions,
            "ids_run_twice": len(self.ran_twice),
            "ran_twice_ids": list(self.ran_twice[:50]),
            "most_runs": self.most_runs,
            "phantoms": len(self.phantoms),
            "results_seen": self.results_seen,
            "duplicate_results": self.duplicate_results,
            "duplicate_recorded_outcomes": len(self.duplicate_recorded),
            "duplicate_recorded_ids": list(self.duplicate_recorded[:50]),
            "duplicate_outcomes_ignored": self.duplicate_outcomes_ignored,
            "redrives": self.redrives,
            "redrives_by_reason": self.redrives_by_reason,
            "duplicate_execution_bound": self.bound.total,
            "bound_terms": self.bound.terms(),
            "answers": self.answers,
        }


def judge(
    submitted: Mapping[str, Submitted],
    ledger: LedgerWatch,
    executions: Mapping[str, int],
    results: Mapping[str, int],
    *,
    duplicate_outcomes_ignored: int,
    redrives_by_reason: Mapping[str, int],
    bound: Bound,
) -> Verdict:
    """The verdict on one run.

    ``lost``: accepted ids whose ledger row has no outcome after the drain (or that have no
    row: a 202 for a job never recorded). ``duplicate_recorded``: ids whose recorded outcome
    changed once terminal (seen by a read, or by the audit trigger), or that hold more than
    one row. ``phantoms``: ids that ran or are
    in the ledger though the client never sent them. Re-drives are the ledger's own count
    (its ``redrives`` column), which survives a gateway SIGKILL; the reasons come from the
    gateway's metric, scraped while it ran.
    """
    accepted = [s.id for s in submitted.values() if s.state == "accepted"]
    unconfirmed = [s.id for s in submitted.values() if s.state == "unconfirmed"]
    rows = ledger.rows
    lost = tuple(sorted(ledger.unfinished(accepted)))
    unrecorded = tuple(i for i in lost if i not in rows)
    runs = [n for i, n in executions.items() if i in submitted]
    ran_twice = tuple(sorted(i for i, n in executions.items() if n > 1 and i in submitted))
    answers: Counter[str] = Counter()
    for s in submitted.values():
        answers.update(s.answers)
    known = set(submitted)
    phantoms = {i for i in executions if i not in known} | {i for i in rows if i not in known}
    redrives = sum(r.redrives for r in rows.values() if r.id in known)
    duplicate_recorded = sorted(
        set(ledger.rewritten) | set(ledger.audited) | set(ledger.extra_rows)
    )
    return Verdict(
        submitted=len(submitted),
        accepted=len(accepted),
        accepted_after_retry=sum(
            1 for s in submitted.values() if s.state == "accepted" and len(s.answers) > 1
        ),
        unconfirmed=len(unconfirmed),
        unconfirmed_recorded=sum(1 for i in unconfirmed if i in rows and rows[i].terminal),
        rejected=sum(1 for s in submitted.values() if s.state == "rejected"),
        lost=lost,
        lost_rows=tuple(rows[i] for i in lost if i in rows),
        unrecorded=unrecorded,
        executed=len(runs),
        never_executed=sum(1 for i in accepted if executions.get(i, 0) == 0),
        unrun=tuple(sorted(i for i in accepted if executions.get(i, 0) == 0)),
        stuck_unconfirmed=tuple(
            sorted(i for i in unconfirmed if i in rows and not rows[i].terminal)
        ),
        duplicate_executions=sum(n - 1 for n in runs if n > 1),
        ran_twice=ran_twice,
        most_runs=max(runs, default=0),
        phantoms=tuple(sorted(phantoms)),
        results_seen=sum(1 for i, n in results.items() if n and i in known),
        duplicate_results=sum(n - 1 for i, n in results.items() if n > 1 and i in known),
        duplicate_recorded=tuple(duplicate_recorded),
        duplicate_outcomes_ignored=duplicate_outcomes_ignored,
        redrives=redrives,
        redrives_by_reason={k: v for k, v in redrives_by_reason.items() if v},
        bound=Bound(
            worker_faults=bound.worker_faults,
            concurrency=bound.concurrency,
            retried_publishes=bound.retried_publishes,
            requeued_results=bound.requeued_results,
            redrives=max(redrives, sum(redrives_by_reason.values())),
            nsqd_kills_on_disk=bound.nsqd_kills_on_disk,
            sync_every=bound.sync_every,
        ),
        answers=dict(sorted(answers.items())),
    )
