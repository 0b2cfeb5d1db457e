"""First-packet endpoint selection for the NFQUEUE mode: :class:`Decider`.

:class:`Decider` owns the decision for one queued packet (pure apart from its
counters and the affinity/round-robin state; unit-tested with scapy bytes, no
queue needed): parse with the fast path's parser, find the service port by
(destination, port, protocol), choose an endpoint with the service's policy and
return the mark field value of that endpoint (0: leave the packet unmarked).

- ``maglev``: Maglev over the endpoints' ``IP:port`` names (so every node with
  the same endpoints builds the same table) and the flow's 5-tuple hash; with
  ClientIP affinity the hash is the client IP's alone, so a client lands on the
  same endpoint on every node, and a record keeps it there across endpoint
  changes for the affinity timeout;
- ``rr``: round robin (upstream's userspace balancer), ClientIP affinity by record;
- odd packets (fragments, truncated or malformed headers, other protocols) and
  packets of unknown service ports are left unmarked: the nat rules' fallback
  balances them; nothing a packet holds can make :meth:`Decider.decide` raise.

Tables (Maglev, the service map) are built by :meth:`Decider.update` in the
caller's thread (the sync worker), never on the packet path, and published by
one reference assignment, which the packet thread picks up on its next packet.
Affinity records and round-robin positions carry over for the service ports
that stay; they are mutated by the packet thread only (a record pointing at a
removed endpoint is ignored and rewritten there).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final

from kproxy import fastpath
from kproxy.proxy.nfqueue.rules import mark_value
from kproxy.proxy.types import ServicePortName

__all__ = [
    "MAGLEV",
    "REASONS",
    "ROUND_ROBIN",
    "Decider",
    "Decision",
    "ServiceSelection",
]

MAGLEV: Final = "maglev"
ROUND_ROBIN: Final = "rr"
SELECTIONS: Final = (MAGLEV, ROUND_ROBIN)
DEFAULT_TABLE_SIZE: Final = 65537
_PROTO: Final = {"TCP": 6, "UDP": 17}
# Why a packet was left unmarked; index 0 is unused, 6 counts handler errors.
REASONS: Final = ("truncated", "fragment", "unsupported", "malformed", "no_service", "error")


@dataclass(frozen=True, slots=True)
class ServiceSelection:
    """One service port for the handler: its frontends, endpoints and policy.

    ``frontends`` are packed addresses (4 or 16 bytes); ``endpoints`` are
    ``IP:port`` names, ``mark_ids`` and ``weights`` aligned with them;
    ``affinity_timeout`` is 0 without ClientIP affinity.
    """

    spn: ServicePortName
    protocol: str
    frontends: tuple[bytes, ...]
    port: int
    endpoints: tuple[str, ...]
    mark_ids: tuple[int, ...]
    weights: tuple[int, ...] = ()
    affinity_timeout: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    """What :meth:`Decider.explain` found: parse status, service, endpoint, mark value."""

    status: int
    service: ServicePortName | None
    endpoint: str | None
    mark: int


class _Service:
    """The packet path's view of one service port (replaced whole on updates)."""

    __slots__ = (
        "affinity",
        "by_name",
        "key",
        "maglev",
        "marked",
        "marks",
        "names",
        "rr",
        "sel",
    )

    def __init__(self, sel: ServiceSelection, maglev: Any, rr: Any, affinity: Any) -> None:
        self.sel = sel
        self.key = (sel.endpoints, sel.weights or (1,) * len(sel.endpoints))
        self.names = sel.endpoints
        self.marks = tuple(mark_value(i) for i in sel.mark_ids)
        self.by_name = dict(zip(self.names, self.marks, strict=True))
        self.maglev = maglev
        self.rr = rr
        self.affinity = affinity
        self.marked = 0


class Decider:
    """Endpoint choice for the first packet of a flow (see the module docstring).

    ``impl`` is the fast-path module to use (default: :mod:`kproxy.fastpath`'s
    choice); the benchmark passes the compiled module or the twin explicitly.
    """

    def __init__(
        self,
        selection: str = MAGLEV,
        *,
        table_size: int = DEFAULT_TABLE_SIZE,
        clock: Callable[[], float] = time.monotonic,
        impl: ModuleType | None = None,
    ) -> None:
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, not {selection!r}")
        m: Any = impl if impl is not None else fastpath
        self.impl = m
        self.selection = selection
        self.table_size = table_size
        self._clock = clock
        self._parse = m.parse_packet
        self._hash64 = m.hash64
        self._seed = m.FLOW_SEED
        self._Maglev = m.Maglev
        self._RoundRobin = m.RoundRobin
        self._Affinity = m.ClientIPAffinity
        self._services: dict[tuple[bytes, int, int], _Service] = {}
        self._by_spn: dict[ServicePortName, _Service] = {}
        # Unmarked packets by reason; index = parse status (1..4), 5 no service, 6 error.
        self.unmarked = [0] * (len(REASONS) + 1)

    # -- building (sync thread) ---------------------------------------------------
    def update(self, services: Iterable[ServiceSelection]) -> None:
        """Build the tables for ``services`` and publish them in one assignment."""
        by_spn: dict[ServicePortName, _Service] = {}
        table: dict[tuple[bytes, int, int], _Service] = {}
        for sel in services:
            proto = _PROTO.get(sel.protocol)
            if proto is None or not sel.endpoints:
                continue
            svc = self._build(sel, self._by_spn.get(sel.spn))
            by_spn[sel.spn] = svc
            for ip in sel.frontends:
                table[(ip, sel.port, proto)] = svc
        # The packet thread reads self._services once per packet: it sees the old
        # map or the new one, never a mix.
        self._services = table
        self._by_spn = by_spn

    def _build(self, sel: ServiceSelection, old: _Service | None) -> _Service:
        weights = sel.weights or (1,) * len(sel.endpoints)
        same = old is not None and old.key == (sel.endpoints, weights)
        maglev = rr = None
        if self.selection == MAGLEV:
            maglev = (
                old.maglev
                if same and old is not None
                else self._Maglev(sel.endpoints, weights, self.table_size)
            )
        else:
            rr = old.rr if same and old is not None else self._RoundRobin(sel.endpoints)
        affinity = None
        if sel.affinity_timeout > 0:
            prev = old.affinity if old is not None else None
            affinity = (
                prev
                if prev is not None and prev.timeout == sel.affinity_timeout
                else self._Affinity(sel.affinity_timeout)
            )
        svc = _Service(sel, maglev, rr, affinity)
        if old is not None:
            svc.marked = old.marked
        return svc

    @property
    def services(self) -> Mapping[ServicePortName, ServiceSelection]:
        return {spn: s.sel for spn, s in self._by_spn.items()}

    def marks_by_service(self) -> dict[str, int]:
        return {str(spn): s.marked for spn, s in self._by_spn.items()}

    def loop_entries(self) -> list[tuple[Any, ...]]:
        """The published tables as ``NfqLoop.set_services`` entries (keyed by service port).

        The loop uses the Maglev and RoundRobin objects in place, so round-robin
        positions carry over exactly as they do here; affinity services are
        delegated back to :meth:`decide`.
        """
        out: list[tuple[Any, ...]] = []
        for spn, svc in self._by_spn.items():
            sel = svc.sel
            out.append(
                (
                    spn,
                    sel.frontends,
                    sel.port,
                    _PROTO[sel.protocol],
                    svc.maglev,
                    svc.rr,
                    svc.marks,
                    svc.affinity is not None,
                )
            )
        return out

    def add_marked(self, counts: Iterable[tuple[Any, int]]) -> None:
        """Fold the loop's per-service marked counts in (services gone since are dropped)."""
        for spn, n in counts:
            svc = self._by_spn.get(spn)
            if svc is not None:
                svc.marked += n

    # -- the packet path ----------------------------------------------------------
    def decide(self, buf: bytes) -> int:
        """The mark field value for the packet ``buf`` (IP header first); 0: unmarked."""
        status, _, proto, src, _, dst, dport = self._parse(buf)
        if status:
            self.unmarked[status] += 1
            return 0
        svc = self._services.get((dst, dport, proto))
        if svc is None:
            self.unmarked[5] += 1
            return 0
        svc.marked += 1
        if svc.affinity is not None:
            return self._sticky(svc, src)
        if svc.maglev is not None:
            # Parsed already, so the packet is well-formed: lookup_packet returns an index.
            return svc.marks[svc.maglev.lookup_packet(buf)]  # type: ignore[no-any-return]
        return svc.marks[svc.rr.next_index()]  # type: ignore[no-any-return]

    def _sticky(self, svc: _Service, src: bytes) -> int:
        now = self._clock()
        name = svc.affinity.get(src, now)
        mark = svc.by_name.get(name) if name is not None else None
        if mark is None:
            if svc.maglev is not None:
                i = svc.maglev.lookup(self._hash64(src, self._seed))
            else:
                i = svc.rr.next_index()
            svc.affinity.set(src, svc.names[i], now)
            mark = svc.marks[i]
        return mark

    def explain(self, buf: bytes) -> Decision:
        """:meth:`decide` plus what it found (tests, debugging; counts like ``decide``)."""
        status, _, proto, _, _, dst, dport = self._parse(buf)
        svc = self._services.get((dst, dport, proto)) if status == 0 else None
        mark = self.decide(buf)
        endpoint = None
        if svc is not None and mark:
            endpoint = next(n for n, m in svc.by_name.items() if m == mark)
        return Decision(status, svc.sel.spn if svc is not None else None, endpoint, mark)

    def sweep(self) -> int:
        """Drop expired affinity records (packet thread); returns how many."""
        now = self._clock()
        return sum(s.affinity.sweep(now) for s in self._by_spn.values() if s.affinity is not None)
