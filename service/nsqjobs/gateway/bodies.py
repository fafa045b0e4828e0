"""Request bodies, decoded strictly: UTF-8 JSON of the right shape, no key twice in an object,
``args`` nested at most ``MAX_ARGS_DEPTH`` levels, and integral floats (``1547.0``) taken where
the API says integer, as JSON Schema does.

The common case costs a few byte counts: a body whose brackets and colons add up to what the
decoded value holds has neither deep nesting nor a repeated key. Anything else is scanned once
more (``_scan``), which names the offending field.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Final, TypeVar

import msgspec

from nsqjobs.api import (
    JOB_ID_PATTERN,
    MAX_ARGS_DEPTH,
    BatchRequest,
    SubmitRequest,
    WaitRequest,
)
from nsqjobs.http.problems import Problem
from nsqjobs.registry import field_error

R = TypeVar("R", SubmitRequest, BatchRequest)

_INT_GOT_FLOAT: Final = "Expected `int`, got `float`"
# A JSON string (a key when a colon follows) or a structural character.
_TOKEN: Final = re.compile(rb'"((?:[^"\\]|\\.)*)"(\s*:)?|[{}\[\],]')
# Levels above a job's ``args`` object: the body (single), or the body, ``jobs`` and the job.
_ABOVE_ARGS: Final[dict[type[Any], int]] = {SubmitRequest: 1, BatchRequest: 3, WaitRequest: 0}
_ID: Final = operator.attrgetter("id")
_ARGS: Final = operator.attrgetter("args")
_EXPIRES: Final = operator.attrgetter("expires_s")
_RUN_AT: Final = operator.attrgetter("run_at")


# Charsets a JSON body may be labelled with: UTF-8, and ASCII (a subset of it).
_UTF8_LABELS: Final = frozenset(("utf-8", "utf8", "us-ascii", "ascii"))


def check_content_type(ctype: str) -> None:
    """Raise the 415 unless ``ctype`` is ``application/json``, with no charset or a UTF-8 one
    (JSON is UTF-8: RFC 8259)."""
    media, _, params = ctype.partition(";")
    if media.strip().lower() == "application/json" and not (params and _not_utf8(params)):
        return
    raise Problem(
        415,
        "unsupported-media-type",
        f"Content-Type must be application/json (UTF-8), got {ctype or 'none'!r}",
    )


def _not_utf8(params: str) -> bool:
    """Whether a Content-Type's parameters name a charset other than UTF-8."""
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"').lower() not in _UTF8_LABELS
    return False


def decode_submit(body: bytes) -> SubmitRequest:
    """``POST /v1/jobs``'s body; raises :class:`Problem` (400 or 422) when it is not one."""
    req = _decode(body, SubmitRequest)
    if req.id is not None and req.id[-1] == "\n":  # written "\n" or "\u000a": see _bad_id
        raise _bad_id("body.id")
    if req.run_at is not None and req.delay_ms:
        raise _error("body.run_at", "give delay_ms or run_at, not both")
    args = req.args
    keys = 1 + (req.id is not None) + (req.delay_ms != 0) + (req.expires_s is not None)
    keys += req.run_at is not None
    if args:
        keys += 1 + len(args)
    _check_keys(body, SubmitRequest, [args], keys, 2 if args else 1)
    return req


def decode_batch(body: bytes) -> BatchRequest:
    """``POST /v1/jobs/batch``'s body; raises :class:`Problem` (400 or 422) when it is not one."""
    batch = _decode(body, BatchRequest)
    jobs = batch.jobs
    n = len(jobs)
    ids = list(map(_ID, jobs))
    no_ids = ids.count(None)
    # An id may hold no newline but at its end (the pattern): one in any of them is that.
    if no_ids < n and "\n" in "".join(filter(None, ids)):
        for i, job_id in enumerate(ids):
            if job_id is not None and job_id[-1] == "\n":
                raise _bad_id(f"body.jobs[{i}].id")
    # Counted in C: the keys each job surely had ("jobs", then per job: task, args and its
    # keys when args is not empty, id, expires_s, run_at), and its brackets if nothing nests in
    # args.
    sizes = list(map(len, map(_ARGS, jobs)))
    with_args = n - sizes.count(0)
    given = n - no_ids + n - list(map(_EXPIRES, jobs)).count(None)
    given += n - list(map(_RUN_AT, jobs)).count(None)
    keys = 1 + n + with_args + sum(sizes) + given
    _check_keys(body, BatchRequest, list(map(_ARGS, jobs)), keys, 2 + n + with_args)
    return batch


def decode_wait(body: bytes) -> WaitRequest:
    """``POST /v1/jobs/wait``'s body; raises :class:`Problem` (400 or 422) when it is not one."""
    try:
        req: WaitRequest = _parse(body, WaitRequest, WaitRequest)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
    for i, job_id in enumerate(req.ids):
        if job_id[-1] == "\n":
            raise _bad_id(f"body.ids[{i}]")
    # Not the hot path: always scanned for a key given twice.
    _check_duplicates(body, WaitRequest)
    return req


def _check_keys(
    body: bytes, kind: type[Any], args: list[dict[str, Any]], keys: int, brackets: int
) -> None:
    # ``keys`` and ``brackets``: what the body holds when nothing nests inside ``args``. More
    # brackets: count the nested keys (and refuse nesting past the limit). Then as many colons
    # as keys means no key was given twice; otherwise scan the body to name the repeated one.
    if body.count(b"{") + body.count(b"[") != brackets:
        for job_args in args:
            nested = _nested_keys(job_args)
            if nested is None:
                raise _scan_problem(body, kind)
            keys += nested
    if keys != body.count(b":"):
        _check_duplicates(body, kind)


def integral_floats(value: Any) -> Any:
    """``value`` with every integral float made an int (``value`` itself when there is none)."""
    if type(value) is float:
        return int(value) if value.is_integer() else value
    if type(value) is dict:
        fixed = {k: integral_floats(v) for k, v in value.items()}
        return value if all(fixed[k] is v for k, v in value.items()) else fixed
    if type(value) is list:
        items = [integral_floats(v) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    return value


# -- decoding -------------------------------------------------------------------------------------


def _decode(body: bytes, kind: type[R]) -> R:
    try:
        value: R = _parse(body, kind, kind)
        return value
    except msgspec.ValidationError as exc:
        if _INT_GOT_FLOAT not in str(exc):
            raise _invalid(exc) from None
        first = exc
    # An integer field written as an integral float: accepted, as JSON Schema's integer is.
    data = _parse(body, None, kind)
    if type(data) is dict and type(data.get("delay_ms")) is float:
        data["delay_ms"] = integral_floats(data["delay_ms"])
    try:
        fixed: R = msgspec.convert(data, kind, strict=True)
    except msgspec.ValidationError as exc:
        raise _invalid(exc if _INT_GOT_FLOAT not in str(exc) else first) from None
    return fixed


def _parse(body: bytes, kind: Any, shape: type[Any]) -> Any:
    """msgspec's decode (as ``kind``, or untyped) with every failure but a validation error
    turned into a 400 or 422; ``shape`` is what the body should be."""
    try:
        return (
            msgspec.json.decode(body, type=kind) if kind is not None else msgspec.json.decode(body)
        )
    except msgspec.ValidationError:
        raise
    except msgspec.DecodeError as exc:
        raise Problem(400, "malformed-json", f"body is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise Problem(
            400,
            "malformed-json",
            f"body is not UTF-8 (JSON must be): {exc.reason}",
        ) from None
    except RecursionError:
        raise _scan_problem(body, shape) from None


def _bad_id(field: str) -> Problem:
    # Python's `$` (msgspec's pattern) also matches before a final newline; JSON Schema's not.
    return _error(field, f"Expected `str` matching regex '{JOB_ID_PATTERN.pattern}'")


def _invalid(exc: msgspec.ValidationError) -> Problem:
    err = field_error(str(exc), "body")
    message = err.message
    if err.field.startswith("body.jobs[") and err.field.endswith("].delay_ms"):
        message = "delay_ms is not taken in a batch: give run_at (Unix seconds) instead"
    return Problem(
        422,
        "invalid-arguments",
        f"{err.field}: {message}",
        errors=[{"field": err.field, "message": message}],
    )


# -- counting what the decoded value holds ---------------------------------------------------------


def _nested_keys(args: dict[str, Any]) -> int | None:
    """Keys of the objects nested in ``args``; None when they nest past the limit."""
    keys = 0
    stack: list[tuple[Any, int]] = [(args, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_ARGS_DEPTH:
            return None
        if type(value) is dict:
            keys += len(value)
            children = value.values()
        else:
            children = value
        for child in children:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return keys - len(args)


# -- the slow path: scan the bytes, naming the field ----------------------------------------------


def _check_duplicates(body: bytes, kind: type[Any]) -> None:
    problem = _scan(body, kind)
    if problem is not None:
        raise problem


def _scan_problem(body: bytes, kind: type[Any]) -> Problem:
    problem = _scan(body, kind)
    if problem is None:  # cannot happen: the decoder or the walk saw what the scan misses
        return _error("body", f"nests more than {MAX_ARGS_DEPTH} levels deep")
    return problem


def _scan(body: bytes, kind: type[Any]) -> Problem | None:
    """The first repeated key or too-deep container in ``body`` (valid JSON), as a 422."""
    limit = MAX_ARGS_DEPTH + _ABOVE_ARGS[kind]
    # One frame per open container: its keys so far (None for an array) and where we are in it.
    frames: list[tuple[set[bytes] | None, list[Any]]] = []
    for match in _TOKEN.finditer(body):
        token = match.group()
        first = token[0]
        if first == 0x22:  # a string
            if match.group(2) and frames and frames[-1][0] is not None:
                keys, at = frames[-1]
                key = match.group(1)
                # The key as decoded: "a", "\u0061" and "\/" spellings of one key are one key.
                name = key if b"\\" not in key else _text(key).encode("utf-8", "surrogatepass")
                if keys is not None and name in keys:
                    at[0] = key
                    return _error(_path(frames), f"repeats key {_text(key)!r}")
                if keys is not None:
                    keys.add(name)
                at[0] = key
        elif first in b"{[":
            frames.append((set() if first == 0x7B else None, [b"" if first == 0x7B else 0]))
            if len(frames) > limit:
                return _error(_path(frames[:-1]), f"nests more than {MAX_ARGS_DEPTH} levels deep")
        elif first == 0x2C:  # a comma: the next item of an array
            if frames and frames[-1][0] is None:
                frames[-1][1][0] += 1
        elif frames:
            frames.pop()
    return None


def _text(raw: bytes) -> str:
    try:
        text: str = msgspec.json.decode(b'"' + raw + b'"')
    except (msgspec.DecodeError, UnicodeDecodeError):
        return raw.decode("utf-8", "replace")
    return text


def _path(frames: list[tuple[set[bytes] | None, list[Any]]]) -> str:
    parts: list[str] = []
    for keys, at in frames:
        if keys is None:
            parts.append(f"[{at[0]}]")
        else:
            parts.append(("." if parts else "") + _text(at[0]))
    path = "".join(parts)
    return path if path.startswith(("args", "jobs[")) else f"body.{path}" if path else "body"


def _error(field: str, message: str) -> Problem:
    return Problem(
        422,
        "invalid-arguments",
        f"{field}: {message}",
        errors=[{"field": field, "message": message}],
    )
