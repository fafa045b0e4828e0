"""The query parameters of the ledger's routes, checked strictly, and their opaque cursors.

Every parameter is given at most once, known to its route and well-formed, or the request is a
400 problem naming each bad one in ``errors`` (``query.<name>``). A cursor is handed out by one
listing and is good only for that listing with the same filters.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Final

from nsqjobs.http.problems import Problem
from nsqjobs.ledger import STATUSES, JobStatus
from nsqjobs.names import MAX_PAGE_LIMIT

MAX_LIMIT: Final = MAX_PAGE_LIMIT
DEFAULT_PAGE: Final = 100
MAX_TASK_LENGTH: Final = 200


@dataclass(frozen=True, slots=True)
class Query:
    """What a ledger route was asked: filters, a page size, and the store's cursor."""

    status: JobStatus | None = None
    task: str | None = None
    limit: int = DEFAULT_PAGE
    after: str | None = None


def parse_query(
    arguments: dict[str, list[bytes]],
    allowed: tuple[str, ...],
    *,
    listing: str = "",
    default_limit: int = DEFAULT_PAGE,
    status: JobStatus | None = None,
) -> Query:
    """The query of one request; ``allowed`` names its parameters (any other is refused),
    ``listing`` names the listing whose cursors it takes, ``status`` is the status a route
    lists (a fixed filter, part of its cursors)."""
    errors: list[dict[str, str]] = []
    values: dict[str, str] = {}
    for name, raw in arguments.items():
        field = f"query.{name}"
        if name not in allowed:
            known = ", ".join(allowed) if allowed else "none"
            errors.append({"field": field, "message": f"unknown parameter (known: {known})"})
        elif len(raw) > 1:
            errors.append({"field": field, "message": "given more than once"})
        else:
            try:
                values[name] = raw[0].decode("utf-8")
            except UnicodeDecodeError:
                errors.append({"field": field, "message": "not UTF-8"})
    wanted = values.get("status")
    if wanted is not None:
        matched = [s for s in STATUSES if s == wanted]
        if matched:
            status = matched[0]
        else:
            errors.append({"field": "query.status", "message": f"one of {', '.join(STATUSES)}"})
    task = values.get("task")
    if task is not None and not 1 <= len(task) <= MAX_TASK_LENGTH:
        errors.append(
            {"field": "query.task", "message": f"a task name of 1-{MAX_TASK_LENGTH} characters"}
        )
    limit = default_limit
    text = values.get("limit")
    if text is not None:
        # Short before int(): Python refuses to convert more than 4,300 digits (ValueError).
        if text.isascii() and text.isdigit() and len(text) <= 9 and 1 <= int(text) <= MAX_LIMIT:
            limit = int(text)
        else:
            errors.append({"field": "query.limit", "message": f"an integer from 1 to {MAX_LIMIT}"})
    after = None
    text = values.get("cursor")
    if text is not None and not errors:
        after = _open_cursor(text, listing, status, task)
        if after is None:
            errors.append(
                {
                    "field": "query.cursor",
                    "message": "not a cursor this listing gave out with these filters",
                }
            )
    if errors:
        raise bad_query(errors)
    return Query(status=status, task=task, limit=limit, after=after)


def bad_query(errors: list[dict[str, str]]) -> Problem:
    """The 400 for bad query parameters."""
    names = ", ".join(e["field"].removeprefix("query.") for e in errors)
    return Problem(400, "bad-query", f"bad query parameter(s): {names}", errors=errors)


def make_cursor(listing: str, query: Query, after: str | None) -> str | None:
    """The cursor of the page after this one (None: this was the last page)."""
    if after is None:
        return None
    packed = json.dumps([listing, query.status, query.task, after], separators=(",", ":"))
    return base64.urlsafe_b64encode(packed.encode()).decode().rstrip("=")


def _open_cursor(
    cursor: str, listing: str, status: JobStatus | None, task: str | None
) -> str | None:
    """The store's cursor inside ``cursor`` when this listing gave it out for these filters."""
    try:
        packed = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        fields = json.loads(packed)
    except (binascii.Error, ValueError, RecursionError):  # RecursionError: nested too deep
        return None
    if not isinstance(fields, list) or len(fields) != 4 or not isinstance(fields[3], str):
        return None
    if fields[:3] != [listing, status, task]:
        return None
    return fields[3]
