"""RDY follows free slots: the worker never takes more messages than it has slots to run them.

nsqd sends a connection messages while the connection's in-flight count is below its RDY. So the
messages nsqd may still send are the sum, over every connection of every queue reader, of RDY
minus in flight; :class:`Flow` keeps that sum at the worker's free slots (slots minus the
messages it holds minus the threads still busy with a job that already ended). pynsq's own RDY
logic (per reader, from ``max_in_flight``) is switched off: with two queues and one slot it gave
RDY 1 to each.

The success path costs nothing here: a FIN frees the slot and the connection's room grows back
by one on its own. RDY is sent when the room must move: a connection opens or closes, a slot is
kept past its message (a timed-out thread), a freed thread comes back, a message arrived that
had no room (moving room between connections races with messages already on their way), or,
when slots are fewer than connections, every ``ROTATE_S`` to let each queue have its turn.

Adaptive delivery (the default). nsqd batches a connection's deliveries (16 KiB, or
``--delivery-buffer-ms``), which is what makes a busy worker fast, but at light load a lone
message then waits up to the whole timeout. nsqd also flushes at once whenever a connection's RDY
is used up. So a connection is *eager* while the worker keeps up: its room is at most one message
(RDY = in flight + 1), so each message nsqd sends uses the room up and goes out at once; the room
is opened again when it arrives and closed again when it is answered (two RDY per message, only
at light load). When ``BATCH_AFTER`` messages arrived without the connection being idle in
between (the worker is not keeping up, or jobs overlap), the connection turns *batched*: its room
is the free slots and nsqd batches. It turns eager again once it has been idle (nothing in flight,
no message) for ``ROTATE_S``: under load a connection touches zero in flight between two batches,
and turning eager there cost a fifth of the jobs/s. Nothing is reconnected and no message moves:
the switch is one RDY, so it can lose or duplicate nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from nsqjobs.nsq.reader import Reader

log = logging.getLogger("nsqjobs.worker")


class SlotReader(Reader):
    """A queue reader that leaves every RDY to its :class:`Flow` and names itself ``client_id``."""

    def __init__(self, flow: Flow, client_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.flow = flow
        self.client_id = client_id

    def connect_to_nsqd(self, host: str, port: int) -> Any:
        """Connect as pynsq does; IDENTIFY (sent once connected) carries our ``client_id``."""
        conn = super().connect_to_nsqd(host, port)
        if conn is not None:
            # pynsq sends its short host name as client_id: every worker of a host looked alike.
            conn.short_hostname = self.client_id
            conn.eager = self.flow.adaptive  # a new connection is idle
            conn.streak = 0  # messages arrived since the connection was last idle
            # FIN and REQ trigger these before pynsq lowers in_flight and sends the command.
            for answered in ("resume", "continue", "backoff"):
                conn.on(answered, self.flow.answering)
        return conn

    def _send_rdy(self, conn: Any, value: int) -> None:
        """pynsq's RDY decisions are ignored: the flow sends RDY itself."""

    def _on_message(self, conn: Any, message: Any, **kwargs: Any) -> None:
        message.conn = conn  # the flow adjusts this connection's RDY before answering, at times
        super()._on_message(conn, message, **kwargs)
        if conn.eager:
            self.flow.arrived(conn)

    def _on_connection_ready(self, conn: Any, **kwargs: Any) -> None:
        super()._on_connection_ready(conn, **kwargs)
        self.flow.rebalance()

    def _on_connection_close(self, conn: Any, **kwargs: Any) -> None:
        super()._on_connection_close(conn, **kwargs)
        conn.rdy = 0
        self.flow.rebalance()


class Flow:
    """Gives out RDY across all readers' connections so that what may arrive fits the free slots.

    ``used`` counts the slots taken: messages held plus threads still busy with an ended job.
    """

    ROTATE_S = 0.2  # how long a connection with room and no message keeps it when others wait
    # Messages a connection takes without being idle in between before it batches: at light load
    # each job ends before the next arrives, while a backlog keeps one in flight all along.
    BATCH_AFTER = 16

    def __init__(
        self,
        capacity: int,
        used: Callable[[], int],
        *,
        adaptive: bool = False,
        switched: Callable[[bool], None] | None = None,
    ) -> None:
        self.capacity = capacity
        self.used = used
        self.adaptive = adaptive
        self.switched = switched  # called with True when a connection turns eager, else False
        self.readers: list[SlotReader] = []
        self.stopped = False
        self._turn = 0
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the rotation that lets every queue have a turn when slots are scarce."""
        self._ticker = asyncio.ensure_future(self._tick())

    def conns(self) -> list[Any]:
        """Every open connection of every reader."""
        return [c for r in self.readers for c in r.conns.values() if c.connected()]

    def rebalance(self) -> None:
        """Set RDY so that the room on all connections adds up to the free slots (or less, when
        eager connections take one each)."""
        if self.stopped:
            return
        conns = self.conns()
        if not conns:
            return
        free = max(0, self.capacity - self.used())
        room = [max(0, c.rdy - c.in_flight) for c in conns]
        # An eager connection never gets more than one: see the module docstring.
        cap = [1 if c.eager else free for c in conns]
        room = [min(r, m) for r, m in zip(room, cap, strict=True)]
        excess = sum(room) - free
        if excess > 0:  # take it from the connections idle the longest
            for i in sorted(range(len(conns)), key=lambda i: conns[i].last_msg_timestamp):
                take = min(room[i], excess)
                room[i] -= take
                excess -= take
                if not excess:
                    break
        n = len(conns)
        while excess < 0:  # fill evenly, ties in turn
            open_ = [r for r, m in zip(room, cap, strict=True) if r < m]
            if not open_:
                break
            least = min(open_)
            i = next(
                (self._turn + k) % n
                for k in range(n)
                if room[(self._turn + k) % n] == least and least < cap[(self._turn + k) % n]
            )
            room[i] += 1
            excess += 1
            self._turn = (i + 1) % n
        for conn, r in zip(conns, room, strict=True):
            self._set(conn, conn.in_flight + r)

    def arrived(self, conn: Any) -> None:
        """A message came on an eager connection: turn it batched, or open its room again."""
        if self.stopped or not conn.connected():
            return
        conn.streak += 1
        if conn.streak >= self.BATCH_AFTER:
            conn.eager = False
            if self.switched is not None:
                self.switched(False)
            self.rebalance()
            return
        if conn.rdy > conn.in_flight:
            return  # it still has its one
        others = sum(max(0, c.rdy - c.in_flight) for c in self.conns() if c is not conn)
        if self.capacity - self.used() - others >= 1:
            self._set(conn, conn.in_flight + 1)

    def answering(self, conn: Any, **_kwargs: Any) -> None:
        """A FIN or REQ is being sent on ``conn`` (``in_flight`` still counts its message)."""
        if self.stopped:
            return
        if self.used() > self.capacity:
            # More held than slots (a message came when its room had just moved away): the
            # slot this answer frees is a waiting job's, so the connection's room must not
            # grow back, or the overload would outlive the burst that made it.
            self._set(conn, max(0, conn.rdy - 1))
            return
        if not conn.eager:
            return  # the busy path: a batched connection's room grows back by one on its own
        if conn.in_flight <= 1:
            conn.streak = 0  # idle once answered
        if conn.rdy > conn.in_flight:
            self._set(conn, conn.in_flight)  # one of room once it is answered, not two

    def settle(self) -> None:
        """Turn eager every batched connection idle for ``ROTATE_S`` (nothing in flight, no
        message): a busy one touches zero in flight between batches, and must stay batched."""
        now = time.time()  # pynsq stamps each message's arrival with time.time()
        idle = [
            c
            for c in self.conns()
            if not c.eager and not c.in_flight and now - c.last_msg_timestamp >= self.ROTATE_S
        ]
        for conn in idle:
            conn.eager = True
            conn.streak = 0
            if self.switched is not None:
                self.switched(True)
        if idle:
            self.rebalance()

    def keep_slot(self, message: Any) -> None:
        """Call before answering a message whose slot stays taken: its room must not grow."""
        conn = getattr(message, "conn", None)
        if conn is not None and conn.connected() and not self.stopped:
            self._set(conn, max(0, conn.rdy - 1))

    def rotate(self) -> None:
        """Slots fewer than connections: move room from an idle connection to one with none."""
        if self.stopped:
            return
        conns = self.conns()
        if len(conns) < 2:
            return
        now = time.time()  # pynsq stamps each message's arrival with time.time()
        waiting = [c for c in conns if c.rdy <= c.in_flight and not c.in_flight]
        idle = [
            c for c in conns if c.rdy > c.in_flight and now - c.last_msg_timestamp >= self.ROTATE_S
        ]
        if not waiting or not idle:
            return
        self._turn = (self._turn + 1) % len(conns)
        giver = idle[self._turn % len(idle)]
        taker = waiting[self._turn % len(waiting)]
        self._set(giver, giver.rdy - 1)
        self._set(taker, taker.in_flight + 1)

    def stop(self) -> None:
        """RDY 0 everywhere, for good (drain)."""
        self.stopped = True
        if self._ticker is not None:
            self._ticker.cancel()
        for conn in self.conns():
            self._set(conn, 0)

    async def _tick(self) -> None:
        while not self.stopped:
            await asyncio.sleep(self.ROTATE_S)
            try:
                if self.adaptive:
                    self.settle()
                self.rebalance()
                self.rotate()
            except Exception:  # never let the rotation die: log, and go on
                log.exception("RDY rotation failed")

    @staticmethod
    def _set(conn: Any, value: int) -> None:
        if conn.rdy != value:
            conn.send_rdy(value)
