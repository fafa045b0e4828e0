"""The task registry: a decorator that declares a task's name, argument type, queue and limits.

Task modules import this module and nothing else of the runtime, so task code never sees NSQ or
Prometheus. Daemons import task modules by name (``--task-module``), which keeps the import arrow
pointing from ``workers`` to ``service`` and never back.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import msgspec

from nsqjobs.errors import (
    ConfigError,
    FieldError,
    InvalidArgumentsError,
    NsqjobsError,
    TaskDefinitionError,
    UnknownTaskError,
)
from nsqjobs.names import DEBUG_TASK_MODULE, DEFAULT_QUEUE, ENV_DEBUG_TASKS

# A task whose argument type is this takes any JSON object (the decorator stores this very
# object for ``dict[str, Any]``, so the check is an identity test).
_ANY_OBJECT: Any = dict[str, Any]
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
    # Publish a started event when a job begins, so the ledger can report it as running.
    track_started: bool = False

    def validate(self, args: Any, where: str = "args") -> Any:
        """Convert plain JSON data to the typed arguments, or raise with the failing fields."""
        if self.args_type is _ANY_OBJECT and isinstance(args, dict):
            return args  # any JSON object is valid: nothing to check (the hot path: a
            # comparison with a fresh dict[str, Any] cost the gateway 9 % of its batch time)
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
            raise TaskDefinitionError(
                f"{_where(task.fn)}: task name {task.name!r} must be dotted lowercase "
                "identifiers (e.g. 'demo.square')"
            )
        if not _QUEUE_NAME.match(task.queue):
            raise TaskDefinitionError(
                f"{_where(task.fn)}: task {task.name!r}: queue {task.queue!r} must be 1-64 of "
                "[A-Za-z0-9_-]"
            )
        known = self._tasks.get(task.name)
        if known is not None and known.fn is not task.fn:
            raise TaskDefinitionError(
                f"task {task.name!r} is already registered (by {_where(known.fn)}); "
                f"{_where(task.fn)} registers it again"
            )
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
    track_started: bool = False,
    target: Registry | None = None,
) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Register a one-argument function as a task; the argument's annotation is its schema.

    ``throws``: exception types the task raises when retrying cannot help (bad input found deep
    in the work, a missing file...); a job failing with one is dead-lettered at once.

    ``track_started``: the worker publishes a small started event when each attempt begins,
    and the job ledger reports the job as ``running`` until its outcome (off by default: one
    more publish per job; a lost event only leaves the job reported ``queued``).

    Every mistake in a declaration raises :class:`TaskDefinitionError` with one line naming the
    task and the function.
    """
    if not isinstance(throws, tuple | list) or not all(
        isinstance(t, type) and issubclass(t, Exception) for t in throws
    ):
        raise TaskDefinitionError(
            f"task {name!r}: throws must be a tuple of Exception subclasses, got {throws!r}"
        )
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise TaskDefinitionError(
            f"task {name!r}: max_attempts must be at least 1 (a whole number), got {max_attempts!r}"
        )
    if (
        isinstance(time_limit_s, bool)
        or not isinstance(time_limit_s, int | float)
        or not math.isfinite(time_limit_s)
        or time_limit_s <= 0
    ):
        # NaN passes a `<= 0` check, and a timer set for NaN seconds fires at once.
        raise TaskDefinitionError(
            f"task {name!r}: time_limit_s must be a positive, finite number of seconds, "
            f"got {time_limit_s!r}"
        )
    if not isinstance(track_started, bool):
        raise TaskDefinitionError(f"task {name!r}: track_started must be True or False")
    if warm_up is not None and not callable(warm_up):
        raise TaskDefinitionError(f"task {name!r}: warm_up must be callable")

    def decorate(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        args_type = _argument_type(name, fn)
        try:
            schema = msgspec.json.schema(args_type)
        except Exception as exc:
            raise TaskDefinitionError(
                f"task {name!r} ({_where(fn)}): its argument type {args_type!r} has no JSON "
                f"schema: {exc}"
            ) from None
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
                schema=schema,
                throws=tuple(throws),
                track_started=track_started,
            )
        )
        return fn

    return decorate


def _where(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}.{getattr(fn, '__qualname__', repr(fn))}"


def _argument_type(name: str, fn: Any) -> Any:
    """The annotation of ``fn``'s one argument, or a one-line TaskDefinitionError."""
    where = f"task {name!r} ({_where(fn)})"
    if not callable(fn):
        raise TaskDefinitionError(f"task {name!r}: @task decorates a function, not {fn!r}")
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as exc:
        raise TaskDefinitionError(f"{where}: cannot read its signature: {exc}") from None
    if len(params) != 1 or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise TaskDefinitionError(
            f"{where}: a task function takes exactly one argument (its arguments as one "
            f"annotated type), not ({', '.join(str(p) for p in params)})"
        )
    try:
        hints = get_type_hints(fn, include_extras=True)
    except Exception as exc:
        raise TaskDefinitionError(
            f"{where}: its annotations do not resolve: {type(exc).__name__}: {exc}"
        ) from None
    if params[0].name not in hints:
        raise TaskDefinitionError(
            f"{where}: argument {params[0].name!r} needs a type annotation (its arguments' "
            "type, e.g. a msgspec.Struct, or dict[str, Any] for any object)"
        )
    hint = hints[params[0].name]
    return _ANY_OBJECT if hint == _ANY_OBJECT else hint


def debug_tasks_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``NSQJOBS_DEBUG_TASKS`` asks for the debug tasks (1/true/yes/on)."""
    raw = (os.environ if environ is None else environ).get(ENV_DEBUG_TASKS, "").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{ENV_DEBUG_TASKS}: invalid value {raw!r} (expected 1 or 0)")


def task_modules(
    configured: Iterable[str],
    environ: Mapping[str, str] | None = None,
    *,
    debug: bool | None = None,
) -> list[str]:
    """The task modules a daemon loads: ``configured`` (``--task-module``), plus the debug
    tasks' module when ``debug`` (``--debug-tasks``; None: ``NSQJOBS_DEBUG_TASKS=1`` in
    ``environ``), whatever ``configured`` is."""
    modules = list(dict.fromkeys(configured))
    if debug is None:
        debug = debug_tasks_enabled(environ)
    if debug and DEBUG_TASK_MODULE not in modules:
        modules.append(DEBUG_TASK_MODULE)
    return modules


def load_task_modules(modules: Iterable[str], environ: Mapping[str, str] | None = None) -> None:
    """Import task modules so their decorators run (see :func:`task_modules`).

    Any failure, in the import or in a declaration, is one :class:`TaskDefinitionError` line.
    """
    for module in task_modules(modules, environ):
        try:
            importlib.import_module(module)
        except NsqjobsError as exc:
            raise TaskDefinitionError(f"task module {module!r}: {exc}") from None
        except Exception as exc:
            raise TaskDefinitionError(
                f"task module {module!r} failed to import: {type(exc).__name__}: {exc}"
            ) from None


def validation_errors(exc: InvalidArgumentsError) -> list[dict[str, str]]:
    """Field errors as plain dicts, for problem+json bodies."""
    return [{"field": e.field, "message": e.message} for e in exc.errors]
