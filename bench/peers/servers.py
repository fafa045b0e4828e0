"""The peers' brokers as the benchmark's own processes: Redis and RabbitMQ from Debian's packages,
each on free loopback ports with a temporary data directory, stopped when the stack unwinds.

Nothing here uses a system service: a broker that apt started is neither needed nor touched.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from nsqjobs.testing import HarnessError, Proc, free_port, spawn, wait_for

# Debian's rabbitmq-server in /usr/sbin is a wrapper that switches to the rabbitmq user and its
# /var/lib/rabbitmq; the script under /usr/lib runs the node as we are, with our directories.
RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
APT_HINT = "apt-get install -y redis-server rabbitmq-server"


@dataclass(frozen=True)
class Broker:
    """One running broker: its URL, its version, and the process behind it."""

    name: str
    url: str
    version: str
    proc: Proc


def have_redis() -> bool:
    """True when ``redis-server`` is on PATH."""
    return shutil.which("redis-server") is not None


def have_rabbitmq() -> bool:
    """True when Debian's RabbitMQ server script and ``epmd`` are installed."""
    return RABBITMQ_SERVER.exists() and shutil.which("epmd") is not None


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_redis(stack: ExitStack, work: Path) -> Broker:
    """A ``redis-server`` on a free port: no persistence, data dir under ``work``."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise HarnessError(f"redis-server not found ({APT_HINT})")
    data = work / "redis"
    data.mkdir()
    port = free_port()
    argv = [exe, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data)]
    argv += ["--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"]
    proc = spawn(argv, work / "redis.log", name="redis-server", stack=stack)
    url = f"redis://127.0.0.1:{port}/0"

    def answers() -> bool | None:
        proc.check_alive()
        return _port_open(port) or None

    wait_for(answers, 20.0, "redis-server to accept connections")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False).stdout
    version = next((w[2:] for w in out.split() if w.startswith("v=")), "?")
    return Broker("redis", url, version, proc)


def start_rabbitmq(stack: ExitStack, work: Path) -> Broker:
    """A RabbitMQ node of our own: its own epmd, node name, AMQP and distribution ports, Mnesia
    and log directories and Erlang cookie (``HOME``), so it collides with no other node."""
    epmd_exe = shutil.which("epmd")
    if not RABBITMQ_SERVER.exists() or epmd_exe is None:
        raise HarnessError(f"RabbitMQ not installed ({APT_HINT})")
    base = work / "rabbitmq"
    for sub in ("home", "mnesia", "log"):
        (base / sub).mkdir(parents=True)
    (base / "enabled_plugins").write_text("[].\n")
    epmd_port, amqp_port, dist_port = free_port(), free_port(), free_port()
    node = f"nsqjobs-bench-{os.getpid()}@localhost"
    env = {
        "HOME": str(base / "home"),
        "ERL_EPMD_PORT": str(epmd_port),
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(amqp_port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
        "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
    }
    (base / "rabbitmq-env.conf").write_text("")
    (base / "rabbitmq.conf").write_text("loopback_users = none\n")
    # epmd first, as our process: otherwise the node would start one that outlives the run.
    epmd = spawn(
        [epmd_exe, "-port", str(epmd_port), "-address", "127.0.0.1"],
        base / "epmd.log",
        name="epmd",
        stack=stack,
    )

    def epmd_listens() -> bool | None:
        epmd.check_alive()
        return _port_open(epmd_port) or None

    wait_for(epmd_listens, 10.0, "epmd to listen")
    proc = spawn([str(RABBITMQ_SERVER)], base / "rabbitmq.log", name="rabbitmq", env=env)
    stack.callback(proc.stop, 30.0)

    def answers() -> bool | None:
        proc.check_alive()
        return _port_open(amqp_port) or None

    wait_for(answers, 90.0, "RabbitMQ to accept AMQP connections")
    found = sorted(p.name for p in Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*"))
    version = found[-1].rpartition("-")[2] if found else "?"
    return Broker("rabbitmq", f"amqp://guest:guest@127.0.0.1:{amqp_port}/", version, proc)
