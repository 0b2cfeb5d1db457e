"""Snapshot → IPVS plan: virtual servers, kube-ipvs0 addresses, ipsets and glue rules.

Owns the pure half of the IPVS mode, upstream's ``syncProxyRules`` without the
kernel calls: :func:`plan_ipvs` turns the service ports, their endpoints and
:class:`~kproxy.proxy.ipvs.options.IpvsOptions` into a frozen :class:`IpvsPlan`
that says what the kernel should hold after the sync; the applier diffs it
against the kernel. :meth:`IpvsPlan.render` prints it deterministically (for
``kproxy render ipvs`` and golden tests).

Upstream behaviour kept:
- one virtual server per ClusterIP:port, per externalIP:port, per LB IP:port and,
  for a NodePort, one per node address (never bound to kube-ipvs0);
- ClusterIPs are always bound to kube-ipvs0; externalIPs and LB IPs unless they
  already are node addresses;
- real servers are weight 1, masquerading (NAT); a ClusterIP server uses the
  Local endpoints iff internalTrafficPolicy=Local, the others iff
  externalTrafficPolicy=Local; with none local it falls back to the Cluster
  endpoints (PR #97081) and the Service counts toward
  ``sync_proxy_rules_no_local_endpoints_total``;
- ClientIP affinity → PERSISTENT with the affinity timeout; scheduler ``mh`` →
  the source-hash flag (``mh-port``).

Invariants: service ports are visited in sorted order (upstream's map order is
random; every set and VS is order-free, only the KUBE-IPVS-OUT-FILTER rules
follow it); two service ports that claim the same virtual server: the later one
in that order wins, as the later sync wins upstream, and a warning is logged.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kproxy.kernel.ipvs import (
    ForwardingMethod,
    IPProtocol,
    RealServer,
    ServiceFlags,
    VirtualServer,
)
from kproxy.proxy.ipvs import ipsets as s
from kproxy.proxy.ipvs.ipsets import SET_INFO, IPSet, IPSetEntry
from kproxy.proxy.ipvs.options import IpvsOptions, sysctls
from kproxy.proxy.ipvs.rules import JUMP_RULES, JumpRule, restore_text
from kproxy.proxy.topology import categorize_endpoints
from kproxy.proxy.types import (
    EndpointInfo,
    IPAddress,
    IPNetwork,
    ServicePortInfo,
    ServicePortName,
)

__all__ = ["DUMMY_DEVICE", "IpvsPlan", "PlannedServer", "plan_ipvs"]

log = logging.getLogger(__name__)

DUMMY_DEVICE = "kube-ipvs0"

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


@dataclass(frozen=True, slots=True)
class IpvsPlan:
    """What the kernel should hold after one sync of one IP family."""

    ipv6: bool
    servers: tuple[PlannedServer, ...]  # sorted by (address, port, protocol)
    bind_addresses: tuple[IPAddress, ...]  # on kube-ipvs0, sorted
    ipsets: tuple[IPSet, ...]  # upstream's ipsetInfo order, every set
    restore: str  # iptables-restore --noflush input (nat, filter)
    nat_rules: int
    filter_rules: int
    jump_rules: tuple[JumpRule, ...]
    sysctls: tuple[tuple[str, int], ...]
    timeouts: tuple[int, int, int] | None  # (tcp, tcpfin, udp) for ipvsadm --set
    exclude_cidrs: tuple[IPNetwork, ...]
    no_local_endpoints_internal: int
    no_local_endpoints_external: int

    def ipset(self, name: str) -> IPSet:
        """A set by upstream (IPv4) name, e.g. ``KUBE-CLUSTER-IP``."""
        for ipset in self.ipsets:
            if ipset.base_name == name:
                return ipset
        raise KeyError(name)

    def server(self, address: str, port: int, protocol: str = "TCP") -> PlannedServer:
        key = (ipaddress.ip_address(address), port, IPProtocol[protocol])
        for planned in self.servers:
            if planned.server.key == key:
                return planned
        raise KeyError(f"{address}:{port}/{protocol}")

    def may_delete(self, vs: VirtualServer) -> bool:
        """Whether a kernel VS absent from the plan is ours to delete (cleanLegacyService):
        of this family and outside ``--ipvs-exclude-cidrs``."""
        if (vs.address.version == 6) != self.ipv6:
            return False
        return not any(vs.address in net for net in self.exclude_cidrs)

    def render(self) -> str:
        """Deterministic text: ``ipvsadm -S -n``-like servers, kube-ipvs0 addresses,
        ``ipset save``-like sets, jump rules and the restore input."""
        out = ["# ipvs (ipvsadm -S -n)"]
        for planned in self.servers:
            out.extend(_ipvsadm_lines(planned))
        out.append(f"# {DUMMY_DEVICE} addresses")
        plen = 128 if self.ipv6 else 32
        out.extend(f"{addr}/{plen}" for addr in self.bind_addresses)
        out.append("# ipsets (ipset save)")
        for ipset in self.ipsets:
            out.extend(ipset.save_lines())
        out.append("# jump rules (iptables -I)")
        for j in self.jump_rules:
            out.append(
                f'-t {j.table} -I {j.source} -m comment --comment "{j.comment}" -j {j.chain}'
            )
        out.append("# iptables-restore --noflush --counters")
        return "\n".join(out) + "\n" + self.restore


_PROTO_FLAG = {IPProtocol.TCP: "-t", IPProtocol.UDP: "-u", IPProtocol.SCTP: "--sctp-service"}


def _hostport(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _ipvsadm_lines(planned: PlannedServer) -> list[str]:
    vs = planned.server
    svc = f"{_PROTO_FLAG[vs.protocol]} {_hostport(vs.address, vs.port)}"
    head = f"-A {svc} -s {vs.scheduler}"
    if vs.flags & ServiceFlags.PERSISTENT:
        head += f" -p {vs.timeout}"
    if vs.flags & ServiceFlags.SCHED2:
        head += f" -b {vs.scheduler}-port"
    lines = [head]
    for rs in planned.destinations:
        method = "-m" if rs.forwarding == ForwardingMethod.MASQ else "-g"
        lines.append(f"-a {svc} -r {_hostport(rs.address, rs.port)} {method} -w {rs.weight}")
    return lines


class _Builder:
    """The mutable state of one planning pass (upstream's per-sync locals)."""

    def __init__(self, options: IpvsOptions) -> None:
        self.o = options
        self.labels = dict(options.topology_labels)
        self.entries: dict[str, set[IPSetEntry]] = {info.name: set() for info in SET_INFO}
        self.servers: dict[VsKey, PlannedServer] = {}
        self.bind: set[IPAddress] = set()
        self.no_local_internal: set[str] = set()
        self.no_local_external: set[str] = set()
        self.lb_no_node_access: list[IPSetEntry] = []

    def add(self, name: str, entry: IPSetEntry) -> None:
        self.entries[name].add(entry)

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
        self,
        spn: ServicePortName,
        svc: ServicePortInfo,
        endpoints: Sequence[EndpointInfo],
        only_local: bool,
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
                name = str(spn.service)
                if cat.has_any and svc.internal_policy_local:
                    self.no_local_internal.add(name)
                if cat.has_any and svc.external_policy_local:
                    self.no_local_external.add(name)
        seen: dict[str, RealServer] = {}
        for ep in chosen:
            if ep.endpoint not in seen:
                seen[ep.endpoint] = RealServer(ipaddress.ip_address(ep.ip), ep.port)
        return tuple(seen.values())

    def server(
        self,
        vs: VirtualServer,
        spn: ServicePortName,
        kind: str,
        destinations: tuple[RealServer, ...],
    ) -> None:
        old = self.servers.get(vs.key)
        if old is not None and old.service != spn:
            log.warning(
                "virtual server %s is claimed by %s and %s; using %s",
                vs,
                old.service,
                spn,
                spn,
            )
        self.servers[vs.key] = PlannedServer(vs, destinations, spn, kind)


def plan_ipvs(
    services: Mapping[ServicePortName, ServicePortInfo],
    endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]],
    options: IpvsOptions,
) -> IpvsPlan:
    """The IPVS state for this snapshot (upstream's ``syncProxyRules``, minus I/O)."""
    b = _Builder(options)
    o = options
    node_ips: tuple[IPAddress, ...] = ()
    if any(svc.node_port for svc in services.values()):
        node_ips = o.nodeport_addresses()

    for spn in sorted(services):
        svc = services[spn]
        proto = svc.protocol.lower()
        eps = endpoints.get(spn, ())
        port = svc.port

        # Hairpin: a local endpoint reaching itself through a VIP is SNATed.
        for ep in eps:
            if ep.is_local:
                b.add(s.LOOP_BACK, IPSetEntry(s.HASH_IP_PORT_IP, ep.ip, ep.port, proto, ip2=ep.ip))

        b.add(s.CLUSTER_IP, IPSetEntry(s.HASH_IP_PORT, str(svc.cluster_ip), port, proto))
        vs = b.virtual_server(svc.cluster_ip, port, svc)
        b.server(vs, spn, CLUSTER_IP, b.real_servers(spn, svc, eps, svc.internal_policy_local))
        b.bind.add(svc.cluster_ip)

        # Computed once per service port, and only if some external VS uses it
        # (the no-local-endpoints counts follow the virtual servers, as upstream).
        ext_rs: tuple[RealServer, ...] = ()
        if svc.external_ips or svc.load_balancer_vips or (svc.node_port and node_ips):
            ext_rs = b.real_servers(spn, svc, eps, svc.external_policy_local)

        for ext_ip in svc.external_ips:
            entry = IPSetEntry(s.HASH_IP_PORT, str(ext_ip), port, proto)
            b.add(s.EXTERNAL_IP_LOCAL if svc.external_policy_local else s.EXTERNAL_IP, entry)
            b.server(b.virtual_server(ext_ip, port, svc), spn, EXTERNAL_IP, ext_rs)
            # An address that is already local elsewhere must not move to kube-ipvs0.
            if not o.is_node_address(ext_ip):
                b.bind.add(ext_ip)

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
            b.server(b.virtual_server(lb_ip, port, svc), spn, LOAD_BALANCER, ext_rs)
            if not o.is_node_address(lb_ip):
                b.bind.add(lb_ip)

        if svc.node_port:
            if not node_ips:
                # Upstream skips the rest of this service port (its health-check
                # port included) when no node address is usable.
                continue
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
                b.server(b.virtual_server(ip, np, svc), spn, NODE_PORT, ext_rs)

        if svc.health_check_node_port:
            b.add(
                s.HEALTH_CHECK_NODE_PORT,
                IPSetEntry(s.BITMAP_PORT, port=svc.health_check_node_port, protocol="tcp"),
            )

    for addr in b.bind:
        b.add(s.IPVS_IPS, IPSetEntry(s.HASH_IP, str(addr)))
    sets = {info.name: IPSet.of(info, b.entries[info.name], o.ipv6) for info in SET_INFO}
    restore = restore_text(sets, o, b.lb_no_node_access)
    timeouts = (o.tcp_timeout, o.tcp_fin_timeout, o.udp_timeout)
    return IpvsPlan(
        ipv6=o.ipv6,
        servers=tuple(b.servers[k] for k in sorted(b.servers, key=_vs_order)),
        bind_addresses=tuple(sorted(b.bind, key=int)),
        ipsets=tuple(sets[info.name] for info in SET_INFO),
        restore=restore.text,
        nat_rules=restore.nat_rules,
        filter_rules=restore.filter_rules,
        jump_rules=JUMP_RULES,
        sysctls=sysctls(o),
        timeouts=timeouts if any(timeouts) else None,
        exclude_cidrs=o.exclude_cidrs,
        no_local_endpoints_internal=len(b.no_local_internal),
        no_local_endpoints_external=len(b.no_local_external),
    )


def _vs_order(key: VsKey) -> tuple[int, int, int]:
    address, port, protocol = key
    return (int(address), port, int(protocol))
