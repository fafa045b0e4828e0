"""The OpenAPI 3.1 document, generated from the same msgspec types the gateway validates with."""

from __future__ import annotations

from typing import Any

import msgspec

from nsqjobs import wire
from nsqjobs.api import Accepted, BatchAccepted, BatchRequest, SubmitRequest
from nsqjobs.names import MAX_WAIT_SECONDS
from nsqjobs.registry import Registry
from nsqjobs.version import __version__

_REF = "#/components/schemas/{name}"


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": _REF.format(name="Problem")}}},
    }


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _REF.format(name=ref)}}},
    }


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details; `type` is stable (urn:nsqjobs:problem:<slug>).",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
    "required": ["type", "title", "status", "detail"],
}


def openapi_document(registry: Registry) -> dict[str, Any]:
    """Build the document; task argument schemas appear as ``<task>.args`` components."""
    (_, components) = msgspec.json.schema_components(
        [SubmitRequest, BatchRequest, Accepted, BatchAccepted, wire.ResultEnvelope],
        ref_template=_REF,
    )
    components["Problem"] = PROBLEM_SCHEMA
    for task in registry:
        (schema,), task_components = msgspec.json.schema_components(
            [task.args_type], ref_template=_REF
        )
        components.update(task_components)
        components[f"{task.name}.args"] = schema
    errors = {
        "400": _problem("malformed JSON or a bad query parameter"),
        "404": _problem("unknown task"),
        "413": _problem("body over the size limit"),
        "415": _problem("Content-Type is not application/json"),
        "422": _problem("arguments fail the task's schema (see `errors`)"),
        "503": _problem("no nsqd acknowledged the publish; retry after `Retry-After`"),
    }
    health = {"200": {"description": "ok"}, "503": {"description": "not ready"}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "nsqjobs gateway", "version": __version__},
        "paths": {
            "/v1/jobs": {
                "post": {
                    "summary": "Submit one job",
                    "parameters": [
                        {
                            "name": "wait",
                            "in": "query",
                            "required": False,
                            "description": "seconds to wait for the result",
                            "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECONDS},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": _REF.format(name="SubmitRequest")}
                            }
                        },
                    },
                    "responses": {
                        "200": _json("ResultEnvelope", "the result came within `wait`"),
                        "202": _json("Accepted", "acknowledged by nsqd"),
                        **errors,
                    },
                }
            },
            "/v1/jobs/batch": {
                "post": {
                    "summary": "Submit up to 1000 jobs atomically (one MPUB per queue)",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": _REF.format(name="BatchRequest")}
                            }
                        },
                    },
                    "responses": {
                        "202": _json("BatchAccepted", "all acknowledged by nsqd"),
                        **errors,
                    },
                }
            },
            "/v1/tasks": {
                "get": {
                    "summary": "The task catalog with argument JSON Schemas",
                    "responses": {"200": {"description": "the catalog"}},
                }
            },
            "/healthz": {"get": {"summary": "Process is alive", "responses": health}},
            "/readyz": {"get": {"summary": "Connected to nsqd", "responses": health}},
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "text exposition"}},
                }
            },
        },
        "components": {"schemas": components},
    }
