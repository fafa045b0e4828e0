"""The house rules, checked: imports point one way, the public import is light, names are ours.

Imports are read from the source with ``ast`` (module level and inside functions alike), so a
lazy import inside a function counts too; the light-import checks run a fresh interpreter.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ROOT / "service" / "nsqjobs"
TASKS = ROOT / "workers" / "nsqjobs_tasks"
HEAVY = ("tornado", "nsq", "numba", "httptools", "uvloop", "prometheus_client")


def _module_name(path: Path) -> str:
    root = ROOT / "service" if path.is_relative_to(ROOT / "service") else ROOT / "workers"
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str | None = None) -> Iterator[str]:
    """Every module ``path`` imports, absolute, including imports inside functions."""
    tree = ast.parse(path.read_text(), str(path))
    package = module or _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            # `from nsqjobs import wire` imports the submodule nsqjobs.wire.
            yield from (f"{base}.{alias.name}" for alias in node.names)


def _sources(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _imports_of(root: Path, *, under: str = "") -> dict[str, set[str]]:
    return {
        _module_name(p): set(_imports(p))
        for p in _sources(root)
        if _module_name(p).startswith(under)
    }


def _hits(imports: dict[str, set[str]], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} imports {name}"
        for module, names in imports.items()
        for name in names
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    )


def test_the_checker_sees_imports(tmp_path: Path) -> None:
    # The arrows below are only as good as the import reader: prove it finds every form.
    probe = tmp_path / "probe.py"
    probe.write_text(
        textwrap.dedent(
            """
            import tornado.web
            from nsqjobs.worker import daemon
            from . import submit
            from ..nsq import publisher

            def later() -> None:
                import numba
            """
        )
    )
    found = set(_imports(probe, "nsqjobs.gateway.probe"))
    assert {"tornado.web", "nsqjobs.worker.daemon", "nsqjobs.gateway.submit"} <= found
    assert {"nsqjobs.nsq.publisher", "numba"} <= found
    assert _hits({"probe": found}, ("nsqjobs.worker",)) == [
        "probe imports nsqjobs.worker",
        "probe imports nsqjobs.worker.daemon",
    ]


def test_wire_and_api_types_import_no_network_or_compute_library() -> None:
    light = (
        *("nsqjobs", "nsqjobs.api", "nsqjobs.wire", "nsqjobs.errors", "nsqjobs.names"),
        *("nsqjobs.registry", "nsqjobs.version"),
    )
    imports = {m: names for m, names in _imports_of(RUNTIME).items() if m in light}
    assert set(imports) == set(light)
    assert _hits(imports, HEAVY) == []
    # ...and nothing of the daemons either.
    daemons = ("nsqjobs.gateway", "nsqjobs.worker", "nsqjobs.nsq", "nsqjobs.http")
    assert _hits(imports, daemons) == []


def test_gateway_and_worker_never_import_each_other() -> None:
    assert _hits(_imports_of(RUNTIME, under="nsqjobs.gateway"), ("nsqjobs.worker",)) == []
    assert _hits(_imports_of(RUNTIME, under="nsqjobs.worker"), ("nsqjobs.gateway",)) == []


def test_lower_layers_do_not_import_the_daemons_or_the_harness() -> None:
    lower = {
        m: names
        for m, names in _imports_of(RUNTIME).items()
        if m.startswith(("nsqjobs.nsq", "nsqjobs.http", "nsqjobs.observability"))
    }
    assert lower, "no NSQ/HTTP/observability modules found"
    assert _hits(lower, ("nsqjobs.gateway", "nsqjobs.worker", "nsqjobs.cli")) == []
    runtime = {m: n for m, n in _imports_of(RUNTIME).items() if m != "nsqjobs.testing"}
    assert _hits(runtime, ("nsqjobs.testing", "tests", "bench")) == []


def test_kernels_import_nothing_of_ours() -> None:
    kernels = _imports_of(TASKS, under="nsqjobs_tasks.kernels")
    assert len(kernels) >= 8
    # Kernels may share kernels (the splitmix64 PRNG), and nothing else of ours.
    ours = _hits(kernels, ("nsqjobs", "nsqjobs_tasks", "service", "workers"))
    assert [hit for hit in ours if " imports nsqjobs_tasks.kernels." not in hit] == []
    assert ours, "the kernels share splitmix: the reader should have seen those imports"


def test_tasks_use_only_the_public_runtime_names() -> None:
    tasks = _imports_of(TASKS)
    allowed = ("nsqjobs", "nsqjobs.names", "nsqjobs.errors", "nsqjobs.registry")
    wrong = [
        f"{m} imports {name}"
        for m, names in tasks.items()
        for name in names
        if name.startswith("nsqjobs.") and not name.startswith(allowed)
    ]
    assert wrong == []


def _fresh_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["submit", "--help"], ["submit", "noop", "--gateway-url", "http://127.0.0.1:9"]],
)
def test_cli_help_and_submit_load_no_daemon_library(argv: list[str], tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import json, sys
        from nsqjobs import cli
        try:
            cli.main({argv!r})
        except SystemExit:
            pass
        heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        print(json.dumps(heavy))
        """
    )
    done = _fresh_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_public_import_is_light_and_complete(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import json, sys
        import nsqjobs
        from nsqjobs import task, Retry, SubmitRequest, ResultEnvelope, NsqjobsError
        heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
        print(json.dumps([heavy, sorted(nsqjobs.__all__)]))
        """
    )
    done = _fresh_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    heavy, names = json.loads(done.stdout)
    assert heavy == []
    assert {"task", "Retry", "SubmitRequest", "Accepted", "ResultEnvelope", "__version__"} <= set(
        names
    )


def test_an_application_with_its_own_service_and_workers_packages(tmp_path: Path) -> None:
    # The names our source folders have must not be the names we install.
    for name in ("service", "workers"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"WHO = 'the application {name}'\n")
    (tmp_path / "service" / "registry.py").write_text("MINE = True\n")
    (tmp_path / "workers" / "mytasks.py").write_text(
        textwrap.dedent(
            """
            import msgspec
            from nsqjobs import task, registry

            class Args(msgspec.Struct):
                n: int

            @task("app.double")
            def double(args: Args) -> int:
                return 2 * args.n
            """
        )
    )
    code = textwrap.dedent(
        """
        import json
        import service, service.registry, workers, workers.mytasks
        from nsqjobs import registry
        from nsqjobs.registry import load_task_modules
        load_task_modules(["nsqjobs_tasks.builtin"])
        print(json.dumps([service.WHO, workers.WHO, service.registry.MINE,
                          registry.get("app.double").run({"n": 21}),
                          "primes.count" in registry]))
        """
    )
    done = _fresh_python(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [
        "the application service",
        "the application workers",
        True,
        42,
        True,
    ]
