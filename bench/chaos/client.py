"""The chaos client: POSTs jobs with chosen ids at a steady rate and writes down every answer.

It behaves like a careful real client: a 202 (or a 200: the id exists) is an acceptance; an
answer that leaves it unsure whether the job was stored (a 503, a 500, a connection that broke
or timed out) is retried with the same id, after the server's Retry-After, until the job is
accepted or ``give_up_s`` has passed since the first try. A refused connection is retried too
(nothing was sent). Any other answer is final: refused.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench.chaos.check import SubmitState, Submitted

# A client's own patience: a request unanswered this long is given up and retried.
REQUEST_TIMEOUT_S = 30.0


@dataclass
class _Progress:
    sent: int = 0
    accepted: int = 0
    unconfirmed: int = 0
    rejected: int = 0
    retries: int = 0
    in_flight: int = 0
    answers: dict[str, int] = field(default_factory=dict)


class Submitter:
    """Threads submitting ``ids`` to ``POST {url}/v1/jobs`` at ``rate`` jobs/s.

    Job ``i`` is due ``i / rate`` seconds after :meth:`start`; a thread takes the next due job
    when it is free, so answers that are slow to come (an nsqd stopped past the publish
    timeout) hold back the pace only once every thread waits.
    """

    def __init__(
        self,
        url: str,
        ids: Sequence[str],
        body: Callable[[str], dict[str, object]],
        rate: float,
        *,
        threads: int = 48,
        give_up_s: float = 60.0,
    ) -> None:
        host, _, port = url.removeprefix("http://").rpartition(":")
        self.host, self.port = host, int(port)
        self.ids = list(ids)
        self.body = body
        self.rate = rate
        self.give_up_s = give_up_s
        self.results: dict[str, Submitted] = {}
        self.progress = _Progress()
        self._lock = threading.Lock()
        self._next = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"chaos-client-{n}", daemon=True)
            for n in range(max(1, threads))
        ]
        self.started = 0.0
        self.finished = 0.0

    def start(self) -> None:
        """Start submitting now."""
        self.started = time.monotonic()
        for t in self._threads:
            t.start()

    def done(self) -> bool:
        """True once every id is accepted, given up or refused."""
        return not any(t.is_alive() for t in self._threads)

    def stop(self) -> None:
        """Stop at once (ids not sent yet are left out of the results)."""
        self._stop.set()
        for t in self._threads:
            t.join(REQUEST_TIMEOUT_S + 5)

    def _take(self) -> tuple[str, float] | None:
        with self._lock:
            i = self._next
            if i >= len(self.ids):
                return None
            self._next += 1
        return self.ids[i], self.started + i / self.rate

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            taken = self._take()
            if taken is None:
                break
            job_id, due = taken
            if self._stop.wait(max(0.0, due - time.monotonic())):
                break
            conn = self._submit(job_id, conn)
        if conn is not None:
            conn.close()
        with self._lock:
            self.finished = max(self.finished, time.monotonic())

    def _submit(
        self, job_id: str, conn: http.client.HTTPConnection | None
    ) -> http.client.HTTPConnection | None:
        payload = json.dumps(self.body(job_id)).encode()
        answers: list[str] = []
        first = time.monotonic()
        with self._lock:
            self.progress.sent += 1
        state: SubmitState = "unconfirmed"
        while True:
            if answers:
                with self._lock:
                    self.progress.retries += 1
            with self._lock:
                self.progress.in_flight += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, REQUEST_TIMEOUT_S)
                answer, retry_after, keep = _post(conn, payload)
            finally:
                with self._lock:
                    self.progress.in_flight -= 1
            if not keep and conn is not None:
                conn.close()
                conn = None
            answers.append(answer)
            with self._lock:
                self.progress.answers[answer] = self.progress.answers.get(answer, 0) + 1
            if answer in ("202", "200"):
                state = "accepted"
                break
            if retry_after is None:
                state = "rejected"
                break
            if time.monotonic() - first + retry_after > self.give_up_s:
                break
            if self._stop.wait(retry_after):
                break
        with self._lock:
            self.results[job_id] = Submitted(job_id, state, tuple(answers))
            if state == "accepted":
                self.progress.accepted += 1
            elif state == "unconfirmed":
                self.progress.unconfirmed += 1
            else:
                self.progress.rejected += 1
        return conn


def _post(conn: http.client.HTTPConnection, payload: bytes) -> tuple[str, float | None, bool]:
    """One POST: (what the answer was, seconds to wait before a retry or None when it is
    final, whether the connection can be used again)."""
    try:
        conn.request("POST", "/v1/jobs", body=payload, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    except ConnectionRefusedError:
        return "refused", 0.2, False
    except TimeoutError:
        return "timeout", 0.5, False
    except (OSError, http.client.HTTPException):
        # Reset, closed, half an answer: the request may have been handled.
        return "connection lost", 0.2, False
    keep = not resp.will_close
    status = resp.status
    if status in (200, 202):
        return str(status), None, keep
    if status >= 500:
        kind = ""
        with contextlib.suppress(ValueError, AttributeError):
            # The problem type's last part: urn:nsqjobs:problem:outcome-unknown -> outcome-unknown.
            kind = re.split(r"[/:]", str(json.loads(raw).get("type", "")))[-1]
        try:
            wait = float(resp.headers.get("Retry-After") or 1)
        except ValueError:
            wait = 1.0
        return f"{status} {kind}".strip(), min(max(wait, 0.1), 5.0), keep
    return str(status), None, keep
