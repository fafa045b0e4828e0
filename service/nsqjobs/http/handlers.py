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
        """The methods this handler implements (what a 405's ``Allow`` names)."""
        base = tornado.web.RequestHandler
        return [
            method
            for method in cls.SUPPORTED_METHODS
            if getattr(cls, method.lower(), None) is not getattr(base, method.lower(), None)
        ]

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

    def prepare(self) -> None:
        """Refuse before the method is looked at: no route, whatever the method."""
        raise Problem(404, "not-found", f"no route {self.request.path}")
