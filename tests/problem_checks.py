"""The shape every error answer must have: RFC 9457 problem+json with a stable ``type``."""

from __future__ import annotations

from typing import Any


def check_problem(
    status: int, headers: dict[str, str], body: object, expect: int, slug: str
) -> dict[str, Any]:
    """Assert ``status``/``headers``/``body`` (as ``nsqjobs.testing.http`` returns them) are the
    problem ``slug`` with status ``expect``; returns the body."""
    assert status == expect, body
    assert headers["Content-Type"] == "application/problem+json", headers
    assert headers.get("Date", "").endswith(" GMT"), headers  # RFC 9110: origin servers date
    assert isinstance(body, dict), body
    assert body["type"] == f"urn:nsqjobs:problem:{slug}" and body["status"] == expect, body
    assert body["title"] and body["detail"], body
    return body
