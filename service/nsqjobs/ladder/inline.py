"""The first rung: each job runs in the caller's thread, inside ``submit`` (tests, profiling)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from typing import Any

from nsqjobs.ladder.base import (
    DEFAULT_TASK_MODULES,
    TaskExecutor,
    normalise,
    registered,
    task_failed,
)
from nsqjobs.registry import Task


class InlineExecutor(TaskExecutor):
    """Runs each job at once in the caller, one at a time: the future is done when ``submit``
    returns. No time limit and no retries (a profiler sees the task's own frames)."""

    kind = "inline"

    def __init__(self, *, task_modules: Sequence[str] = DEFAULT_TASK_MODULES) -> None:
        super().__init__(1, task_modules=task_modules)

    def _dispatch(self, task: Task | str, args: dict[str, Any]) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            fut.set_result(normalise(registered(task).run(args)))
        except Exception as exc:
            fut.set_exception(task_failed(exc))
        return fut
