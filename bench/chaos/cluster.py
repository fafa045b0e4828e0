"""The system under test, and the faults done to it: nsqlookupd, nsqd, one gateway with the
ledger on, N workers, each a real process from ``nsqjobs.testing``.

Every fault is a plain signal: SIGKILL (a crash: nothing flushed) and SIGSTOP/SIGCONT (a stall).
A killed process is started again on the same ports and data, as a supervisor would.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from nsqjobs.config import GatewayConfig, WorkerConfig, env_var
from nsqjobs.names import DEFAULT_QUEUE, ENV_DEBUG_EXECUTIONS_LOG, LEDGER_CHANNEL, WORKER_CHANNEL
from nsqjobs.testing import Daemon, HarnessError, Nsq, start_daemon, start_nsq, wait_for

from bench.chaos.ledger import Ledger
from bench.chaos.observe import CHANNEL, OUTCOME_TOPICS
from bench.procs import ROOT

# What a worker logs when it requeues a job whose result nsqd did not acknowledge.
REQUEUED_RESULT = "result not acknowledged"


@dataclass(frozen=True)
class Setup:
    """How the cluster is built: workers, their slots, nsqd's flags, extra daemon settings.

    ``msg_timeout_s`` is nsqd's ``--msg-timeout`` (which the gateway's outcome reader gets) and
    the workers' ``--msg-timeout-s``: how long a SIGKILLed consumer's in-flight messages stay
    with nsqd before it gives them to another (60 s by default; shorter keeps runs short).
    """

    workers: int = 2
    concurrency: int = 8
    msg_timeout_s: int = 10
    nsqd_args: tuple[str, ...] = ()
    gateway_env: Mapping[str, str] = field(default_factory=dict)
    worker_env: Mapping[str, str] = field(default_factory=dict)


class Cluster:
    """Everything running for one scenario; ``stack`` stops it all."""

    def __init__(self, stack: ExitStack, work: Path, setup: Setup, ledger: Ledger) -> None:
        self.stack = stack
        self.work = work
        self.setup = setup
        self.ledger = ledger
        self.executions = work / "executions.log"
        self.nsq: Nsq = start_nsq(
            stack, work / "nsq", msg_timeout=f"{setup.msg_timeout_s}s", nsqd_args=setup.nsqd_args
        )
        # The witnesses' channels exist before the first job, so every outcome is kept for them;
        # the workers' channel too, so a job published before a worker subscribes is kept.
        for topic in OUTCOME_TOPICS:
            self.nsq.create_channel(topic, CHANNEL)
        self.nsq.create_channel(DEFAULT_QUEUE, WORKER_CHANNEL)
        self.gateway = self._start_gateway()
        self.workers = self._start_workers(setup.workers)
        self.paused: list[Daemon] = []
        self.kills = 0

    # -- starting -------------------------------------------------------------------------------

    def _start_gateway(self, port: int | None = None) -> Daemon:
        env = {env_var(GatewayConfig, "ledger_url"): self.ledger.url, **self.setup.gateway_env}
        if port is not None:
            env[env_var(GatewayConfig, "port")] = str(port)
        return start_daemon("gateway", self.nsq, self.work, env, stack=self.stack, cwd=ROOT)

    def _start_worker(self, ready: bool = True) -> Daemon:
        env = {
            env_var(WorkerConfig, "concurrency"): str(self.setup.concurrency),
            env_var(WorkerConfig, "msg_timeout_s"): str(self.setup.msg_timeout_s),
            ENV_DEBUG_EXECUTIONS_LOG: str(self.executions),
            **self.setup.worker_env,
        }
        return start_daemon(
            "worker", self.nsq, self.work, env, ready=ready, stack=self.stack, cwd=ROOT
        )

    def _start_workers(self, n: int) -> list[Daemon]:
        # Side by side: each spends seconds importing its tasks before it is ready.
        with ThreadPoolExecutor(n) as pool:
            return list(pool.map(lambda _: self._start_worker(), range(n)))

    # -- faults ---------------------------------------------------------------------------------

    def kill_worker(self) -> str:
        """SIGKILL the next worker in turn and start another in its place at once, as a
        supervisor would (not waiting for it: nsqd may be stopped, and resuming it is the
        next fault on the schedule; :meth:`supervise` replaces one that exits)."""
        self.kills += 1
        n = self.kills % len(self.workers)
        victim = self.workers[n]
        victim.proc.kill()
        victim.proc.wait(10)
        self.workers[n] = self._start_worker(ready=False)
        return f"worker {victim.proc.pid} killed, another started"

    def supervise(self) -> list[str]:
        """Start another worker in place of any that exited on its own (a lost port race).
        Raises :class:`HarnessError` when a paused worker runs again before its time: some
        other process sent it SIGCONT, and the run no longer shows what it claims."""
        for worker in self.paused:
            if worker.proc.poll() is None and not worker.stopped():
                raise HarnessError(
                    f"worker {worker.proc.pid} runs again while it should be paused (another "
                    "process sent it SIGCONT): the run is void"
                )
        events = []
        for n, worker in enumerate(self.workers):
            if worker.proc.poll() is not None and worker not in self.paused:
                self.workers[n] = self._start_worker(ready=False)
                events.append(
                    f"worker {worker.proc.pid} exited ({worker.proc.returncode}), another started"
                )
        return events

    def stop_workers(self) -> str:
        """Stop every worker cleanly (SIGTERM: what they hold goes back to nsqd)."""
        for worker in self.workers:
            worker.stop()
        return f"{len(self.workers)} worker(s) stopped cleanly"

    def start_workers(self) -> str:
        """Start the workers again after :meth:`stop_workers`."""
        self.workers = self._start_workers(len(self.workers))
        return f"{len(self.workers)} worker(s) started"

    def pause_workers(self) -> str:
        """SIGSTOP every worker (they hold their in-flight jobs; the rest queue in nsqd)."""
        for worker in self.workers:
            worker.pause()
            self.paused.append(worker)
        return f"{len(self.paused)} worker(s) stopped"

    def resume_workers(self) -> str:
        """SIGCONT the workers :meth:`pause_workers` stopped."""
        for worker in self.paused:
            worker.resume()
        n, self.paused = len(self.paused), []
        return f"{n} worker(s) resumed"

    def kill_nsqd(self) -> str:
        """SIGKILL nsqd and start it again on the same ports and data path."""
        self.nsq.stop_nsqd(kill=True)
        self.nsq.start_nsqd()
        return "nsqd killed and restarted"

    def pause_nsqd(self) -> str:
        """SIGSTOP nsqd."""
        if self.nsq.nsqd is None:
            raise HarnessError("no nsqd process")
        self.nsq.nsqd.pause()
        return "nsqd stopped"

    def resume_nsqd(self) -> str:
        """SIGCONT nsqd."""
        if self.nsq.nsqd is None:
            raise HarnessError("no nsqd process")
        self.nsq.nsqd.resume()
        return "nsqd resumed"

    def kill_gateway(self) -> str:
        """SIGKILL the gateway and start it again on the same port and ledger."""
        old = self.gateway
        old.proc.kill()
        old.proc.wait(10)
        started = time.monotonic()
        self.gateway = wait_for(
            lambda: self._restart_gateway(old.port), 60, "the gateway to start again"
        )
        return f"gateway killed, back in {time.monotonic() - started:.1f}s"

    def _restart_gateway(self, port: int) -> Daemon | None:
        try:
            return self._start_gateway(port)
        except HarnessError as exc:
            if "address already in use" in str(exc).lower():
                return None  # the old socket is not released yet
            raise

    def restart_ledger(self) -> str:
        """Stop the ledger's database and start it again."""
        started = time.monotonic()
        self.ledger.restart()
        return f"ledger database restarted in {time.monotonic() - started:.1f}s"

    # -- state ------------------------------------------------------------------------------------

    def requeued_results(self) -> int:
        """Jobs a worker requeued because nsqd did not acknowledge their result in time (each
        worker's log, the killed ones' too, says so once per job): such a result may still
        have been stored, and the job runs again."""
        return sum(
            path.read_text(errors="replace").count(REQUEUED_RESULT)
            for path in self.work.glob("worker-*.log")
        )

    def queued_in_nsqd(self) -> int | None:
        """Jobs nsqd holds for the workers (topic depth + channel depth, in flight, deferred);
        None when nsqd does not answer."""
        try:
            topic = self.nsq.topic(DEFAULT_QUEUE)
        except (OSError, ValueError, HarnessError):
            return None
        if topic is None:
            return 0
        held = int(topic.get("depth", 0))
        for ch in topic.get("channels") or []:
            held += int(ch["depth"]) + int(ch["in_flight_count"]) + int(ch["deferred_count"])
        return held

    def outcomes_pending(self) -> int | None:
        """Outcomes nsqd still holds for the witnesses' and the ledger's channels."""
        total = 0
        try:
            for topic in OUTCOME_TOPICS:
                t = self.nsq.topic(topic)
                if t is None:
                    continue
                total += int(t.get("depth", 0))
                for ch in t.get("channels") or []:
                    if ch["channel_name"] in (CHANNEL, LEDGER_CHANNEL):
                        total += int(ch["depth"]) + int(ch["in_flight_count"])
        except (OSError, ValueError, HarnessError):
            return None
        return total
