"""Typed settings: frozen dataclasses filled from ``NSQJOBS_*`` variables and mirroring CLI flags.

Each field names its variable once; the flag is derived from it (``NSQJOBS_NSQD_TCP_ADDRESS`` ->
``--nsqd-tcp-address``), so the two can never drift apart. A flag beats its variable, which beats
the default. Bad values raise :class:`ConfigError` naming both spellings.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from nsqjobs import names as c
from nsqjobs.errors import ConfigError

C = TypeVar("C")


def setting(default: Any, help: str, *, env: str | None = None) -> Any:
    """Declare a config field: its default, its help text and, optionally, its variable name."""
    kw: dict[str, Any] = {"metadata": {"help": help, "env": env}}
    if isinstance(default, list | tuple):
        kw["default_factory"] = lambda: tuple(default)
    else:
        kw["default"] = default
    return field(**kw)


def env_name(f: dataclasses.Field[Any]) -> str:
    """The environment variable of a config field."""
    return str(f.metadata.get("env") or c.ENV_PREFIX + f.name.upper())


def env_var(cls: type[Any], name: str) -> str:
    """The environment variable of field ``name`` of config class ``cls``."""
    return env_name({f.name: f for f in dataclasses.fields(cls)}[name])


def flag_name(f: dataclasses.Field[Any]) -> str:
    """The CLI flag of a config field, derived from its environment variable."""
    return "--" + env_name(f).removeprefix(c.ENV_PREFIX).lower().replace("_", "-")


def _parse(raw: str, kind: Any, where: str, both: str) -> Any:
    """``raw`` (given in ``where``, the flag or the variable) as ``kind``; a ConfigError naming
    both spellings (``both``) and where the value came from."""
    origin = get_origin(kind)
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError("expected true/false")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is str:
            return raw
        if origin is tuple:
            return tuple(p.strip() for p in raw.split(",") if p.strip())
        if origin is Literal:
            if raw not in get_args(kind):
                raise ValueError(f"expected one of {', '.join(map(str, get_args(kind)))}")
            return raw
        if kind == float | None:
            return None if raw.strip() in ("", "none") else float(raw)
    except ValueError as exc:
        raise ConfigError(f"{both}: invalid value {raw!r} in {where} ({exc})") from None
    raise TypeError(f"unsupported config type {kind!r}")


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Add one flag per field of config class ``cls``; flags default to 'not given'."""
    for f in dataclasses.fields(cls):
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        shown = ",".join(default) if isinstance(default, tuple) else default
        parser.add_argument(
            flag_name(f),
            dest=f.name,
            default=None,
            metavar=f.name.upper(),
            help=f"{f.metadata['help']} [env {env_name(f)}, default {shown}]",
        )


def load(
    cls: type[C],
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
) -> C:
    """Build config ``cls`` from flags, then the environment, then defaults, and validate it."""
    environ = os.environ if environ is None else environ
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        raw = getattr(args, f.name, None) if args is not None else None
        where = flag_name(f)
        if raw is None:
            raw = environ.get(env_name(f))
            where = env_name(f)
        if raw is not None:
            values[f.name] = _parse(raw, hints[f.name], where, f"{flag_name(f)} / {env_name(f)}")
    config = cls(**values)
    check = getattr(config, "check", None)
    if check is not None:
        check()
    return config


def spelled(cls: type[Any], *names: str) -> str:
    """Both spellings of fields ``names`` of config class ``cls``: ``--flag / NSQJOBS_VAR``,
    comma-separated."""
    fields = {x.name: x for x in dataclasses.fields(cls)}
    return ", ".join(f"{flag_name(fields[n])} / {env_name(fields[n])}" for n in names)


def _require(ok: bool, cls: type[Any], name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{spelled(cls, name)}: {message}")


def _addresses(addrs: Sequence[str], cls: type[Any], name: str) -> None:
    for a in addrs:
        host, _, port = a.rpartition(":")
        ok = bool(host) and port.isascii() and port.isdigit()
        _require(ok, cls, name, f"{a!r} is not HOST:PORT")


def default_worker_id() -> str:
    """host:pid, unique enough to tell workers apart in results and logs."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class NsqConfig:
    """Where nsqd and nsqlookupd are; shared by every daemon."""

    nsqd_tcp_address: tuple[str, ...] = setting(
        [f"127.0.0.1:{c.NSQD_TCP_PORT}"], "nsqd TCP addresses to publish to (comma-separated)"
    )
    nsqd_http_address: tuple[str, ...] = setting(
        [f"127.0.0.1:{c.NSQD_HTTP_PORT}"],
        "nsqd HTTP addresses used to pre-create topics at start (empty to skip)",
    )
    lookupd_http_address: tuple[str, ...] = setting(
        [f"127.0.0.1:{c.LOOKUPD_HTTP_PORT}"],
        "nsqlookupd HTTP addresses to discover producers (empty: read from --nsqd-tcp-address)",
    )
    lookupd_poll_interval: int = setting(10, "seconds between nsqlookupd polls")
    task_module: tuple[str, ...] = setting(
        [c.BUILTIN_TASK_MODULE],
        "modules that register tasks (they replace the built-in ones; "
        f"{c.ENV_DEBUG_TASKS}=1 adds {c.DEBUG_TASK_MODULE} to them)",
    )
    debug_tasks: bool = setting(
        False,
        f"also load the debug tasks ({c.DEBUG_TASK_MODULE}), whatever --task-module says "
        "(tests and demos)",
        env=c.ENV_DEBUG_TASKS,
    )
    event_loop: Literal["uvloop", "asyncio"] = setting(
        "uvloop",
        "the event loop: uvloop (when installed) or the standard asyncio one",
        env=c.ENV_EVENT_LOOP,
    )
    log_level: str = setting("INFO", "log level (DEBUG, INFO, WARNING, ERROR)")
    nsqd_max_msg_size: int = setting(
        1024 * 1024,
        "nsqd's --max-msg-size in bytes (its live value is read at start): the gateway answers "
        "a larger job envelope 413, a worker fails a larger result at once",
    )

    def check(self) -> None:
        """Validate addresses and ranges."""
        cls = type(self)
        _require(bool(self.nsqd_tcp_address), cls, "nsqd_tcp_address", "at least one is needed")
        _addresses(self.nsqd_tcp_address, cls, "nsqd_tcp_address")
        _addresses(self.nsqd_http_address, cls, "nsqd_http_address")
        _addresses(self.lookupd_http_address, cls, "lookupd_http_address")
        _require(self.lookupd_poll_interval >= 1, cls, "lookupd_poll_interval", "must be >= 1")
        _require(self.nsqd_max_msg_size >= 1024, cls, "nsqd_max_msg_size", "must be >= 1024")
        _require(
            self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
            cls,
            "log_level",
            "must be DEBUG, INFO, WARNING or ERROR",
        )


@dataclass(frozen=True)
class GatewayConfig(NsqConfig):
    """Settings of ``nsqjobs gateway``."""

    host: str = setting("127.0.0.1", "address the HTTP server binds", env="NSQJOBS_GATEWAY_HOST")
    port: int = setting(c.GATEWAY_PORT, "HTTP port", env="NSQJOBS_GATEWAY_PORT")
    max_body_bytes: int = setting(1024 * 1024, "largest request body accepted")
    publish_timeout_s: float = setting(5.0, "seconds to wait for nsqd to acknowledge a publish")
    http_server: Literal["httptools", "tornado"] = setting(
        "httptools",
        "HTTP/1.1 connection layer under the tornado app: httptools (fast) or tornado's own",
    )
    nsqd_max_body_size: int = setting(
        c.NSQD_MAX_BODY_SIZE,
        "nsqd's --max-body-size in bytes: a batch whose MPUB for one queue is larger is "
        "answered 413 (nsqd's live value is read at start)",
    )
    header_timeout_s: float = setting(
        10.0, "seconds a client has to send a request's line and headers (408 after)"
    )
    body_timeout_s: float = setting(
        30.0, "seconds a client has to send a request's body once its headers are in (408 after)"
    )
    idle_timeout_s: float = setting(65.0, "seconds an idle keep-alive connection stays open")
    max_incomplete_bytes: int = setting(
        64 * 1024 * 1024,
        "request body bytes held for requests still arriving, all connections together; a "
        "request past it is answered 503 and its connection closed",
    )
    max_wait_s: float = setting(60.0, "longest ?wait= a client may ask for, in seconds")
    api_tokens: tuple[str, ...] = setting(
        [], "bearer tokens every /v1 route requires (comma-separated; empty: no authentication)"
    )
    ledger_url: str = setting(
        "",
        "job ledger: sqlite:///relative/path, sqlite:////absolute/path, or "
        "postgresql://user[:password]@host[:port]/database for several gateways sharing one "
        "(empty: no ledger, no GET /v1/jobs/{id}, no id deduplication)",
    )
    ledger_poll_s: float = setting(
        1.0,
        "seconds between the ledger relay's passes: nsqd restart checks, re-drives, long delays "
        "coming due, retention, the ledger gauges",
    )
    ledger_grace_s: float = setting(
        30.0,
        "seconds a recorded job is left to the request that accepted it before the relay "
        "publishes it (its publish failed, or the gateway died before it ended)",
    )
    result_ttl: float = setting(
        7 * 86400.0,
        "seconds finished jobs (succeeded, failed, cancelled) stay in the ledger; dead ones "
        "stay until replayed or purged (0: keep everything)",
    )

    def check(self) -> None:
        """Validate, including the shared NSQ settings."""
        super().check()
        cls = type(self)
        _require(0 <= self.port < 65536, cls, "port", "must be 0-65535")
        _require(self.max_body_bytes >= 1024, cls, "max_body_bytes", "must be >= 1024")
        _require(self.publish_timeout_s > 0, cls, "publish_timeout_s", "must be > 0")
        _require(
            self.nsqd_max_body_size >= self.nsqd_max_msg_size,
            cls,
            "nsqd_max_body_size",
            "must be >= --nsqd-max-msg-size",
        )
        for name in ("header_timeout_s", "body_timeout_s", "idle_timeout_s"):
            _require(getattr(self, name) > 0, cls, name, "must be > 0")
        _require(
            self.max_incomplete_bytes >= self.max_body_bytes,
            cls,
            "max_incomplete_bytes",
            "must be >= --max-body-bytes",
        )
        _require(
            0 <= self.max_wait_s <= c.MAX_WAIT_LIMIT_S,
            cls,
            "max_wait_s",
            f"must be 0-{c.MAX_WAIT_LIMIT_S:g}",
        )
        _require(
            all(len(t) >= 16 and t.isprintable() and " " not in t for t in self.api_tokens),
            cls,
            "api_tokens",
            "each token must be at least 16 printable characters without spaces",
        )
        _require(
            not self.ledger_url
            or (self.ledger_url.startswith(c.LEDGER_SQLITE_SCHEME) and len(self.ledger_url) > 10)
            or _postgres_url(self.ledger_url),
            cls,
            "ledger_url",
            f"must be empty, {c.LEDGER_SQLITE_SCHEME}PATH or postgresql://user@host:port/database",
        )
        _require(0.01 <= self.ledger_poll_s <= 60, cls, "ledger_poll_s", "must be 0.01-60")
        _require(
            self.ledger_grace_s >= self.publish_timeout_s,
            cls,
            "ledger_grace_s",
            "must be >= --publish-timeout-s (the relay would publish jobs whose accepting "
            "request is still waiting for nsqd, and they would run twice)",
        )
        _require(self.ledger_grace_s <= 86400, cls, "ledger_grace_s", "must be <= 86400")
        _require(
            self.result_ttl == 0 or self.result_ttl >= 1,
            cls,
            "result_ttl",
            "must be 0 (keep everything) or >= 1 second",
        )


@dataclass(frozen=True)
class WorkerConfig(NsqConfig):
    """Settings of ``nsqjobs worker``."""

    host: str = setting(
        "127.0.0.1", "address the metrics/health server binds", env="NSQJOBS_WORKER_HOST"
    )
    port: int = setting(
        c.WORKER_METRICS_PORT, "metrics and health HTTP port", env="NSQJOBS_WORKER_PORT"
    )
    channel: str = setting(c.WORKER_CHANNEL, "NSQ channel the workers share")
    queues: tuple[str, ...] = setting([], "queue topics to consume (default: all task queues)")
    concurrency: int = setting(2, "executor slots; also the max_in_flight, so no hidden prefetch")
    executor: Literal["thread", "process"] = setting("thread", "thread or process pool")
    grace_s: float = setting(30.0, "seconds SIGTERM waits for running jobs before requeueing")
    backoff_base_s: float = setting(1.0, "first retry delay; doubles per attempt, with jitter")
    backoff_cap_s: float = setting(60.0, "longest retry delay")
    max_attempts: int = setting(0, "override every task's max attempts (0: use the task's)")
    msg_timeout_s: float = setting(60.0, "message timeout asked of nsqd; touched at a third")
    delivery: Literal["adaptive", "batched"] = setting(
        "adaptive",
        "adaptive: nsqd sends each message at once while the worker keeps up, and batches "
        "them under load; batched: always batched (more latency at light load)",
    )
    delivery_buffer_ms: int = setting(
        25,
        "how long nsqd may hold a batch of deliveries (25-1000; 0: never batch, "
        "fewer jobs/s under load)",
    )
    worker_id: str = setting(
        "", "name in results, logs and nsqd's client list (client_id; default host:pid)"
    )

    def check(self) -> None:
        """Validate, including the shared NSQ settings."""
        super().check()
        cls = type(self)
        _require(0 <= self.port < 65536, cls, "port", "must be 0-65535")
        _require(1 <= self.concurrency <= 1024, cls, "concurrency", "must be 1-1024")
        _require(self.grace_s >= 0, cls, "grace_s", "must be >= 0")
        _require(
            0 < self.backoff_base_s <= self.backoff_cap_s,
            cls,
            "backoff_base_s",
            "must be > 0 and <= --backoff-cap-s",
        )
        _require(
            self.backoff_cap_s <= c.MAX_DELAY_MS / 1000,
            cls,
            "backoff_cap_s",
            "must be <= 3600 (nsqd's --max-req-timeout)",
        )
        _require(self.max_attempts >= 0, cls, "max_attempts", "must be >= 0")
        _require(1 <= self.msg_timeout_s <= 900, cls, "msg_timeout_s", "must be 1-900")
        _require(
            self.delivery_buffer_ms == 0 or 25 <= self.delivery_buffer_ms <= 1000,
            cls,
            "delivery_buffer_ms",
            "must be 0 or 25-1000 (nsqd's --min-output-buffer-timeout is 25 ms)",
        )
        _require(
            bool(self.channel) and "." not in self.channel,
            cls,
            "channel",
            "must be non-empty without dots",
        )


@dataclass(frozen=True)
class ExporterConfig(NsqConfig):
    """Settings of ``nsqjobs exporter``: nsqd's stats as Prometheus metrics, read on scrape."""

    host: str = setting(
        "127.0.0.1", "address the metrics/health server binds", env="NSQJOBS_EXPORTER_HOST"
    )
    port: int = setting(
        c.EXPORTER_PORT, "metrics and health HTTP port", env="NSQJOBS_EXPORTER_PORT"
    )
    scrape_timeout_s: float = setting(
        2.0, "seconds each nsqlookupd or nsqd request of a scrape may take"
    )

    def check(self) -> None:
        """Validate, including the shared NSQ settings."""
        super().check()
        cls = type(self)
        _require(0 <= self.port < 65536, cls, "port", "must be 0-65535")
        ok = 0 < self.scrape_timeout_s <= 60
        _require(ok, cls, "scrape_timeout_s", "must be over 0 and at most 60")
        _require(
            bool(self.lookupd_http_address or self.nsqd_http_address),
            cls,
            "lookupd_http_address",
            "empty: set --nsqd-http-address instead, or the exporter has nothing to read",
        )


def _postgres_url(url: str) -> bool:
    """A ``postgresql://`` or ``postgres://`` URL naming a host or a database (libpq's form)."""
    if not url.startswith(c.LEDGER_POSTGRES_SCHEMES):
        return False
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is not one)
    except ValueError:
        return False
    return bool(parts.hostname or parts.path.strip("/") or parts.query)
