"""One machine to many: the same registered tasks behind one ``concurrent.futures.Executor``,
inline, on local processes, on an IPython Parallel cluster, or on the NSQ service::

    import nsqjobs

    with nsqjobs.executor("processes", workers=2) as ex:
        counts = list(ex.map("primes.count", ({"start": a, "stop": a + 10**6} for a in starts)))

Each rung is imported when asked for, so ``processes`` never loads ipyparallel, nor
``ipyparallel`` the HTTP client.
"""

from __future__ import annotations

import importlib
from typing import Any

from nsqjobs.errors import ConfigError
from nsqjobs.ladder.base import TaskExecutor, normalise, prepare

# kind -> (module, class): the rungs, bottom to top.
RUNGS: dict[str, tuple[str, str]] = {
    "inline": ("nsqjobs.ladder.inline", "InlineExecutor"),
    "processes": ("nsqjobs.ladder.processes", "ProcessPoolExecutor"),
    "ipyparallel": ("nsqjobs.ladder.ipyparallel", "IPyParallelExecutor"),
    "nsq": ("nsqjobs.ladder.nsq", "NsqExecutor"),
}


def executor(kind: str, **options: Any) -> TaskExecutor:
    """A task executor of ``kind`` (inline, processes, ipyparallel, nsq), built with ``options``
    (see each rung's class; all take ``task_modules``, the local ones ``workers`` too)."""
    if kind not in RUNGS:
        raise ConfigError(f"unknown executor kind {kind!r}: expected one of {', '.join(RUNGS)}")
    module, name = RUNGS[kind]
    try:
        cls: type[TaskExecutor] = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name != "ipyparallel":
            raise
        raise ConfigError(
            "executor kind 'ipyparallel' needs ipyparallel: pip install 'nsqjobs[ladder]'"
        ) from exc
    return cls(**options)


__all__ = ["RUNGS", "TaskExecutor", "executor", "normalise", "prepare"]
