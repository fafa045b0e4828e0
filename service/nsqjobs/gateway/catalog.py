"""``GET /v1/tasks`` and ``GET /openapi.json``: what a client can submit, and in which shape."""

from __future__ import annotations

from typing import Any

from nsqjobs.http.handlers import ProblemHandler
from nsqjobs.registry import Registry


class TasksHandler(ProblemHandler):
    """``GET /v1/tasks``: the catalog with each task's argument JSON Schema."""

    route = "/v1/tasks"

    def initialize(self, registry: Registry) -> None:
        self.registry = registry

    def get(self) -> None:
        """List the registered tasks."""
        self.write_json(
            200,
            {
                "tasks": [
                    {
                        "name": t.name,
                        "queue": t.queue,
                        "time_limit_s": t.time_limit_s,
                        "max_attempts": t.max_attempts,
                        "track_started": t.track_started,
                        "description": t.description,
                        "args_schema": t.schema,
                    }
                    for t in self.registry
                ]
            },
        )


class OpenApiHandler(ProblemHandler):
    """``GET /openapi.json``: generated from the same types the gateway validates with."""

    route = "/openapi.json"

    def initialize(self, document: dict[str, Any]) -> None:
        self.document = document

    def get(self) -> None:
        """Serve the OpenAPI 3.1 document."""
        self.write_json(200, self.document)
