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
    WaitAnswer,
    WaitRequest,
)
from nsqjobs.errors import InvalidArgumentsError
from nsqjobs.ledger import STATUSES
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
    need a bearer token; ``ledger``: the job ledger is on (jobs by id, listings, cancel, dead
    letters; ids deduplicated).
    """
    (_, components) = msgspec.json.schema_components(
        [
            SubmitRequest,
            BatchRequest,
            Accepted,
            BatchAccepted,
            wire.ResultEnvelope,
            WaitRequest,
            WaitAnswer,
        ],
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
    components["WaitRequest"]["properties"]["timeout_s"]["maximum"] = max_wait_s
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
            "/v1/jobs/wait": {
                "post": {
                    "summary": "Wait for the first or all of many jobs to finish (a long poll)",
                    "description": "Answers the outcomes known (`done`) and the ids still "
                    "`pending` once the first (or every) job finished or `timeout_s` passed. "
                    "Without the job ledger (`ledger: false`), only outcomes that arrive "
                    "during the wait, or that went by on this gateway shortly before it, are "
                    "known; with it, `unknown` lists ids the ledger does not hold.",
                    **security,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": _REF.format(name="WaitRequest")}
                            }
                        },
                    },
                    "responses": {
                        "200": _json("WaitAnswer", "what is known when the wait ends"),
                        **{k: v for k, v in errors.items() if k != "404"},
                        "503": _problem(
                            "the job ledger could not be read, or the gateway holds too many "
                            "incomplete requests; retry after `Retry-After`",
                            _RETRY_AFTER,
                        ),
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


_TIME = {"type": ["number", "null"], "description": "Unix seconds"}
_ERROR = {
    "type": ["object", "null"],
    "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
    "required": ["type", "message"],
}
JOB_RECORD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A job as the ledger records it. `history`: the failed attempts of its "
    "latest run; `runs`: its earlier runs, one per replay.",
    "properties": {
        "id": {"type": "string"},
        "task": {"type": "string"},
        "args": {"type": "object"},
        "status": {"enum": list(STATUSES)},
        "attempts": {"type": "integer"},
        "worker": {"type": ["string", "null"]},
        "result": {},
        "error": _ERROR,
        "dead_reason": {"type": ["string", "null"]},
        **{
            name: _TIME
            for name in (
                "created_at",
                "accepted_at",
                "published_at",
                "finished_at",
                "dead_at",
                "due_at",
                "started_at",
            )
        },
        "redrives": {"type": "integer"},
        "replays": {"type": "integer"},
        "history": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "attempt": {"type": "integer"},
                    "worker": {"type": "string"},
                    "started_at": {"type": "number"},
                    "finished_at": {"type": "number"},
                    "error": _ERROR,
                },
            },
        },
        "runs": {
            "type": "array",
            "items": {
                "type": "object",
                "description": "One earlier run: status, attempts, error, dead_reason, "
                "finished_at, dead_at, history, replayed_at.",
            },
        },
    },
    "required": ["id", "task", "status", "attempts", "created_at", "accepted_at"],
}
JOB_PAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One page of a listing, oldest first; `next_cursor` fetches the next "
    "(null: this was the last).",
    "properties": {
        "jobs": {"type": "array", "items": {"$ref": _REF.format(name="JobRecord")}},
        "next_cursor": {"type": ["string", "null"]},
    },
    "required": ["jobs", "next_cursor"],
}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_TASK = _query(
    "task", "only jobs of this task", {"type": "string", "minLength": 1, "maxLength": 200}
)
_CURSOR = _query(
    "cursor",
    "the `next_cursor` of the page before, from the same listing with the same filters (any "
    "other is a 400)",
    {"type": "string"},
)


def _limit(default: int) -> dict[str, Any]:
    schema = {"type": "integer", "minimum": 1, "maximum": 1000, "default": default}
    return _query("limit", "at most this many jobs", schema)


def _add_ledger(
    document: dict[str, Any],
    security: dict[str, Any],
    auth: dict[str, Any],
    plain: dict[str, Any],
) -> None:
    # With the ledger on: jobs by id, listings, cancel, dead letters; ids deduplicated.
    schemas = document["components"]["schemas"]
    schemas["JobRecord"] = JOB_RECORD_SCHEMA
    schemas["JobPage"] = JOB_PAGE_SCHEMA
    schemas["Purged"] = {
        "type": "object",
        "properties": {"purged": {"type": "integer", "minimum": 0}},
        "required": ["purged"],
    }
    schemas["Replayed"] = {
        "type": "object",
        "properties": {"ids": {"type": "array", "items": {"type": "string"}}},
        "required": ["ids"],
    }
    record = _json("JobRecord", "the job as recorded")
    unknown = _problem("no job with that id in the ledger")
    conflict = _problem("the id was accepted before for another task or other args")
    unavailable = _problem("the ledger could not be read or written; retry", _RETRY_AFTER)
    errors = {**plain, **auth, "400": _problem("a bad, repeated or unknown query parameter")}

    def operation(
        summary: str,
        answer: dict[str, Any],
        parameters: list[dict[str, Any]],
        **more: dict[str, Any],
    ) -> dict[str, Any]:
        return {
            "summary": summary,
            "parameters": parameters,
            **security,
            "responses": {"200": answer, **errors, "503": unavailable, **more},
        }

    paths = document["paths"]
    submit = paths["/v1/jobs"]["post"]["responses"]
    submit["200"] = {
        "description": "the result came within `wait` (a result envelope), or the id was "
        "accepted before (the job as recorded; nothing is published again; with `wait`, once "
        "it finished or the wait ended)",
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
    submit["409"] = conflict
    submit["503"] = _problem(
        "no nsqd acknowledged the publish, its outcome is unknown, the ledger could not record "
        "the job, or the gateway holds too many incomplete requests; retry after `Retry-After`",
        _RETRY_AFTER,
    )
    submit["202"] = _json(
        "Accepted",
        "acknowledged by nsqd; or, for a delay beyond nsqd's hour, recorded in the ledger, "
        "which publishes it when due (`due_at`)",
    )
    paths["/v1/jobs/batch"]["post"]["responses"]["409"] = _problem(
        "two jobs of the batch have the same id, or an id was accepted before for another task "
        "or other args"
    )
    paths["/v1/jobs"]["get"] = operation(
        "List jobs in the order they were accepted",
        _json("JobPage", "one page"),
        [
            _query("status", "only jobs with this status", {"enum": list(STATUSES)}),
            _TASK,
            _limit(100),
            _CURSOR,
        ],
    )
    paths["/v1/jobs/{id}"] = {
        "get": operation(
            "A job's status, attempts, error, result and timestamps",
            record,
            [_ID],
            **{"404": unknown},
        ),
        "delete": operation(
            "Cancel a queued or running job (workers skip it)",
            _json("JobRecord", "cancelled (the job as now recorded)"),
            [_ID],
            **{
                "404": unknown,
                "409": _problem("the job has finished already (`job_status` says how)"),
                "503": _problem(
                    "the ledger could not be read or written, or the job is cancelled but "
                    "workers could not be told to skip it; retry",
                    _RETRY_AFTER,
                ),
            },
        ),
    }
    # /v1/jobs/wait and /v1/jobs/batch are also where the jobs whose ids are "wait" and "batch"
    # live: GET and DELETE answer for them.
    for route in ("wait", "batch"):
        for method, operation_of_id in paths["/v1/jobs/{id}"].items():
            same = copy.deepcopy(operation_of_id)
            same["summary"] = f"{same['summary']}: the job whose id is `{route}`"
            same["parameters"] = []
            paths[f"/v1/jobs/{route}"][method] = same
    not_dead = _problem("the job is not dead (`job_status` says what it is)")
    paths["/v1/dead-letters"] = {
        "get": operation(
            "List dead jobs, oldest first, with their reason and error",
            _json("JobPage", "one page"),
            [_TASK, _limit(100), _CURSOR],
        ),
        "delete": operation(
            "Purge up to `limit` dead jobs (of `task`), oldest first",
            _json("Purged", "how many were deleted"),
            [_TASK, _limit(1000)],
        ),
    }
    paths["/v1/dead-letters/replay"] = {
        "post": operation(
            "Replay up to `limit` dead jobs (of `task`), oldest first",
            _json("Replayed", "the ids replayed"),
            [_TASK, _limit(1000)],
        )
    }
    paths["/v1/dead-letters/{id}/replay"] = {
        "post": operation(
            "Replay a dead job: its run so far is kept in `runs`, it is queued again",
            _json("JobRecord", "the job as now recorded (queued)"),
            [_ID],
            **{"404": unknown, "409": not_dead},
        )
    }
    paths["/v1/dead-letters/{id}"] = {
        "delete": operation(
            "Purge a dead job",
            _json("Purged", "deleted"),
            [_ID],
            **{"404": unknown, "409": not_dead},
        )
    }
