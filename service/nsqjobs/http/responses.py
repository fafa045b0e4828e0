"""Whole responses written straight to a tornado ``HTTPConnection``, for message delegates that
answer without a RequestHandler (the gateway's job routes)."""

from __future__ import annotations

import time
from http import HTTPStatus
from typing import Final

import tornado.httputil

JSON_HEADERS: Final = {"Content-Type": "application/json"}

_REASONS: Final = {s.value: s.phrase for s in HTTPStatus}
_date_cache: list[int | str] = [0, ""]


def http_date() -> str:
    """The Date header (RFC 9110 asks origin servers for one), formatted once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0], _date_cache[1] = now, tornado.httputil.format_timestamp(now)
    return str(_date_cache[1])


def write_response(
    conn: tornado.httputil.HTTPConnection,
    status: int,
    headers: dict[str, str],
    body: bytes,
    *,
    head: bool = False,
) -> None:
    """Write status, ``headers`` (Content-Type among them), Date, Content-Length and ``body``,
    and finish the response. The answer to a HEAD request (``head``) has no body, only the
    Content-Length of the one it would have had (RFC 9110)."""
    out = tornado.httputil.HTTPHeaders()
    out["Date"] = http_date()
    for name, value in headers.items():
        out[name] = value
    out["Content-Length"] = str(len(body))
    conn.write_headers(
        tornado.httputil.ResponseStartLine("HTTP/1.1", status, _REASONS[status]),
        out,
        b"" if head else body,
    )
    conn.finish()
