"""The OpenAPI 3.1 document, generated from the same msgspec types the gateway validates with.

It describes exactly what the gateway accepts: a job body is one of its tasks (``oneOf`` on
``task``, each with that task's ``args`` schema), and every status a route can answer is listed
with its problem+json body. What JSON Schema cannot say (a task's cross-field rules, such as
``stop - start <= 10**9``) is in that task's ``args`` description, and answered 422.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec

from nsqjobs import wire
from nsqjobs.api import (
    MAX_ARGS_DEPTH,
    Accepted,
    BatchAccepted,
    BatchJob,
    BatchRequest,
    SubmitRequest,
)
from nsqjobs.errors import InvalidArgumentsError
from nsqjobs.names import MAX_DELAY_MS, MAX_WAIT_SECONDS
from nsqjobs.registry import Registry, Task
from nsqjobs.version import __version__

_REF = "#/components/schemas/{name}"


def _problem(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": _REF.format(name="Problem")}}},
    }
    if headers:
        answer["headers"] = headers
    return answer


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

_RETRY_AFTER = {"Retry-After": {"required": True, "schema": {"type": "string"}}}


def _args_required(task: Task) -> bool:
    try:
        task.validate({})
    except InvalidArgumentsError:
        return True
    return False


def _variants(registry: Registry, base: dict[str, Any]) -> list[dict[str, Any]]:
    """One schema per task: ``base`` (a job body's schema) with ``task`` fixed to its name and
    ``args`` to its argument schema."""
    variants = []
    for task in registry:
        schema = copy.deepcopy(base)
        schema.pop("title", None)
        schema["description"] = task.description or task.name
        props = schema["properties"]
        props["task"] = {"const": task.name}
        props["args"] = {"$ref": _REF.format(name=f"{task.name}.args")}
        if _args_required(task):
            schema["required"] = ["task", "args"]
        variants.append(schema)
    return variants


def openapi_document(
    registry: Registry,
    *,
    max_wait_s: float = MAX_WAIT_SECONDS,
    authenticated: bool = False,
    ledger: bool = False,
) -> dict[str, Any]:
    """Build the document; task argument schemas appear as ``<task>.args`` components.

    ``max_wait_s`` is the gateway's longest ``?wait=``; ``authenticated``: the ``/v1`` routes
    need a bearer token; ``ledger``: the job ledger is on (``GET /v1/jobs/{id}``, ids
    deduplicated).
    """
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
        schema = dict(schema)
        # The argument type's own description (its docstring) states its cross-field rules.
        schema["description"] = f"Nests at most {MAX_ARGS_DEPTH} levels deep."
        components[f"{task.name}.args"] = schema
    if not ledger:  # nsqd's own limit: the ledger holds longer delays
        delay = components["SubmitRequest"]["properties"]["delay_ms"]
        delay["maximum"] = MAX_DELAY_MS
    # A job body is one of the tasks, each with its own args.
    components["SubmitRequest"] = {
        "title": "SubmitRequest",
        "description": "Body of `POST /v1/jobs`: one of the tasks, with its arguments.",
        "oneOf": _variants(registry, components["SubmitRequest"]),
    }
    components["BatchJob"] = {
        "title": "BatchJob",
        "description": "One job of a batch: a job body without `delay_ms` (`run_at` instead).",
        "oneOf": _variants(registry, components[BatchJob.__name__]),
    }
    auth: dict[str, Any] = {}
    security: dict[str, Any] = {}
    if authenticated:
        auth = {
            "401": _problem(
                "no bearer token",
                {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
            ),
            "403": _problem("a bearer token this gateway does not accept"),
        }
        security = {"security": [{"bearer": []}]}
        components_security = {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
    else:
        components_security = {}
    connection = {
        "400": _problem("malformed HTTP, JSON or query parameter"),
        "408": _problem("the request did not arrive within the header or body timeout"),
        "413": _problem("body over the size limit, or a job over nsqd's message size"),
        "431": _problem("request line and headers over 64 KiB"),
        "501": _problem("a transfer coding other than chunked"),
        "503": _problem(
            "no nsqd acknowledged the publish, its outcome is unknown, or the gateway holds "
            "too many incomplete requests; retry after `Retry-After`",
            _RETRY_AFTER,
        ),
    }
    errors = {
        **connection,
        **auth,
        "404": _problem("unknown task"),
        "405": _problem("method not allowed (see `Allow`)"),
        "415": _problem("Content-Type is not application/json"),
        "422": _problem("arguments fail the task's schema or its rules (see `errors`)"),
    }
    plain = {
        "400": connection["400"],
        "405": _problem("method not allowed (see `Allow`)"),
        "408": connection["408"],
        "413": connection["413"],
        "431": connection["431"],
        "501": connection["501"],
    }
    health = {
        "200": {"description": "ok"},
        **plain,
        "503": {"description": "not ready"},
    }
    document: dict[str, Any] = {
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
                            "description": "seconds to wait for the result (a decimal number)",
                            "schema": {"type": "number", "minimum": 0, "maximum": max_wait_s},
                        }
                    ],
                    **security,
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
                    **security,
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
                        "409": _problem("two jobs of the batch have the same id"),
                        **errors,
                    },
                }
            },
            "/v1/tasks": {
                "get": {
                    "summary": "The task catalog with argument JSON Schemas",
                    **security,
                    "responses": {"200": {"description": "the catalog"}, **plain, **auth},
                }
            },
            "/healthz": {"get": {"summary": "Process is alive", "responses": health}},
            "/readyz": {"get": {"summary": "Connected to nsqd", "responses": health}},
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "text exposition"}, **plain},
                }
            },
        },
        "components": {"schemas": components, **components_security},
    }
    if ledger:
        _add_ledger(document, security, auth, plain)
    return document


JOB_RECORD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A job as the ledger records it.",
    "properties": {
        "id": {"type": "string"},
        "task": {"type": "string"},
        "args": {"type": "object"},
        "status": {"enum": ["queued", "succeeded", "failed", "dead"]},
        "attempts": {"type": "integer"},
        "worker": {"type": ["string", "null"]},
        "result": {},
        "error": {"type": ["object", "null"]},
        "dead_reason": {"type": ["string", "null"]},
        **{
            name: {"type": ["number", "null"], "description": "Unix seconds"}
            for name in (
                "created_at",
                "accepted_at",
                "published_at",
                "finished_at",
                "dead_at",
            )
        },
    },
    "required": ["id", "task", "status"],
}


def _add_ledger(
    document: dict[str, Any],
    security: dict[str, Any],
    auth: dict[str, Any],
    plain: dict[str, Any],
) -> None:
    # With the ledger on: a job by id, and ids deduplicated on submission.
    document["components"]["schemas"]["JobRecord"] = JOB_RECORD_SCHEMA
    record = _json("JobRecord", "the job as recorded")
    conflict = _problem("the id was accepted before for another task or other args")
    paths = document["paths"]
    paths["/v1/jobs"]["post"]["responses"]["200"] = {
        "description": "the result came within `wait`, or the id was accepted before (the job "
        "as recorded; nothing is published again)",
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"$ref": _REF.format(name="ResultEnvelope")},
                        {"$ref": _REF.format(name="JobRecord")},
                    ]
                }
            }
        },
    }
    paths["/v1/jobs"]["post"]["responses"]["409"] = conflict
    paths["/v1/jobs"]["post"]["responses"]["202"] = _json(
        "Accepted",
        "acknowledged by nsqd; or, for a delay beyond nsqd's hour, recorded in the ledger, "
        "which publishes it when due (`due_at`)",
    )
    paths["/v1/jobs/batch"]["post"]["responses"]["409"] = _problem(
        "two jobs of the batch have the same id, or an id was accepted before for another task "
        "or other args"
    )
    paths["/v1/jobs/{id}"] = {
        "get": {
            "summary": "A job's status, attempts, error, result and timestamps",
            "parameters": [
                {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            **security,
            "responses": {
                "200": record,
                "404": _problem("no job with that id in the ledger"),
                **plain,
                **auth,
            },
        }
    }
