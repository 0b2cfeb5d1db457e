"""One service port's share of the IPVS plan (upstream's per-service-port loop body).

Owns :func:`plan_piece`: a pure function from one service port, its endpoints,
the options and the node's addresses to a :class:`Piece` — its virtual servers
(:class:`PlannedServer`) with their real servers, its ipset entries, the
addresses it binds on kube-ipvs0 and its LB drops.  The
:class:`~kproxy.proxy.ipvs.plan.IpvsPlanner` folds pieces in and out of the
plan, so only changed service ports are planned again.

Invariants: a piece depends on nothing but its arguments; within one service
port a later claim on the same virtual server wins silently (upstream's loop);
real servers are de-duplicated per server, weight 1, masquerading (NAT).
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from kproxy.kernel.ipvs import IPProtocol, RealServer, ServiceFlags, VirtualServer
from kproxy.proxy.ipvs import ipsets as s
from kproxy.proxy.ipvs.ipsets import IPSetEntry
from kproxy.proxy.ipvs.options import IpvsOptions
from kproxy.proxy.topology import categorize_endpoints
from kproxy.proxy.types import EndpointInfo, IPAddress, ServicePortInfo, ServicePortName

__all__ = [
    "CLUSTER_IP",
    "EXTERNAL_IP",
    "LOAD_BALANCER",
    "NODE_PORT",
    "Piece",
    "PlannedServer",
    "VsKey",
    "plan_piece",
]

CLUSTER_IP = "cluster-ip"
EXTERNAL_IP = "external-ip"
LOAD_BALANCER = "load-balancer"
NODE_PORT = "node-port"

VsKey = tuple[IPAddress, int, IPProtocol]


@dataclass(frozen=True, slots=True)
class PlannedServer:
    """One virtual server, the service port it serves and its real servers."""

    server: VirtualServer
    destinations: tuple[RealServer, ...]
    service: ServicePortName
    kind: str  # cluster-ip | external-ip | load-balancer | node-port


@functools.lru_cache(maxsize=1 << 17)
def _real_server(ip: str, port: int) -> RealServer:
    # Parsing addresses was most of a full plan's time: inet_pton + the packed
    # constructor is several times faster than ipaddress' parser, and the cache
    # spares unchanged endpoints the work on the next full replan.
    try:
        address: IPAddress = ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, ip))
    except OSError:
        address = ipaddress.ip_address(ip)
    return RealServer(address, port)


class _PieceBuilder:
    """The mutable state of planning one service port (upstream's loop body)."""

    def __init__(self, spn: ServicePortName, options: IpvsOptions, labels: dict[str, str]) -> None:
        self.spn = spn
        self.o = options
        self.labels = labels
        self.entries: dict[tuple[str, IPSetEntry], None] = {}  # ordered, de-duplicated
        self.servers: dict[VsKey, PlannedServer] = {}
        self.bind: dict[IPAddress, None] = {}
        self.no_local_internal = False
        self.no_local_external = False
        self.lb_no_node_access: list[IPSetEntry] = []

    def add(self, name: str, entry: IPSetEntry) -> None:
        self.entries[(name, entry)] = None

    def virtual_server(self, address: IPAddress, port: int, svc: ServicePortInfo) -> VirtualServer:
        flags = ServiceFlags.NONE
        timeout = 0
        if svc.session_affinity_client_ip:
            flags |= ServiceFlags.PERSISTENT
            timeout = svc.sticky_max_age_seconds
        if self.o.scheduler == "mh":
            flags |= ServiceFlags.SCHED2  # mh hashes on source port too (FlagSourceHash)
        return VirtualServer(
            address, port, IPProtocol[svc.protocol], self.o.scheduler, flags, timeout
        )

    def real_servers(
        self, svc: ServicePortInfo, endpoints: Sequence[EndpointInfo], only_local: bool
    ) -> tuple[RealServer, ...]:
        cat = categorize_endpoints(
            endpoints,
            svc,
            self.o.node_name,
            self.labels,
            prefer_same_node=self.o.prefer_same_node,
        )
        chosen = cat.cluster
        if only_local:
            if cat.local:
                chosen = cat.local
            else:
                # Let local pods reach the service even with no local endpoint;
                # off-node clients get replies from the pod IP and drop them.
                chosen = cat.cluster
                if cat.has_any and svc.internal_policy_local:
                    self.no_local_internal = True
                if cat.has_any and svc.external_policy_local:
                    self.no_local_external = True
        # (ip, port) names an endpoint as its ``IP:port`` string does, without building it.
        seen: dict[tuple[str, int], RealServer] = {}
        for ep in chosen:
            key = (ep.ip, ep.port)
            if key not in seen:
                seen[key] = _real_server(ep.ip, ep.port)
        return tuple(seen.values())

    def server(self, vs: VirtualServer, kind: str, destinations: tuple[RealServer, ...]) -> None:
        # Within one service port the later kind wins silently, as upstream's loop.
        self.servers[vs.key] = PlannedServer(vs, destinations, self.spn, kind)


@dataclass(frozen=True, slots=True)
class Piece:
    """What one service port contributes to the plan (a pure function of its inputs)."""

    svc: ServicePortInfo
    eps: Sequence[EndpointInfo]
    servers: tuple[PlannedServer, ...]  # distinct keys
    entries: tuple[tuple[str, IPSetEntry], ...]  # distinct, KUBE-IPVS-IPS included
    bind: tuple[IPAddress, ...]  # distinct
    lb_no_node_access: tuple[IPSetEntry, ...]
    no_local_internal: bool
    no_local_external: bool


def plan_piece(
    spn: ServicePortName,
    svc: ServicePortInfo,
    eps: Sequence[EndpointInfo],
    o: IpvsOptions,
    labels: dict[str, str],
    node_ips: tuple[IPAddress, ...],
) -> Piece:
    """One iteration of upstream's per-service-port loop, without its neighbours."""
    b = _PieceBuilder(spn, o, labels)
    proto = svc.protocol.lower()
    port = svc.port
    _fill_piece(b, svc, eps, proto, port, node_ips)
    for addr in b.bind:
        b.add(s.IPVS_IPS, IPSetEntry(s.HASH_IP, str(addr)))
    return Piece(
        svc=svc,
        eps=eps,
        servers=tuple(b.servers.values()),
        entries=tuple(b.entries),
        bind=tuple(b.bind),
        lb_no_node_access=tuple(b.lb_no_node_access),
        no_local_internal=b.no_local_internal,
        no_local_external=b.no_local_external,
    )


def _fill_piece(
    b: _PieceBuilder,
    svc: ServicePortInfo,
    eps: Sequence[EndpointInfo],
    proto: str,
    port: int,
    node_ips: tuple[IPAddress, ...],
) -> None:
    o = b.o
    # Hairpin: a local endpoint reaching itself through a VIP is SNATed.
    for ep in eps:
        if ep.is_local:
            b.add(s.LOOP_BACK, IPSetEntry(s.HASH_IP_PORT_IP, ep.ip, ep.port, proto, ip2=ep.ip))

    b.add(s.CLUSTER_IP, IPSetEntry(s.HASH_IP_PORT, str(svc.cluster_ip), port, proto))
    vs = b.virtual_server(svc.cluster_ip, port, svc)
    b.server(vs, CLUSTER_IP, b.real_servers(svc, eps, svc.internal_policy_local))
    b.bind[svc.cluster_ip] = None

    # Computed once per service port, and only if some external VS uses it
    # (the no-local-endpoints counts follow the virtual servers, as upstream).
    ext_rs: tuple[RealServer, ...] = ()
    if svc.external_ips or svc.load_balancer_vips or (svc.node_port and node_ips):
        ext_rs = b.real_servers(svc, eps, svc.external_policy_local)

    for ext_ip in svc.external_ips:
        entry = IPSetEntry(s.HASH_IP_PORT, str(ext_ip), port, proto)
        b.add(s.EXTERNAL_IP_LOCAL if svc.external_policy_local else s.EXTERNAL_IP, entry)
        b.server(b.virtual_server(ext_ip, port, svc), EXTERNAL_IP, ext_rs)
        # An address that is already local elsewhere must not move to kube-ipvs0.
        if not o.is_node_address(ext_ip):
            b.bind[ext_ip] = None

    for lb_ip in svc.load_balancer_vips:
        entry = IPSetEntry(s.HASH_IP_PORT, str(lb_ip), port, proto)
        b.add(s.LOAD_BALANCER, entry)
        if svc.external_policy_local:
            b.add(s.LOAD_BALANCER_LOCAL, entry)
        if svc.load_balancer_source_ranges:
            b.add(s.LOAD_BALANCER_FW, entry)
            allow_from_node = False
            for cidr in svc.load_balancer_source_ranges:
                b.add(
                    s.LOAD_BALANCER_SOURCE_CIDR,
                    IPSetEntry(s.HASH_IP_PORT_NET, str(lb_ip), port, proto, net=str(cidr)),
                )
                if o.node_ip is not None and o.node_ip in cidr:
                    allow_from_node = True
            if allow_from_node:
                # The node's own requests to the LB VIP short-circuit locally
                # with the VIP as source; let them through.
                b.add(
                    s.LOAD_BALANCER_SOURCE_IP,
                    IPSetEntry(s.HASH_IP_PORT_IP, str(lb_ip), port, proto, ip2=str(lb_ip)),
                )
            else:
                b.lb_no_node_access.append(entry)  # issue #119656
        b.server(b.virtual_server(lb_ip, port, svc), LOAD_BALANCER, ext_rs)
        if not o.is_node_address(lb_ip):
            b.bind[lb_ip] = None

    if svc.node_port:
        if not node_ips:
            # Upstream skips the rest of this service port (its health-check
            # port included) when no node address is usable.
            return
        np = svc.node_port
        np_entries: list[IPSetEntry]
        if proto == "sctp":
            np_set, local_set = s.NODE_PORT_SCTP, s.NODE_PORT_LOCAL_SCTP
            np_entries = [IPSetEntry(s.HASH_IP_PORT, str(ip), np, proto) for ip in node_ips]
        else:
            np_set, local_set = (
                (s.NODE_PORT_TCP, s.NODE_PORT_LOCAL_TCP)
                if proto == "tcp"
                else (s.NODE_PORT_UDP, s.NODE_PORT_LOCAL_UDP)
            )
            np_entries = [IPSetEntry(s.BITMAP_PORT, port=np, protocol=proto)]
        for e in np_entries:
            b.add(np_set, e)
            if svc.external_policy_local:
                b.add(local_set, e)
        for ip in node_ips:
            b.server(b.virtual_server(ip, np, svc), NODE_PORT, ext_rs)

    if svc.health_check_node_port:
        b.add(
            s.HEALTH_CHECK_NODE_PORT,
            IPSetEntry(s.BITMAP_PORT, port=svc.health_check_node_port, protocol="tcp"),
        )
