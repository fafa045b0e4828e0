"""IPython Parallel: one ``ipcontroller`` (the broker, in memory) and ``ipengine`` processes."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipyparallel
from nsqjobs.testing import Proc, spawn, wait_for

from bench.peers import jobs
from bench.peers.base import Mode, Peer, Task, WorkerRun, console_script, dist_version
from bench.peers.base import start_worker_process as start


@dataclass
class IppPeer(Peer):
    """IPython Parallel's producer: ``apply_async()``, or ``map_async()`` for bulk, on a
    load-balanced view. Tasks wait in the controller's scheduler until an engine is up."""

    profile: Path = Path()
    controller: Proc | None = None
    _client: Any = field(default=None, init=False)
    _view: Any = field(default=None, init=False)
    _deferred: tuple[Any, list[int], list[Any]] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._client = ipyparallel.Client(profile_dir=str(self.profile), timeout=60)

    def version(self) -> str:
        return dist_version("ipyparallel")

    def submit(self, task: Task, seqs: Sequence[int], *, results: bool, bulk: bool) -> list[Any]:
        fn = jobs.primes if task == "primes" else jobs.mark
        if self._view is None:
            # The client refuses tasks while no engine is registered: the drain's jobs are sent
            # as soon as its engine is (into the list returned now).
            self._deferred = (fn, list(seqs), [])
            return self._deferred[2]
        if bulk:
            return [self._view.map_async(fn, seqs)]
        return [self._view.apply_async(fn, i) for i in seqs]

    def enqueue_setup(self, stack: ExitStack, run: WorkerRun) -> None:
        self.start_worker(stack, "noop", run)

    def start_worker(self, stack: ExitStack, mode: Mode, run: WorkerRun) -> None:
        self._start_engines(stack, mode, run)
        if self._deferred is not None:
            fn, seqs, handles = self._deferred
            self._deferred = None
            handles.append(self._view.map_async(fn, seqs))

    def _start_engines(self, stack: ExitStack, mode: Mode, run: WorkerRun) -> None:
        before = set(self._client.ids)
        engines = 1 if mode == "noop" else 2
        argv = [console_script("ipengine"), f"--profile-dir={self.profile}", "--log-level=WARN"]
        for n in range(engines):
            start(stack, f"ipengine-{mode}-{n}", argv, run)

        def registered() -> list[int] | None:
            fresh = sorted(set(self._client.ids) - before)
            return fresh if len(fresh) >= engines else None

        # A stopped engine stays registered until the controller's heartbeat drops it: the view
        # names the engines of this run, so jobs never wait for a dead one.
        fresh = wait_for(registered, 60.0, "engines to register")
        self._view = self._client.load_balanced_view(targets=fresh)
        stack.callback(self._engines_gone)

    def _engines_gone(self) -> None:
        self._view = None

    def submit_wait(self, seq: int, timeout: float) -> Any:
        if self._view is None:
            raise RuntimeError("no engine")
        return self._view.apply_async(jobs.mark, seq).get(timeout=timeout)

    def results_stored(self, handles: Sequence[Any]) -> int:
        done = 0
        for h in handles:
            h.wait(30)
            done += len(h.get()) if isinstance(h, ipyparallel.AsyncMapResult) else 1
        return done

    def flush(self) -> None:
        self._deferred = None
        with contextlib.suppress(Exception):  # nothing to purge is not a failure
            self._client.purge_everything()

    def close(self) -> None:
        self._client.close()


def peer(stack: ExitStack, work: Path) -> Peer:
    """Start an ``ipcontroller`` on loopback (``stack`` stops it); the IPython Parallel peer."""
    profile = work / "ipython-profile"
    profile.mkdir()
    argv = [console_script("ipcontroller"), "--ip=127.0.0.1", f"--profile-dir={profile}"]
    argv += ["--log-level=WARN"]
    controller = spawn(argv, work / "ipcontroller.log", name="ipcontroller", stack=stack)
    client_file = profile / "security" / "ipcontroller-client.json"

    def ready() -> bool | None:
        controller.check_alive()
        return client_file.exists() or None

    wait_for(ready, 60.0, "ipcontroller's connection file")
    return IppPeer(
        key="ipyparallel",
        label="IPython Parallel",
        broker="ipcontroller (ZeroMQ, in memory)",
        settings={
            "engines": "1 ipengine; CPU: 2 ipengines",
            "scheduler": "load-balanced view, controller defaults (leastload, hwm 1)",
            "results": "always returned to the client (no option to drop them)",
            "bulk": "map_async() (one task per item)",
            "wait": "AsyncResult.get()",
            "drain": "the client refuses tasks while no engine is registered: the drain's "
            "20,000 are sent by one map_async() right after the engine registers",
            "enqueue": "measured with one engine up (it runs the jobs meanwhile)",
        },
        stores_optional=False,
        profile=profile,
        controller=controller,
    )
