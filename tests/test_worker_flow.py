"""The worker's RDY bookkeeping (``nsqjobs.worker.flow``) on fake connections: what nsqd may
still send never exceeds the free slots, also after a message came with no room."""

from __future__ import annotations

from nsqjobs.worker.flow import Flow


class Conn:
    """What the flow reads and sets of a pynsq connection."""

    def __init__(self, rdy: int, in_flight: int, eager: bool = False) -> None:
        self.rdy, self.in_flight, self.eager = rdy, in_flight, eager
        self.streak = 0
        self.last_msg_timestamp = 0.0

    def connected(self) -> bool:
        return True

    def send_rdy(self, value: int) -> None:
        self.rdy = value

    def finished(self) -> None:
        """What pynsq does after the answering event: the message leaves in flight."""
        self.in_flight -= 1


class Reader:
    def __init__(self, *conns: Conn) -> None:
        self.conns = {str(i): c for i, c in enumerate(conns)}


def room(*conns: Conn) -> int:
    return sum(max(0, c.rdy - c.in_flight) for c in conns)


def test_an_answer_while_over_capacity_opens_no_room() -> None:
    # One slot, two connections. A message came on `b` just as its room moved away: two held,
    # one running, one waiting for the slot. When the running one is answered, its slot goes
    # to the waiting one: nsqd must not be let to send another.
    held = [2]
    flow = Flow(1, lambda: held[0], adaptive=True)
    a, b = Conn(rdy=1, in_flight=1), Conn(rdy=1, in_flight=1)
    flow.readers = [Reader(a, b)]  # type: ignore[list-item]
    assert room(a, b) == 0
    flow.answering(a)
    a.finished()
    held[0] = 1  # the answered message is let go; the waiting one runs
    assert room(a, b) == 0  # no slot is free: nothing more may come
    # Within capacity, an answer frees a slot and the room grows back by one, as it should.
    flow.answering(b)
    b.finished()
    held[0] = 0
    assert room(a, b) == 1


def test_over_capacity_a_batched_connections_room_does_not_grow_either() -> None:
    # Batched delivery (adaptive off; SlotReader registers the hook in both modes): the same.
    held = [2]
    flow = Flow(1, lambda: held[0], adaptive=False)
    a = Conn(rdy=2, in_flight=2)
    flow.readers = [Reader(a)]  # type: ignore[list-item]
    flow.answering(a)
    a.finished()
    assert room(a) == 0
