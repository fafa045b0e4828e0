"""The base of every tornado RequestHandler we serve: JSON out, every error as problem+json.

A 405 names the methods the handler implements in ``Allow``; an unknown path gets
:class:`NotFoundHandler`'s problem+json 404 instead of tornado's HTML page.
"""

from __future__ import annotations

from typing import Any

import msgspec
import tornado.web

from nsqjobs.http.problems import Problem, method_not_allowed, render_problem, status_problem

_json = msgspec.json.Encoder()


class ProblemHandler(tornado.web.RequestHandler):
    """JSON answers and problem+json errors; ``route`` labels its request metrics."""

    route = "unmatched"

    def check_xsrf_cookie(self) -> None:  # an API, never a browser form
        return None

    def write_json(self, status: int, body: Any) -> None:
        """Finish with a JSON body."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(_json.encode(body))

    @classmethod
    def allowed_methods(cls) -> list[str]:
        """The methods this handler implements (what a 405's ``Allow`` names): HEAD with GET."""
        base = tornado.web.RequestHandler
        implemented = [
            method
            for method in cls.SUPPORTED_METHODS
            if method != "HEAD"
            and getattr(cls, method.lower(), None) is not getattr(base, method.lower(), None)
        ]
        return [*implemented, "HEAD"] if "GET" in implemented else implemented

    async def head(self, *args: str, **kwargs: str) -> None:
        """HEAD wherever GET is served (RFC 9110): the GET's status and headers, and no body
        (tornado sends none for HEAD)."""
        if "GET" not in self.allowed_methods():
            raise tornado.web.HTTPError(405)
        answered = self.get(*args, **kwargs)
        if answered is not None:
            await answered

    def prepare(self) -> None:
        """Refuse a body over the application's ``max_body_bytes`` setting (the gateway's
        ``NSQJOBS_MAX_BODY_BYTES``: the HTTP server's own cap is far above it)."""
        limit = self.settings.get("max_body_bytes")
        if limit is not None and len(self.request.body) > limit:
            raise Problem(413, "payload-too-large", f"body is over the {limit}-byte limit")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Render any error with :func:`render_problem`, as every route does."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        method = self.request.method or "-"
        if status_code == 405 and not isinstance(exc, Problem):
            problem = method_not_allowed(method, self.allowed_methods())
        else:
            problem = status_problem(status_code, exc, method)
        status, headers, body = render_problem(problem)
        if status != status_code:
            self.set_status(status)
        for name, value in headers.items():
            self.set_header(name, value)
        self.finish(body)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Expected problems are not stack traces."""
        if isinstance(value, Problem) and value.status_code < 500:
            return
        super().log_exception(typ, value, tb)


class NotFoundHandler(ProblemHandler):
    """Any unknown path: a problem+json 404 (tornado's default is an HTML page)."""

    # Every method reaches prepare (tornado answers 405 first for one not listed here).
    SUPPORTED_METHODS = (*tornado.web.RequestHandler.SUPPORTED_METHODS, "TRACE", "CONNECT")

    def prepare(self) -> None:
        """Refuse before the method is looked at: no route, whatever the method."""
        raise Problem(404, "not-found", f"no route {self.request.path}")
