"""Schemathesis hooks for tests/test_openapi.py (loaded through ``SCHEMATHESIS_HOOKS``).

The document states each task's cross-field rules in words (its ``args`` description), since
JSON Schema cannot compare two properties; generated bodies are repaired to obey those rules,
so every other part of the schema is tested as written. Likewise a listing's ``cursor`` must be
one the same listing gave out (any other is a 400, tested in tests/test_ledger_api.py): a
generated one is left out.
"""

from __future__ import annotations

import time
from typing import Any

import schemathesis
from nsqjobs.names import MAX_EXPIRES_S


def _numbers(args: dict[str, Any], *names: str) -> bool:
    """Every one of ``names`` is in ``args`` and a number (the rules compare numbers only)."""
    return all(
        isinstance(args.get(n), int | float) and not isinstance(args.get(n), bool) for n in names
    )


def _obey(job: Any) -> None:
    if not isinstance(job, dict):
        return
    # run_at: at most an hour ahead (a year with the ledger), and not beside delay_ms; stated
    # in words, since JSON Schema cannot compare a time with now.
    run_at = job.get("run_at")
    if isinstance(run_at, int | float) and not isinstance(run_at, bool):
        if job.get("delay_ms"):
            del job["run_at"]
        elif run_at > time.time() + 3000:
            job["run_at"] = time.time() + 60
    # expires_s: longer than the delay (a job due after it expires is refused), also in words.
    expires = job.get("expires_s")
    if isinstance(expires, int | float) and not isinstance(expires, bool):
        delay_ms, run_at = job.get("delay_ms"), job.get("run_at")
        ahead = 0.0
        if isinstance(delay_ms, int | float) and not isinstance(delay_ms, bool):
            ahead = delay_ms / 1000
        elif isinstance(run_at, int | float) and not isinstance(run_at, bool):
            ahead = run_at - time.time()
        if expires <= ahead + 1 and ahead + 3600 <= MAX_EXPIRES_S:
            job["expires_s"] = ahead + 3600
        elif expires <= ahead + 1:
            del job["expires_s"]
    if not isinstance(job.get("args"), dict):
        return
    args: dict[str, Any] = job["args"]
    task = job.get("task")
    if task == "primes.count" and _numbers(args, "start", "stop"):
        start, stop = sorted((args["start"], args["stop"]))
        args["start"], args["stop"] = start, min(stop, start + 10**9)
    elif task == "julia.tile" and _numbers(
        args, "width", "height", "x_min", "x_max", "y_min", "y_max"
    ):
        if args["width"] >= 1 and args["width"] * args["height"] > 4_000_000:
            args["height"] = max(2, 4_000_000 // args["width"])
        for low, high in (("x_min", "x_max"), ("y_min", "y_max")):
            if args[low] >= args[high]:
                args[low], args[high] = -1.0, 1.0
    elif task == "diffusion.run" and _numbers(args, "d", "dt") and args["d"] * args["dt"] > 0.25:
        args["d"], args["dt"] = 0.5, 0.5


def _obey_all(body: Any) -> None:
    if isinstance(body, dict):
        jobs = body.get("jobs")
        for job in jobs if isinstance(jobs, list) else [body]:
            _obey(job)


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: Any, kwargs: dict[str, Any]) -> None:
    """Make a job, or each job of a batch, obey its task's stated rules: every phase's cases,
    the coverage phase's boundary values included, pass through here."""
    _obey_all(case.body)
    _obey_all(kwargs.get("json"))
    for query in (case.query, kwargs.get("params")):
        if isinstance(query, dict):
            query.pop("cursor", None)
