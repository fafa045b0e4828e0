"""Baseline consumer: a bare pynsq Reader whose handler only FINs (returns True).

Run in its own process by the dispatch benchmark, against the same nsqd and the same pre-filled
messages as one ``nsqjobs worker``:

    python -m bench.bare_reader --nsqd-tcp-address 127.0.0.1:4150 --topic T --channel C \
        --max-in-flight 64

It stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Sequence
from typing import Any

import nsq
from nsqjobs.cli import run_event_loop


def _fin(_message: Any) -> bool:
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Consume ``--topic``/``--channel`` until signalled."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsqd-tcp-address", required=True, help="HOST:PORT of nsqd")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--max-in-flight", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # The same event loop as the worker, so the ratio measures the worker's own work.
    run_event_loop(_consume(args))
    return 0


async def _consume(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reader = nsq.Reader(
        topic=args.topic,
        channel=args.channel,
        message_handler=_fin,
        nsqd_tcp_addresses=[args.nsqd_tcp_address],
        max_in_flight=args.max_in_flight,
        max_tries=0,  # as the worker: no give-up logic in the client
    )
    await stop.wait()
    reader.close()


if __name__ == "__main__":
    raise SystemExit(main())
