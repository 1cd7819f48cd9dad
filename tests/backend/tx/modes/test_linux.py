"""``linux`` does its own work and no other's: the header pull copies the head, then exactly
the fragments with bytes left after it are mapped - a page the pull consumed entirely never
is - and unmapped when the packet is freed; the vif write goes by reference."""

from tests.backend.handed import TxSpy, payload_offsets, spans
from tests.conftest import frame, make_pair


def test_linux_maps_what_the_pull_left_and_only_that(monkeypatch):
    p = make_pair("linux", header_slots=False)
    spy = TxSpy(p)
    # 100 B: one fragment, all of it pulled; 4000 B: the pull takes 128 of the first page;
    # 9000 B: three pages, the first partly pulled
    frames = [frame(b"a" * 58), frame(b"b" * 3958), frame(b"c" * 8958)]
    assert spy.run(monkeypatch, frames) == frames
    assert spy.maps(spy.between("attach", "pulled")) == []
    want = [f for a, left in zip(spy.attached, spy.pulled, strict=True)
            for f, n in zip(a.frames, left, strict=True) if n]
    assert sorted(spy.maps(spy.between("pulled", "xmit"))) == sorted(want)
    assert [len(a.frames) for a in spy.attached] == [1, 1, 3]
    assert [sum(1 for n in left if n) for left in spy.pulled] == [0, 1, 3]
    assert sorted(f for k, f, *_ in spy.between("free", None) if k == "unmap") == sorted(want)
    for pieces, a, left in zip(spy.writes, spy.attached, spy.pulled, strict=True):
        rest = [x for x in pieces[2:] if x.data]
        assert all(x.offset is not None for x in rest)
        assert spans([(x.offset, len(x.data)) for x in rest]) == spans(payload_offsets(a, left))
    own = p.btx.mech.own
    assert (own.tx_mapped_after_pull, own.tx_pull_consumed) == (4, 1)


def test_linux_with_header_slots_maps_every_fragment(monkeypatch):
    p = make_pair("linux", header_slots=True)
    spy = TxSpy(p)
    f = frame(b"d" * 12000)
    assert spy.run(monkeypatch, [f]) == [f]
    (a,) = spy.attached
    assert sorted(spy.maps(spy.between("pulled", "xmit"))) == sorted(a.frames)
