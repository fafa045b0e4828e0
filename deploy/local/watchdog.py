"""supervisord event listener of the local stack: a program that cannot start stops the stack.

Without it, supervisord gives a program that keeps failing at start up (FATAL) and goes on
running the others, so `make run` sat there with only the NSQ daemons. On PROCESS_STATE_FATAL
this writes "<program> could not start: <reason>" to the file named by its argument, prints it,
and asks supervisord to shut down; the Makefile then exits non-zero with that line. The reason
is the one line an nsqjobs daemon sends (as PROCESS_COMMUNICATION) when it fails at start, or
the line an NSQ daemon logs as FATAL (its output comes as PROCESS_LOG events).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def _fields(line: str) -> dict[str, str]:
    return dict(part.split(":", 1) for part in line.split() if ":" in part)


def main() -> int:
    """Serve supervisord's listener protocol until supervisord closes our stdin."""
    failure_file = Path(sys.argv[1])
    reasons: dict[str, str] = {}
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        stdout.write(b"READY\n")
        stdout.flush()
        header = stdin.readline()
        if not header:
            return 0
        headers = _fields(header.decode())
        payload = stdin.read(int(headers["len"])).decode(errors="replace")
        head, _, data = payload.partition("\n")
        name = _fields(head).get("processname", "?")
        event = headers.get("eventname", "")
        if event == "PROCESS_COMMUNICATION_STDOUT":
            reasons[name] = " ".join(data.split())
        elif event == "PROCESS_LOG_STDOUT":
            # The NSQ daemons' output: their reason is the line that says FATAL.
            for line in data.splitlines():
                if "FATAL:" in line:
                    reasons[name] = " ".join(line.partition("FATAL:")[2].split())
        elif event == "PROCESS_STATE_FATAL" and not failure_file.exists():
            reason = reasons.get(name) or "it exited while starting (its output is above)"
            line = f"{name} could not start: {reason}"
            failure_file.write_text(line + "\n")
            print(f"nsqjobs local stack: {line}; stopping", file=sys.stderr, flush=True)
            os.kill(os.getppid(), signal.SIGTERM)
        stdout.write(b"RESULT 2\nOK")
        stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
