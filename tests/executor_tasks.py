"""Tasks that push an executor's edges (``--task-module tests.executor_tasks``): results and
arguments larger than a pipe's buffer, and exceptions that are awkward to hand back."""

from __future__ import annotations

from typing import Any

from nsqjobs import task


class Unprintable(Exception):
    """An exception whose ``str()`` raises."""

    def __str__(self) -> str:
        raise ValueError("no text for you")


@task("xt.big", max_attempts=1, time_limit_s=30)
def big(args: dict[str, Any]) -> str:
    """A string of ``n`` characters."""
    return "y" * int(args["n"])


@task("xt.size", max_attempts=1, time_limit_s=30)
def size(args: dict[str, Any]) -> int:
    """The length of the argument ``s``."""
    return len(args["s"])


@task("xt.stop_iteration", max_attempts=2, time_limit_s=30)
def stop_iteration(args: dict[str, Any]) -> None:
    """Raises StopIteration (which an asyncio future refuses to hold)."""
    raise StopIteration("stop")


@task("xt.unprintable", max_attempts=3, time_limit_s=30, throws=(Unprintable,))
def unprintable(args: dict[str, Any]) -> None:
    """Raises an exception that cannot be described, declared as not worth retrying."""
    raise Unprintable()


@task("xt.fork_then_die", max_attempts=1, time_limit_s=60)
def fork_then_die(args: dict[str, Any]) -> None:
    """Fork a process that sleeps on (holding the pipe to the worker), then end this one."""
    import os
    import time

    if os.fork() == 0:
        time.sleep(float(args["seconds"]))
        os._exit(0)
    time.sleep(0.2)
    os._exit(3)
