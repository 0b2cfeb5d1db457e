"""Snapshot → IPVS plan: virtual servers, kube-ipvs0 addresses, ipsets and glue rules.

Owns the pure half of the IPVS mode, upstream's ``syncProxyRules`` without the
kernel calls: :func:`plan_ipvs` turns the service ports, their endpoints and
:class:`~kproxy.proxy.ipvs.options.IpvsOptions` into a frozen :class:`IpvsPlan`
that says what the kernel should hold after the sync; the applier diffs it
against the kernel. :meth:`IpvsPlan.render` prints it deterministically (for
``kproxy render ipvs`` and golden tests).  Each service port's share is planned by
:func:`kproxy.proxy.ipvs.piece.plan_piece`; :class:`IpvsPlanner` folds the pieces
together incrementally.

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
from collections.abc import Collection, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from kproxy.kernel.ipvs import (
    ForwardingMethod,
    IPProtocol,
    ServiceFlags,
    VirtualServer,
)
from kproxy.proxy.ipvs.ipsets import SET_INFO, IPSet, IPSetEntry
from kproxy.proxy.ipvs.options import IpvsOptions, sysctls
from kproxy.proxy.ipvs.piece import Piece, PlannedServer, VsKey, plan_piece
from kproxy.proxy.ipvs.rules import JUMP_RULES, JumpRule, RestoreText, restore_text
from kproxy.proxy.types import (
    EndpointInfo,
    IPAddress,
    IPNetwork,
    NamespacedName,
    ServicePortInfo,
    ServicePortName,
)

__all__ = ["DUMMY_DEVICE", "IpvsPlan", "IpvsPlanner", "PlanDelta", "PlannedServer", "plan_ipvs"]

log = logging.getLogger(__name__)

DUMMY_DEVICE = "kube-ipvs0"


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


@dataclass(slots=True)
class PlanDelta:
    """What one :meth:`IpvsPlanner.update` changed in the plan.

    ``servers`` are the virtual-server keys whose planned server appeared,
    disappeared or changed; entries and addresses are net changes (an entry a
    Service drops and another adds in the same update is in neither).
    """

    full: bool = False  # every service port was (re)considered
    replanned: int = 0  # service ports planned anew
    servers: set[VsKey] = field(default_factory=set)
    entries_added: dict[str, set[IPSetEntry]] = field(default_factory=dict)
    entries_removed: dict[str, set[IPSetEntry]] = field(default_factory=dict)
    bind_added: set[IPAddress] = field(default_factory=set)
    bind_removed: set[IPAddress] = field(default_factory=set)
    restore_changed: bool = False


class IpvsPlanner:
    """Plans incrementally: keeps each service port's piece and the aggregate sets.

    Pure (no I/O): :meth:`update` replans the service ports of the changed
    Services (or, given no change set, every port whose inputs differ from the
    last update's) and folds the pieces in and out of reference-counted
    aggregates, so its cost follows the change, not N.  :meth:`plan` materializes
    the :class:`IpvsPlan` that :func:`plan_ipvs` returns for the same inputs.
    """

    def __init__(self) -> None:
        self.options: IpvsOptions | None = None
        self._pieces: dict[ServicePortName, Piece] = {}
        self._by_service: dict[tuple[str, str], set[ServicePortName]] = {}
        self._claims: dict[VsKey, dict[ServicePortName, PlannedServer]] = {}
        self.servers: dict[VsKey, PlannedServer] = {}  # the winner of each key
        self._entry_refs: dict[str, dict[IPSetEntry, int]] = {i.name: {} for i in SET_INFO}
        self._bind_refs: dict[IPAddress, int] = {}
        self._lb_nna: dict[ServicePortName, tuple[IPSetEntry, ...]] = {}
        self._no_local_int: dict[str, int] = {}
        self._no_local_ext: dict[str, int] = {}
        self._restore: RestoreText | None = None
        self._restore_key: tuple[Any, ...] | None = None
        self._plan: IpvsPlan | None = None

    # -- read side ----------------------------------------------------------------
    def entries(self, name: str) -> Collection[IPSetEntry]:
        """The members of set ``name`` (upstream's IPv4 name), unordered."""
        return self._entry_refs[name].keys()

    @property
    def bind_addresses(self) -> Collection[IPAddress]:
        return self._bind_refs.keys()

    def may_delete(self, vs: VirtualServer) -> bool:
        o = self.options
        assert o is not None
        if (vs.address.version == 6) != o.ipv6:
            return False
        return not any(vs.address in net for net in o.exclude_cidrs)

    @property
    def no_local_endpoints(self) -> tuple[int, int]:
        return len(self._no_local_int), len(self._no_local_ext)

    def restore(self) -> RestoreText:
        """The restore input; recomputed only when a set's emptiness or the drops change."""
        o = self.options
        assert o is not None
        nonempty = frozenset(name for name, refs in self._entry_refs.items() if refs)
        drops = tuple(e for spn in sorted(self._lb_nna) for e in self._lb_nna[spn])
        key = (o, nonempty, drops)
        if self._restore is None or key != self._restore_key:
            # restore_text looks only at whether a set has entries: a one-entry
            # stand-in spares sorting the large sets.
            sets = {
                info.name: IPSet.of(info, set(list(self._entry_refs[info.name])[:1]), o.ipv6)
                for info in SET_INFO
            }
            self._restore = restore_text(sets, o, drops)
            self._restore_key = key
        return self._restore

    def plan(self) -> IpvsPlan:
        """The whole plan (sorted; O(N log N), cached until the next update)."""
        if self._plan is not None:
            return self._plan
        o = self.options
        assert o is not None
        sets = {
            info.name: IPSet.of(info, set(self._entry_refs[info.name]), o.ipv6) for info in SET_INFO
        }
        restore = self.restore()
        timeouts = (o.tcp_timeout, o.tcp_fin_timeout, o.udp_timeout)
        n_int, n_ext = self.no_local_endpoints
        self._plan = IpvsPlan(
            ipv6=o.ipv6,
            servers=tuple(self.servers[k] for k in sorted(self.servers, key=_vs_order)),
            bind_addresses=tuple(sorted(self._bind_refs, key=int)),
            ipsets=tuple(sets[info.name] for info in SET_INFO),
            restore=restore.text,
            nat_rules=restore.nat_rules,
            filter_rules=restore.filter_rules,
            jump_rules=JUMP_RULES,
            sysctls=sysctls(o),
            timeouts=timeouts if any(timeouts) else None,
            exclude_cidrs=o.exclude_cidrs,
            no_local_endpoints_internal=n_int,
            no_local_endpoints_external=n_ext,
        )
        return self._plan

    # -- write side ---------------------------------------------------------------
    def update(
        self,
        services: Mapping[ServicePortName, ServicePortInfo],
        endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]],
        options: IpvsOptions,
        changed: AbstractSet[NamespacedName] | None = None,
    ) -> PlanDelta:
        """Bring the plan to this snapshot; ``changed`` None = compare every port.

        With ``changed`` only the ports of those Services are replanned (the
        caller guarantees nothing else changed since the last update); new
        options always replan everything.
        """
        full = changed is None or options != self.options
        if options != self.options:
            self._reset()
            self.options = options
        self._plan = None
        delta = PlanDelta(full=full)
        ctx = _Update(self, delta)
        node_ips: tuple[IPAddress, ...] = ()
        if any(svc.node_port for svc in services.values()) if full else True:
            node_ips = options.nodeport_addresses()
        labels = dict(options.topology_labels)
        if full:
            todo: set[ServicePortName] = set(self._pieces.keys() - services.keys())
            for spn, svc in services.items():
                old = self._pieces.get(spn)
                eps = endpoints.get(spn, ())
                if old is None or not (
                    (old.svc is svc or old.svc == svc) and (old.eps is eps or old.eps == eps)
                ):
                    todo.add(spn)
        else:
            assert changed is not None
            names = {(n.namespace, n.name) for n in changed}
            todo = set()
            for name in names:
                todo |= self._by_service.get(name, set())
            if names:
                todo.update(spn for spn in services if (spn.namespace, spn.name) in names)
        for spn in todo:
            old = self._pieces.get(spn)
            if old is not None:
                ctx.remove(spn, old)
            current = services.get(spn)
            if current is None:
                continue
            piece = plan_piece(spn, current, endpoints.get(spn, ()), options, labels, node_ips)
            ctx.add(spn, piece)
            delta.replanned += 1
        ctx.finish()
        return delta

    def _reset(self) -> None:
        self.__init__()  # type: ignore[misc]


class _Update:
    """One update's bookkeeping: the state before each touched key, for net deltas."""

    def __init__(self, planner: IpvsPlanner, delta: PlanDelta) -> None:
        self.p = planner
        self.delta = delta
        self.vs_before: dict[VsKey, PlannedServer | None] = {}
        self.entry_before: dict[tuple[str, IPSetEntry], bool] = {}
        self.bind_before: dict[IPAddress, bool] = {}
        self.drops_touched = False

    def add(self, spn: ServicePortName, piece: Piece) -> None:
        p = self.p
        p._pieces[spn] = piece
        p._by_service.setdefault((spn.namespace, spn.name), set()).add(spn)
        for planned in piece.servers:
            key = planned.server.key
            self.vs_before.setdefault(key, p.servers.get(key))
            p._claims.setdefault(key, {})[spn] = planned
        for name, entry in piece.entries:
            refs = p._entry_refs[name]
            n = refs.get(entry, 0)
            self.entry_before.setdefault((name, entry), n > 0)
            refs[entry] = n + 1
        for addr in piece.bind:
            n = p._bind_refs.get(addr, 0)
            self.bind_before.setdefault(addr, n > 0)
            p._bind_refs[addr] = n + 1
        if piece.lb_no_node_access:
            p._lb_nna[spn] = piece.lb_no_node_access
        name = str(spn.service)
        if piece.no_local_internal:
            p._no_local_int[name] = p._no_local_int.get(name, 0) + 1
        if piece.no_local_external:
            p._no_local_ext[name] = p._no_local_ext.get(name, 0) + 1

    def remove(self, spn: ServicePortName, piece: Piece) -> None:
        p = self.p
        del p._pieces[spn]
        group = p._by_service.get((spn.namespace, spn.name))
        if group is not None:
            group.discard(spn)
            if not group:
                del p._by_service[(spn.namespace, spn.name)]
        for planned in piece.servers:
            key = planned.server.key
            self.vs_before.setdefault(key, p.servers.get(key))
            claims = p._claims[key]
            del claims[spn]
            if not claims:
                del p._claims[key]
        for name, entry in piece.entries:
            refs = p._entry_refs[name]
            self.entry_before.setdefault((name, entry), True)
            n = refs[entry] - 1
            if n:
                refs[entry] = n
            else:
                del refs[entry]
        for addr in piece.bind:
            self.bind_before.setdefault(addr, True)
            n = p._bind_refs[addr] - 1
            if n:
                p._bind_refs[addr] = n
            else:
                del p._bind_refs[addr]
        p._lb_nna.pop(spn, None)
        name = str(spn.service)
        for flag, counts in (
            (piece.no_local_internal, p._no_local_int),
            (piece.no_local_external, p._no_local_ext),
        ):
            if flag:
                counts[name] -= 1
                if not counts[name]:
                    del counts[name]

    def finish(self) -> None:
        p, d = self.p, self.delta
        for key, before in self.vs_before.items():
            claims = p._claims.get(key)
            if not claims:
                p.servers.pop(key, None)
                after = None
            else:
                # Upstream visits ports in sorted order and the later claim wins.
                winner = max(claims)
                after = claims[winner]
                p.servers[key] = after
                if len(claims) > 1:
                    log.warning(
                        "virtual server %s is claimed by %s; using %s",
                        after.server,
                        " and ".join(str(c) for c in sorted(claims)),
                        winner,
                    )
            if after != before:
                d.servers.add(key)
        for (name, entry), was in self.entry_before.items():
            now = entry in p._entry_refs[name]
            if now and not was:
                d.entries_added.setdefault(name, set()).add(entry)
            elif was and not now:
                d.entries_removed.setdefault(name, set()).add(entry)
        for addr, was in self.bind_before.items():
            now = addr in p._bind_refs
            if now and not was:
                d.bind_added.add(addr)
            elif was and not now:
                d.bind_removed.add(addr)


def plan_ipvs(
    services: Mapping[ServicePortName, ServicePortInfo],
    endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]],
    options: IpvsOptions,
) -> IpvsPlan:
    """The IPVS state for this snapshot (upstream's ``syncProxyRules``, minus I/O)."""
    planner = IpvsPlanner()
    planner.update(services, endpoints, options)
    return planner.plan()


def _vs_order(key: VsKey) -> tuple[int, int, int]:
    address, port, protocol = key
    return (int(address), port, int(protocol))
