"""IPython Parallel: one ``ipcontroller`` (the broker, in memory) and ``ipengine`` processes."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipyparallel

from bench.peers import jobs
from bench.peers.base import Mode, Peer, Task, WorkerRun, console_script, dist_version
from bench.peers.base import start_worker_process as start
from nsqjobs.testing import Proc, spawn, wait_for


@dataclass
class IppPeer(Peer):
    """IPython Parallel's producer: ``apply_async()``, or ``map_async()`` for bulk, on a
    load-balanced view. Tasks wait in the controller's scheduler until an engine is up."""

    profile: Path = Path()
    controller: Proc | None = None
    _client: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._client = ipyparallel.Client(profile_dir=str(self.profile), timeout=60)
        self._view = self._client.load_balanced_view()

    def version(self) -> str:
        return dist_version("ipyparallel")

    def submit(self, task: Task, seqs: Sequence[int], *, results: bool, bulk: bool) -> list[Any]:
        fn = jobs.primes if task == "primes" else jobs.mark
        if bulk:
            return [self._view.map_async(fn, seqs)]
        return [self._view.apply_async(fn, i) for i in seqs]

    def start_worker(self, stack: ExitStack, mode: Mode, run: WorkerRun) -> None:
        before = len(self._client.ids)
        engines = 1 if mode == "noop" else 2
        argv = [console_script("ipengine"), f"--profile-dir={self.profile}", "--log-level=WARN"]
        for n in range(engines):
            start(stack, f"ipengine-{mode}-{n}", argv, run)
        wait_for(
            lambda: len(self._client.ids) >= before + engines or None, 60.0, "engines to register"
        )
        # Engines leave when their process stops; wait so the next run starts with none.
        stack.callback(
            lambda: wait_for(lambda: not self._client.ids or None, 30.0, "engines to unregister")
        )

    def submit_wait(self, seq: int, timeout: float) -> Any:
        return self._view.apply_async(jobs.mark, seq).get(timeout=timeout)

    def results_stored(self, handles: Sequence[Any]) -> int:
        done = 0
        for h in handles:
            h.wait(30)
            done += len(h.get()) if isinstance(h, ipyparallel.AsyncMapResult) else 1
        return done

    def flush(self) -> None:
        self._client.abort()
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
            "drain": "tasks queue in the controller while no engine is up",
        },
        stores_optional=False,
        profile=profile,
        controller=controller,
    )
