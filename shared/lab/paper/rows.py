"""The published results and the experiment that reproduces each one here.

Each ``Row`` names its source (read in the primary text: the URL is where), what was compared,
the published figures (before -> after and their ratio), and pvnet's experiment: the bench
path, the two modes compared (``before`` is the mechanism the source improved on, ``after``
the mechanism it introduced), the workload and direction. Ours is ``after / before`` of the
workload's primary figure (frames/s for pps*, Gbit/s for tcp), per round.

Kinds: ``measured`` rows count toward the goal; ``arithmetic`` rows (a recycling hit rate
that follows from the pool size alone) are reported apart; ``pending`` rows wait for a
mechanism pvnet lacks and are never shown as passing (none since multi-queue).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    key: str
    title: str
    url: str


SOURCES = {s.key: s for s in (
    Source("martins-rfc-2015", "J. Martins, [RFC PATCH 00/13] Persistent grant maps for xen net "
           "drivers, xen-devel, May 2015 (cover letter; as sent, also in github.com/cnplab/"
           "xen-pgnt-net, patches/linux/0000-cover-letter.patch)",
           "https://lists.xenproject.org/archives/html/xen-devel/2015-05/msg01498.html"),
    Source("uek-26107942", "J. Martins, Oracle UEK xen-netback/netfront 'use gref mappings for "
           "Tx/Rx requests', 'generalize recycling for grants' (Orabug 26107942)",
           "https://www.infradead.org/git/?a=commit&h=fdbb2e3659b3677b4fc5af732ae1406c844b2b3f"
           "&p=users%2Fjedix%2Flinux-maple.git"),
    Source("xen-staging-doc", "Xen docs/misc/netif-staging-grants.pandoc rev 4, 'Performance'",
           "https://xenbits.xen.org/docs/unstable/misc/netif-staging-grants.html"),
    Source("xu-2007", "H. Xu, RFC: [0/2] Remove netloop by lazy copying in netback, xen-devel, "
           "March 2007", "https://lists.xenproject.org/archives/html/xen-devel/2007-03/msg00914.html"),
    Source("snabb-719", "Snabb PR #719 'packet copies' (virtio-net, 128 B)",
           "https://github.com/snabbco/snabb/pull/719"),
    Source("bennieston-2014", "A. Bennieston, [PATCH V6 net-next 0/5] xen-net{back,front}: "
           "Multiple transmit and receive queues, xen-devel, March 2014",
           "https://lists.xenproject.org/archives/html/xen-devel/2014-03/msg00000.html"),
)}


@dataclass(frozen=True)
class Row:
    """One published comparison and pvnet's experiment for it."""

    id: str
    source: str  # a SOURCES key
    compared: str  # what was compared, in a few words
    theirs_before: float
    theirs_after: float
    unit: str  # of the published figures
    setup: str  # the source's set-up
    before: str  # pvnet bench mode the source improved on
    after: str  # pvnet bench mode of the mechanism it introduced
    workload: str
    direction: str
    kind: str = "measured"  # or "arithmetic", "pending"
    #: why pvnet's comparison is the one it is (where it differs from the source's)
    note: str = ""

    @property
    def theirs_ratio(self) -> float:
        return self.theirs_after / self.theirs_before

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(m for m in (self.before, self.after) if m)


P1_TX = ("the cover letter's baseline is stock netback (as the UEK commit's, P2a: the same "
         "1.24 Mpps): the first 128 bytes grant-copied, any rest of the slot and the frags "
         "grant-mapped and unmapped per packet, so a 64-byte frame is one grant copy and a "
         "1496-byte one a copy and a map; with persistent grants every gref is mapped once "
         "and kept ('still preparing the grant map and adding them to the tree'), the "
         "header memcpy'd out of the mapping. Until 2026-12-07 the 'before' was "
         "map-noslots (every page mapped per packet: at 64 B a map no netback did)")

ROWS: tuple[Row, ...] = (
    Row("P1a", "martins-rfc-2015", "TX 64 B: persistent grants vs stock netback",
        1.24, 1.82, "Mpps", "E5-1650 v2, Xen 4.5, pktgen burst 1, DomU->Dom0",
        "linux-noslots", "map-noslots-persistent", "pps64", "tx",
        note=P1_TX),
    Row("P1b", "martins-rfc-2015", "TX 1496 B: persistent grants vs stock netback",
        0.518, 1.48, "Mpps", "E5-1650 v2, Xen 4.5, pktgen burst 1, DomU->Dom0",
        "linux-noslots", "map-noslots-persistent", "pps1496", "tx", note=P1_TX),
    Row("P1c", "martins-rfc-2015", "RX 64 B: persistent grants vs stock netback's grant copy",
        1.33, 2.78, "Mpps", "E5-1650 v2, Xen 4.5, pktgen burst 1, Dom0->DomU",
        "lazy-noslots", "lazy-noslots-persistent+rx-map", "pps64", "rx",
        note="stock netback grant-copies every frame into the guest's buffer; with "
             "persistent grants it maps a buffer's gref once and memcpys into it (the cover "
             "letter); the same pair as P2b. The RFC's RX figure also has its patch 6 in "
             "it (the frame copied in ndo_start_xmit instead of through the RX kthread: "
             "'by ~2x' for small packets, its words), which pvnet has no counterpart for; "
             "until 2026-12-07 the 'before' was the mapping receiver (a map per frame), "
             "which no netback had"),
    Row("P2a", "uek-26107942", "TX 64 B: gref mappings (staged) vs Linux netback's grant copy",
        1.24, 3.6, "Mpps", "E5-2699 v3, DomU->Dom0",
        "linux-noslots", "linux-noslots-staging", "pps64", "tx",
        note="a 64-byte frame is all linear: Linux grant-copies it (no map); the staged "
             "mapping makes that a memcpy (P4a's experiment against this source's figure); "
             "the commit's '46 %' is a slip for 2.9x"),
    Row("P2b", "uek-26107942", "RX: kept-mapped buffers vs a grant copy per packet",
        1.02, 2.04, "Mpps", "E5-2699 v3, Dom0->DomU (about 2x the grant copy)",
        "lazy-noslots", "lazy-noslots-persistent+rx-map", "pps64", "rx",
        note="frontend buffers granted persistently, mapped once by the backend, "
             "filled by memcpy; the source states 2.04 Mpps as about twice the grant copy"),
    Row("P3a", "uek-26107942", "grant recycling hit rate, pool = 1 ring", 100.0, 30.0, "%",
        "TCP streams, backend->frontend", "", "lazy-recycle1", "tcp", "rx", kind="arithmetic",
        note="figures: % of pages whose grant was reused (theirs ~30 %)"),
    Row("P3b", "uek-26107942", "grant recycling hit rate, pool = 2 rings", 100.0, 90.0, "%",
        "TCP streams, backend->frontend", "", "lazy-recycle2", "tcp", "rx", kind="arithmetic",
        note="figures: % of pages whose grant was reused (theirs 80-100 %: 90 taken)"),
    Row("P4a", "xen-staging-doc", "UDP 64 B TX: staged linear area vs grant copy",
        0.684, 2.49, "Mpps", "E5-2630 v4, 100 GbE, 1 queue, guest->host",
        "linux-noslots", "linux-noslots-staging", "pps64", "tx",
        note="the frame's linear part pulled by a CPU copy from the premapped page"),
    Row("P4b", "xen-staging-doc", "UDP 64 B RX: staged buffers vs grant copy",
        0.439, 2.96, "Mpps", "E5-2630 v4, 100 GbE, 1 queue, host->guest",
        "lazy-noslots", "lazy-noslots-staging+rx-map", "pps64", "rx"),
    Row("P4c", "xen-staging-doc", "bulk TX: staged buffers vs grant map", 17.2, 38.2, "Gbit/s",
        "E5-2630 v4, 100 GbE, 1 queue, guest->host", "linux-noslots",
        "linux-noslots-staging", "tcp", "tx"),
    Row("P5", "xu-2007", "bulk domU->dom0: lazy copy vs the netloop copy", 1.0, 1.5, "x",
        "domU -> dom0 bulk ('around 50 %' higher)", "copy-noslots", "map-noslots", "tcp", "tx",
        note="2007's netback grant-mapped every TX page before and after the change; Xu "
             "removed only the copy of every packet bound for dom0 ('eliminate the copying "
             "for bulk transfers'): copy mode (map, copy, unmap) against map mode (mapped, "
             "never copied); until 2026-12-07 the 'after' was lazy-noslots, which also "
             "drops the maps"),
    Row("P7", "snabb-719", "skipping the per-packet copy", 5.6, 8.1, "Mpps",
        "virtio-net, 128 B frames", "copy-noslots-persistent", "map-noslots-persistent",
        "pps1496", "tx",
        note="Snabb's vhost-user maps the guest's memory once (its memory table), so only "
             "the copy differs: both sides keep the frontend's pages mapped (persistent "
             "grants) and one copies the payload out, the other hands the mapped page on; "
             "until 2026-12-07 the row compared copy-noslots with lazy-noslots, a per-packet "
             "map and unmap apart as well. 1496 B: at 64 B the header pull takes the whole "
             "frame, leaving copy mode nothing to copy"),
    Row("P6", "bennieston-2014", "2 queues vs 1 (aggregate), MTU frames, 4 flows", 1.0, 1.7,
        "x", "X5650, intra-host iperf, 10 GbE line rate", "lazy-noslots", "lazy-noslots-q2",
        "tcp-nogso-p4", "rx",
        note="scale-out, not efficiency: a worker process per queue at each end, one queue of "
             "each end per core; on 2 cores one queue already keeps both busy (front on one, "
             "back on the other), so the bound is the machine's idle share, not 1.7x"),
)

#: the reference mode: one base cost per path and frame size for the cost model. Every row
#: runs without header slots (pvnet's addition: none of the sources had them), so the
#: reference does too
REFERENCE = "lazy-noslots"


def select(ids: list[str] | None) -> list[Row]:
    """The rows asked for (all if None); ValueError naming the known ones."""
    if not ids:
        return list(ROWS)
    known = {r.id: r for r in ROWS}
    bad = [i for i in ids if i not in known]
    if bad:
        raise ValueError(f"unknown row(s) {', '.join(bad)} (known: {', '.join(known)})")
    return [known[i] for i in ids]


def experiments(rows: list[Row]) -> dict[str, list[tuple[str, str]]]:
    """mode -> the (workload, direction) pairs the rows need of it, the reference mode
    included for every (workload, direction) a measured row uses (its base cost)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        if r.kind == "pending":
            continue
        for m in (*r.modes, REFERENCE if r.kind == "measured" else ""):
            if m and (r.workload, r.direction) not in out.setdefault(m, []):
                out[m].append((r.workload, r.direction))
    return out
