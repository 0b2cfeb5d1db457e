"""The ipsets of the IPVS mode: names, types, comments, entries and ``ipset save`` text.

Owns upstream's ``ipsetInfo`` table (pkg/proxy/ipvs/proxier.go and ipset.go):
the 17 sets kube-proxy creates in IPVS mode, their ``ipset`` types and the
comment text that the iptables rules matching them carry, plus upstream's entry
string format (``(*Entry).String``) and the IPv6 renaming.

Invariants:
- :data:`SET_INFO` is in upstream's order; a plan always holds every set, empty
  or not (upstream creates all of them on every sync);
- ``str(entry)`` is byte-for-byte upstream's entry string: ``ip``,
  ``ip,proto:port``, ``ip,proto:port,ip2``, ``ip,proto:port,net`` or ``port``
  (protocol lower case, IPv6 addresses unbracketed);
- the kernel name of an IPv6 set swaps the ``KUBE-`` prefix for ``KUBE-6-`` and
  is cut to 31 characters (ipset's limit); bitmap:port sets have no family.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BITMAP_PORT",
    "HASH_IP",
    "HASH_IP_PORT",
    "HASH_IP_PORT_IP",
    "HASH_IP_PORT_NET",
    "SET_INFO",
    "IPSet",
    "IPSetEntry",
    "SetInfo",
    "kernel_set_name",
]

HASH_IP: Final = "hash:ip"
HASH_IP_PORT: Final = "hash:ip,port"
HASH_IP_PORT_IP: Final = "hash:ip,port,ip"
HASH_IP_PORT_NET: Final = "hash:ip,port,net"
BITMAP_PORT: Final = "bitmap:port"

LOOP_BACK: Final = "KUBE-LOOP-BACK"
CLUSTER_IP: Final = "KUBE-CLUSTER-IP"
EXTERNAL_IP: Final = "KUBE-EXTERNAL-IP"
EXTERNAL_IP_LOCAL: Final = "KUBE-EXTERNAL-IP-LOCAL"
LOAD_BALANCER: Final = "KUBE-LOAD-BALANCER"
LOAD_BALANCER_FW: Final = "KUBE-LOAD-BALANCER-FW"
LOAD_BALANCER_LOCAL: Final = "KUBE-LOAD-BALANCER-LOCAL"
LOAD_BALANCER_SOURCE_IP: Final = "KUBE-LOAD-BALANCER-SOURCE-IP"
LOAD_BALANCER_SOURCE_CIDR: Final = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
NODE_PORT_TCP: Final = "KUBE-NODE-PORT-TCP"
NODE_PORT_LOCAL_TCP: Final = "KUBE-NODE-PORT-LOCAL-TCP"
NODE_PORT_UDP: Final = "KUBE-NODE-PORT-UDP"
NODE_PORT_LOCAL_UDP: Final = "KUBE-NODE-PORT-LOCAL-UDP"
NODE_PORT_SCTP: Final = "KUBE-NODE-PORT-SCTP-HASH"
NODE_PORT_LOCAL_SCTP: Final = "KUBE-NODE-PORT-LOCAL-SCTP-HASH"
HEALTH_CHECK_NODE_PORT: Final = "KUBE-HEALTH-CHECK-NODE-PORT"
IPVS_IPS: Final = "KUBE-IPVS-IPS"

HASH_SIZE: Final = 1024
MAX_ELEM: Final = 65536
PORT_RANGE: Final = (0, 65535)
_NAME_MAX: Final = 31


@dataclass(frozen=True, slots=True)
class SetInfo:
    name: str  # the IPv4 (upstream constant) name
    set_type: str
    comment: str


SET_INFO: Final = (
    SetInfo(
        LOOP_BACK,
        HASH_IP_PORT_IP,
        "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose",
    ),
    SetInfo(
        CLUSTER_IP, HASH_IP_PORT, "Kubernetes service cluster ip + port for masquerade purpose"
    ),
    SetInfo(
        EXTERNAL_IP,
        HASH_IP_PORT,
        "Kubernetes service external ip + port for masquerade and filter purpose",
    ),
    SetInfo(
        EXTERNAL_IP_LOCAL,
        HASH_IP_PORT,
        "Kubernetes service external ip + port with externalTrafficPolicy=local",
    ),
    SetInfo(LOAD_BALANCER, HASH_IP_PORT, "Kubernetes service lb portal"),
    SetInfo(
        LOAD_BALANCER_FW,
        HASH_IP_PORT,
        "Kubernetes service load balancer ip + port for load balancer with sourceRange",
    ),
    SetInfo(
        LOAD_BALANCER_LOCAL,
        HASH_IP_PORT,
        "Kubernetes service load balancer ip + port with externalTrafficPolicy=local",
    ),
    SetInfo(
        LOAD_BALANCER_SOURCE_IP,
        HASH_IP_PORT_IP,
        "Kubernetes service load balancer ip + port + source IP for packet filter purpose",
    ),
    SetInfo(
        LOAD_BALANCER_SOURCE_CIDR,
        HASH_IP_PORT_NET,
        "Kubernetes service load balancer ip + port + source cidr for packet filter purpose",
    ),
    SetInfo(NODE_PORT_TCP, BITMAP_PORT, "Kubernetes nodeport TCP port for masquerade purpose"),
    SetInfo(
        NODE_PORT_LOCAL_TCP,
        BITMAP_PORT,
        "Kubernetes nodeport TCP port with externalTrafficPolicy=local",
    ),
    SetInfo(NODE_PORT_UDP, BITMAP_PORT, "Kubernetes nodeport UDP port for masquerade purpose"),
    SetInfo(
        NODE_PORT_LOCAL_UDP,
        BITMAP_PORT,
        "Kubernetes nodeport UDP port with externalTrafficPolicy=local",
    ),
    SetInfo(
        NODE_PORT_SCTP,
        HASH_IP_PORT,
        "Kubernetes nodeport SCTP port for masquerade purpose with type 'hash ip:port'",
    ),
    SetInfo(
        NODE_PORT_LOCAL_SCTP,
        HASH_IP_PORT,
        "Kubernetes nodeport SCTP port with externalTrafficPolicy=local with type 'hash ip:port'",
    ),
    SetInfo(HEALTH_CHECK_NODE_PORT, BITMAP_PORT, "Kubernetes health check node port"),
    SetInfo(IPVS_IPS, HASH_IP, "Addresses on the ipvs interface"),
)
SET_INFO_BY_NAME: Final = {info.name: info for info in SET_INFO}


def kernel_set_name(name: str, ipv6: bool) -> str:
    """The name the set has in the kernel (``KUBE-6-…`` for IPv6, at most 31 chars)."""
    if ipv6 and name.startswith("KUBE-"):
        return ("KUBE-6-" + name[len("KUBE-") :])[:_NAME_MAX]
    return name


@dataclass(frozen=True, slots=True)
class IPSetEntry:
    """One member of a set; the fields used depend on ``set_type``.

    ``protocol`` is lower case (``tcp``); ``net`` is a CIDR string.
    """

    set_type: str
    ip: str = ""
    port: int = 0
    protocol: str = ""
    ip2: str = ""
    net: str = ""

    def __str__(self) -> str:
        t = self.set_type
        if t == HASH_IP:
            return self.ip
        if t == BITMAP_PORT:
            return str(self.port)
        base = f"{self.ip},{self.protocol}:{self.port}"
        if t == HASH_IP_PORT_IP:
            return f"{base},{self.ip2}"
        if t == HASH_IP_PORT_NET:
            return f"{base},{self.net}"
        return base

    def sort_key(self) -> tuple[int, int, str, str]:
        # Numeric order of addresses and ports, like ``ipset save`` of a bitmap.
        ip = int(ipaddress.ip_address(self.ip)) if self.ip else -1
        ip2 = self.ip2 or self.net
        return (ip, self.port, self.protocol, ip2)


@dataclass(frozen=True, slots=True)
class IPSet:
    """A set as the plan wants it: kernel name, type, family and sorted entries."""

    name: str  # kernel name
    base_name: str  # upstream's (IPv4) constant, the key plans look sets up by
    set_type: str
    comment: str
    ipv6: bool
    entries: tuple[IPSetEntry, ...]

    @property
    def family(self) -> str:
        """``inet``/``inet6``; empty for bitmap:port, which has no family."""
        if self.set_type == BITMAP_PORT:
            return ""
        return "inet6" if self.ipv6 else "inet"

    @property
    def quoted_comment(self) -> str:
        """The comment as upstream writes it in iptables rules (``getComment``)."""
        return f'"{self.comment}"'

    def create_line(self) -> str:
        """``ipset save``'s create line (what upstream's ``ipset create`` makes)."""
        if self.set_type == BITMAP_PORT:
            lo, hi = PORT_RANGE
            return f"create {self.name} {self.set_type} range {lo}-{hi}"
        return (
            f"create {self.name} {self.set_type} family {self.family}"
            f" hashsize {HASH_SIZE} maxelem {MAX_ELEM}"
        )

    def save_lines(self) -> list[str]:
        return [self.create_line(), *(f"add {self.name} {e}" for e in self.entries)]

    @classmethod
    def of(cls, info: SetInfo, entries: set[IPSetEntry], ipv6: bool) -> IPSet:
        return cls(
            name=kernel_set_name(info.name, ipv6),
            base_name=info.name,
            set_type=info.set_type,
            comment=info.comment,
            ipv6=ipv6,
            entries=tuple(sorted(entries, key=IPSetEntry.sort_key)),
        )
