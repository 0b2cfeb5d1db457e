"""EndpointSlices → endpoints per service port: cache, change tracker, EndpointsMap.

Owns upstream's ``EndpointSliceCache`` / ``EndpointsChangeTracker`` /
``EndpointsMap`` semantics for EndpointSlices given as plain JSON-shaped dicts:

- slices are keyed by the ``kubernetes.io/service-name`` label and the slice name;
  a slice without that label, name or namespace is logged and ignored;
- only ``IPv4``/``IPv6`` address types are used, and only endpoints of the
  proxy's family; only ``addresses[0]`` counts, re-printed as an IP;
- unset conditions: ready → true, serving → true, terminating → false;
- ports without a name (JSON ``null``/missing) or with port 0 are ignored, as
  upstream does (an unnamed port is ``"name": ""``);
- the endpoints of one service port are merged over all its slices, deduplicated
  by ``IP:port`` (a local duplicate wins) and sorted by that string (upstream's
  ``byEndpoint``, so ``10.180.0.10:80`` sorts before ``10.180.0.2:80``).

Invariant: a pending slice equal to the applied one is not a change, so an
update that restores the applied state cancels out.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from kproxy.proxy.types import (
    IPV4,
    IPV6,
    EndpointInfo,
    NamespacedName,
    ServicePortName,
    parse_ip_sloppy,
)

__all__ = [
    "EndpointSliceCache",
    "EndpointsChangeTracker",
    "EndpointsMap",
    "EndpointsUpdateResult",
]

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
LAST_CHANGE_TRIGGER_TIME = "endpoints.kubernetes.io/last-change-trigger-time"

EndpointsByPort = dict[ServicePortName, tuple[EndpointInfo, ...]]


@dataclass(frozen=True, slots=True)
class _SliceEndpoint:
    addresses: tuple[str, ...]
    node_name: str | None
    zone: str | None
    zone_hints: frozenset[str]
    node_hints: frozenset[str]
    ready: bool
    serving: bool
    terminating: bool


@dataclass(frozen=True, slots=True)
class _SlicePort:
    name: str | None
    port: int | None
    protocol: str


@dataclass(frozen=True, slots=True)
class _SliceInfo:
    ports: tuple[_SlicePort, ...]
    endpoints: tuple[_SliceEndpoint, ...]
    remove: bool


def _hint_names(hints: Any, key: str) -> frozenset[str]:
    return frozenset(str(h.get("name")) for h in (hints or {}).get(key) or [] if h.get("name"))


def _slice_info(es: Mapping[str, Any], remove: bool) -> _SliceInfo:
    ports = tuple(
        sorted(
            (
                _SlicePort(
                    None if p.get("name") is None else str(p["name"]),
                    p.get("port") if isinstance(p.get("port"), int) else None,
                    str(p.get("protocol") or "TCP"),
                )
                for p in es.get("ports") or []
            ),
            key=lambda p: p.port or 0,
        )
    )
    endpoints: list[_SliceEndpoint] = []
    if not remove:
        for ep in es.get("endpoints") or []:
            cond = ep.get("conditions") or {}
            endpoints.append(
                _SliceEndpoint(
                    addresses=tuple(str(a) for a in ep.get("addresses") or []),
                    node_name=ep.get("nodeName"),
                    zone=ep.get("zone"),
                    zone_hints=_hint_names(ep.get("hints"), "forZones"),
                    node_hints=_hint_names(ep.get("hints"), "forNodes"),
                    ready=cond.get("ready") is None or bool(cond.get("ready")),
                    serving=cond.get("serving") is None or bool(cond.get("serving")),
                    terminating=bool(cond.get("terminating")),
                )
            )
        endpoints.sort(key=lambda e: ",".join(e.addresses))
    return _SliceInfo(ports, tuple(endpoints), remove)


def _cache_keys(es: Mapping[str, Any]) -> tuple[NamespacedName, str] | None:
    meta = es.get("metadata") or {}
    service = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    namespace, name = meta.get("namespace"), meta.get("name")
    if not service or not namespace or not name:
        log.error(
            "endpointslice %s/%s: no %s label or name; ignored", namespace, name, SERVICE_NAME_LABEL
        )
        return None
    return NamespacedName(str(namespace), str(service)), str(name)


@dataclass(slots=True)
class _Tracker:
    applied: dict[str, _SliceInfo] = field(default_factory=dict)
    pending: dict[str, _SliceInfo] = field(default_factory=dict)


class EndpointSliceCache:
    """EndpointSlices grouped per Service: the applied ones and the pending ones."""

    def __init__(self, node_name: str, family: str = IPV4) -> None:
        self.node_name = node_name
        self.family = family
        self._trackers: dict[NamespacedName, _Tracker] = {}

    def update_pending(self, es: Mapping[str, Any], remove: bool) -> bool:
        """Stage a slice add/update (or removal); True if it changes what is staged."""
        keys = _cache_keys(es)
        if keys is None:
            return False
        service, slice_name = keys
        try:
            info = _slice_info(es, remove)
        except (AttributeError, TypeError, ValueError) as exc:
            log.error(
                "endpointslice %s/%s: malformed object ignored: %s",
                service.namespace,
                slice_name,
                exc,
            )
            return False
        tracker = self._trackers.setdefault(service, _Tracker())
        if slice_name in tracker.pending:
            changed = tracker.pending[slice_name] != info
        elif slice_name in tracker.applied:
            changed = tracker.applied[slice_name] != info
        else:
            changed = not remove
        if changed:
            tracker.pending[slice_name] = info
        return changed

    def checkout_changes(self) -> dict[NamespacedName, tuple[EndpointsByPort, EndpointsByPort]]:
        """Apply the pending slices; return (previous, current) endpoints per Service."""
        changes: dict[NamespacedName, tuple[EndpointsByPort, EndpointsByPort]] = {}
        for service, tracker in self._trackers.items():
            if not tracker.pending:
                continue
            previous = self._endpoints_map(service, tracker.applied)
            for name, info in tracker.pending.items():
                if info.remove:
                    tracker.applied.pop(name, None)
                else:
                    tracker.applied[name] = info
            tracker.pending.clear()
            changes[service] = (previous, self._endpoints_map(service, tracker.applied))
        return changes

    def _endpoints_map(
        self, service: NamespacedName, slices: Mapping[str, _SliceInfo]
    ) -> EndpointsByPort:
        by_port: dict[ServicePortName, dict[str, EndpointInfo]] = {}
        for info in slices.values():
            for port in info.ports:
                if port.name is None:
                    log.error("endpointslice for %s: ignoring port with nil name", service)
                    continue
                if not port.port:
                    log.error("endpointslice for %s: ignoring invalid port %r", service, port.name)
                    continue
                spn = ServicePortName(service.namespace, service.name, port.name, port.protocol)
                self._add_endpoints(service, port.port, by_port.setdefault(spn, {}), info)
        return {spn: tuple(eps[key] for key in sorted(eps)) for spn, eps in by_port.items() if eps}

    def _add_endpoints(
        self, service: NamespacedName, port: int, into: dict[str, EndpointInfo], info: _SliceInfo
    ) -> None:
        for ep in info.endpoints:
            if not ep.addresses:
                log.error("endpointslice for %s: ignoring endpoint with no address", service)
                continue
            address = ep.addresses[0]
            if (self.family == IPV6) != (":" in address):
                log.error(
                    "endpointslice for %s: ignoring %s of the wrong IP family", service, address
                )
                continue
            ip = parse_ip_sloppy(address)
            if ip is None:
                log.error("endpointslice for %s: ignoring invalid address %r", service, address)
                continue
            is_local = bool(self.node_name) and ep.node_name == self.node_name
            endpoint = EndpointInfo(
                ip=str(ip),
                port=port,
                ready=ep.ready,
                serving=ep.serving,
                terminating=ep.terminating,
                node_name=ep.node_name or "",
                is_local=is_local,
                zone=ep.zone or "",
                zone_hints=ep.zone_hints,
                node_hints=ep.node_hints,
            )
            key = endpoint.endpoint
            if key not in into or is_local:
                into[key] = endpoint


@dataclass(frozen=True, slots=True)
class EndpointsUpdateResult:
    """What an :meth:`EndpointsMap.update` changed.

    ``conntrack_cleanup_required`` is True when a changed Service has a UDP port
    (stale UDP flows must then be reconciled after the sync);
    ``last_change_trigger_times`` holds the raw annotation values per Service.
    """

    updated_services: frozenset[NamespacedName]
    conntrack_cleanup_required: bool = False
    last_change_trigger_times: Mapping[NamespacedName, tuple[str, ...]] = field(
        default_factory=dict
    )


class EndpointsChangeTracker:
    """Accumulates EndpointSlice changes between syncs."""

    def __init__(self, node_name: str, family: str = IPV4) -> None:
        self.cache = EndpointSliceCache(node_name, family)
        self._trigger_times: dict[NamespacedName, list[str]] = {}
        self._pending_services: set[NamespacedName] = set()

    def endpoint_slice_update(self, es: Mapping[str, Any], remove: bool = False) -> bool:
        """Record a slice add/update/delete; True if this call changed what is pending."""
        if es.get("addressType") not in (IPV4, IPV6):
            log.debug("endpointslice address type %r not supported", es.get("addressType"))
            return False
        keys = _cache_keys(es)
        if keys is None:
            return False
        changed = self.cache.update_pending(es, remove)
        if changed:
            service = keys[0]
            self._pending_services.add(service)
            if remove:
                # A deletion's annotation dates from the last update, not this change.
                self._trigger_times.pop(service, None)
            else:
                annotations = (es.get("metadata") or {}).get("annotations") or {}
                stamp = annotations.get(LAST_CHANGE_TRIGGER_TIME)
                if stamp:
                    self._trigger_times.setdefault(service, []).append(str(stamp))
        return changed

    @property
    def pending(self) -> int:
        return len(self._pending_services)

    def checkout(
        self,
    ) -> tuple[
        dict[NamespacedName, tuple[EndpointsByPort, EndpointsByPort]],
        dict[NamespacedName, tuple[str, ...]],
    ]:
        times = {k: tuple(v) for k, v in self._trigger_times.items()}
        self._trigger_times = {}
        self._pending_services = set()
        return self.cache.checkout_changes(), times


class EndpointsMap(Mapping[ServicePortName, tuple[EndpointInfo, ...]]):
    """Endpoints per service port, sorted by ``IP:port`` (a read-only mapping)."""

    def __init__(self, initial: Mapping[ServicePortName, tuple[EndpointInfo, ...]] | None = None):
        self._eps: EndpointsByPort = dict(initial or {})

    def __getitem__(self, key: ServicePortName) -> tuple[EndpointInfo, ...]:
        return self._eps[key]

    def __iter__(self) -> Iterator[ServicePortName]:
        return iter(self._eps)

    def __len__(self) -> int:
        return len(self._eps)

    def update(self, tracker: EndpointsChangeTracker) -> EndpointsUpdateResult:
        """Apply and clear the tracker's pending changes."""
        changes, times = tracker.checkout()
        conntrack = False
        for previous, current in changes.values():
            for spn in previous:
                self._eps.pop(spn, None)
            self._eps.update(current)
            if not conntrack:
                conntrack = any(spn.protocol == "UDP" for spn in (*previous, *current))
        return EndpointsUpdateResult(frozenset(changes), conntrack, times)

    def local_ready_endpoints(self) -> dict[NamespacedName, int]:
        """Distinct local ready endpoint IPs per Service (for the health-check servers)."""
        ips: dict[NamespacedName, set[str]] = {}
        for spn, eps in self._eps.items():
            for ep in eps:
                if ep.ready and ep.is_local:
                    ips.setdefault(spn.service, set()).add(ep.ip)
        return {name: len(v) for name, v in ips.items()}
