"""Optional bearer tokens (``NSQJOBS_API_TOKENS``) for every ``/v1`` route.

``/healthz``, ``/readyz``, ``/metrics`` and ``/openapi.json`` stay open (probes, scrapers and
client generators). Each token is compared in constant time, all of them every time, so the
answer's timing says nothing about which token came close.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from nsqjobs.http.problems import Problem

PROTECTED_PREFIX = "/v1"
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="nsqjobs"'}


class Tokens:
    """The accepted tokens; :meth:`refusal` says why a request may not pass, or None."""

    __slots__ = ("_tokens",)

    def __init__(self, tokens: Sequence[str]) -> None:
        self._tokens = [t.encode() for t in tokens]

    def refusal(self, authorization: str | None) -> Problem | None:
        """None when ``authorization`` (the header's value) carries an accepted token."""
        if not authorization:
            return Problem(
                401,
                "unauthorized",
                "this gateway needs `Authorization: Bearer <token>` on /v1 routes",
                headers=dict(_CHALLENGE),
            )
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return Problem(
                401,
                "unauthorized",
                "the Authorization header must be `Bearer <token>`",
                headers={"WWW-Authenticate": 'Bearer realm="nsqjobs", error="invalid_request"'},
            )
        given = token.strip().encode("utf-8", "surrogateescape")
        ok = False
        for accepted in self._tokens:
            ok |= hmac.compare_digest(given, accepted)
        if ok:
            return None
        return Problem(
            403,
            "forbidden",
            "the bearer token is not one this gateway accepts",
        )
