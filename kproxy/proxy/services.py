"""Services → service ports, the service change tracker and the ServicePortMap.

Owns the translation of a Service (a plain JSON-shaped dict, as parsed from
Kubernetes JSON/YAML) into :class:`~kproxy.proxy.types.ServicePortInfo` values,
following upstream's ``serviceToServiceMap`` / ``newBaseServiceInfo``:

- headless (``None``/empty clusterIP) and ExternalName Services are skipped;
- only the proxy's IP family is kept (clusterIP by ``ipFamilies``/``clusterIPs``,
  externalIPs, LB source ranges and LB ingress IPs filtered by family);
- invalid externalIPs, source ranges and ingress IPs are dropped with an error log
  (source ranges are whitespace-trimmed first, as upstream tolerates padding);
- LB ingress entries with ``ipMode: Proxy`` are not VIPs;
- the health-check node port is kept only for LoadBalancer + eTP=Local.

Stricter than upstream (which trusts apiserver validation) because kproxy also
reads hand-written objects: a port with a bad number or an unknown protocol is
dropped, and a Service with an unparsable clusterIP or a malformed shape is
skipped — each with a log line naming the Service. Nothing here raises.

Invariant of :class:`ServiceChangeTracker`: it holds, per Service, the port map
before the first pending change and after the last one; a change whose result
equals its start is dropped, so add-then-delete leaves nothing pending.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from kproxy.proxy.types import (
    IPV4,
    IPV6,
    PROTOCOLS,
    IPAddress,
    IPNetwork,
    NamespacedName,
    ServicePortInfo,
    ServicePortName,
    ip_family_of,
    parse_cidr_sloppy,
    parse_ip_sloppy,
)

__all__ = [
    "ServiceChangeTracker",
    "ServicePortMap",
    "ServiceUpdateResult",
    "service_name",
    "service_to_port_map",
]

log = logging.getLogger(__name__)

DEFAULT_CLIENT_IP_TIMEOUT = 10800  # apiserver default for sessionAffinityConfig.clientIP

PortMap = dict[ServicePortName, ServicePortInfo]


def service_name(service: Mapping[str, Any]) -> NamespacedName:
    meta = service.get("metadata") or {}
    return NamespacedName(str(meta.get("namespace") or "default"), str(meta.get("name") or ""))


def _cluster_ip_for_family(spec: Mapping[str, Any], family: str) -> str:
    families = spec.get("ipFamilies") or []
    cluster_ip = str(spec.get("clusterIP") or "")
    if not families:
        # Skew with old apiservers: only clusterIP is set, its form tells the family.
        if not cluster_ip or cluster_ip == "None":
            return ""
        return cluster_ip if (family == IPV6) == (":" in cluster_ip) else ""
    cluster_ips = spec.get("clusterIPs") or ([cluster_ip] if cluster_ip else [])
    for idx, fam in enumerate(families):
        if fam == family and idx < len(cluster_ips):
            return str(cluster_ips[idx])
    return ""


def _ips_of_family(name: NamespacedName, values: Any, family: str, what: str) -> list[IPAddress]:
    out: list[IPAddress] = []
    for raw in values or []:
        text = str(raw)
        ip = parse_ip_sloppy(text)
        if ip is None:
            # Empty strings are common (unvalidated externalIPs) and not worth a log.
            if text.strip():
                log.error("service %s: skipping invalid %s %r", name, what, text)
            continue
        if ip_family_of(ip) == family:
            out.append(ip)
    return out


def _cidrs_of_family(name: NamespacedName, values: Any, family: str) -> list[IPNetwork]:
    out: list[IPNetwork] = []
    for raw in values or []:
        text = str(raw).strip()
        cidr = parse_cidr_sloppy(text)
        if cidr is None:
            if text:
                log.error("service %s: skipping invalid loadBalancerSourceRange %r", name, text)
            continue
        if ip_family_of(cidr) == family:
            out.append(cidr)
    return out


def _port_number(value: Any, *, allow_zero: bool) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    low = 0 if allow_zero else 1
    return value if low <= value <= 65535 else None


def service_to_port_map(service: Mapping[str, Any] | None, family: str = IPV4) -> PortMap | None:
    """The service ports of ``service`` for ``family``; None if it is not proxied."""
    if service is None:
        return None
    name = service_name(service)
    try:
        return _service_to_port_map(service, name, family)
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        log.error("service %s: malformed object skipped: %s", name, exc)
        return None


def _service_to_port_map(
    service: Mapping[str, Any], name: NamespacedName, family: str
) -> PortMap | None:
    spec: Mapping[str, Any] = service.get("spec") or {}
    svc_type = str(spec.get("type") or "ClusterIP")
    raw_cluster_ip = str(spec.get("clusterIP") or "")
    if raw_cluster_ip in ("", "None") or svc_type == "ExternalName":
        log.debug("service %s: not proxied (clusterIP %r, type %s)", name, raw_cluster_ip, svc_type)
        return None
    cluster_ip_text = _cluster_ip_for_family(spec, family)
    if not cluster_ip_text:
        return None
    cluster_ip = parse_ip_sloppy(cluster_ip_text)
    if cluster_ip is None or ip_family_of(cluster_ip) != family:
        log.error("service %s: skipping, invalid clusterIP %r", name, cluster_ip_text)
        return None

    external_ips_raw = spec.get("externalIPs") or []
    externally_accessible = svc_type in ("LoadBalancer", "NodePort") or (
        svc_type == "ClusterIP" and len(external_ips_raw) > 0
    )
    external_local = externally_accessible and spec.get("externalTrafficPolicy") == "Local"
    internal_local = spec.get("internalTrafficPolicy") == "Local"

    affinity = spec.get("sessionAffinity") == "ClientIP"
    timeout = 0
    if affinity:
        client_ip = (spec.get("sessionAffinityConfig") or {}).get("clientIP") or {}
        timeout = int(client_ip.get("timeoutSeconds") or DEFAULT_CLIENT_IP_TIMEOUT)

    external_ips = tuple(_ips_of_family(name, external_ips_raw, family, "externalIP"))
    source_ranges = tuple(_cidrs_of_family(name, spec.get("loadBalancerSourceRanges"), family))
    vips: list[IPAddress] = []
    status = service.get("status") or {}
    for ing in (status.get("loadBalancer") or {}).get("ingress") or []:
        text = str(ing.get("ip") or "")
        mode = ing.get("ipMode")
        if not text or (mode is not None and mode != "VIP"):
            continue
        vips.extend(_ips_of_family(name, [text], family, "load-balancer ingress IP"))

    health_check_port = 0
    if svc_type == "LoadBalancer" and external_local:
        health_check_port = _port_number(spec.get("healthCheckNodePort") or 0, allow_zero=True) or 0
        if health_check_port == 0:
            log.error("service %s: has no valid healthCheckNodePort", name)

    ports: PortMap = {}
    for raw_port in spec.get("ports") or []:
        port_name = str(raw_port.get("name") or "")
        protocol = str(raw_port.get("protocol") or "TCP")
        if protocol not in PROTOCOLS:
            log.error(
                "service %s: skipping port %r, unknown protocol %r", name, port_name, protocol
            )
            continue
        port = _port_number(raw_port.get("port"), allow_zero=False)
        node_port = _port_number(raw_port.get("nodePort") or 0, allow_zero=True)
        if port is None or node_port is None:
            log.error("service %s: skipping port %r, invalid port or nodePort", name, port_name)
            continue
        spn = ServicePortName(name.namespace, name.name, port_name, protocol)
        ports[spn] = ServicePortInfo(
            cluster_ip=cluster_ip,
            port=port,
            protocol=protocol,
            node_port=node_port,
            external_ips=external_ips,
            load_balancer_vips=tuple(vips),
            load_balancer_source_ranges=source_ranges,
            session_affinity_client_ip=affinity,
            sticky_max_age_seconds=timeout,
            external_policy_local=external_local,
            internal_policy_local=internal_local,
            health_check_node_port=health_check_port,
        )
    return ports


@dataclass(slots=True)
class _Change:
    previous: PortMap | None
    current: PortMap | None


@dataclass(frozen=True, slots=True)
class ServiceUpdateResult:
    """Services (namespace/name) added, updated or deleted since the last update."""

    updated_services: frozenset[NamespacedName]


class ServiceChangeTracker:
    """Accumulates Service changes between syncs (upstream's ServiceChangeTracker)."""

    def __init__(self, family: str = IPV4) -> None:
        if family not in (IPV4, IPV6):
            raise ValueError(f"unknown IP family {family!r}")
        self.family = family
        self._items: dict[NamespacedName, _Change] = {}

    def update(self, previous: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> bool:
        """Record ``previous`` → ``current`` (either may be None for add/delete).

        Returns True if any change is pending (not only this one), as upstream.
        """
        svc = current if current is not None else previous
        if svc is None:
            return False
        name = service_name(svc)
        change = self._items.get(name)
        if change is None:
            change = _Change(service_to_port_map(previous, self.family), None)
            self._items[name] = change
        change.current = service_to_port_map(current, self.family)
        if (change.previous or None) == (change.current or None):
            del self._items[name]
        return bool(self._items)

    @property
    def pending(self) -> int:
        return len(self._items)

    def checkout(self) -> dict[NamespacedName, tuple[PortMap | None, PortMap | None]]:
        items = {n: (c.previous, c.current) for n, c in self._items.items()}
        self._items = {}
        return items


class ServicePortMap(Mapping[ServicePortName, ServicePortInfo]):
    """The current service ports of all proxied Services (a read-only mapping)."""

    def __init__(self, initial: Mapping[ServicePortName, ServicePortInfo] | None = None) -> None:
        self._ports: PortMap = dict(initial or {})

    def __getitem__(self, key: ServicePortName) -> ServicePortInfo:
        return self._ports[key]

    def __iter__(self) -> Iterator[ServicePortName]:
        return iter(self._ports)

    def __len__(self) -> int:
        return len(self._ports)

    def update(self, tracker: ServiceChangeTracker) -> ServiceUpdateResult:
        """Apply and clear the tracker's pending changes; report the Services touched."""
        updated: set[NamespacedName] = set()
        for name, (previous, current) in tracker.checkout().items():
            updated.add(name)
            current = current or {}
            self._ports.update(current)
            for spn in previous or {}:
                if spn not in current:
                    self._ports.pop(spn, None)
        return ServiceUpdateResult(frozenset(updated))

    def health_check_node_ports(self) -> dict[NamespacedName, int]:
        return {
            spn.service: info.health_check_node_port
            for spn, info in self._ports.items()
            if info.health_check_node_port
        }
