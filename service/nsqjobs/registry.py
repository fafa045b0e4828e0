"""The task registry: a decorator that declares a task's name, argument type, queue and limits.

Task modules import this module and nothing else of the runtime, so task code never sees NSQ or
Prometheus. Daemons import task modules by name (``--task-module``), which keeps the import arrow
pointing from ``workers`` to ``service`` and never back.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import msgspec

from nsqjobs.errors import FieldError, InvalidArgumentsError, UnknownTaskError
from nsqjobs.names import DEFAULT_QUEUE

_TASK_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
_QUEUE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # nsqd allows dots; we keep them out


@dataclass(frozen=True)
class Task:
    """A registered task: how to validate its arguments and how to run it."""

    name: str
    fn: Callable[[Any], Any]
    args_type: Any
    queue: str = DEFAULT_QUEUE
    time_limit_s: float = 300.0
    max_attempts: int = 5
    description: str = ""
    warm_up: Callable[[], None] | None = None
    schema: dict[str, Any] = field(default_factory=dict)
    # Exceptions that cannot succeed on another attempt: the job is dead-lettered at once.
    throws: tuple[type[Exception], ...] = ()

    def validate(self, args: Any, where: str = "args") -> Any:
        """Convert plain JSON data to the typed arguments, or raise with the failing fields."""
        if self.args_type == dict[str, Any] and isinstance(args, dict):
            return args  # any JSON object is valid: nothing to check
        try:
            return msgspec.convert(args, self.args_type, strict=True)
        except msgspec.ValidationError as exc:
            raise InvalidArgumentsError([field_error(str(exc), where)]) from exc

    def run(self, args: Any) -> Any:
        """Validate ``args`` (plain data from the envelope) and call the task function."""
        return self.fn(self.validate(args))


_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$")
_NAMED = re.compile(r"(?:missing required field|unknown field) `(?P<name>[^`]+)`")


def field_error(message: str, where: str) -> FieldError:
    """Turn a msgspec validation message into a field path plus a reason."""
    path = where
    m = _AT.match(message)
    if m:
        message, path = m["msg"], where + m["path"]
    named = _NAMED.search(message)
    if named:
        path = f"{path}.{named['name']}"
    return FieldError(field=path, message=message)


class Registry:
    """Tasks by name. The module-level :data:`registry` is the default one."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}

    def add(self, task: Task) -> Task:
        """Register ``task``; a second task with the same name is an error."""
        if not _TASK_NAME.match(task.name):
            raise ValueError(f"task name {task.name!r} must be dotted lowercase identifiers")
        if not _QUEUE_NAME.match(task.queue):
            raise ValueError(f"queue {task.queue!r} must be 1-64 of [A-Za-z0-9_-]")
        if task.name in self._tasks and self._tasks[task.name].fn is not task.fn:
            raise ValueError(f"task {task.name!r} is already registered")
        self._tasks[task.name] = task
        return task

    def get(self, name: str) -> Task:
        """The task called ``name``, or :class:`UnknownTaskError`."""
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTaskError(name) from None

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[Task]:
        return iter(sorted(self._tasks.values(), key=lambda t: t.name))

    def __len__(self) -> int:
        return len(self._tasks)

    def queues(self) -> list[str]:
        """Every queue topic some registered task uses, sorted."""
        return sorted({t.queue for t in self._tasks.values()})


registry = Registry()


def task(
    name: str,
    *,
    queue: str = DEFAULT_QUEUE,
    time_limit_s: float = 300.0,
    max_attempts: int = 5,
    warm_up: Callable[[], None] | None = None,
    throws: tuple[type[Exception], ...] = (),
    target: Registry | None = None,
) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Register a one-argument function as a task; the argument's annotation is its schema.

    ``throws``: exception types the task raises when retrying cannot help (bad input found deep
    in the work, a missing file...); a job failing with one is dead-lettered at once.
    """
    if not all(isinstance(t, type) and issubclass(t, Exception) for t in throws):
        raise TypeError("throws must be a tuple of Exception subclasses")
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    if time_limit_s <= 0:
        raise ValueError("time_limit_s must be positive")

    def decorate(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        hints = get_type_hints(fn, include_extras=True)
        params = [k for k in hints if k != "return"]
        if len(params) != 1:
            raise TypeError(f"task {name!r}: the function must take one annotated argument")
        args_type = hints[params[0]]
        (target if target is not None else registry).add(
            Task(
                name=name,
                fn=fn,
                args_type=args_type,
                queue=queue,
                time_limit_s=time_limit_s,
                max_attempts=max_attempts,
                description=(fn.__doc__ or "").strip().split("\n")[0],
                warm_up=warm_up,
                schema=msgspec.json.schema(args_type),
                throws=tuple(throws),
            )
        )
        return fn

    return decorate


def load_task_modules(modules: Iterable[str]) -> None:
    """Import task modules so their decorators run."""
    for module in modules:
        importlib.import_module(module)


def validation_errors(exc: InvalidArgumentsError) -> list[dict[str, str]]:
    """Field errors as plain dicts, for problem+json bodies."""
    return [{"field": e.field, "message": e.message} for e in exc.errors]
