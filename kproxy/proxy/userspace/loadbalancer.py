"""Endpoint selection for the userspace proxy: upstream's round robin with ClientIP affinity.

Owns, per service port, the endpoint list (``"IP:port"`` strings), the rotation
(:class:`kproxy.fastpath.RoundRobin`) and the ClientIP affinity records, with
the semantics of upstream's ``pkg/proxy/userspace/roundrobin.go``:

- ``next_endpoint`` returns the client's recorded endpoint while the record is
  younger than the TTL (refreshing it) unless a reset is asked for (the dialer
  asks after a failed dial), otherwise the next endpoint of the rotation, and
  with affinity (re)writes the client's record;
- an endpoint update that changes the *set* of endpoints shuffles the new list
  (so nodes do not all start on the same backend), restarts the rotation and
  drops the records pointing at removed endpoints; the same set in another
  order changes nothing;
- a TTL of 0 means the API default, 10800 s;
- ``cleanup_stale_sticky_sessions`` drops expired records (the mode calls it on
  every sync, as upstream's proxier did).

Invariants: updates affect only the choices made after them, so established
connections keep their backend; a balancer is used from one thread only (the
mode's data-plane loop), so it takes no lock. :class:`LoadBalancer` is the
interface a faster selector (Maglev, a compiled affinity table) plugs in behind.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

from kproxy.errors import KProxyError
from kproxy.fastpath import RoundRobin
from kproxy.proxy.types import ServicePortName

if TYPE_CHECKING:
    # fastpath.RoundRobin is a variable (compiled class or its twin); type as the twin.
    from kproxy._fastpath_py import RoundRobin as RoundRobinType

__all__ = [
    "DEFAULT_AFFINITY_SECONDS",
    "LoadBalancer",
    "MissingEndpoints",
    "MissingService",
    "RoundRobinLoadBalancer",
]

DEFAULT_AFFINITY_SECONDS: Final = 10800


class MissingService(KProxyError):
    """``next_endpoint`` for a service port the balancer does not know."""


class MissingEndpoints(KProxyError):
    """``next_endpoint`` for a service port without endpoints."""


class LoadBalancer(Protocol):
    """What the proxy sockets need from a selector."""

    def new_service(self, service: ServicePortName, client_ip_affinity: bool, ttl: int) -> None:
        """Create (or reconfigure the affinity of) a service port."""

    def set_endpoints(self, service: ServicePortName, endpoints: Sequence[str]) -> None:
        """Replace the endpoints of a service port (new choices only)."""

    def delete_service(self, service: ServicePortName) -> None: ...

    def has_endpoints(self, service: ServicePortName) -> bool: ...

    def next_endpoint(
        self, service: ServicePortName, client_ip: str, session_affinity_reset: bool
    ) -> str:
        """The endpoint for a new connection; raises MissingService/MissingEndpoints."""

    def cleanup_stale_sticky_sessions(self, service: ServicePortName) -> None: ...


@dataclass(slots=True)
class _Sticky:
    endpoint: str
    last_used: float


@dataclass(slots=True)
class _State:
    rr: RoundRobinType = field(default_factory=RoundRobin)
    affinity: bool = False
    ttl: float = float(DEFAULT_AFFINITY_SECONDS)
    sticky: dict[str, _Sticky] = field(default_factory=dict)


class RoundRobinLoadBalancer:
    """Upstream's ``LoadBalancerRR``."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        shuffle: Callable[[list[str]], None] | None = None,
    ) -> None:
        self._clock = clock
        self._shuffle = shuffle if shuffle is not None else random.SystemRandom().shuffle
        self._services: dict[ServicePortName, _State] = {}

    def new_service(self, service: ServicePortName, client_ip_affinity: bool, ttl: int) -> None:
        state = self._services.setdefault(service, _State())
        if state.affinity and not client_ip_affinity:
            state.sticky.clear()
        state.affinity = client_ip_affinity
        state.ttl = float(ttl if ttl > 0 else DEFAULT_AFFINITY_SECONDS)

    def set_endpoints(self, service: ServicePortName, endpoints: Sequence[str]) -> None:
        state = self._services.setdefault(service, _State())
        if sorted(state.rr.endpoints) == sorted(endpoints):
            return
        keep = set(endpoints)
        state.sticky = {ip: s for ip, s in state.sticky.items() if s.endpoint in keep}
        shuffled = list(endpoints)
        self._shuffle(shuffled)
        # The set changed, so the list differs and the rotation restarts at 0.
        state.rr.set_endpoints(shuffled)

    def delete_service(self, service: ServicePortName) -> None:
        self._services.pop(service, None)

    def has_endpoints(self, service: ServicePortName) -> bool:
        state = self._services.get(service)
        return state is not None and len(state.rr) > 0

    def plain_rotation(self, service: ServicePortName) -> tuple[str, ...] | None:
        """The rotation order when ``service`` is plain round robin (no affinity), else None.

        A plain rotation needs nothing per client, so the relay loop can run it
        (see :meth:`.proxysocket.TcpProxySocket.refresh`).
        """
        state = self._services.get(service)
        if state is None or state.affinity:
            return None
        return state.rr.endpoints

    def endpoints(self, service: ServicePortName) -> tuple[str, ...]:
        """The rotation order (tests, debugging)."""
        state = self._services.get(service)
        return state.rr.endpoints if state is not None else ()

    def next_endpoint(
        self, service: ServicePortName, client_ip: str, session_affinity_reset: bool
    ) -> str:
        state = self._services.get(service)
        if state is None:
            raise MissingService(f"no load balancer state for {service}")
        if len(state.rr) == 0:
            raise MissingEndpoints(f"{service} has no endpoints")
        now = self._clock()
        if state.affinity and not session_affinity_reset:
            sticky = state.sticky.get(client_ip)
            if sticky is not None and now - sticky.last_used < state.ttl:
                sticky.last_used = now
                return sticky.endpoint
        endpoint = state.rr.next()
        if state.affinity:
            state.sticky[client_ip] = _Sticky(endpoint, now)
        return endpoint

    def cleanup_stale_sticky_sessions(self, service: ServicePortName) -> None:
        state = self._services.get(service)
        if state is None or not state.sticky:
            return
        now = self._clock()
        state.sticky = {ip: s for ip, s in state.sticky.items() if now - s.last_used < state.ttl}

    def sticky_clients(self, service: ServicePortName) -> dict[str, str]:
        """Client IP → endpoint of the live affinity records (tests, debugging)."""
        state = self._services.get(service)
        return {ip: s.endpoint for ip, s in state.sticky.items()} if state is not None else {}
