"""Running ``hey`` (the HTTP load generator) and reading its summary."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import BenchError

_TOTAL = re.compile(r"^\s*Total:\s+([0-9.]+) secs", re.M)
_RPS = re.compile(r"^\s*Requests/sec:\s+([0-9.]+)", re.M)
_STATUS = re.compile(r"^\s*\[(\d+)\]\s+(\d+) responses")
_ERROR = re.compile(r"^\s*\[(\d+)\]\s+(.*)$")


def hey_binary() -> str:
    """The hey executable, or a one-line instruction to install it."""
    found = shutil.which("hey")
    if not found:
        raise SystemExit("bench: hey not found: apt-get install hey")
    return found


@dataclass
class HeyResult:
    """hey's summary: requests by status code, errors, and the run's length."""

    seconds: float
    reported_rps: float
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        """Requests answered 2xx."""
        return sum(n for code, n in self.statuses.items() if 200 <= code < 300)

    @property
    def failed(self) -> int:
        """Requests answered non-2xx, plus transport errors."""
        return sum(self.statuses.values()) - self.ok + sum(self.errors.values())

    @property
    def ok_per_s(self) -> float:
        """2xx answers per second of the run."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0


def parse(output: str) -> HeyResult:
    """Read hey's default text summary."""
    total, rps = _TOTAL.search(output), _RPS.search(output)
    if not total or not rps:
        raise BenchError(f"cannot read hey's summary:\n{output[-2000:]}")
    result = HeyResult(seconds=float(total[1]), reported_rps=float(rps[1]))
    section = ""
    for line in output.splitlines():
        if line.startswith("Status code distribution"):
            section = "status"
        elif line.startswith("Error distribution"):
            section = "error"
        elif line and not line.startswith(" "):
            section = ""
        elif section == "status" and (m := _STATUS.match(line)):
            result.statuses[int(m[1])] = int(m[2])
        elif section == "error" and (m := _ERROR.match(line)):
            result.errors[m[2].strip()[:200]] = int(m[1])
    return result


def run(
    url: str, body_file: Path, *, concurrency: int, seconds: float, content_type: str | None
) -> HeyResult:
    """POST ``body_file`` to ``url`` from ``concurrency`` workers for ``seconds``."""
    argv = [hey_binary(), "-z", f"{seconds:g}s", "-c", str(concurrency), "-m", "POST"]
    if content_type:
        argv += ["-T", content_type]
    argv += ["-D", str(body_file), url]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"hey did not finish within {seconds + 60:g}s") from exc
    if done.returncode != 0:
        raise BenchError(f"hey failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return parse(done.stdout)
