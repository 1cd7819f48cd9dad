"""Peers that speak only stock netif, for running each pvnet end against something it did not
write: ``StockBackend`` behaves like Linux xen-netback, ``StockFrontend`` like xen-netfront.

Written from Xen's ``netif.h``, ``ring.h`` and ``grant_table.h`` on purpose *without* importing
``shared/protocol/netif.py`` or ``shared/protocol/ring.py``: every struct, flag and ring rule below
is transcribed again, so a mistake shared by both pvnet ends (a swapped flag, an extra slot in the
wrong place) shows up as a disagreement here instead of cancelling out. What they borrow from pvnet
is only what netif leaves to the platform: the event channel and handshake transport, and where the
region's pages are (``shared/region.Layout``, pvnet's stand-in for xenstore ring refs).

Each peer notes anything a stock peer would not accept in ``violations`` instead of raising, so
a test can name exactly what went wrong.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import time
from dataclasses import dataclass, field

from shared.plumbing.channel import EventChannel
from shared.plumbing.transport import create_memfd
from shared.protocol.region import Layout, Region

# --- ring.h --------------------------------------------------------------------------------
PAGE = 4096
NR_ENTS = 256  # __CONST_RING_SIZE for both netif rings on a 4 KiB page
ENTRIES_AT = 64  # 4 x u32 indices + 48 bytes of pad
M32 = 0xFFFFFFFF
# --- netif.h -------------------------------------------------------------------------------
TX_REQ = struct.Struct("<IHHHH")  # gref, offset, flags, id, size
TX_RSP = struct.Struct("<Hh")  # id, status
RX_REQ = struct.Struct("<HHI")  # id, pad, gref
RX_RSP = struct.Struct("<HHHh")  # id, offset, flags, status
EXTRA = struct.Struct("<BBHBBH")  # type, flags, gso.size, gso.type, gso.pad, gso.features
TX_ENT, RX_ENT = 12, 8  # sizeof(union netif_tx_sring_entry), (netif_rx_sring_entry)
TXF_CSUM_BLANK, TXF_DATA_VALIDATED, TXF_MORE_DATA, TXF_EXTRA_INFO = 1, 2, 4, 8
RXF_DATA_VALIDATED, RXF_CSUM_BLANK, RXF_MORE_DATA, RXF_EXTRA_INFO = 1, 2, 4, 8
EXTRA_TYPE_GSO = 1
GSO_TCPV4, GSO_TCPV6 = 1, 2
RSP_OKAY, RSP_NULL = 0, 1
# --- grant_table.h (grant_entry_v1) ----------------------------------------------------------
GNT = struct.Struct("<HHI")  # flags, domid, frame
GTF_PERMIT, GTF_READONLY = 1, 4
RESERVED = 8

#: what Linux xen-netback's netback_probe writes (6.x; multi-queue-max-queues is its
#: xenvif_max_queues, the host's CPUs), implemented by this stock backend or not
BACKEND_KEYS = {"feature-sg": True, "feature-gso-tcpv4": True, "feature-gso-tcpv6": True,
                "feature-ipv6-csum-offload": True, "feature-rx-copy": True,
                "feature-rx-flip": False, "feature-multicast-control": True,
                "feature-dynamic-multicast-control": True,
                "feature-split-event-channels": True, "multi-queue-max-queues": 4,
                "feature-ctrl-ring": True, "feature-xdp-headroom": True}
#: what Linux xen-netfront's talk_to_netback writes (6.x, one queue, no XDP)
FRONTEND_KEYS = {"request-rx-copy": True, "feature-rx-notify": True, "feature-sg": True,
                 "feature-gso-tcpv4": True, "feature-gso-tcpv6": True,
                 "feature-ipv6-csum-offload": True}
#: what a frontend written from netif.h before feature-rx-notify and IPv6 checksum offload
#: writes (the keys every stock netfront knows)
OLD_FRONTEND_KEYS = {"request-rx-copy": True, "feature-sg": True, "feature-gso-tcpv4": True,
                     "feature-gso-tcpv6": True}
#: the boolean keys Linux netback's read_xenbus_vif_flags reads from a frontend
BACKEND_READS = {*FRONTEND_KEYS, "feature-no-csum-offload", "request-multicast-control"}


@dataclass
class Frame:
    """One packet as netif describes it: bytes, the first slot's flags, GSO (type, size)."""

    data: bytes
    flags: int = 0
    gso: tuple[int, int] | None = None
    features: int = 0  # the extra slot's gso.features (0 in stock netif)


class Ring:
    """One shared ring page: the four indices and entry offsets, as ``ring.h`` lays them out."""

    def __init__(self, page: memoryview, ent: int) -> None:
        self.page, self.ent = page, ent

    def get(self, i: int) -> int:
        return struct.unpack_from("<I", self.page, 4 * i)[0]

    def set(self, i: int, v: int) -> None:
        struct.pack_into("<I", self.page, 4 * i, v & M32)

    def at(self, idx: int) -> int:
        return ENTRIES_AT + (idx % NR_ENTS) * self.ent


REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT = range(4)


def push_notify(ring: Ring, which: int, new: int) -> bool:
    """RING_PUSH_{REQUESTS,RESPONSES}_AND_CHECK_NOTIFY for producer index ``which``."""
    old = ring.get(which)
    ring.set(which, new)
    event = ring.get(which + 1)
    return (new - event) & M32 < (new - old) & M32


@dataclass
class Peer:
    """What both stock peers share: the channel, the region's pages, the violation log."""

    chan: EventChannel
    violations: list[str] = field(default_factory=list)

    def _map(self, mem: mmap.mmap) -> None:
        self.mem = mem
        self.buf = memoryview(mem)
        self.lay = Layout.unpack(self.buf, len(mem))
        p = PAGE
        self.tx = Ring(self.buf[self.lay.tx_ring_page * p:(self.lay.tx_ring_page + 1) * p], TX_ENT)
        self.rx = Ring(self.buf[self.lay.rx_ring_page * p:(self.lay.rx_ring_page + 1) * p], RX_ENT)
        self.gnt_at = self.lay.gnt_page * p

    def page(self, frame: int) -> memoryview:
        return self.buf[frame * PAGE:(frame + 1) * PAGE]

    def wait(self, state: str, timeout: float = 10.0) -> dict:
        """The next handshake message in ``state``, within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        poller = select.poll()  # not select(): the test process may hold fds past 1024
        poller.register(self.chan.fileno(), select.POLLIN)
        while time.monotonic() < deadline:
            if not poller.poll(50):
                continue
            got = self.chan.recv()
            for msg in got.messages:
                if msg.get("state") == state:
                    self.fds = got.fds
                    return msg
            for fd in got.fds:
                os.close(fd)
        raise TimeoutError(f"no {state} from the pvnet end in {timeout:g}s")

    def close(self) -> None:
        self.chan.close()


class StockBackend(Peer):
    """Linux xen-netback, as far as the ring is concerned. ``pump`` serves both rings once."""

    def handshake(self) -> dict:
        hello = self.wait("Initialising")
        self.chan.send({"state": "InitWait", "name": "stock-netback", "domid": 0,
                        "features": BACKEND_KEYS})
        init = self.wait("Initialised")
        self.keys = init["features"]
        for k, v in self.keys.items():
            if k == "multi-queue-num-queues":  # connect(): at most multi-queue-max-queues
                if not 1 <= v <= BACKEND_KEYS["multi-queue-max-queues"]:
                    self.violations.append(f"frontend asked for {v} queues")
            elif v and k not in BACKEND_READS:
                self.violations.append(f"frontend wrote {k}, which no stock backend offers")
        for k in FRONTEND_KEYS:  # a Linux netfront writes each of these, all true
            if self.keys.get(k) is not True:
                self.violations.append(f"frontend did not write {k} (Linux netfront does)")
        fd = self.fds[0]
        self._map(mmap.mmap(fd, os.fstat(fd).st_size))
        os.close(fd)
        self.chan.send({"state": "Connected"})
        self.rx_queue: list[Frame] = []
        self.tx_frames: list[Frame] = []
        self.req_cons_tx = self.rsp_prod_tx = self.tx.get(RSP_PROD)
        self.req_cons_rx = self.rsp_prod_rx = self.rx.get(RSP_PROD)
        return hello

    def grant(self, gref: int, write: bool) -> memoryview | None:
        """gnttab_copy's checks on a gref from the ring; None (and a violation) if refused."""
        if gref >= self.lay.gnt_count:
            self.violations.append(f"gref {gref:#x} outside the grant table")
            return None
        flags, dom, frame = GNT.unpack_from(self.buf, self.gnt_at + gref * GNT.size)
        if not flags & GTF_PERMIT or dom != 0 or (write and flags & GTF_READONLY):
            self.violations.append(f"gref {gref} not granted for {'write' if write else 'read'}")
            return None
        return self.page(frame)

    def _tx_one(self) -> None:
        tx = self.tx
        buf = tx.page
        gref, off, flags, rid, size = TX_REQ.unpack_from(buf, tx.at(self.req_cons_tx))
        self.req_cons_tx += 1
        if flags & ~(TXF_CSUM_BLANK | TXF_DATA_VALIDATED | TXF_MORE_DATA | TXF_EXTRA_INFO):
            self.violations.append(f"tx request flags {flags:#x}: bits netif.h does not define")
        f = Frame(b"", flags)
        answers = [(rid, RSP_OKAY)]
        if flags & TXF_EXTRA_INFO:  # xenvif_get_extras: the next slot
            etype, _ef, gsize, gtype, _pad, feat = EXTRA.unpack_from(buf,
                                                                     tx.at(self.req_cons_tx))
            self.req_cons_tx += 1
            if etype != EXTRA_TYPE_GSO or gtype not in (GSO_TCPV4, GSO_TCPV6) or not gsize:
                self.violations.append(f"tx extra type {etype} gso {gtype}/{gsize}")
            f.gso, f.features = (gtype, gsize), feat
            answers.append((0, RSP_NULL))
        frags, more = [], flags & TXF_MORE_DATA
        while more:
            fg, fo, ff, fid, fs = TX_REQ.unpack_from(buf, tx.at(self.req_cons_tx))
            self.req_cons_tx += 1
            frags.append((fg, fo, fs))
            answers.append((fid, RSP_OKAY))
            more = ff & TXF_MORE_DATA
        first = size - sum(s for _g, _o, s in frags)
        parts = []
        for g, o, s in [(gref, off, first), *frags]:
            page = self.grant(g, False)
            parts.append(bytes(page[o:o + s]) if page is not None and o + s <= PAGE else b"")
        f.data = b"".join(parts)
        self.tx_frames.append(f)
        for rid_, status in answers:  # make_tx_response, then NULL for each extra
            TX_RSP.pack_into(buf, tx.at(self.rsp_prod_tx), rid_, status)
            self.rsp_prod_tx += 1

    def _rx_one(self, f: Frame) -> bool:
        """xenvif_rx_skb: first data slot, then the extra in its own request slot, then the
        rest; every response at the position of the request it answers."""
        rx = self.rx
        buf = rx.page
        npages = -(-len(f.data) // PAGE)
        need = npages + (1 if f.gso else 0)
        if (rx.get(REQ_PROD) - self.req_cons_rx) & M32 < need:
            return False
        slots = ["data0", *(["extra"] if f.gso else []), *[f"data{i}" for i in range(1, npages)]]
        for i, what in enumerate(slots):
            rid, _pad, gref = RX_REQ.unpack_from(buf, rx.at(self.req_cons_rx))
            self.req_cons_rx += 1
            at = rx.at(self.rsp_prod_rx)
            self.rsp_prod_rx += 1
            if what == "extra":
                EXTRA.pack_into(buf, at, EXTRA_TYPE_GSO, 0, f.gso[1], f.gso[0], 0, 0)
                continue
            k = int(what[4:])
            chunk = f.data[k * PAGE:(k + 1) * PAGE]
            page = self.grant(gref, True)
            if page is not None:
                page[:len(chunk)] = chunk
            flags = (f.flags if k == 0 else 0) | (RXF_MORE_DATA if i < len(slots) - 1 else 0)
            if k == 0 and f.gso:
                flags |= RXF_EXTRA_INFO
            RX_RSP.pack_into(buf, at, rid, 0, flags, len(chunk))
        return True

    def pump(self) -> None:
        """Serve what is there, publish, notify as ring.h says, re-arm req_event."""
        tx, rx = self.tx, self.rx
        while (tx.get(REQ_PROD) - self.req_cons_tx) & M32:
            self._tx_one()
        while self.rx_queue and self._rx_one(self.rx_queue[0]):
            self.rx_queue.pop(0)
        kick = push_notify(tx, RSP_PROD, self.rsp_prod_tx)
        kick |= push_notify(rx, RSP_PROD, self.rsp_prod_rx)
        tx.set(REQ_EVENT, self.req_cons_tx + 1)
        rx.set(REQ_EVENT, self.req_cons_rx + 1)
        if kick:
            self.chan.notify()


class StockFrontend(Peer):
    """Linux xen-netfront: RX buffers found by ring position (id = position & 255), TX packets
    as first slot + GSO extra + fragments, every page granted per use."""

    def handshake(self, size: int = 2 << 20, keys: dict | None = None) -> dict:
        self.chan.send({"state": "Initialising", "name": "stock-netfront", "domid": self.domid})
        offer = self.wait("InitWait")
        self.offered = offer["features"]
        fd, mem = create_memfd(size, "stock-netfront")
        Region.create(mem)  # pvnet's layout header: where the pages are
        self._map(mem)
        for ring in (self.tx, self.rx):  # SHARED_RING_INIT
            ring.set(REQ_EVENT, 1)
            ring.set(RSP_EVENT, 1)
        self.keys = keys or FRONTEND_KEYS
        self.chan.send({"state": "Initialised", "name": "stock-netfront", "domid": self.domid,
                        "features": self.keys, "region": {"size": size}}, (fd,))
        os.close(fd)
        self.wait("Connected")
        self.chan.send({"state": "Connected"})
        self.req_prod_tx = self.rsp_cons_tx = self.req_prod_rx = self.rsp_cons_rx = 0
        self.rx_frames: list[Frame] = []
        self.tx_done = 0
        self.next_tx_page = 0
        return offer

    domid = 7

    def _gnt(self, ref: int, frame: int, readonly: bool) -> None:
        GNT.pack_into(self.buf, self.gnt_at + ref * GNT.size,
                      GTF_PERMIT | (GTF_READONLY if readonly else 0), 0, frame)

    def keep_posted(self, count: int) -> None:
        """Post RX buffers up to ``count`` and keep that many posted."""
        self.posted_target = count
        self.post_rx(count - ((self.req_prod_rx - self.rsp_cons_rx) & M32))

    def post_rx(self, count: int) -> None:
        """xennet_alloc_rx_buffers: buffer i lives at ring position i (mod 256)."""
        for _ in range(count):
            i = self.req_prod_rx % NR_ENTS
            self._gnt(RESERVED + i, self.lay.payload_page + i, False)
            RX_REQ.pack_into(self.rx.page, self.rx.at(self.req_prod_rx), i, 0, RESERVED + i)
            self.req_prod_rx += 1
        # a frontend without feature-rx-notify never notifies for RX requests (netif.h)
        if push_notify(self.rx, REQ_PROD, self.req_prod_rx) \
                and self.keys.get("feature-rx-notify"):
            self.chan.notify()

    def send(self, f: Frame) -> None:
        """xennet_start_xmit: first slot sized as the whole packet, extra, fragments."""
        pages = [f.data[i:i + PAGE] for i in range(0, len(f.data), PAGE)] or [b""]
        slots = []
        for k, chunk in enumerate(pages):
            n = NR_ENTS + self.next_tx_page % NR_ENTS  # TX pages after the RX buffers
            self.next_tx_page += 1
            self.page(self.lay.payload_page + n)[:len(chunk)] = chunk
            self._gnt(RESERVED + n, self.lay.payload_page + n, True)
            more = TXF_MORE_DATA if k < len(pages) - 1 else 0
            size = len(f.data) if k == 0 else len(chunk)
            flags = more | ((f.flags | (TXF_EXTRA_INFO if f.gso else 0)) if k == 0 else 0)
            slots.append(TX_REQ.pack(RESERVED + n, 0, flags, n, size))
            if k == 0 and f.gso:
                slots.append(EXTRA.pack(EXTRA_TYPE_GSO, 0, f.gso[1], f.gso[0], 0, 0)
                             + bytes(TX_ENT - EXTRA.size))
        for s in slots:
            at = self.tx.at(self.req_prod_tx)
            self.tx.page[at:at + len(s)] = s
            self.req_prod_tx += 1
        if push_notify(self.tx, REQ_PROD, self.req_prod_tx):
            self.chan.notify()

    def pump(self) -> None:
        """xennet_tx_buf_gc and xennet_poll: consume responses, re-arm rsp_event."""
        tx, rx = self.tx, self.rx
        while (tx.get(RSP_PROD) - self.rsp_cons_tx) & M32:
            _rid, status = TX_RSP.unpack_from(tx.page, tx.at(self.rsp_cons_tx))
            self.rsp_cons_tx += 1
            if status not in (RSP_OKAY, RSP_NULL):
                self.violations.append(f"tx status {status}")
            self.tx_done += status == RSP_OKAY
        cur: Frame | None = None
        while (rx.get(RSP_PROD) - self.rsp_cons_rx) & M32:
            pos = self.rsp_cons_rx
            rid, off, flags, status = RX_RSP.unpack_from(rx.page, rx.at(pos))
            self.rsp_cons_rx += 1
            if rid != pos % NR_ENTS:
                self.violations.append(f"rx response at position {pos} has id {rid}, the "
                                       f"request there had id {pos % NR_ENTS}")
            data = bytes(self.page(self.lay.payload_page + pos % NR_ENTS)[off:off + status])
            if cur is None:
                cur = Frame(data, flags & (RXF_DATA_VALIDATED | RXF_CSUM_BLANK))
            else:
                cur.data += data
            if flags & RXF_EXTRA_INFO:  # xennet_get_extras: the next slot is the extra
                etype, _ef, gsize, gtype, _pad, feat = EXTRA.unpack_from(
                    rx.page, rx.at(self.rsp_cons_rx))
                self.rsp_cons_rx += 1
                cur.gso, cur.features = (gtype, gsize), feat
                if etype != EXTRA_TYPE_GSO or feat:
                    self.violations.append(f"rx extra type {etype} features {feat}")
            if not flags & RXF_MORE_DATA:
                self.rx_frames.append(cur)
                cur = None
        if cur is not None:
            self.violations.append("rx frame published without its last slot")
        missing = self.posted_target - ((self.req_prod_rx - self.rsp_cons_rx) & M32)
        if missing > 0:  # xennet_move_rx_slot / refill: keep ``posted_target`` posted
            self.post_rx(missing)
        tx.set(RSP_EVENT, self.rsp_cons_tx + 1)
        rx.set(RSP_EVENT, self.rsp_cons_rx + 1)

    posted_target = 0
