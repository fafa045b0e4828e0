"""A task on a second queue, so a batch can span two queue topics (``--task-module``)."""

from __future__ import annotations

from typing import Any

from nsqjobs import task


@task("other.echo", queue="other", time_limit_s=10)
def other_echo(args: dict[str, Any]) -> dict[str, Any]:
    """Return the arguments (on queue ``other``)."""
    return args
