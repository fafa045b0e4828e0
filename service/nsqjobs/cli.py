"""The ``nsqjobs`` command: ``gateway``, ``worker``, ``exporter``, ``check``, and the gateway's
clients ``submit``, ``status``, ``result``, ``jobs``, ``dlq`` and ``cancel`` (``nsqjobs.commands``).

Every daemon flag mirrors an ``NSQJOBS_*`` variable (see ``nsqjobs.config``). Errors print one
line to stderr and exit non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import logging
import os
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Coroutine, Sequence
from typing import Any, NoReturn, TypeVar

from nsqjobs import commands, config
from nsqjobs.errors import NsqjobsError
from nsqjobs.names import ENV_EVENT_LOOP, ENV_SUPERVISOR, GATEWAY_PORT
from nsqjobs.registry import load_task_modules, registry, task_modules
from nsqjobs.version import __version__

log = logging.getLogger("nsqjobs")
T = TypeVar("T")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s",
    )
    # pynsq logs every connection detail at INFO; keep its warnings and errors.
    logging.getLogger("nsq").setLevel(
        logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING
    )
    logging.getLogger("tornado.access").setLevel(logging.WARNING)


async def _until_signalled(run: Any, cfg: Any) -> Any:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    hits = 0

    def on_signal(signum: int) -> None:
        nonlocal hits
        hits += 1
        if hits > 1:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return await run(cfg, registry, stop)


def run_event_loop(main: Coroutine[Any, Any, T], event_loop: str | None = None) -> T:
    """Run ``main`` on uvloop when it is installed (tornado and pynsq run on any asyncio loop).

    ``event_loop="asyncio"`` (a daemon's ``--event-loop``; None: ``NSQJOBS_EVENT_LOOP``) forces
    the standard loop.
    """
    if event_loop is None:
        event_loop = os.environ.get(ENV_EVENT_LOOP, "uvloop")
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def _daemon(kind: type[Any], run: Any, args: argparse.Namespace) -> int:
    cfg = config.load(kind, args)
    _setup_logging(cfg.log_level)
    modules = task_modules(cfg.task_module, debug=cfg.debug_tasks)
    load_task_modules(modules)
    if not len(registry):
        raise NsqjobsError(f"no tasks registered by {', '.join(modules)}")
    log.info("tasks from %s: %s", ", ".join(modules), ", ".join(t.name for t in registry))
    result = run_event_loop(_until_signalled(run, cfg), cfg.event_loop)
    if isinstance(result, int) and result:
        # Abandoned jobs are back in nsqd; their executor threads cannot be killed, and
        # waiting for them would outlast the grace period.
        logging.shutdown()
        os._exit(0)
    return 0


def _exporter(args: argparse.Namespace) -> int:
    from nsqjobs.exporter.daemon import serve as serve_exporter

    cfg = config.load(config.ExporterConfig, args)
    _setup_logging(cfg.log_level)
    # The exporter runs no tasks: the registry _until_signalled passes is not needed.
    run_event_loop(
        _until_signalled(lambda cfg, _tasks, stop: serve_exporter(cfg, stop), cfg), cfg.event_loop
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    """GET ``args.url``: 0 on 2xx, else 1 with one line why (container health checks; no curl);
    2 for a URL that is not one."""
    try:
        parts = urllib.parse.urlsplit(args.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("it needs http:// or https:// and a host")
        parts.port  # noqa: B018  # raises ValueError for a port that is not a number
    except ValueError as exc:
        raise commands.CommandFailed(f"{args.url!r} is not a URL to check: {exc}", 2) from None
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as resp:
            resp.read()
    except urllib.error.HTTPError as exc:
        raise NsqjobsError(f"{args.url} answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        # HTTPException: something answered that is not HTTP (BadStatusLine...).
        raise NsqjobsError(f"cannot reach {args.url}: {exc!r}") from None
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (what was wrong, and where --help is) instead
    of the usage block then the error: every nsqjobs error is one line on stderr."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = _Parser(prog="nsqjobs", description=__doc__)
    parser.add_argument("--version", action="version", version=f"nsqjobs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gw = sub.add_parser(
        "gateway",
        help="run the HTTP gateway",
        description="Accept jobs over HTTP and publish them to nsqd.",
    )
    config.add_arguments(gw, config.GatewayConfig)

    wk = sub.add_parser(
        "worker",
        help="run a worker",
        description="Consume jobs from nsqd, run them, publish results.",
    )
    config.add_arguments(wk, config.WorkerConfig)

    ex = sub.add_parser(
        "exporter",
        help="run the nsqd metrics exporter",
        description="Serve nsqd's topic and channel stats as Prometheus metrics, read on scrape.",
    )
    config.add_arguments(ex, config.ExporterConfig)

    port_var = config.env_var(config.GatewayConfig, "port")
    ck = sub.add_parser(
        "check",
        help="exit 0 when a health URL answers 2xx (for container health checks)",
        description="GET a URL; exit 0 on 2xx, 1 with a one-line reason otherwise.",
    )
    ck.add_argument(
        "url",
        nargs="?",
        default=f"http://127.0.0.1:{os.environ.get(port_var) or GATEWAY_PORT}/readyz",
        help=f"URL to check [default http://127.0.0.1:${port_var}/readyz]",
    )
    ck.add_argument(
        "--timeout", type=commands.seconds, default=3.0, help="seconds to wait for the answer"
    )

    sm = sub.add_parser(
        "submit",
        help="submit one job to a gateway and print the answer",
        description="Submit a job over HTTP; with --wait, print its result.",
    )
    sm.add_argument("task", type=commands.task_name, help="task name, e.g. primes.count")
    sm.add_argument("--args", default="{}", help="task arguments as JSON, e.g. '{\"start\": 0}'")
    sm.add_argument(
        "--wait", type=commands.seconds, default=0.0, help="seconds to wait for the result"
    )
    sm.add_argument("--id", type=commands.job_id, default=None, help="job id (default: generated)")
    sm.add_argument("--delay-ms", type=int, default=0, help="deliver after this delay")
    default_url = f"http://127.0.0.1:{os.environ.get(port_var) or GATEWAY_PORT}"
    commands.add_gateway_arguments(sm, default_url)
    commands.add_commands(sub, default_url)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nsqjobs`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "gateway":
            # Daemons are imported here, not at the top: `nsqjobs --help` and `nsqjobs submit`
            # never load tornado, pynsq or numba.
            from nsqjobs.gateway.app import serve as serve_gateway

            return _daemon(config.GatewayConfig, serve_gateway, args)
        if args.command == "worker":
            from nsqjobs.worker.daemon import serve as serve_worker

            return _daemon(config.WorkerConfig, serve_worker, args)
        if args.command == "exporter":
            return _exporter(args)
        if args.command == "check":
            return _check(args)
        return commands.COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"nsqjobs {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`nsqjobs jobs | head`): end quietly, as a shell tool does on
        # SIGPIPE, and point stdout at /dev/null so the flush at exit does not complain too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except (NsqjobsError, ImportError, OSError) as exc:
        # One line, even when the error's own text has several (msgspec's, a task module's).
        lines = (line.strip() for line in str(exc).splitlines())
        reason = f"nsqjobs {args.command}: {' '.join(line for line in lines if line)}"
        print(reason, file=sys.stderr)
        if os.environ.get(ENV_SUPERVISOR) and args.command in ("gateway", "worker", "exporter"):
            # Under supervisord (which sets SUPERVISOR_ENABLED) the reason also goes to its
            # event listeners as PROCESS_COMMUNICATION: the local stack's watchdog stops the
            # stack with it.
            print(f"<!--XSUPERVISOR:BEGIN-->{reason}<!--XSUPERVISOR:END-->", flush=True)
        return exc.exit_code if isinstance(exc, commands.CommandFailed) else 1


if __name__ == "__main__":
    sys.exit(main())
