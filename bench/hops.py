"""What one hop costs at light load on this machine: ``python -m bench.hops``.

A job's latency at 50 jobs/s is mostly the hops it takes (README, "Against the peers"): this
measures the two kinds, paced like the latency benchmarks (one every 20 ms, so every hop wakes
a sleeping process or thread): a round trip between two processes over loopback TCP (64 bytes
each way, ``TCP_NODELAY``), and a handover to a thread and back (two ``queue.SimpleQueue``s).
Prints p50 and p99 in microseconds; nothing is written.
"""

from __future__ import annotations

import multiprocessing
import queue
import socket
import statistics
import threading
import time
from collections.abc import Callable

from bench.procs import paced

RATE = 50.0
SAMPLES = 400


def _echo(ports: multiprocessing.Queue[int]) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    ports.put(server.getsockname()[1])
    conn, _ = server.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(4096):
        conn.sendall(data)


def timed(fn: Callable[[], object], n: int = SAMPLES, rate: float = RATE) -> str:
    """``fn`` ``n`` times at ``rate`` per second; its p50 and p99 in microseconds."""
    took: list[float] = []
    for _ in paced(n, rate):
        t = time.perf_counter()
        fn()
        took.append((time.perf_counter() - t) * 1e6)
    q = statistics.quantiles(took, n=100)
    return f"p50 {q[49]:.0f} us, p99 {q[98]:.0f} us"


def main() -> None:
    """Print both measurements."""
    ports: multiprocessing.Queue[int] = multiprocessing.Queue()
    echo = multiprocessing.Process(target=_echo, args=(ports,), daemon=True)
    echo.start()
    with socket.create_connection(("127.0.0.1", ports.get(timeout=30))) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def round_trip() -> None:
            conn.sendall(b"x" * 64)
            conn.recv(4096)

        print(f"process round trip over loopback (two hops): {timed(round_trip)}")
    echo.terminate()
    jobs: queue.SimpleQueue[int] = queue.SimpleQueue()
    done: queue.SimpleQueue[int] = queue.SimpleQueue()

    def worker() -> None:
        while True:
            done.put(jobs.get())

    threading.Thread(target=worker, daemon=True).start()

    def handover() -> None:
        jobs.put(1)
        done.get()

    print(f"thread handover and back (two handovers): {timed(handover)}")


if __name__ == "__main__":
    main()
