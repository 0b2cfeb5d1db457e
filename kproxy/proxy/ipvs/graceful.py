"""Graceful termination of IPVS real servers (upstream ``graceful_termination.go``).

Owns the list of real servers that left the plan while they still carried
connections, and the decision, from fresh kernel counters, of what happens to
each: :class:`GracefulTermination` is pure state plus a clock; the mode reads the
counters and sends the operations it returns.

Rules (upstream's, with the differences said why):

- a removed real server of a UDP or SCTP service is deleted at once (a datagram
  service has no connection to drain, and ActiveConn stays 0: issue #71514);
- a removed TCP real server with no connections (ActiveConn + InActConn == 0) is
  deleted at once; otherwise its weight goes to 0 (no new connections, the
  established ones go on) and it is listed here;
- a listed server is deleted once its counters reach 0, or ``timeout`` seconds
  after it was listed.  Upstream has no timeout (a weight-0 server can linger for
  as long as one idle connection does); the default is the kernel's own IPVS
  TCP idle timeout (900 s), past which such a connection is gone anyway;
- an endpoint that comes back while listed gets weight 1 again.  Upstream deletes
  and re-adds it, which cuts its established connections (``expire_nodest_conn``);
  restoring the weight keeps them;
- nothing is persisted: after a restart the first (full) sync resets the weight
  of every planned real server to 1 and re-lists the weight-0 leftovers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address
from typing import Final

from kproxy.kernel.ipvs import IPProtocol, RealServer, VirtualServer

__all__ = ["DEFAULT_TIMEOUT", "Decision", "Draining", "GracefulTermination", "needs_draining"]

DEFAULT_TIMEOUT: Final = 900.0

VsKey = tuple[IPv4Address | IPv6Address, int, IPProtocol]
RsKey = tuple[IPv4Address | IPv6Address, int]


def needs_draining(vs: VirtualServer) -> bool:
    """Whether removed real servers of ``vs`` are drained (TCP) or deleted at once."""
    return vs.protocol is IPProtocol.TCP


def connections(rs: RealServer) -> int:
    return rs.active_connections + rs.inactive_connections


@dataclass(frozen=True, slots=True)
class Draining:
    """A real server at weight 0, waiting for its connections to end."""

    service: VirtualServer
    server: RealServer
    since: float


@dataclass(frozen=True, slots=True)
class Decision:
    """What to send for one service: weight-0 edits and deletions."""

    quiesce: tuple[RealServer, ...] = ()  # to set to weight 0 (weight 0 in the tuple)
    delete: tuple[RealServer, ...] = ()


class GracefulTermination:
    """The draining list, keyed by (service key, server key)."""

    def __init__(
        self, timeout: float = DEFAULT_TIMEOUT, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if timeout < 0:
            raise ValueError(f"graceful termination timeout must be >= 0, got {timeout}")
        self.timeout = timeout
        self._clock = clock
        self._by_service: dict[VsKey, dict[RsKey, Draining]] = {}

    def __len__(self) -> int:
        return sum(len(d) for d in self._by_service.values())

    def __iter__(self) -> Iterator[Draining]:
        for entries in self._by_service.values():
            yield from entries.values()

    def is_draining(self, vs_key: VsKey, rs_key: RsKey) -> bool:
        return rs_key in self._by_service.get(vs_key, {})

    def services(self) -> list[VsKey]:
        """The services with at least one draining server (their counters need a read)."""
        return list(self._by_service)

    def cancel(self, vs_key: VsKey, rs_key: RsKey) -> bool:
        """The endpoint is back (or the server is gone): stop draining it. True if listed."""
        entries = self._by_service.get(vs_key)
        if entries is None or entries.pop(rs_key, None) is None:
            return False
        if not entries:
            del self._by_service[vs_key]
        return True

    def forget_service(self, vs_key: VsKey) -> None:
        """The service itself was deleted (or re-created): its list goes with it."""
        self._by_service.pop(vs_key, None)

    def clear(self) -> None:
        self._by_service.clear()

    def decide(
        self,
        vs: VirtualServer,
        removed: Iterable[RealServer],
        fresh: Mapping[RsKey, RealServer],
    ) -> Decision:
        """Decide for ``vs`` from ``fresh`` counters (one destination dump of it).

        ``removed`` are servers that just left the plan (not yet listed); the
        listed servers of ``vs`` are re-checked too.  Servers missing from
        ``fresh`` are gone already and are dropped from the list.
        """
        now = self._clock()
        quiesce: list[RealServer] = []
        delete: list[RealServer] = []
        entries = self._by_service.setdefault(vs.key, {})
        # The listed ones first, so that a server listed below is not re-checked now.
        for rs_key, entry in list(entries.items()):
            current = fresh.get(rs_key)
            if current is None:
                del entries[rs_key]
            elif connections(current) == 0 or now - entry.since >= self.timeout:
                delete.append(current)
                del entries[rs_key]
        for rs in removed:
            current = fresh.get(rs.key)
            if current is None:
                continue
            if not needs_draining(vs) or connections(current) == 0:
                delete.append(current)
                continue
            zero = current if current.weight == 0 else replace(current, weight=0)
            if current.weight != 0:
                quiesce.append(zero)
            entries[rs.key] = Draining(vs, zero, now)
        if not entries:
            del self._by_service[vs.key]
        return Decision(tuple(quiesce), tuple(delete))
