"""The third rung: an IPython Parallel cluster, local engines started here or a cluster of yours.

Jobs go to a load-balanced view; each engine loads the task modules and warms the kernels once
(at connection for the engines already there, on its first job for one that joins later). A job
whose engine dies fails with status ``lost`` (ipyparallel's ``EngineError`` as its cause), or is
sent again ``retries`` times first. Needs the ``ladder`` extra (``pip install 'nsqjobs[ladder]'``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import ipyparallel as ipp
from ipyparallel.error import RemoteError

from nsqjobs.errors import ConfigError, TaskFailed
from nsqjobs.ladder.base import (
    DEFAULT_TASK_MODULES,
    TaskExecutor,
    mark_running,
    normalise,
    settle,
    task_failed,
)
from nsqjobs.registry import Task, load_task_modules, registry

_ENGINE_DIED = "EngineError"  # what ipyparallel calls a job whose engine went away

# -- on the engines ------------------------------------------------------------------------------

_ready: set[tuple[str, ...]] = set()


def engine_setup(modules: tuple[str, ...]) -> int:
    """On an engine: load the task modules and warm every task up, once; returns the pid."""
    if modules not in _ready:
        load_task_modules(modules)
        for task in registry:
            if task.warm_up is not None:
                task.warm_up()
        _ready.add(modules)
    return os.getpid()


def engine_run(name: str, args: dict[str, Any], modules: tuple[str, ...]) -> Any:
    """On an engine: run one job; its result as the worker would publish it."""
    engine_setup(modules)
    return normalise(registry.get(name).run(args))


# -- in the caller -------------------------------------------------------------------------------


class _RemoteFuture(concurrent.futures.Future[Any]):
    """A job's future on this rung: running once an engine has begun the job, so that
    ``cancel()`` then fails, as with the stdlib's executors.

    An engine tells its client it began a request (its ``busy`` status, on the I/O thread),
    which ipyparallel notes in the request's metadata: ``running()`` and ``cancel()`` read
    it there. A job that an engine begins in the moment between that reading and the abort a
    successful cancel sends still runs; its outcome is dropped."""

    def __init__(self, client: Any) -> None:
        super().__init__()
        self._client = client
        self._msg_ids: list[str] = []  # every send of the job (a retry adds one)

    def sent(self, msg_ids: Sequence[str]) -> None:
        self._msg_ids.extend(msg_ids)

    def _begun(self) -> None:
        metadata = self._client.metadata
        if not self.done() and any(
            (metadata.get(m) or {}).get("engine_uuid") is not None for m in self._msg_ids
        ):
            mark_running(self)

    def running(self) -> bool:
        self._begun()
        return super().running()

    def cancel(self) -> bool:
        self._begun()
        return super().cancel()


class IPyParallelExecutor(TaskExecutor):
    """Jobs on an IPython Parallel cluster.

    - No ``profile``, ``url_file`` or ``client``: starts a local cluster (a controller and
      ``workers`` engines, default one per core) and stops it at shutdown. ``heartbeat_ms``
      sets how often its controller checks the engines: a dead engine is noticed after about
      four missed beats.
    - ``profile`` / ``url_file``: connects to a running cluster (``ipcluster start``, local or
      remote); ``client``: uses an ``ipyparallel.Client`` of yours (not closed at shutdown).
      ``workers``: how many engines to wait for (default: those registered, at least one).

    ``retries``: how many times a job whose engine died is sent again before its future fails
    (a task that raises is never retried). Engines need nsqjobs and the task modules importable.
    """

    kind = "ipyparallel"

    def __init__(
        self,
        workers: int | None = None,
        *,
        task_modules: Sequence[str] = DEFAULT_TASK_MODULES,
        profile: str | None = None,
        url_file: str | None = None,
        client: ipp.Client | None = None,
        retries: int = 0,
        heartbeat_ms: int = 500,
        start_timeout_s: float = 120.0,
    ) -> None:
        if sum(x is not None for x in (profile, url_file, client)) > 1:
            raise ConfigError("ipyparallel: give one of profile, url_file and client")
        if not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"ipyparallel: retries must be a whole number >= 0, not {retries!r}")
        local = profile is None and url_file is None and client is None
        super().__init__(workers, task_modules=task_modules)
        self.retries = retries
        self._cluster: ipp.Cluster | None = None
        self._profile_dir: str | None = None
        self._owns_client = client is None
        try:
            if local:
                self._profile_dir = tempfile.mkdtemp(prefix="nsqjobs-ipp-")
                self._cluster = ipp.Cluster(
                    n=self.workers,
                    profile_dir=self._profile_dir,
                    controller_args=[
                        f"--HeartMonitor.period={heartbeat_ms}",
                        "--HeartMonitor.max_heartmonitor_misses=4",
                    ],
                    log_level=30,  # WARNING: the cluster's start and stop are not news
                    shutdown_atexit=True,
                )
                self._cluster.start_cluster_sync()
                client = self._cluster.connect_client_sync()
            elif url_file is not None:
                client = ipp.Client(url_file, timeout=start_timeout_s)
            elif client is None:
                client = ipp.Client(profile=profile, timeout=start_timeout_s)
            self.client: ipp.Client = client
            wanted = workers or (self.workers if local else 1)
            self.client.wait_for_engines(wanted, timeout=start_timeout_s)
            if not local and not workers:
                self._workers = len(self.client.ids)
            self._view = self.client.load_balanced_view()
            self.engine_pids: dict[int, int] = dict(
                zip(
                    self.client.ids,
                    self.client[:].apply_sync(engine_setup, self.task_modules),
                    strict=True,
                )
            )
        except BaseException:
            self._close()
            raise

    def _dispatch(self, task: Task | str, args: dict[str, Any]) -> concurrent.futures.Future[Any]:
        fut = _RemoteFuture(self.client)
        name = task.name if isinstance(task, Task) else task
        self._send(fut, name, args, self.retries)
        return fut

    def _send(self, fut: _RemoteFuture, name: str, args: dict[str, Any], retries: int) -> None:
        sent = self._view.apply_async(engine_run, name, args, self.task_modules)
        fut.sent(sent.msg_ids)
        sent.add_done_callback(functools.partial(self._ended, fut, name, args, retries))
        # Cancelled by the caller: abort it if it has not reached an engine yet.
        fut.add_done_callback(functools.partial(_abort, self.client, sent))

    def _ended(
        self,
        fut: _RemoteFuture,
        name: str,
        args: dict[str, Any],
        retries: int,
        sent: concurrent.futures.Future[Any],
    ) -> None:
        # On the client's I/O thread.
        if fut.done():
            return
        exc = None if sent.cancelled() else sent.exception()
        if sent.cancelled():
            fut.cancel()
        elif exc is None:
            settle(fut, sent.result())
        elif isinstance(exc, RemoteError) and exc.ename == _ENGINE_DIED and retries > 0:
            try:
                self._send(fut, name, args, retries - 1)
            except Exception as lost:  # the client is closed: shut down meanwhile
                settle(fut, exc=task_failed(lost, "lost"))
        elif isinstance(exc, RemoteError):
            status = "lost" if exc.ename == _ENGINE_DIED else "failed"
            failed = TaskFailed(exc.ename, exc.evalue or exc.ename, status=status)
            failed.__cause__ = exc
            settle(fut, exc=failed)
        else:
            settle(fut, exc=task_failed(exc))

    def _close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None and self._owns_client:
            client.close()
        if self._cluster is not None:
            self._cluster.stop_cluster_sync()
            self._cluster = None
        if self._profile_dir is not None:
            shutil.rmtree(self._profile_dir, ignore_errors=True)
            self._profile_dir = None


def _abort(client: Any, sent: Any, fut: concurrent.futures.Future[Any]) -> None:
    # Without waiting for the engines' replies (AsyncResult.abort waits, with no timeout: a
    # cancel made on the client's own I/O thread, in a done-callback, would never return).
    if fut.cancelled() and not sent.ready():
        with contextlib.suppress(Exception):  # already on an engine, or the client is closed
            client.abort(sent.msg_ids, block=False)
