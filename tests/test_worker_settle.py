"""How a worker sends again what nsqd did not acknowledge: a job's own copy (a retry, a
give-back) is never sent twice when nsqd may have stored the first (its caller's REQ is then the
only other copy); a dead letter or failed result is."""

from __future__ import annotations

import asyncio

import pytest
from nsqjobs.errors import PublishConnectionLost, PublishError, PublishRejected, PublishTimeout
from nsqjobs.worker.hooks import Hooks
from nsqjobs.worker.settle import Settler


class FlakyPublisher:
    """Fails the first ``fails`` publishes with ``error``, then acknowledges; always connected."""

    def __init__(self, error: PublishError, fails: int = 1) -> None:
        self.error, self.fails, self.sent = error, fails, 0

    async def _send(self) -> None:
        self.sent += 1
        if self.sent <= self.fails:
            raise self.error

    def enqueue(self, topic: str, body: bytes) -> asyncio.Future[None]:
        raise AssertionError("not used here")

    async def pub(self, topic: str, body: bytes) -> None:
        await self._send()

    async def dpub(self, topic: str, delay_ms: int, body: bytes) -> None:
        await self._send()

    async def wait_connected(self, timeout_s: float) -> bool:
        return True


def _settler(publisher: FlakyPublisher) -> Settler:
    return Settler(
        "w1", publisher, Hooks(), backoff_base_s=0.1, backoff_cap_s=1.0, held={}, forget=print
    )


@pytest.mark.parametrize(
    ("error", "job_copy", "sends", "raises"),
    [
        # Not sent at all: sending again cannot make a second copy.
        (PublishError("not connected"), True, 2, False),
        (PublishError("not connected"), False, 2, False),
        # nsqd may hold the first: a job's copy is not sent again (the caller REQs instead)...
        (PublishTimeout("no answer"), True, 1, True),
        (PublishConnectionLost("closed"), True, 1, True),
        # ...an outcome is (a second dead letter or result is only counted as a duplicate).
        (PublishTimeout("no answer"), False, 2, False),
        # Refused: sending again cannot help.
        (PublishRejected("E_BAD_MESSAGE"), False, 1, True),
    ],
)
def test_what_is_sent_again_after_a_failed_publish(
    error: PublishError, job_copy: bool, sends: int, raises: bool
) -> None:
    publisher = FlakyPublisher(error)
    settler = _settler(publisher)

    async def publish() -> None:
        await settler._publish(lambda: publisher.dpub("jobs", 1000, b"{}"), job_copy=job_copy)

    if raises:
        with pytest.raises(type(error)):
            asyncio.run(publish())
    else:
        asyncio.run(publish())
    assert publisher.sent == sends
