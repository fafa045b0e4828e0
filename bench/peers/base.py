"""What every peer adapter provides, and the little they share (worker processes, versions).

An adapter is a producer in this process and a way to start one worker (``noop`` mode: the
peer's usual single worker process; ``cpu`` mode: two slots). The measurements in
``bench.peers.measure`` drive every adapter the same way.
"""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from nsqjobs.testing import Proc, spawn

from bench.peers.jobs import MARKS_ENV
from bench.procs import ROOT

Task = Literal["mark", "primes"]
Mode = Literal["noop", "cpu"]
VENV_BIN = Path(sys.executable).parent


def import_paths() -> str:
    """A PYTHONPATH under which a process started here imports this checkout's modules (the
    bench's job functions and task module), whatever the caller's own path."""
    paths = [str(ROOT), str(ROOT / "service"), str(ROOT / "workers")]
    old = os.environ.get("PYTHONPATH")
    return os.pathsep.join([*paths, *([old] if old else [])])


@dataclass(frozen=True)
class WorkerRun:
    """Where a worker marks its jobs, and the kernel it computes with (cpu mode)."""

    marks: Path
    log_dir: Path
    kernel_impl: str = "python"

    def env(self, **more: str) -> dict[str, str]:
        """The environment of a worker process: our modules importable, the marks file."""
        return {
            "PYTHONPATH": import_paths(),
            MARKS_ENV: str(self.marks),
            "NSQJOBS_KERNEL_IMPL": self.kernel_impl,
            **more,
        }


@dataclass
class Peer(ABC):
    """One job queue under test: a producer here, workers as processes."""

    key: str
    label: str
    broker: str
    # Natural settings, as a reader needs them to judge the figures.
    settings: dict[str, str] = field(default_factory=dict)
    # Which measurements apply (a peer that always keeps results has no "without" drain).
    stores_optional: bool = True
    enqueue_measured: bool = True
    drain_cap: int | None = None
    producer: str = ""
    # The peer's single-job call also has a blocking form (one round trip per job, acceptance
    # awaited): measured as well, as "enqueue_single_blocking", while ``single_blocks`` is set.
    has_blocking_single: bool = False
    single_blocks: bool = False

    @abstractmethod
    def version(self) -> str:
        """The peer's version (its distribution's)."""

    @abstractmethod
    def submit(self, task: Task, seqs: Sequence[int], *, results: bool, bulk: bool) -> list[Any]:
        """Enqueue one job per ``seq`` (one call each, or the peer's bulk call); the handles."""

    @abstractmethod
    def start_worker(self, stack: ExitStack, mode: Mode, run: WorkerRun) -> None:
        """Start the worker process(es) of ``mode``; ``stack`` stops them."""

    @abstractmethod
    def submit_wait(self, seq: int, timeout: float) -> Any:
        """Enqueue one no-op job and block until its result is seen here; the result."""

    @abstractmethod
    def results_stored(self, handles: Sequence[Any]) -> int:
        """How many of the jobs behind ``handles`` have a result stored."""

    @abstractmethod
    def flush(self) -> None:
        """Empty the queues and results, ready for the next measurement."""

    def enqueue_setup(self, stack: ExitStack, run: WorkerRun) -> None:  # noqa: B027
        """What must run while jobs are enqueued (nothing, but for a peer that cannot queue
        jobs without a worker); ``stack`` stops it."""

    @abstractmethod
    def close(self) -> None:
        """Release the producer's connections (processes are the stack's)."""


def dist_version(name: str) -> str:
    """The installed version of distribution ``name``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def start_worker_process(
    stack: ExitStack, name: str, argv: Sequence[str], run: WorkerRun, **env: str
) -> Proc:
    """Start one worker process from the repository root with the run's environment."""
    return spawn(
        argv, run.log_dir / f"{name}.log", name=name, env=run.env(**env), cwd=ROOT, stack=stack
    )


def console_script(name: str) -> str:
    """A console script of this virtualenv (celery, dramatiq, rq, ipengine...)."""
    return str(VENV_BIN / name)
