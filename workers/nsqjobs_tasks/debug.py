"""Tasks for testing and demonstrating failure handling; never needed in production.

Loaded only when ``NSQJOBS_DEBUG_TASKS=1``, which adds this module to whatever task modules are
set (``--task-module`` / ``NSQJOBS_TASK_MODULE``), so the debug tasks sit beside an
application's own tasks as well as the built-in ones.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Annotated, Any, Literal

import msgspec
from nsqjobs import NsqjobsError, Retry, task
from nsqjobs.names import ENV_DEBUG_EXECUTIONS_LOG, MAX_JOB_ID_LENGTH


class DebugSleepArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Seconds to sleep."""

    seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)]


class DebugFailArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How to fail: raise an exception, or kill the process running the task."""

    mode: Literal["error", "crash"]


class DebugFailure(NsqjobsError):
    """The error ``debug.fail`` raises on purpose."""


def debug_sleep(args: DebugSleepArgs) -> dict[str, float]:
    """Sleep for ``seconds`` (for timeouts, touches and drains)."""
    time.sleep(args.seconds)
    return {"slept": args.seconds}


def debug_fail(args: DebugFailArgs) -> None:
    """Raise (``error``) or kill the process running the task (``crash``)."""
    if args.mode == "crash":
        os._exit(70)
    raise DebugFailure("debug.fail asked to fail")


class DebugRetryArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The delay to ask for, in seconds."""

    delay: Annotated[float, msgspec.Meta(ge=0, le=3600)]


def debug_retry(args: DebugRetryArgs) -> None:
    """Ask for another attempt after ``delay`` seconds, every time (``Retry(delay=...)``)."""
    raise Retry(f"debug.retry asks for a retry in {args.delay:g}s", delay=args.delay)


def debug_unencodable(args: dict[str, Any]) -> dict[str, Any]:
    """Return a value the JSON wire format cannot hold (a complex number)."""
    return {"value": complex(1, 2)}


class DebugBigArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Size of the result string, in bytes."""

    size: Annotated[int, msgspec.Meta(ge=0, le=16 * 1024 * 1024)]


def debug_big(args: DebugBigArgs) -> str:
    """Return a string of ``size`` bytes (past nsqd's --max-msg-size, the result is refused)."""
    return "x" * args.size


class DebugPermanentFailure(NsqjobsError):
    """The error ``debug.throws`` raises and declares in ``throws=``: retrying cannot help."""


def debug_throws(args: dict[str, Any]) -> None:
    """Raise an exception the task lists in ``throws=``, so the job is dead-lettered at once."""
    raise DebugPermanentFailure("debug.throws failed for good")


class DebugFlakyArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Fail the first ``fails`` calls for ``key`` in this process, then succeed."""

    key: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    fails: Annotated[int, msgspec.Meta(ge=0, le=100)]


_flaky_calls: dict[str, int] = {}
_flaky_lock = threading.Lock()
_FLAKY_KEYS = 10_000  # a debug task still keeps its memory bounded


def debug_flaky(args: DebugFlakyArgs) -> dict[str, int]:
    """Raise for the first ``fails`` calls with this ``key`` (counted per process), then
    return the number of calls: a job that fails, is retried, and succeeds."""
    with _flaky_lock:
        if args.key not in _flaky_calls and len(_flaky_calls) >= _FLAKY_KEYS:
            _flaky_calls.clear()
        calls = _flaky_calls[args.key] = _flaky_calls.get(args.key, 0) + 1
    if calls <= args.fails:
        raise DebugFailure(f"debug.flaky call {calls} of {args.key}: failing as asked")
    return {"calls": calls}


def debug_noop(args: dict[str, Any]) -> dict[str, Any]:
    """Return the arguments unchanged (``debug.noop_tracked``: the same, with track_started)."""
    return args


class DebugChaosArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The job's key (the chaos suite uses its id) and how long the job takes."""

    key: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_JOB_ID_LENGTH)]
    seconds: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.0


def _log_execution(line: str) -> None:
    """Append ``line`` to the file ``$NSQJOBS_DEBUG_EXECUTIONS_LOG`` names, if set. One write()
    of one short line with O_APPEND: lines from concurrent executions and processes never
    interleave, and a SIGKILL after it cannot take the line back."""
    path = os.environ.get(ENV_DEBUG_EXECUTIONS_LOG)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{line}\n".encode())
        finally:
            os.close(fd)


def debug_chaos(args: DebugChaosArgs) -> dict[str, str]:
    """Append ``key`` to the executions log (if set), then sleep ``seconds``: one line per
    execution, counted by the chaos suite (``bench/chaos``)."""
    _log_execution(args.key)
    time.sleep(args.seconds)
    return {"key": args.key}


class DebugSpawnArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The job's key, and how long the subprocess it starts (``sleep``) and the task wait."""

    key: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_JOB_ID_LENGTH)]
    seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 60.0


def debug_spawn(args: DebugSpawnArgs) -> dict[str, int]:
    """Start ``sleep seconds`` as a subprocess, append ``key:pid`` to the executions log (if
    set), and wait for it: a task with a process of its own, for what happens to that process
    when its job is killed at its time limit or cancelled."""
    proc = subprocess.Popen(["sleep", f"{args.seconds:g}"])
    _log_execution(f"{args.key}:{proc.pid}")
    return {"exit": proc.wait()}


task("debug.sleep", time_limit_s=3600)(debug_sleep)
task("debug.spawn", time_limit_s=3600, max_attempts=1)(debug_spawn)
task("debug.chaos", max_attempts=10)(debug_chaos)
task("debug.sleep_tracked", time_limit_s=3600, track_started=True)(debug_sleep)
task("debug.flaky", max_attempts=5)(debug_flaky)
# The pair the track_started benchmark (bench/started.py) compares.
task("debug.noop", time_limit_s=10)(debug_noop)
task("debug.noop_tracked", time_limit_s=10, track_started=True)(debug_noop)
task("debug.fail", max_attempts=5)(debug_fail)
task("debug.retry", max_attempts=2)(debug_retry)
task("debug.unencodable", max_attempts=5)(debug_unencodable)
task("debug.big", max_attempts=5)(debug_big)
task("debug.throws", max_attempts=5, throws=(DebugPermanentFailure,))(debug_throws)
