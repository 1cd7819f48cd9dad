"""The shared ring: FIFO order, wrap-around of the u32 indices, and notification avoidance."""

from __future__ import annotations

import platform
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.protocol.ring import (
    MASK32,
    REQ_EVENT,
    REQ_PROD,
    RSP_EVENT,
    RSP_PROD,
    BackRing,
    FrontRing,
    OrderingError,
    RingError,
    require_tso,
    selftest,
)

U32 = struct.Struct("<I")


def make(start: int, size: int = 8) -> tuple[FrontRing, BackRing, memoryview]:
    page = memoryview(bytearray(4096))
    front = FrontRing(page, 4, size=size)
    for i in (REQ_PROD, RSP_PROD):
        front.idx[i] = start
    for i in (REQ_EVENT, RSP_EVENT):
        front.idx[i] = (start + 1) & MASK32
    front.req_prod_pvt = front.rsp_cons = start
    return front, BackRing(page, 4, size=size), page


def test_selftest_runs():
    selftest()


@settings(max_examples=300, deadline=None)
@given(start=st.integers(0, MASK32), ops=st.lists(st.tuples(st.sampled_from("pcrf"),
                                                             st.integers(1, 8)), max_size=80))
def test_fifo_and_no_lost_wakeup(start, ops):
    """Random interleavings of produce/consume/respond/reap, starting anywhere in u32 space:
    entries come out in order, counts never exceed the ring, and a consumer that went to sleep
    after RING_FINAL_CHECK_FOR_REQUESTS is always woken by the producer's next push."""
    front, back, page = make(start)
    sent = consumed = answered = reaped = 0
    back_sleeping = True  # SHARED_RING_INIT arms req_event: the consumer starts asleep
    for op, n in ops:
        if op == "p":  # produce n requests if room
            k = min(n, front.free_requests())
            for _ in range(k):
                U32.pack_into(page, front.entry(front.req_prod_pvt), sent)
                front.req_prod_pvt = (front.req_prod_pvt + 1) & MASK32
                sent += 1
            notify = front.push_requests()
            if notify:
                assert back_sleeping, "notified a consumer that never asked for it"
                back_sleeping = False
        elif op == "c" and not back_sleeping:  # consume and maybe sleep
            while back.unconsumed_requests():
                (v,) = U32.unpack_from(page, back.entry(back.req_cons))
                assert v == consumed
                back.req_cons = (back.req_cons + 1) & MASK32
                consumed += 1
            back_sleeping = not back.final_check_for_requests()
        elif op == "r":  # answer up to n consumed requests
            k = min(n, consumed - answered)
            for _ in range(k):
                back.rsp_prod_pvt = (back.rsp_prod_pvt + 1) & MASK32
                answered += 1
            back.push_responses()
        elif op == "f":
            k = front.unconsumed_responses()
            front.rsp_cons = (front.rsp_cons + k) & MASK32
            reaped += k
        assert not (back_sleeping and back.unconsumed_requests()), "lost wake-up"
        assert sent - reaped <= 8 and 0 <= front.free_requests() <= 8


def test_wraps_past_u32():
    front, back, page = make(MASK32 - 2)
    for i in range(6):
        U32.pack_into(page, front.entry(front.req_prod_pvt), i)
        front.req_prod_pvt = (front.req_prod_pvt + 1) & MASK32
    front.push_requests()
    assert back.unconsumed_requests() == 6
    assert front.req_prod_pvt == 3  # wrapped


def test_producer_running_ahead_is_an_error():
    front, back, _ = make(100)
    front.idx[REQ_PROD] = 100 + 9  # one more than the ring holds
    with pytest.raises(RingError):
        back.unconsumed_requests()


def test_backend_running_ahead_is_an_error():
    front, back, _ = make(5)
    front.idx[RSP_PROD] = 6  # a response without a request
    with pytest.raises(RingError):
        front.unconsumed_responses()


def test_push_notifies_only_across_event():
    front, back, _ = make(0)
    front.req_prod_pvt = 1
    assert front.push_requests()  # req_event starts at 1
    front.req_prod_pvt = 2
    assert not front.push_requests()  # the consumer has not re-armed
    back.req_cons = 2
    assert not back.final_check_for_requests()  # arms req_event = 3
    front.req_prod_pvt = 3
    assert front.push_requests()


class RacingIndices:
    """The shared indices, with a peer that publishes one entry the instant the consumer
    arms its event index: the race RING_FINAL_CHECK_FOR_* re-checks for."""

    def __init__(self, real, armed: int, prod: int) -> None:
        self.real, self.armed, self.prod = real, armed, prod

    def __getitem__(self, i):
        return self.real[i]

    def __setitem__(self, i, v) -> None:
        self.real[i] = v
        if i == self.armed:
            self.real[self.prod] = (self.real[self.prod] + 1) & MASK32


def test_final_check_for_requests_sees_a_request_published_while_arming():
    front, back, _page = make(MASK32 - 1)
    front.req_prod_pvt = (front.req_prod_pvt + 1) & MASK32  # what the racing peer publishes
    back.idx = RacingIndices(back.idx, REQ_EVENT, REQ_PROD)
    assert back.unconsumed_requests() == 0
    assert back.final_check_for_requests() is True


def test_final_check_for_responses_sees_a_response_published_while_arming():
    front, back, _page = make(MASK32 - 1)
    front.req_prod_pvt = (front.req_prod_pvt + 1) & MASK32  # one request outstanding
    front.idx = RacingIndices(front.idx, RSP_EVENT, RSP_PROD)
    assert front.unconsumed_responses() == 0
    assert front.final_check_for_responses() is True


@pytest.mark.parametrize("machine", ["aarch64", "ppc64le", "riscv64", "armv7l"])
def test_weakly_ordered_machines_are_refused(machine):
    with pytest.raises(OrderingError, match="total store order"):
        require_tso(machine)


def test_x86_is_accepted():
    require_tso("x86_64")
    require_tso("AMD64")


def test_netfront_refuses_to_start_on_a_weakly_ordered_machine(monkeypatch, tmp_path):
    from frontend.netfront import Netfront, NetfrontConfig

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(OrderingError):
        Netfront(NetfrontConfig(name="x", domid=1, connect=str(tmp_path / "ev")))
