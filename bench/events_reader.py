"""The ledger's part in ``bench.started``: reads the started topic, decodes every message and
counts the events, like the ledger's reader (which also writes them to its store).

    python -m bench.events_reader --nsqd-tcp-address 127.0.0.1:4150 --count-file PATH

On SIGTERM or SIGINT it writes the number of events read to ``--count-file`` and stops.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nsq
from nsqjobs import wire
from nsqjobs.cli import run_event_loop
from nsqjobs.names import LEDGER_CHANNEL, STARTED_TOPIC

MAX_IN_FLIGHT = 500  # as nsqjobs.ledger.outcomes


def main(argv: Sequence[str] | None = None) -> int:
    """Read started events until signalled; write their count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nsqd-tcp-address", required=True, help="HOST:PORT of nsqd")
    parser.add_argument("--count-file", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run_event_loop(_read(args))
    return 0


async def _read(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    count = 0

    def handle(message: Any) -> bool:
        nonlocal count
        count += len(wire.decode_started(message.body))
        return True

    reader = nsq.Reader(
        topic=STARTED_TOPIC,
        channel=LEDGER_CHANNEL,
        message_handler=handle,
        nsqd_tcp_addresses=[args.nsqd_tcp_address],
        max_in_flight=MAX_IN_FLIGHT,
        max_tries=0,
    )
    await stop.wait()
    reader.close()
    args.count_file.write_text(f"{count}\n")


if __name__ == "__main__":
    raise SystemExit(main())
