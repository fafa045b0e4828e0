"""The ``nsqjobs`` commands that talk to a gateway over HTTP: ``submit``, and with the job
ledger ``status``, ``result``, ``jobs``, ``dlq list|replay|purge`` and ``cancel``.

They use the Python client (:class:`nsqjobs.client.Client`, on httpx): these commands load
neither tornado nor pynsq. The gateway is ``--gateway-url`` (else ``NSQJOBS_GATEWAY_URL``), the
bearer token ``--token`` (else ``NSQJOBS_API_TOKEN``). Every failure is one line on stderr and
a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, Final

import httpx

from nsqjobs.api import JOB_ID_PATTERN
from nsqjobs.client import Client, GatewayError, GatewayUnreachable, RetryPolicy
from nsqjobs.client.core import json_of
from nsqjobs.errors import ConfigError, NsqjobsError
from nsqjobs.ledger.store import STATUSES, UNFINISHED
from nsqjobs.names import ENV_API_TOKEN, ENV_GATEWAY_URL, MAX_JOB_ID_LENGTH, MAX_PAGE_LIMIT

# `nsqjobs result`'s exit statuses (2 is argparse's, for usage errors).
EXIT_SUCCEEDED: Final = 0
EXIT_FAILED: Final = 1  # failed, dead or cancelled
EXIT_TIMEOUT: Final = 3  # not finished within --wait
EXIT_UNKNOWN: Final = 4  # could not tell: unknown id, gateway unreachable or refusing
ERROR_WIDTH: Final = 60


class CommandFailed(NsqjobsError):
    """A command's one-line failure, with the exit status it ends with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Gateway:
    """A gateway's HTTP API, one request at a time, each tried once (a command's user sees a
    failure at once and decides)."""

    def __init__(self, url: str, token: str = "", timeout_s: float = 30.0) -> None:
        try:
            self.client = Client(url, token, timeout_s=timeout_s, retry=RetryPolicy(deadline_s=0))
            if not httpx.URL(self.client.url).host:
                raise ValueError("no host")
        except (ValueError, httpx.InvalidURL, ConfigError) as exc:
            raise CommandFailed(f"--gateway-url {url!r} is not a URL: {exc}", 2) from None
        self.url = self.client.url

    def failed(self, exc: GatewayError, exit_code: int = 1) -> CommandFailed:
        """The one-line failure for a gateway's error."""
        if isinstance(exc, GatewayUnreachable):
            return CommandFailed(
                f"cannot reach the gateway at {self.url}: {exc.__cause__ or exc}", exit_code
            )
        fields = "; ".join(f"{e.field}: {e.message}" for e in exc.errors)
        detail = exc.detail
        if exc.type.endswith((":not-found", ":method-not-allowed")):
            # A gateway without the ledger's routes (GET /v1/jobs is then POST's alone).
            detail = f"{detail} (is the gateway's job ledger on? see NSQJOBS_LEDGER_URL)"
        return CommandFailed(f"gateway answered {exc.status}: {fields or detail}", exit_code)

    def request(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        body: Any = None,
    ) -> tuple[int, Any]:
        """Status and JSON answer of a 2xx; :class:`CommandFailed` with the problem's detail
        (or its field errors) for anything else."""
        params = {k: v for k, v in (query or {}).items() if v is not None and v is not False}
        try:
            response = self.client.request(
                method, urllib.parse.quote(path), body=body, params=params or None
            )
            return response.status_code, json_of(response)
        except GatewayError as exc:
            raise self.failed(exc) from None


def add_gateway_arguments(parser: argparse.ArgumentParser, default_url: str) -> None:
    """``--gateway-url`` and ``--token``, defaulting to their environment variables."""
    parser.add_argument(
        "--gateway-url",
        default=os.environ.get(ENV_GATEWAY_URL) or default_url,
        help=f"gateway base URL [env {ENV_GATEWAY_URL}, else {default_url}]",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(ENV_API_TOKEN, ""),
        help=f"bearer token [env {ENV_API_TOKEN}; the variable keeps it out of `ps`]",
    )


def gateway(args: argparse.Namespace, timeout_s: float = 30.0) -> Gateway:
    """The gateway the command's flags name."""
    return Gateway(args.gateway_url, args.token, timeout_s)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2 if sys.stdout.isatty() else None))


# -- submit ---------------------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def json_argument(text: str) -> Any:
    """``--args``: strict JSON (no NaN, Infinity or numbers out of range, which Python's json
    would take and the gateway refuses); :class:`CommandFailed` (usage, 2) otherwise."""
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
        # A lone surrogate ("\ud800", or bytes that are not UTF-8 on the command line) has
        # no UTF-8 form: the request could not be sent.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise CommandFailed("--args is not valid JSON: nested too deeply", 2) from None
    except UnicodeEncodeError:
        message = "--args holds text that is not valid UTF-8 (a lone surrogate)"
        raise CommandFailed(message, 2) from None
    except ValueError as exc:  # json.JSONDecodeError is one
        raise CommandFailed(f"--args is not valid JSON: {exc}", 2) from None
    return value


def task_name(text: str) -> str:
    """An argparse type: a task name that can be sent (valid UTF-8; the gateway judges the
    rest, answering unknown-task)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"not valid UTF-8: {text!r}") from None
    return text


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"not a number of seconds >= 0: {text!r}")
    return value


def page_limit(text: str) -> int:
    """An argparse type: a ``--limit`` the gateway takes (1 to 1000), so a bad one is a usage
    error here rather than the gateway's 400."""
    value = int(text) if text.isascii() and text.isdigit() else 0
    if not 1 <= value <= MAX_PAGE_LIMIT:
        raise argparse.ArgumentTypeError(f"not an integer from 1 to {MAX_PAGE_LIMIT}: {text!r}")
    return value


def job_id(text: str) -> str:
    """An argparse type: a job id as the gateway takes them (1-128 of ``A-Za-z0-9._:-``, not
    ``.`` or ``..``), so a mistyped one fails here and not as an odd 404."""
    if not JOB_ID_PATTERN.fullmatch(text) or len(text) > MAX_JOB_ID_LENGTH:
        raise argparse.ArgumentTypeError(
            f"not a job id: {text!r} (1-{MAX_JOB_ID_LENGTH} of A-Za-z0-9._:-, not . or ..)"
        )
    return text


def submit(args: argparse.Namespace) -> int:
    """``nsqjobs submit TASK``: 0 accepted or succeeded, 1 failed."""
    task_args = json_argument(args.args)
    body: dict[str, Any] = {"task": args.task, "args": task_args}
    if args.id is not None:
        body["id"] = args.id
    if args.delay_ms:
        body["delay_ms"] = args.delay_ms
    query = {"wait": f"{args.wait:g}"} if args.wait else None
    status, answer = gateway(args, args.wait + 10).request("POST", "/v1/jobs", query, body)
    _print_json(answer)
    return 1 if status == 200 and answer.get("status") in ("failed", "dead", "cancelled") else 0


# -- one job --------------------------------------------------------------------------------


def _when(at: float | None) -> str:
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))


def _error(job: dict[str, Any]) -> str:
    error = job.get("error")
    if not error:
        return ""
    return f"{error.get('type')}: {error.get('message')}"


def describe(job: dict[str, Any]) -> str:
    """A job's record as aligned ``name  value`` lines."""
    lines = [
        ("id", job["id"]),
        ("task", job["task"]),
        ("status", job["status"]),
        ("attempts", str(job.get("attempts", 0))),
        ("worker", job.get("worker") or "-"),
        ("accepted", _when(job.get("accepted_at"))),
        ("started", _when(job.get("started_at"))),
        ("finished", _when(job.get("finished_at"))),
    ]
    if job.get("due_at"):
        lines.append(("due", _when(job["due_at"])))
    if job.get("dead_reason"):
        lines.append(("dead", f"{job['dead_reason']} at {_when(job.get('dead_at'))}"))
    if job.get("error"):
        lines.append(("error", _error(job)))
    for attempt in job.get("history") or []:
        err = attempt.get("error") or {}
        lines.append(
            (f"attempt {attempt.get('attempt')}", f"{err.get('type')}: {err.get('message')}")
        )
    if job.get("replays"):
        lines.append(("replays", f"{job['replays']} (earlier runs: {len(job.get('runs') or [])})"))
    if job["status"] == "succeeded":
        lines.append(("result", json.dumps(job.get("result"))))
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)


def status(args: argparse.Namespace) -> int:
    """``nsqjobs status ID``: the job as the ledger records it."""
    _, job = gateway(args).request("GET", f"/v1/jobs/{args.id}")
    print(json.dumps(job) if args.json else describe(job))
    return 0


def result(args: argparse.Namespace) -> int:
    """``nsqjobs result ID --wait S``: print the result of a job that succeeded (exit 0); a
    failed, dead or cancelled one exits 1, one still unfinished after ``--wait`` 3, a job the
    gateway cannot tell about 4."""
    gw = gateway(args)
    try:  # one long poll (POST /v1/jobs/wait), then the job as recorded
        waited = gw.client.wait([args.id], timeout=args.wait)
    except GatewayError as exc:
        raise gw.failed(exc, EXIT_UNKNOWN) from None
    if waited.unknown:
        raise CommandFailed(f"gateway answered 404: no job with id {args.id!r}", EXIT_UNKNOWN)
    try:
        _, job = gw.request("GET", f"/v1/jobs/{args.id}")
    except CommandFailed as exc:
        raise CommandFailed(str(exc), EXIT_UNKNOWN) from None
    if job["status"] in UNFINISHED:
        raise CommandFailed(
            f"job {args.id} is still {job['status']} after {args.wait:g}s", EXIT_TIMEOUT
        )
    if args.json:
        print(json.dumps(job))
    elif job["status"] == "succeeded":
        _print_json(job.get("result"))
    if job["status"] == "succeeded":
        return EXIT_SUCCEEDED
    why = _error(job) or "no error recorded"
    if job["status"] == "dead":
        why = f"{job.get('dead_reason')}, {why}"
    if not args.json:
        print(f"nsqjobs result: job {args.id} {job['status']} ({why})", file=sys.stderr)
    return EXIT_FAILED


def cancel(args: argparse.Namespace) -> int:
    """``nsqjobs cancel ID``: cancel a queued or running job."""
    _, job = gateway(args).request("DELETE", f"/v1/jobs/{args.id}")
    print(f"cancelled {job['id']}")
    return 0


# -- listings -------------------------------------------------------------------------------

Column = tuple[str, Callable[[dict[str, Any]], str]]
JOB_COLUMNS: Final[tuple[Column, ...]] = (
    ("ID", lambda j: j["id"]),
    ("TASK", lambda j: j["task"]),
    ("STATUS", lambda j: j["status"]),
    ("ATTEMPTS", lambda j: str(j.get("attempts", 0))),
    ("ACCEPTED", lambda j: _when(j.get("accepted_at"))),
    ("FINISHED", lambda j: _when(j.get("finished_at"))),
    ("ERROR", _error),
)
DEAD_COLUMNS: Final[tuple[Column, ...]] = (
    ("ID", lambda j: j["id"]),
    ("TASK", lambda j: j["task"]),
    ("REASON", lambda j: j.get("dead_reason") or "-"),
    ("ATTEMPTS", lambda j: str(j.get("attempts", 0))),
    ("DEAD", lambda j: _when(j.get("dead_at"))),
    ("REPLAYS", lambda j: str(j.get("replays", 0))),
    ("ERROR", _error),
)


def table(jobs: list[dict[str, Any]], columns: tuple[Column, ...]) -> str:
    """Jobs as a table with a header row; the error column cut to ``ERROR_WIDTH``."""
    rows = [[name for name, _ in columns]]
    for job in jobs:
        cells = [cell(job) for _, cell in columns]
        cells[-1] = (
            cells[-1] if len(cells[-1]) <= ERROR_WIDTH else cells[-1][: ERROR_WIDTH - 1] + "…"
        )
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _listing(
    args: argparse.Namespace, path: str, query: dict[str, Any], columns: Any, empty: str
) -> int:
    client = gateway(args)
    jobs: list[dict[str, Any]] = []
    cursor = args.cursor
    while True:
        _, page = client.request("GET", path, {**query, "limit": args.limit, "cursor": cursor})
        jobs += page["jobs"]
        cursor = page["next_cursor"]
        if cursor is None or not args.all:
            break
    if args.json:
        print(json.dumps({"jobs": jobs, "next_cursor": cursor}))
    elif jobs:
        print(table(jobs, columns))
    else:
        print(empty, file=sys.stderr)
    if cursor is not None and not args.json:
        print(f"more: --all, or --cursor {cursor}", file=sys.stderr)
    return 0


def jobs(args: argparse.Namespace) -> int:
    """``nsqjobs jobs [--status S] [--task T]``: jobs in the order they were accepted."""
    query = {"status": args.status, "task": args.task}
    return _listing(args, "/v1/jobs", query, JOB_COLUMNS, "no jobs")


def dlq(args: argparse.Namespace) -> int:
    """``nsqjobs dlq list|replay|purge``: dead letters from the ledger."""
    if args.action == "list":
        query = {"task": args.task}
        return _listing(args, "/v1/dead-letters", query, DEAD_COLUMNS, "no dead letters")
    if bool(args.ids) + bool(args.task) + bool(args.all) != 1:
        raise CommandFailed(
            f"dlq {args.action} needs job ids, or --task TASK, or --all (one of them)", 2
        )
    client = gateway(args)
    if args.action == "purge" and not args.yes:
        raise CommandFailed("dlq purge deletes dead jobs for good: add --yes", 2)
    if args.ids:
        return _each_dead(client, args.action, args.ids)
    query = {"task": args.task, "limit": args.limit}
    if args.action == "replay":
        ids = client.request("POST", "/v1/dead-letters/replay", query)[1]["ids"]
        print(f"replayed {len(ids)}" + (f": {' '.join(ids)}" if ids else ""))
        return 0
    purged = client.request("DELETE", "/v1/dead-letters", query)[1]["purged"]
    print(f"purged {purged}")
    return 0


def _each_dead(client: Gateway, action: str, ids: list[str]) -> int:
    """Replay or purge dead jobs one id at a time: every id is tried, what was done is printed
    (``replayed 2: a1 a7``), and each failure is one line on stderr; exit 1 when any failed."""
    done: list[str] = []
    failed = False
    for i in ids:
        try:
            if action == "replay":
                client.request("POST", f"/v1/dead-letters/{i}/replay")
            else:
                client.request("DELETE", f"/v1/dead-letters/{i}")
        except CommandFailed as exc:
            failed = True
            print(f"nsqjobs dlq: {exc}", file=sys.stderr)
            continue
        done.append(i)
    if done:
        verb = "replayed" if action == "replay" else "purged"
        print(f"{verb} {len(done)}: {' '.join(done)}")
    return 1 if failed else 0


# -- the parsers ----------------------------------------------------------------------------


def add_commands(sub: Any, default_url: str) -> None:
    """The ledger's commands, on the ``nsqjobs`` subcommand parsers ``sub``."""
    st = sub.add_parser(
        "status",
        help="show a job as the ledger records it",
        description="Show a job's status, attempts, errors, timestamps and result.",
    )
    st.add_argument("id", type=job_id, help="job id")
    st.add_argument("--json", action="store_true", help="print the record as JSON")
    add_gateway_arguments(st, default_url)

    rs = sub.add_parser(
        "result",
        help="wait for a job's outcome and print its result",
        description="Wait up to --wait seconds for the job to finish. Exit status: 0 "
        "succeeded (its result printed as JSON), 1 failed, dead or cancelled, 2 usage, 3 "
        "still unfinished after --wait, 4 unknown job or gateway unreachable.",
    )
    rs.add_argument("id", type=job_id, help="job id")
    rs.add_argument("--wait", type=seconds, default=0.0, help="seconds to wait [default 0]")
    rs.add_argument("--json", action="store_true", help="print the whole record as JSON")
    add_gateway_arguments(rs, default_url)

    jb = sub.add_parser(
        "jobs",
        help="list jobs from the ledger",
        description="List jobs in the order they were accepted, as a table (or --json).",
    )
    jb.add_argument("--status", choices=STATUSES, help="only jobs with this status")
    _listing_arguments(jb, default_url)

    cn = sub.add_parser(
        "cancel",
        help="cancel a job that has not finished",
        description="Cancel a queued or running job: workers skip it.",
    )
    cn.add_argument("id", type=job_id, help="job id")
    add_gateway_arguments(cn, default_url)

    dl = sub.add_parser(
        "dlq",
        help="list, replay or purge dead letters",
        description="Dead letters from the ledger: list them, replay them (run again with a "
        "fresh history), purge them.",
    )
    actions = dl.add_subparsers(dest="action", required=True)
    _listing_arguments(actions.add_parser("list", help="list dead jobs, oldest first"), default_url)
    for action, text in (
        ("replay", "replay dead jobs (by id, by --task, or --all)"),
        ("purge", "delete dead jobs for good (by id, by --task, or --all; needs --yes)"),
    ):
        ap = actions.add_parser(action, help=text, description=text[0].upper() + text[1:] + ".")
        ap.add_argument("ids", nargs="*", type=job_id, help="job ids")
        ap.add_argument("--task", help="every dead job of this task (up to --limit)")
        ap.add_argument("--all", action="store_true", help="every dead job (up to --limit)")
        ap.add_argument("--limit", type=page_limit, default=1000, help="at most this many [1000]")
        if action == "purge":
            ap.add_argument("--yes", action="store_true", help="yes, delete them")
        add_gateway_arguments(ap, default_url)


def _listing_arguments(parser: argparse.ArgumentParser, default_url: str) -> None:
    parser.add_argument("--task", help="only jobs of this task")
    parser.add_argument("--limit", type=page_limit, default=100, help="jobs per page [100]")
    parser.add_argument("--all", action="store_true", help="every page, not just the first")
    parser.add_argument("--cursor", help="start at this page (from an earlier listing)")
    parser.add_argument("--json", action="store_true", help="print JSON, not a table")
    add_gateway_arguments(parser, default_url)


COMMANDS: Final[dict[str, Callable[[argparse.Namespace], int]]] = {
    "submit": submit,
    "status": status,
    "result": result,
    "jobs": jobs,
    "cancel": cancel,
    "dlq": dlq,
}
