"""Operating nsqjobs: task modules and their mistakes, debug tasks, and the submit command."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from nsqjobs.config import WorkerConfig, load
from nsqjobs.errors import ConfigError
from nsqjobs.names import BUILTIN_TASK_MODULE, DEBUG_TASK_MODULE, ENV_DEBUG_TASKS
from nsqjobs.registry import task_modules
from nsqjobs.testing import Daemon, Nsq, http, run_cli
from nsqjobs.worker.executors import ProcessExecutor, make_executor

HEADER = """
from typing import Any
import msgspec
from nsqjobs import task

class Args(msgspec.Struct):
    n: int
"""

# Each is a task module with one mistake, and what its one-line error must say.
MISTAKES = {
    "no_annotation": (
        "@task('demo.a')\ndef a(args):\n    return 1\n",
        "argument 'args' needs a type annotation",
    ),
    "two_arguments": (
        "@task('demo.b')\ndef b(args: Args, extra: int) -> int:\n    return 1\n",
        "takes exactly one argument",
    ),
    "no_arguments": ("@task('demo.c')\ndef c() -> int:\n    return 1\n", "exactly one argument"),
    "bad_name": ("@task('Demo Task')\ndef d(args: Args) -> int:\n    return 1\n", "dotted"),
    "bad_queue": (
        "@task('demo.e', queue='my.queue')\ndef e(args: Args) -> int:\n    return 1\n",
        "queue 'my.queue' must be 1-64 of",
    ),
    "duplicate": (
        "@task('demo.f')\ndef f1(args: Args) -> int:\n    return 1\n\n"
        "@task('demo.f')\ndef f2(args: Args) -> int:\n    return 2\n",
        "already registered",
    ),
    "throws_not_exception": (
        "@task('demo.g', throws=(int,))\ndef g(args: Args) -> int:\n    return 1\n",
        "throws must be a tuple of Exception subclasses",
    ),
    "bad_max_attempts": (
        "@task('demo.h', max_attempts=0)\ndef h(args: Args) -> int:\n    return 1\n",
        "max_attempts must be at least 1",
    ),
    "bool_max_attempts": (
        "@task('demo.h2', max_attempts=True)\ndef h2(args: Args) -> int:\n    return 1\n",
        "max_attempts must be at least 1 (a whole number), got True",
    ),
    "nan_time_limit": (
        "@task('demo.h3', time_limit_s=float('nan'))\ndef h3(args: Args) -> int:\n    return 1\n",
        "time_limit_s must be a positive, finite number of seconds, got nan",
    ),
    "unresolved_annotation": (
        "@task('demo.i')\ndef i(args: 'Missing') -> int:\n    return 1\n",
        "annotations do not resolve: NameError",
    ),
    "no_schema": (
        "@task('demo.j')\ndef j(args: object) -> int:\n    return 1\n",
        "has no JSON schema",
    ),
    "import_error": ("import no_such_dependency_here\n", "ModuleNotFoundError"),
    "raises_at_import": ("raise RuntimeError('config file missing')\n", "config file missing"),
    "syntax_error": ("def broken(:\n", "SyntaxError"),
}


def _env(**extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **extra}


@pytest.mark.parametrize("command", ["gateway", "worker"])
@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_every_task_definition_mistake_is_one_line(
    tmp_path: Path, mistake: str, command: str
) -> None:
    code, says = MISTAKES[mistake]
    module = f"mistake_{mistake}"
    (tmp_path / f"{module}.py").write_text(HEADER + "\n" + code)
    proc = run_cli(
        command,
        env=_env(NSQJOBS_TASK_MODULE=module, PYTHONPATH=str(tmp_path)),
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"nsqjobs {command}: task module '{module}'"), proc.stderr
    assert says in proc.stderr, proc.stderr


def test_a_missing_task_module_and_a_bad_debug_flag_are_one_line(tmp_path: Path) -> None:
    proc = run_cli("gateway", env=_env(NSQJOBS_TASK_MODULE="no_such_tasks"), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr == (
        "nsqjobs gateway: task module 'no_such_tasks' failed to import: "
        "ModuleNotFoundError: No module named 'no_such_tasks'\n"
    )
    proc = run_cli("worker", env=_env(**{ENV_DEBUG_TASKS: "maybe"}), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr == (
        "nsqjobs worker: --debug-tasks / NSQJOBS_DEBUG_TASKS: invalid value 'maybe' in "
        "NSQJOBS_DEBUG_TASKS (expected true/false)\n"
    )


def test_debug_tasks_are_added_to_any_task_modules() -> None:
    assert task_modules(["app.tasks"], {}) == ["app.tasks"]
    assert task_modules(["app.tasks"], {ENV_DEBUG_TASKS: "1"}) == ["app.tasks", DEBUG_TASK_MODULE]
    assert task_modules([DEBUG_TASK_MODULE], {ENV_DEBUG_TASKS: "1"}) == [DEBUG_TASK_MODULE]
    with pytest.raises(ConfigError, match="NSQJOBS_DEBUG_TASKS"):
        task_modules([], {ENV_DEBUG_TASKS: "2"})
    # The flag (--debug-tasks) as well as the variable: the process executor's children are
    # told the modules, debug ones included, as the daemon loads them.
    assert task_modules(["app.tasks"], {}, debug=True) == ["app.tasks", DEBUG_TASK_MODULE]
    assert task_modules(["app.tasks"], {ENV_DEBUG_TASKS: "1"}, debug=False) == ["app.tasks"]
    cfg = load(WorkerConfig, environ={"NSQJOBS_EXECUTOR": "process", ENV_DEBUG_TASKS: "yes"})
    executor = make_executor(cfg)
    assert isinstance(executor, ProcessExecutor)
    assert executor.task_modules == (BUILTIN_TASK_MODULE, DEBUG_TASK_MODULE)


@pytest.mark.integration
def test_debug_tasks_run_next_to_an_applications_own_tasks(
    tmp_path: Path, nsq: Nsq, daemons: Callable[..., Daemon]
) -> None:
    (tmp_path / "app_tasks.py").write_text(
        HEADER
        + textwrap.dedent(
            """
            @task("app.double")
            def double(args: Args) -> int:
                return 2 * args.n
            """
        )
    )
    env = {
        "NSQJOBS_TASK_MODULE": "app_tasks",
        ENV_DEBUG_TASKS: "1",
        "PYTHONPATH": str(tmp_path),
    }
    gw = daemons("gateway", nsq, **env)
    worker = daemons("worker", nsq, **env)
    _, _, tasks = http("GET", gw.url + "/v1/tasks")
    names = {t["name"] for t in tasks["tasks"]} if isinstance(tasks, dict) else set()
    assert "app.double" in names and "debug.sleep" in names, tasks
    assert "primes.count" not in names  # the application's module replaces the built-in one
    status, _, body = http(
        "POST", gw.url + "/v1/jobs?wait=10", {"task": "debug.sleep", "args": {"seconds": 0}}
    )
    assert status == 200 and body["status"] == "succeeded", body
    # The daemons say which modules gave which tasks.
    for daemon in (gw, worker):
        assert "tasks from app_tasks, nsqjobs_tasks.debug: app.double, debug." in daemon.log()


@pytest.mark.integration
def test_submit_uses_the_gateway_port_variable(
    tmp_path: Path, nsq: Nsq, daemons: Callable[..., Daemon]
) -> None:
    gw = daemons("gateway", nsq)
    env = _env(NSQJOBS_GATEWAY_PORT=str(gw.port))
    proc = run_cli("submit", "noop", "--args", '{"n": 1}', env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert '"status": "queued"' in proc.stdout
    # NSQJOBS_GATEWAY_URL still wins over the port.
    env["NSQJOBS_GATEWAY_URL"] = "http://127.0.0.1:9"
    proc = run_cli("submit", "noop", env=env, cwd=tmp_path)
    assert proc.returncode == 1 and "cannot reach the gateway at http://127.0.0.1:9" in proc.stderr
