"""The chaos figures: ``chaos.json`` for machines, ``chaos.md`` (one table row per scenario)
for people."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from bench.chaos.run import Result
from bench.chaos.scenarios import TASK
from bench.procs import ROOT
from bench.report import write_text


def commit() -> str:
    """The checked-out commit, marked ``+dirty`` when the tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def write_json(path: Path, header: dict[str, Any], results: list[Result]) -> None:
    """The machine-readable figures."""
    doc = {
        **header,
        "all_pass": all(r.passed for r in results),
        "scenarios": [r.to_json() for r in results],
    }
    write_text(path, json.dumps(doc, indent=2) + "\n")


def _reasons(reasons: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))


def write_markdown(path: Path, header: dict[str, Any], results: list[Result]) -> None:
    """The human-readable report: the table, then each scenario's settings and events."""
    out = [
        "# nsqjobs chaos suite",
        "",
        f"- Date: {header['date']}",
        f"- Commit: {header['commit']}",
        f"- Command: `{header['command']}`",
        f"- Machine: {header['cpu_model']}, {header['cores']} cores (shared); "
        f"NSQ {header['nsq_version']}; Python {header['python']}",
        f"- Re-drive relay in the gateway: {header['relay']}",
        "",
        "Jobs are POSTed one by one with chosen ids at a steady rate; a 202 or 200 is accepted, "
        "any answer that leaves the client unsure (503, 500, a broken or timed-out connection) "
        "is retried with the same id until accepted or given up (unconfirmed). Lost: accepted "
        "with no recorded outcome in the ledger after the drain; a run also fails when an "
        "accepted job never ran (the executions log) or an unconfirmed job the ledger holds "
        "never finished, whatever the ledger says. Duplicate recorded outcomes: "
        "a job's recorded outcome changed after it was first recorded (seen by a read of the "
        "ledger every few seconds, or by an audit trigger on its jobs table, which sees every "
        "change), or the ledger holds two rows for it. Duplicate executions: runs beyond the "
        "first, counted by the task itself "
        "(an append-only file); the bound is what the run's events can cause (see below). "
        "Ignored: later outcomes the ledger counted and ignored "
        "(nsqjobs_ledger_duplicate_outcomes_total, summed over the gateway's lives). "
        "Re-drives: the ledger's own per-job count; reasons from the gateway's metric.",
        "",
        "| Scenario | Store | Faults | Jobs at rate | Accepted | Unconfirmed | **Lost** "
        "| **Dup. recorded outcomes** | Dup. executions (bound) | Dup. outcomes ignored "
        "| Re-drives | Accepted after retry | Time | Result |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in results:
        s, v = r.scenario, r.verdict
        head = f"| {s.name} | {s.store} | {s.fault_text()} | {s.jobs:,} at {s.rate:g}/s "
        if v is None:
            out.append(head + f"| could not run: {r.error} ||||||||| n/a |")
            continue
        reasons = _reasons(v.redrives_by_reason)
        out.append(
            head
            + f"| {v.accepted:,} | {v.unconfirmed} | **{len(v.lost)}** "
            + f"| **{len(v.duplicate_recorded)}** | {v.duplicate_executions} "
            + f"({v.bound.total}) | {v.duplicate_outcomes_ignored} "
            + f"| {v.redrives}{f' ({reasons})' if reasons else ''} "
            + f"| {v.accepted_after_retry} | {r.duration_s:.0f}s | "
            + ("PASS" if r.passed else "FAIL")
            + " |"
        )
    out += [
        "",
        "Targets: 0 lost and 0 duplicate recorded outcomes in every scenario, duplicate "
        "executions within their bound, and no re-drive at all in the deep backlog.",
        "",
        "The bound on duplicate executions, from what each run did: a SIGKILLed worker held at "
        "most `--concurrency` jobs (its max-in-flight), each may run again; a publish the "
        "client retried after an unsure answer may have stored the job once more; a job whose "
        "result nsqd did not acknowledge in time is requeued by its worker, though the result "
        "may have been stored; a re-drive publishes a job once more; an nsqd that keeps jobs "
        "on disk re-delivers after a SIGKILL what it read since its last sync (at most "
        "`--sync-every`, 2500).",
        "",
        "## Scenarios",
        "",
    ]
    for r in results:
        s, v = r.scenario, r.verdict
        out += [
            f"### {s.name}: {s.title}",
            "",
            f"- Settings: {s.jobs:,} jobs of `{TASK}` ({s.job_seconds:g}s each) at "
            f"{s.rate:g}/s, {s.setup.workers} workers x {s.setup.concurrency} slots, message "
            f"timeout {s.setup.msg_timeout_s}s, nsqd "
            f"{' '.join(s.setup.nsqd_args) or 'defaults'}, store {s.store}"
            + (
                ", gateway " + ", ".join(f"{k}={val}" for k, val in s.setup.gateway_env.items())
                if s.setup.gateway_env
                else ""
            ),
            f"- Submitting took {r.submit_s:.1f}s, draining {r.drain_s:.1f}s"
            + ("" if r.drained else " (not drained: see lost)"),
        ]
        if v is not None:
            answers = ", ".join(f"{k}: {n}" for k, n in v.answers.items())
            out += [
                f"- Answers: {answers}",
                f"- Executions: {v.executed:,} ids ran, {len(v.ran_twice)} more than once "
                f"(most {v.most_runs} times), {v.never_executed} accepted never ran; "
                f"bound {v.bound.total} = {v.bound.terms()}",
                f"- Witness channel: {v.results_seen:,} ids with an outcome, "
                f"{v.duplicate_results} duplicate outcomes seen",
            ]
            if v.lost:
                out.append(f"- Lost ids (first 10): {', '.join(v.lost[:10])}")
            if r.planted:
                out.append(
                    "- Planted: " + ", ".join(f"{k} {len(ids)}" for k, ids in r.planted.items())
                )
        if r.events:
            out.append("- Events: " + "; ".join(r.events))
        out.append("")
    write_text(path, "\n".join(out).rstrip() + "\n")
