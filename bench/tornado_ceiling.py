"""Reference server: the most one tornado process answers here, doing nothing per request.

``POST /v1/jobs`` answers 202 with a canned body the size of the gateway's answer, without
reading the JSON or publishing; ``GET /ping`` answers 200. The gateway benchmark measures it
next to the gateway and nsqd so the gateway's rate can be read against its framework's ceiling.

    python -m bench.tornado_ceiling --port 8089
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence

import tornado.web
from nsqjobs.cli import run_event_loop

ANSWER = b'{"id":"00000000000000000000000000000000","task":"noop","status":"queued"}'


class Accept(tornado.web.RequestHandler):
    """A canned 202."""

    def check_xsrf_cookie(self) -> None:
        return None

    def post(self) -> None:
        """Answer as the gateway would, without doing the work."""
        self.set_status(202)
        self.set_header("Content-Type", "application/json")
        self.finish(ANSWER)


class Ping(tornado.web.RequestHandler):
    """Readiness."""

    def get(self) -> None:
        """200 OK."""
        self.finish(b"OK")


async def serve(port: int) -> None:
    """Listen on 127.0.0.1:``port`` until SIGTERM or SIGINT."""
    app = tornado.web.Application(
        [(r"/v1/jobs", Accept), (r"/ping", Ping)], log_function=lambda _h: None
    )
    server = app.listen(port, "127.0.0.1")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the reference server."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    # The same event loop as the gateway, so the reference isolates the gateway's own work.
    run_event_loop(serve(parser.parse_args(argv).port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
