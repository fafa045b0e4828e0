"""STAND-IN (helper A's branch only): the ladder's base as SPEC-11 states it, so the nsq rung
builds and is tested. Helper B's base.py replaces this file when the branches merge."""

from __future__ import annotations

import concurrent.futures
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import msgspec

from nsqjobs.names import BUILTIN_TASK_MODULE
from nsqjobs.registry import Task, registry


def normalise(result: Any) -> Any:
    """A task's value as it comes back through the worker's JSON."""
    return msgspec.json.decode(msgspec.json.encode(result))


class TaskExecutor(concurrent.futures.Executor):
    """Runs registered tasks: ``submit(task, args)``, ``map``, ``shutdown``."""

    kind: str = ""

    def __init__(
        self,
        *,
        workers: int | None = None,
        task_modules: Sequence[str] = (BUILTIN_TASK_MODULE,),
    ) -> None:
        self._workers = workers or 2
        self.task_modules = tuple(task_modules)

    @property
    def workers(self) -> int:
        """How many jobs run at once."""
        return self._workers

    def prepare(self, task: str | Task, args: Any) -> tuple[Task | str, Any]:
        """Validate in the caller: the task and its arguments as plain data."""
        found = task if isinstance(task, Task) else registry.get(task)
        plain = msgspec.to_builtins({} if args is None else args)
        found.validate(plain)
        return found, plain

    def submit(  # type: ignore[override]
        self, task: str | Task, args: Any = None, /
    ) -> concurrent.futures.Future[Any]:
        """Validate, then dispatch one job."""
        found, plain = self.prepare(task, args)
        return self._dispatch(found, plain)

    def _dispatch(self, task: Task | str, plain_args: Any) -> concurrent.futures.Future[Any]:
        raise NotImplementedError

    def map(  # type: ignore[override]
        self,
        task: str | Task,
        iterable_of_args: Iterable[Any],
        *,
        timeout: float | None = None,
        max_in_flight: int | None = None,
    ) -> Iterator[Any]:
        """Results in input order, at most ``max_in_flight`` submitted and not yet yielded."""
        window = max_in_flight or 2 * self.workers
        futures: deque[concurrent.futures.Future[Any]] = deque()
        for args in iterable_of_args:
            if len(futures) >= window:
                yield futures.popleft().result(timeout)
            futures.append(self.submit(task, args))
        while futures:
            yield futures.popleft().result(timeout)
