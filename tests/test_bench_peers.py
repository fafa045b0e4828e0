"""The peers benchmark's harness, small: nsqjobs and RQ through every measurement with nothing
lost, and a RabbitMQ node of our own that starts and stops cleanly (``python -m bench.peers``
is the real run). Skips without redis-server, RabbitMQ or the bench-peers extra on a laptop;
fails when ``CI`` is set."""

from __future__ import annotations

import importlib
import os
from contextlib import ExitStack
from pathlib import Path

import pytest
from nsqjobs.testing import start_nsq

from bench.peers import measure, servers, table
from bench.peers.base import Peer, WorkerRun

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(90)]
IN_CI = bool(os.environ.get("CI"))


def _need(ok: bool, what: str) -> None:
    if ok:
        return
    if IN_CI:
        pytest.fail(f"{what} is missing", pytrace=False)
    pytest.skip(f"{what} is missing")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _every_measurement(peer: Peer, work: Path) -> dict[str, dict[str, object]]:
    def run(kind: str, impl: str = "python") -> WorkerRun:
        return WorkerRun(work / f"marks-{peer.key}-{kind}", work, impl)

    assert measure.enqueue_rate(peer, run("enqueue"), 50, bulk=True) > 0
    drain = measure.drain(peer, run("drain"), 200)
    assert (drain.lost, drain.duplicated, drain.results_stored) == (0, 0, 200), peer.key
    latency = measure.latency(peer, run("latency"), 50.0, 0.4)
    assert (latency.jobs, latency.lost, latency.duplicated) == (20, 0, 0), peer.key
    assert 0 < latency.p50_ms <= latency.p99_ms
    cpu = measure.cpu(peer, run("cpu", "cython"), 4)
    assert (cpu.lost, cpu.duplicated, cpu.results_stored) == (0, 0, 4), peer.key
    return {
        "drain_results": {
            "rate": drain.rate,
            "lost": 0,
            "duplicated": 0,
            "jobs": 200,
            "results_stored": drain.results_stored,
        },
        "latency": {
            "p50_ms": latency.p50_ms,
            "p90_ms": latency.p90_ms,
            "p99_ms": latency.p99_ms,
            "lost": 0,
            "duplicated": 0,
        },
    }


def test_nsqjobs_and_rq_through_every_measurement(tmp_path: Path) -> None:
    _need(servers.have_redis(), "redis-server (apt-get install redis-server)")
    _need(_importable("rq"), "the bench-peers extra (pip install -e '.[bench-peers]')")
    from bench.peers import nsqjobs_peer, rq_peer

    with ExitStack() as stack:
        ours = nsqjobs_peer.peer(stack, start_nsq(stack, tmp_path), tmp_path)
        stack.callback(ours.close)
        rq = rq_peer.peer(servers.start_redis(stack, tmp_path).url, forking=False)
        stack.callback(rq.close)
        rounds = [{p.key: _every_measurement(p, tmp_path) for p in (ours, rq)}]
        peers = table.describe([ours, rq])
    summary = table.summarise(rounds, ["nsqjobs", "rq"])
    assert summary["rq"]["drain_results"]["ratio_to_nsqjobs"] > 0
    header = {
        "command": "test",
        "date": "now",
        "cpu_model": "?",
        "cores": 1,
        "python": "3",
        "sizes": measure.Sizes.quick().__dict__,
        "duration_s": 1,
        "load_average": [[0, 0, 0]],
        "primes_in_process_s": {"python": 0.4, "cython": 0.004},
        "peers": peers,
    }
    text = table.markdown(header, summary)
    assert "| RQ (SimpleWorker) |" in text
    assert "| RQ (SimpleWorker) | drain_results | 0 | 0 | 200 of 200 |" in text


def test_rabbitmq_of_our_own_starts_and_stops(tmp_path: Path) -> None:
    _need(servers.have_rabbitmq(), "RabbitMQ (apt-get install rabbitmq-server)")
    _need(_importable("pika"), "the bench-peers extra (pip install -e '.[bench-peers]')")
    import pika

    with ExitStack() as stack:
        broker = servers.start_rabbitmq(stack, tmp_path)
        connection = pika.BlockingConnection(pika.URLParameters(broker.url))
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_declare("bench-smoke")
        channel.basic_publish("", "bench-smoke", b"x")
        assert channel.queue_declare("bench-smoke", passive=True).method.message_count == 1
        connection.close()
        procs = [broker.proc]
    assert all(not p.alive() for p in procs)
    assert broker.version.count(".") == 2
