"""The bodies every benchmark sends: one noop job, its envelope, and batches of both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nsqjobs import wire
from nsqjobs.registry import load_task_modules, registry

TASK = "noop"
# 64 bytes of JSON: a small, fixed argument object.
ARGS: dict[str, Any] = {"payload": "x" * 40, "n": 12345}
BATCH_SIZE = 1000  # the gateway's largest batch, and one nsqd MPUB


def submit_body() -> bytes:
    """Body of ``POST /v1/jobs``."""
    return json.dumps({"task": TASK, "args": ARGS}, separators=(",", ":")).encode()


def batch_body(n: int = BATCH_SIZE) -> bytes:
    """Body of ``POST /v1/jobs/batch`` with ``n`` noop jobs."""
    jobs = [{"task": TASK, "args": ARGS}] * n
    return json.dumps({"jobs": jobs}, separators=(",", ":")).encode()


def envelope() -> bytes:
    """A job envelope as the gateway publishes it (fresh id, same task limit)."""
    load_task_modules(["nsqjobs_tasks.builtin"])
    return wire.encode(
        wire.JobEnvelope(
            id=wire.new_job_id(),
            task=TASK,
            args=ARGS,
            created_at=wire.now(),
            timeout_s=registry.get(TASK).time_limit_s,
        )
    )


def envelopes(n: int) -> list[bytes]:
    """``n`` distinct envelopes."""
    return [envelope() for _ in range(n)]


def mpub_body(n: int = BATCH_SIZE) -> bytes:
    """Body of nsqd's ``POST /mpub``: ``n`` newline-separated envelopes."""
    return b"\n".join(envelopes(n))


def write(path: Path, body: bytes) -> Path:
    """Save a body for hey's ``-D``."""
    path.write_bytes(body)
    return path
