"""Issue 8, item 7: the served OpenAPI document describes exactly what the gateway accepts.

A stateless schemathesis run, with every check, against a real gateway on a real nsqd: schema-
valid requests are accepted, invalid ones refused with a documented status, every answer
matches its documented status, content type, headers and schema, and none is a 5xx. The run is
bounded (examples per operation, a fixed seed) and its cross-field rule repairs are in
tests/schemathesis_hooks.py.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from nsqjobs.testing import Daemon, Nsq, http

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "schemathesis-token-0123456789"
# Every warning but missing_test_data, which a ledger run gives: a dead letter exists only once a
# worker gave up on a job, so replaying or purging one by id answers 404 here (their other
# answers are tested in tests/test_ledger_api.py).
WARNINGS = (
    "missing_auth,base_url_mismatch,validation_mismatch,missing_deserializer,"
    "unused_openapi_auth,unsupported_regex,method_not_allowed,constants_extraction,"
    "unmatched_filter,unresolvable_reference,low_valid_rate,rate_limited,dictionary_mismatch,"
    "timeout_units"
)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("tokens", "ledger"),
    [(False, False), (True, False), (False, True)],
    ids=["open", "bearer", "ledger"],
)
def test_schemathesis_finds_no_failure_against_the_served_document(
    nsq: Nsq, daemons: Callable[..., Daemon], tmp_path: Path, tokens: bool, ledger: bool
) -> None:
    # ?wait= is bounded by the gateway's setting, which the document states: schema-valid
    # waits of a tenth of a second keep the run short (no worker answers them).
    env = {"NSQJOBS_MAX_WAIT_S": "0.1"}
    if ledger:  # the ledger's routes; 200 for a known id, 409 for a conflicting one
        env["NSQJOBS_LEDGER_URL"] = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    auth: list[str] = []
    if tokens:
        env["NSQJOBS_API_TOKENS"] = TOKEN
        auth = ["-H", f"Authorization: Bearer {TOKEN}"]
    gw = daemons("gateway", nsq, **env)
    _, _, doc = http("GET", gw.url + "/openapi.json")
    assert doc["paths"]["/v1/jobs"]["post"]["parameters"][0]["schema"]["maximum"] == 0.1
    ledger_paths = {
        "/v1/jobs/{id}",
        "/v1/dead-letters",
        "/v1/dead-letters/replay",
        "/v1/dead-letters/{id}",
        "/v1/dead-letters/{id}/replay",
    }
    assert (ledger_paths <= set(doc["paths"])) is ledger
    assert not ledger_paths & set(doc["paths"]) or ledger
    assert ("get" in doc["paths"]["/v1/jobs"]) is ledger
    assert ("409" in doc["paths"]["/v1/jobs"]["post"]["responses"]) is ledger
    st = Path(sys.executable).parent / "st"
    run = subprocess.run(
        [
            str(st),
            "run",
            gw.url + "/openapi.json",
            "--checks",
            "all",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "40",
            "--seed",
            "8",
            "--workers",
            "1",
            "--request-timeout",
            "10",
            "--warnings",
            WARNINGS,
            *auth,
        ],
        cwd=tmp_path,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(tmp_path),
            "PYTHONPATH": str(ROOT),
            "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
            "NO_COLOR": "1",
        },
        capture_output=True,
        text=True,
        timeout=200,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "No issues found" in out, out[-3000:]
    # The gateway never answered 500 (its log would name the internal error).
    assert "internal error" not in gw.log()
