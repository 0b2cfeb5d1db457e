"""Snapshot types shared by the proxy core and every proxy mode.

Owns :class:`NamespacedName`, :class:`ServicePortName`, :class:`ServicePortInfo`
and :class:`EndpointInfo`, plus upstream's "sloppy" IP/CIDR parsing that turns
API strings into :mod:`ipaddress` values.

Invariants:
- every type is a frozen, slotted dataclass, so snapshots can be shared between
  the change trackers, the planners and the sync runner without copying, and
  equality is structural (the trackers use it to let changes cancel out, the
  way upstream uses ``reflect.DeepEqual``);
- addresses are :mod:`ipaddress` values; ``str()`` of them prints what Go's
  ``net.IP.String()`` prints for the same address.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

IPV4: Final = "IPv4"
IPV6: Final = "IPv6"

PROTOCOLS: Final = frozenset({"TCP", "UDP", "SCTP"})


def parse_ip_sloppy(text: str) -> IPAddress | None:
    """Parse an IP like Go's ``netutils.ParseIPSloppy``; None when invalid.

    Leading zeros in IPv4 octets are decimal (``010.0.0.1`` is 10.0.0.1), as in
    Go before 1.17, and an IPv4-mapped IPv6 address is the IPv4 address (Go's
    ``To4()``), so it belongs to the IPv4 family.
    """
    if not text or text != text.strip():
        return None
    if "." in text and ":" not in text:
        parts = text.split(".")
        if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 for p in parts):
            return None
        octets = [int(p) for p in parts]
        if any(o > 255 for o in octets):
            return None
        return ipaddress.IPv4Address(".".join(str(o) for o in octets))
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if "%" in text:  # zones are not IPs for Go's ParseIP
            return None
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
    return addr


def parse_cidr_sloppy(text: str) -> IPNetwork | None:
    """Parse a CIDR like Go's ``netutils.ParseCIDRSloppy``; None when invalid.

    Host bits are allowed and masked off (Go returns the network), so
    ``10.0.0.1/8`` prints as ``10.0.0.0/8``.
    """
    addr_text, sep, prefix_text = text.partition("/")
    if not sep or not prefix_text.isdigit() or len(prefix_text) > 3:
        return None
    addr = parse_ip_sloppy(addr_text)
    if addr is None:
        return None
    prefix = int(prefix_text)
    # An IPv4-mapped address keeps its IPv6 prefix length in Go; a /8..32 on the
    # mapped form is rare enough that rejecting the mismatched case is safe.
    if prefix > addr.max_prefixlen:
        return None
    return ipaddress.ip_network(f"{addr}/{prefix}", strict=False)


def ip_family_of(addr: IPAddress | IPNetwork) -> str:
    return IPV4 if addr.version == 4 else IPV6


@dataclass(frozen=True, slots=True, order=True)
class NamespacedName:
    """A Service's identity; ``str()`` is ``ns/name``."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """One port of one Service; ``str()`` is ``ns/name:port`` (``ns/name`` if unnamed).

    The string is what upstream hashes into chain names and prints in comments.
    """

    namespace: str
    name: str
    port: str = ""
    protocol: str = "TCP"

    @property
    def service(self) -> NamespacedName:
        return NamespacedName(self.namespace, self.name)

    def __str__(self) -> str:
        if self.port:
            return f"{self.namespace}/{self.name}:{self.port}"
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePortInfo:
    """What a proxy needs to know about one service port (upstream's BaseServicePortInfo).

    ``load_balancer_vips`` excludes ingress entries with ``ipMode: Proxy``;
    ``health_check_node_port`` is only set for LoadBalancer services with
    externalTrafficPolicy Local; all address lists hold only this proxy's family.
    """

    cluster_ip: IPAddress
    port: int
    protocol: str = "TCP"
    node_port: int = 0
    external_ips: tuple[IPAddress, ...] = ()
    load_balancer_vips: tuple[IPAddress, ...] = ()
    load_balancer_source_ranges: tuple[IPNetwork, ...] = ()
    session_affinity_client_ip: bool = False
    sticky_max_age_seconds: int = 0
    external_policy_local: bool = False
    internal_policy_local: bool = False
    health_check_node_port: int = 0

    @property
    def externally_accessible(self) -> bool:
        return self.node_port != 0 or bool(self.load_balancer_vips) or bool(self.external_ips)

    @property
    def uses_cluster_endpoints(self) -> bool:
        # Even with eTP=Local an externally reachable port needs the Cluster
        # endpoints, for the short-circuit of pod and node traffic.
        return not self.internal_policy_local or self.externally_accessible

    @property
    def uses_local_endpoints(self) -> bool:
        return self.internal_policy_local or (
            self.external_policy_local and self.externally_accessible
        )

    def __str__(self) -> str:
        return f"{self.cluster_ip}:{self.port}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class EndpointInfo:
    """One endpoint of one service port (upstream's BaseEndpointInfo).

    ``ip`` is the re-printed first address of the EndpointSlice endpoint;
    ``str()`` is ``IP:port`` (``[IPv6]:port``), the sort key and hash input.
    """

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str = ""
    is_local: bool = False
    zone: str = ""
    zone_hints: frozenset[str] = field(default_factory=frozenset)
    node_hints: frozenset[str] = field(default_factory=frozenset)

    @property
    def endpoint(self) -> str:
        if ":" in self.ip:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"

    def __str__(self) -> str:
        return self.endpoint
