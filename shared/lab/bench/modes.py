"""The bench's pvnet modes: a registered mechanism plus orthogonal options, named by a grammar.

A mode name is
``<tx>[-noslots][-persistent|-staging|-recycle<K>][-poll][-doorbell][-q<N>][+rx-<rx>]``
``[+rate-<N>mbit][+capture[-s<N>]]``:
``<tx>`` a TX mechanism and ``<rx>`` an RX mechanism of ``shared/protocol/mechanisms.py``, then the
options that are not mechanisms - header slots off, the netfront's grant policy (persistent
grants, staging grants, or grant recycling with a pool of K rings: ``frontend/grants/``),
the netfront's poll
budget and ivshmem doorbells (QEMU placement only), N queues (a worker process per queue at
each end, ``-q2``: the bench's ``queues`` dimension), the vif's TX limited to N Mbit/s (Linux's
``rate`` key), a ``pvnet capture`` reader attached for the whole session (whole frames, or
``-s N`` bytes). The names the bench has always used
(``lazy``, ``map-persistent``, ``lazy+capture-s128``, ``lazy-doorbell``...) are names of this
grammar, so users' scripts keep working.

No list of modes is written out anywhere else: the default runs, the whole cross product
(``--modes all``) and every ``--help`` are built here from the registry.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from shared.protocol.mechanisms import default, names

_OPTIONS = ("noslots", "persistent", "staging", "poll", "doorbell")
_NAME = re.compile(r"^(?P<tx>[a-z0-9_]+)(?P<opts>(?:-(?:" + "|".join(_OPTIONS) + r"))*)"
                   r"(?:-recycle(?P<pool>[1-8]))?(?:-q(?P<queues>[1-8]))?"
                   r"(?:\+rx-(?P<rx>[a-z0-9_]+))?(?:\+rate-(?P<rate>\d+)mbit)?"
                   r"(?:\+capture(?:-s(?P<snap>\d+))?)?$")
#: the netfront's poll budget in the ``-poll`` modes (µs)
POLL_US = 1000


@dataclass(frozen=True)
class Mode:
    """One bench mode, parsed."""

    name: str
    tx: str
    rx: str
    header_slots: bool = True
    persistent: bool = False
    poll: bool = False
    doorbell: bool = False
    #: a capture reader's snaplen for the whole session (0: whole frames); None: no capture
    capture: int | None = None
    #: the vif's TX limit in Mbit/s (Linux's ``rate``); None: unlimited
    rate_mbit: int | None = None
    #: the netfront's grant recycling pool in rings (0: no recycling)
    recycle: int = 0
    #: staging grants (feature-staging-grants)
    staging: bool = False
    #: queues (multi-queue): a worker process per queue at each end
    queues: int = 1

    def guest_yaml(self) -> str:
        """``guest_keys`` as the tail of a YAML flow mapping (``, tx_mode: lazy, ...``)."""
        return yaml_keys(self.guest_keys())

    def guest_keys(self) -> dict[str, object]:
        """The topology guest keys that set this mode up (defaults left out)."""
        keys: dict[str, object] = {"tx_mode": self.tx}
        if self.rx != default("rx"):
            keys["rx_mode"] = self.rx
        if not self.header_slots:
            keys["header_slots"] = False
        if self.persistent:
            keys["persistent"] = True
        if self.recycle:
            keys["grants"] = "recycle"
            keys["recycle_pool"] = self.recycle
        if self.staging:
            keys["grants"] = "staging"
        if self.poll:
            keys["poll_us"] = POLL_US
        if self.doorbell:
            keys["event"] = "doorbell"
        if self.rate_mbit is not None:
            keys["rate"] = f"{self.rate_mbit}Mb/s"
        if self.queues > 1:
            keys["queues"] = self.queues
        return keys


def yaml_keys(keys: dict[str, object]) -> str:
    """Topology keys as the tail of a YAML flow mapping: booleans as YAML's, strings quoted
    (a rate's ``Mb`` is bits, ``MB`` bytes: its case matters)."""
    return "".join(f", {k}: " + (str(v).lower() if isinstance(v, bool) else
                                 f'"{v}"' if isinstance(v, str) else str(v))
                   for k, v in keys.items())


def parse(name: str) -> Mode:
    """A mode name -> Mode; ValueError saying what a valid name looks like."""
    m = _NAME.match(name)
    if not m or m["tx"] not in names("tx") or (m["rx"] and m["rx"] not in names("rx")):
        raise ValueError(f"mode {name!r}: expected <tx>[-{'][-'.join(_OPTIONS)}][-recycle<K>]"
                         f"[-q<N>][+rx-<rx>]"
                         f"[+rate-<N>mbit][+capture[-sN]] with tx one of "
                         f"{', '.join(names('tx'))} and rx one of {', '.join(names('rx'))}")
    opts = set(re.findall(r"-([a-z]+)", m["opts"] or ""))
    capture = None if "+capture" not in name else int(m["snap"] or 0)
    return Mode(name, m["tx"], m["rx"] or default("rx"), header_slots="noslots" not in opts,
                persistent="persistent" in opts, poll="poll" in opts,
                doorbell="doorbell" in opts, capture=capture,
                rate_mbit=int(m["rate"]) if m["rate"] else None,
                recycle=int(m["pool"] or 0), staging="staging" in opts,
                queues=int(m["queues"] or 1))


def name_of(tx: str, rx: str | None = None, *, noslots: bool = False,
            persistent: bool = False, poll: bool = False, doorbell: bool = False,
            capture: int | None = None, rate_mbit: int | None = None, recycle: int = 0,
            staging: bool = False, queues: int = 1) -> str:
    """The mode name of these choices (the inverse of ``parse``)."""
    name = tx + "".join(f"-{o}" for o, on in (("noslots", noslots), ("persistent", persistent),
                                               ("staging", staging), ("poll", poll),
                                               ("doorbell", doorbell)) if on)
    name += f"-recycle{recycle}" if recycle else ""
    name += f"-q{queues}" if queues > 1 else ""
    if rx and rx != default("rx"):
        name += f"+rx-{rx}"
    if rate_mbit is not None:
        name += f"+rate-{rate_mbit}mbit"
    if capture is not None:
        name += "+capture" + (f"-s{capture}" if capture else "")
    return name


def netns_defaults() -> list[str]:
    """The namespace placement's default run: every mechanism on its own (TX mechanisms
    with the default RX, RX mechanisms with the default TX), then the options where the
    sources measured them - header slots off and persistent grants on the default mechanism,
    persistent map (the persistent-grant RFC's comparison), kept-mapped RX buffers (the RX
    map mechanism with persistent grants), and a capture reader (whole frames, 128 bytes)."""
    tx0, rx0 = default("tx"), default("rx")
    out = [name_of(t) for t in names("tx")]
    out += [name_of(tx0, r) for r in names("rx") if r != rx0]
    out += [name_of(tx0, noslots=True), name_of(tx0, persistent=True),
            name_of("map", persistent=True)]
    out += [name_of(tx0, r, persistent=True) for r in names("rx") if r != rx0]
    out += [name_of(tx0, capture=0), name_of(tx0, capture=128)]
    return list(dict.fromkeys(out))


def qemu_defaults() -> list[str]:
    """The QEMU placement's default run (each guest boot costs ~45 s under TCG): the
    reference mode only; its options (``-poll``, ``-persistent``, ``-doorbell``...) on
    request."""
    return [default("tx")]


def cross_product(qemu: bool = False) -> list[str]:
    """Every mechanism pair with every option (``--modes all``): many hours of bench."""
    flags = ([False, True],) * (4 if qemu else 2)
    captures = [None] if qemu else [None, 0, 128]
    out = []
    for tx, rx, opts, cap in itertools.product(names("tx"), names("rx"),
                                               itertools.product(*flags), captures):
        noslots, persistent, *rest = opts
        poll, doorbell = rest if qemu else (False, False)
        out.append(name_of(tx, rx, noslots=noslots, persistent=persistent, poll=poll,
                           doorbell=doorbell, capture=cap))
    return out


def select(asked: tuple[str, ...] | None, qemu: bool = False) -> list[Mode]:
    """The modes a path runs: its placement's defaults (None), the cross product ("all"),
    or those asked for that the placement can run (the namespace placement has no
    doorbell; the QEMU paths attach no capture). Every name asked is parsed, so a
    typo fails whichever paths run."""
    if asked is None:
        wanted = qemu_defaults() if qemu else netns_defaults()
    elif "all" in asked:
        wanted = cross_product(qemu)
    else:
        wanted = list(asked)
    modes = [parse(n) for n in wanted]
    if qemu:
        return [m for m in modes if m.capture is None]
    return [m for m in modes if not m.doorbell]


def help_text() -> str:
    """For ``--modes`` in every command that takes it."""
    return (f"comma list of pvnet modes: <tx>[-noslots][-persistent|-staging|-recycle<K>]"
            f"[-q<N>][+rx-<rx>]"
            f"[+rate-<N>mbit][+capture[-sN]] "
            f"(QEMU paths also -poll, -doorbell), tx one of {', '.join(names('tx'))}, rx one "
            f"of {', '.join(names('rx'))}; 'all' for the whole cross product. Default: "
            f"{', '.join(netns_defaults())} (namespaces); {', '.join(qemu_defaults())} (QEMU)")
