"""Options of the IPVS planner and how to build them from :class:`ProxyConfig`.

Owns :class:`IpvsOptions` (the host facts and flags that shape an IPVS plan),
:func:`ipvs_options` (config + node addresses → options) and :func:`sysctls`
(the kernel settings upstream's ``NewProxier`` ensures).

Invariants:
- every address is an :mod:`ipaddress` value of the options' family; addresses
  of the other family given to :func:`ipvs_options` are dropped;
- ``node_ips`` are the host's local addresses *not* on ``kube-ipvs0``: they are
  what NodePorts answer on (unless ``nodeport_ips`` narrows them) and which
  externalIPs / LB IPs are never bound to ``kube-ipvs0``;
- loopback never carries a NodePort virtual server (upstream's IPVS mode has no
  localhost NodePorts), nor does an IPv6 link-local address.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from kproxy.proxy.config import ProxyConfig
from kproxy.proxy.masquerade import masquerade_mark
from kproxy.proxy.types import (
    IPV4,
    IPV6,
    IPAddress,
    IPNetwork,
    ip_family_of,
    parse_cidr_sloppy,
    parse_ip_sloppy,
)

__all__ = ["IpvsOptions", "ipvs_options", "masquerade_mark", "sysctls"]

DEFAULT_SCHEDULER: Final = "rr"

# Kernel versions that gate conn_reuse_mode (pkg/util/kernel/constants.go).
CONN_REUSE_MIN_KERNEL: Final = (4, 1)
CONN_REUSE_FIXED_KERNEL: Final = (5, 9)


@dataclass(frozen=True, slots=True)
class IpvsOptions:
    """Host facts and flags of one single-family IPVS proxier.

    ``masquerade_mark`` is written as is: real kube-proxy writes ``0x00004000``,
    upstream's unit tests ``0x4000``. ``if_not_local`` are the arguments of the
    local-traffic detector (``! -s <clusterCIDR>``); empty = no detector.
    ``node_ip`` is the primary node IP, tested against LB source ranges.
    ``nodeport_ips`` None means every address in ``node_ips``.
    ``kernel_version`` (major, minor) gates ``conn_reuse_mode``; None leaves it out.
    """

    node_name: str = ""
    ipv6: bool = False
    node_ip: IPAddress | None = None
    node_ips: tuple[IPAddress, ...] = ()
    nodeport_ips: tuple[IPAddress, ...] | None = None
    masquerade_mark: str = field(default_factory=masquerade_mark)
    masquerade_all: bool = False
    if_not_local: tuple[str, ...] = ()
    random_fully: bool = False
    scheduler: str = DEFAULT_SCHEDULER
    exclude_cidrs: tuple[IPNetwork, ...] = ()
    strict_arp: bool = False
    tcp_timeout: int = 0
    tcp_fin_timeout: int = 0
    udp_timeout: int = 0
    kernel_version: tuple[int, int] | None = None
    topology_labels: tuple[tuple[str, str], ...] = ()
    prefer_same_node: bool = True

    @property
    def family(self) -> str:
        return IPV6 if self.ipv6 else IPV4

    def nodeport_addresses(self) -> tuple[IPAddress, ...]:
        """The addresses that get one virtual server per NodePort (upstream's nodeIPs)."""
        fam = 6 if self.ipv6 else 4
        if self.nodeport_ips is not None:
            return tuple(ip for ip in self.nodeport_ips if ip.version == fam and not ip.is_loopback)
        return tuple(
            ip
            for ip in self.node_ips
            if ip.version == fam
            and not ip.is_loopback
            and not (ip.version == 6 and ip.is_link_local)
        )

    def is_node_address(self, ip: IPAddress) -> bool:
        return ip in self.node_ips


def sysctls(options: IpvsOptions) -> tuple[tuple[str, int], ...]:
    """The sysctls upstream's ``NewProxier`` ensures, in its order."""
    out: list[tuple[str, int]] = [("net/ipv4/vs/conntrack", 1)]
    kv = options.kernel_version
    # conn_reuse_mode=0 only where it helps: 4.1 <= kernel < 5.9 (issue #93297).
    if kv is not None and CONN_REUSE_MIN_KERNEL <= kv < CONN_REUSE_FIXED_KERNEL:
        out.append(("net/ipv4/vs/conn_reuse_mode", 0))
    out += [
        ("net/ipv4/vs/expire_nodest_conn", 1),
        ("net/ipv4/vs/expire_quiescent_template", 1),
        ("net/ipv4/ip_forward", 1),
    ]
    if options.strict_arp:
        out += [("net/ipv4/conf/all/arp_ignore", 1), ("net/ipv4/conf/all/arp_announce", 2)]
    return tuple(out)


def _ips(texts: tuple[str, ...], family: str) -> tuple[IPAddress, ...]:
    out: list[IPAddress] = []
    for text in texts:
        ip = parse_ip_sloppy(text)
        if ip is not None and ip_family_of(ip) == family and ip not in out:
            out.append(ip)
    return tuple(out)


def _nodeport_ips(
    cfg: ProxyConfig, node_ips: tuple[IPAddress, ...]
) -> tuple[IPAddress, ...] | None:
    if not cfg.nodeport_addresses:
        return None
    out: list[IPAddress] = []
    for spec in cfg.nodeport_addresses:
        if spec == "primary":
            matched = list(node_ips[:1])
        else:
            net = parse_cidr_sloppy(spec)
            matched = [ip for ip in node_ips if net is not None and ip in net]
        out.extend(ip for ip in matched if ip not in out)
    return tuple(out)


def ipvs_options(
    cfg: ProxyConfig,
    *,
    node_name: str,
    node_ips: tuple[str, ...],
    family: str = IPV4,
    topology_labels: tuple[tuple[str, str], ...] = (),
    random_fully: bool = False,
    kernel_version: tuple[int, int] | None = None,
) -> IpvsOptions:
    """Options for ``family``; ``node_ips`` are the host's addresses known so far
    (``--node-ip`` first, then the caller's: the Node's or the host's interfaces)."""
    ipv6 = family == IPV6
    ips = _ips((*cfg.node_ips, *node_ips), family)
    cidrs = [c for c in cfg.cluster_cidrs if (":" in c) == ipv6]
    primary: IPAddress | None = ips[0] if ips else None
    if not cfg.node_ips and cfg.bind_address not in ("", "0.0.0.0", "::"):
        bound = parse_ip_sloppy(cfg.bind_address)
        if bound is not None and ip_family_of(bound) == family:
            primary = bound
    excludes = tuple(
        net
        for net in (parse_cidr_sloppy(c) for c in cfg.ipvs_exclude_cidrs)
        if net is not None and ip_family_of(net) == family
    )
    return IpvsOptions(
        node_name=node_name,
        ipv6=ipv6,
        node_ip=primary,
        node_ips=ips,
        nodeport_ips=_nodeport_ips(cfg, ips),
        masquerade_mark=masquerade_mark(cfg.masquerade_bit),
        masquerade_all=cfg.masquerade_all,
        if_not_local=("!", "-s", cidrs[0]) if cidrs else (),
        random_fully=random_fully,
        scheduler=cfg.ipvs_scheduler or DEFAULT_SCHEDULER,
        exclude_cidrs=excludes,
        strict_arp=cfg.ipvs_strict_arp,
        tcp_timeout=int(cfg.ipvs_tcp_timeout),
        tcp_fin_timeout=int(cfg.ipvs_tcp_fin_timeout),
        udp_timeout=int(cfg.ipvs_udp_timeout),
        kernel_version=kernel_version,
        topology_labels=topology_labels,
    )
