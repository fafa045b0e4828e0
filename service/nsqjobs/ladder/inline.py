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

    def __init__(
        self, workers: int | None = None, *, task_modules: Sequence[str] = DEFAULT_TASK_MODULES
    ) -> None:
        """``workers`` is taken for a call alike on every rung, and must be 1 (or None): the
        caller's one thread runs the jobs."""
        if workers not in (None, 1):
            raise ValueError(f"the inline executor runs one job at a time: workers={workers!r}")
        super().__init__(1, task_modules=task_modules)

    def _dispatch(self, task: Task | str, args: dict[str, Any]) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            fut.set_result(normalise(registered(task).run(args)))
        except Exception as exc:
            fut.set_exception(task_failed(exc))
        except (SystemExit, GeneratorExit) as exc:
            # sys.exit() inside a task: a failed job, as on the other rungs, not the caller's
            # exit (Ctrl-C, KeyboardInterrupt, still reaches the caller).
            fut.set_exception(task_failed(RuntimeError(f"task raised {exc!r}")))
        return fut
