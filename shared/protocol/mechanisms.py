"""The registry of data-path mechanisms: the one place a mechanism is named.

A *mechanism* is how one direction moves a packet's payload between the frontend's pages and
the vif: on TX lazy mapping, eager maps, a copy, Linux's copy-then-map; on RX a grant copy or a
mapping receiver; on the frontend, how its pages are granted (per use, or persistently). Each
lives in one module (``backend/tx/modes/<name>.py``, ``backend/rx/modes/<name>.py``,
``frontend/grants/<name>.py``) behind one small protocol (the ``base.py`` beside them); this
table says which names exist, where each lives, and what it does in one line. Everything that
lists mechanisms reads it: netback's ``--tx-mode`` and ``--rx-mode`` (which import the module
named here), netfront's choice of grant policy, the topology's validation, the bench's mode
lists, their ``--help`` texts and the tests, which run the shared behavioural tests over every
entry. Nothing here imports a mechanism: the lab (which must not import the
drivers) reads names and summaries only.

Adding a mechanism is one module plus one line below (README.md: Adding a mechanism).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mechanism:
    """One registered mechanism."""

    #: what users write (``tx_mode: lazy``, ``--rx-mode map``, a bench mode's first word)
    name: str
    #: the module holding its class (``MECHANISM`` in that module), imported by netback only
    module: str
    #: one line for --help texts, the table in docs/mechanisms.md and the bench's legend
    summary: str
    #: a source it reproduces, if any (shown beside the summary)
    source: str = ""
    #: the negotiated extension it needs (frontend grant policies: chosen by the agreement)
    feature: str = ""


TX: tuple[Mechanism, ...] = (
    Mechanism("lazy", "backend.tx.modes.lazy",
              "fragments attached unmapped; a page is mapped only when something reads it "
              "(the vif write goes by DMA)", "Santos/Pratt, xen-devel 2007"),
    Mechanism("map", "backend.tx.modes.map",
              "every fragment grant-mapped at attach, unmapped when the packet is freed",
              "classic netback"),
    Mechanism("copy", "backend.tx.modes.copy",
              "the payload copied through the CPU view (map, copy, unmap), slots answered at "
              "once", "Snabb's 'just copy'"),
    Mechanism("linux", "backend.tx.modes.linux",
              "the first 128 bytes grant-copied by the header pull, every fragment with bytes "
              "left after it mapped", "Linux xen-netback, XEN_NETBACK_TX_COPY_LEN"),
)
"""TX mechanisms, in the order lists show them (the first is the default)."""

RX: tuple[Mechanism, ...] = (
    Mechanism("copy", "backend.rx.modes.copy",
              "the frame read from the vif straight into the posted buffers (a grant copy)",
              "Linux xen-netback (rx.c)"),
    Mechanism("map", "backend.rx.modes.map",
              "each posted buffer mapped through the CPU view, the frame copied in by the CPU, "
              "unmapped", "Menon et al. 2006; Santos et al. 2008"),
)
"""RX mechanisms (the first is the default)."""

GRANTS: tuple[Mechanism, ...] = (
    Mechanism("transient", "frontend.grants.transient",
              "a page is granted when a request names it and revoked once it is answered",
              "netif.h"),
    Mechanism("persistent", "frontend.grants.persistent",
              "every page granted once at connect, the gref's bit 31 says 'keep it mapped'",
              "Pratt, xen-devel 2007; Martins 2015", feature="feature-persistent"),
    Mechanism("recycle", "frontend.grants.recycle",
              "answered pages stay granted in a pool of N rings' pages and their grefs are "
              "reused; the oldest idle ones are revoked when it is full (hit rate counted)",
              "Martins, UEK 'xen-netfront: generalize recycling for grants'"),
    Mechanism("staging", "frontend.grants.staging",
              "every page granted once and listed per ring (tx/rx-pool-ref); the backend "
              "premaps them all at connect and copies with the CPU, no grant op per packet",
              "Xen netif-staging-grants rev 4; UEK Orabug 26107942",
              feature="feature-staging-grants"),
)
"""The frontend's side: how netfront grants its pages (chosen by what was negotiated: the
policy whose ``feature`` was agreed, else the first)."""

SIDES = {"tx": TX, "rx": RX, "grants": GRANTS}


def names(side: str) -> tuple[str, ...]:
    """The registered names of one side, in order."""
    return tuple(m.name for m in SIDES[side])


def default(side: str) -> str:
    return SIDES[side][0].name


def find(side: str, name: str) -> Mechanism:
    """The registered mechanism ``name`` of ``side``; ValueError naming the valid ones."""
    for m in SIDES[side]:
        if m.name == name:
            return m
    raise ValueError(f"{side} mechanism {name!r}: must be one of {', '.join(names(side))}")


def help_text(side: str) -> str:
    """``name: summary`` for every mechanism of a side, for an argparse help."""
    return "; ".join(f"{m.name}: {m.summary}" for m in SIDES[side])


def markdown_table() -> str:
    """The table of mechanisms in docs/mechanisms.md (``python -m shared.protocol.mechanisms``
    prints it; a test holds the doc to it)."""
    rows = ["| side | name | what it does | after |", "|---|---|---|---|"]
    for side, label in (("tx", "TX (netback)"), ("rx", "RX (netback)"),
                        ("grants", "grants (netfront)")):
        for m in SIDES[side]:
            after = m.source + (f"; needs `{m.feature}`" if m.feature else "")
            rows.append(f"| {label} | `{m.name}` | {m.summary} | {after} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
