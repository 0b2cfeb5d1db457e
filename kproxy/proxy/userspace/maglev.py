"""A :class:`~.loadbalancer.LoadBalancer` that picks endpoints by Maglev hashing of the client IP.

Owns, per service port, a :class:`kproxy.fastpath.Maglev` table over the
endpoints (sorted, so every node builds the same table from the same
EndpointSlice) and, with ClientIP affinity, a
:class:`kproxy.fastpath.ClientIPAffinity` table.

- ``next_endpoint`` hashes the client IP into the table (source hashing, like
  IPVS ``sh`` but with Maglev's minimal disruption: removing one of N
  endpoints moves well under 1 % of the other endpoints' clients at M = 65537);
- a retry after a failed dial (``session_affinity_reset``) salts the hash with
  a per-service counter, so retries walk to other slots instead of redialling
  the same dead endpoint; the affinity record, if any, is rewritten;
- an endpoint update that keeps the set is a no-op; a changed set rebuilds the
  table and drops affinity records pointing at removed endpoints;
- a TTL of 0 means the API default (10800 s).

Invariants: a balancer is used from one thread only (the data-plane loop), as
:class:`~.loadbalancer.RoundRobinLoadBalancer` is.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kproxy.fastpath import FLOW_SEED, ClientIPAffinity, Maglev, client_key, hash64
from kproxy.proxy.types import ServicePortName
from kproxy.proxy.userspace.loadbalancer import (
    DEFAULT_AFFINITY_SECONDS,
    MissingEndpoints,
    MissingService,
)

if TYPE_CHECKING:
    from kproxy._fastpath_py import ClientIPAffinity as AffinityType
    from kproxy._fastpath_py import Maglev as MaglevType

__all__ = ["MaglevLoadBalancer"]


@dataclass(slots=True)
class _State:
    table: MaglevType | None = None
    affinity: AffinityType | None = None
    ttl: float = float(DEFAULT_AFFINITY_SECONDS)
    resets: int = 0


class MaglevLoadBalancer:
    """Maglev source hashing with optional ClientIP affinity, both from the fast path."""

    def __init__(
        self, *, table_size: int = 65537, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._m = table_size
        self._clock = clock
        self._services: dict[ServicePortName, _State] = {}

    def new_service(self, service: ServicePortName, client_ip_affinity: bool, ttl: int) -> None:
        state = self._services.setdefault(service, _State())
        state.ttl = float(ttl if ttl > 0 else DEFAULT_AFFINITY_SECONDS)
        if not client_ip_affinity:
            state.affinity = None
        elif state.affinity is None or state.affinity.timeout != state.ttl:
            state.affinity = ClientIPAffinity(state.ttl)

    def set_endpoints(self, service: ServicePortName, endpoints: Sequence[str]) -> None:
        state = self._services.setdefault(service, _State())
        new = sorted(set(endpoints))
        old = list(state.table.backends) if state.table is not None else []
        if new == old:
            return
        state.table = Maglev(new, table_size=self._m) if new else None
        if state.affinity is not None:
            for gone in set(old) - set(new):
                state.affinity.remove_backend(gone)

    def delete_service(self, service: ServicePortName) -> None:
        self._services.pop(service, None)

    def has_endpoints(self, service: ServicePortName) -> bool:
        state = self._services.get(service)
        return state is not None and state.table is not None

    def endpoints(self, service: ServicePortName) -> tuple[str, ...]:
        """The table's endpoints, sorted (tests, debugging)."""
        state = self._services.get(service)
        return state.table.backends if state is not None and state.table is not None else ()

    def next_endpoint(
        self, service: ServicePortName, client_ip: str, session_affinity_reset: bool
    ) -> str:
        state = self._services.get(service)
        if state is None:
            raise MissingService(f"no load balancer state for {service}")
        if state.table is None:
            raise MissingEndpoints(f"{service} has no endpoints")
        now = self._clock()
        if state.affinity is not None and not session_affinity_reset:
            sticky = state.affinity.get(client_ip, now)
            if sticky is not None:
                return sticky
        key = client_key(client_ip)
        if session_affinity_reset:
            state.resets += 1
            h = hash64(key, (FLOW_SEED + state.resets) & 0xFFFFFFFFFFFFFFFF)
            endpoint = state.table.backends[state.table.lookup(h)]
        else:
            endpoint = state.table.select(key)
        if state.affinity is not None:
            state.affinity.set(client_ip, endpoint, now)
        return endpoint

    def cleanup_stale_sticky_sessions(self, service: ServicePortName) -> None:
        state = self._services.get(service)
        if state is not None and state.affinity is not None:
            state.affinity.sweep(self._clock())
