"""Snapshot → ``iptables-restore`` input, exactly as upstream kube-proxy writes it.

Owns the pure half of the iptables mode: given the service ports, their
endpoints, the options, the Services changed since the last sync, the full /
partial flag and the nat chains that exist now, :meth:`IPTablesRenderer.render`
returns the text upstream's ``syncProxyRules`` hands to
``iptables-restore --noflush --counters`` plus the counts its metrics need.

Invariants:
- layout ``*filter`` chains, rules, ``COMMIT``, ``*nat`` chains, rules, ``COMMIT``;
  rules of one chain appear in upstream's order; Services are visited in sorted
  ``ServicePortName`` order (upstream visits a Go map, so its order is random and
  its tests normalise it — any order is equally valid for iptables);
- filter rules and the top-level nat chains are written on every sync; on a
  partial sync the SVC/SVL/EXT/FW/SEP chains of unchanged Services are computed
  but not written (counted as skipped), as upstream;
- a chain that exists (``existing_nat_chains``), looks like a service chain and is
  no longer active is flushed and deleted (``:CHAIN`` + ``-X CHAIN``);
- above ``large_cluster_threshold`` endpoints the per-endpoint comments are dropped.

The per-endpoint lines (SVC/SVL → SEP jumps, SEP chains), most of a large
ruleset, are built by :mod:`kproxy.fastpath` (compiled, or its pure twin);
their input strings (``IP:port``, IP, SEP chain name) are cached per service
port and reused while the endpoint tuple of that port is the same object, so a
sync with few changes touches only the changed ports' endpoints in Python.
On a partial sync the endpoint lines of unchanged Services are only counted.
"""

from __future__ import annotations

import ipaddress
import logging
import operator
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass

from kproxy import fastpath
from kproxy.proxy.iptables.chains import (
    FILTER_TOP_CHAINS,
    KUBE_EXTERNAL_SERVICES,
    KUBE_FORWARD,
    KUBE_MARK_MASQ,
    KUBE_NODEPORTS,
    KUBE_POSTROUTING,
    KUBE_PROXY_FIREWALL,
    KUBE_SERVICES,
    KUBELET_FIREWALL,
    NAT_TOP_CHAINS,
    NFACCT_CT_STATE_INVALID,
    NFACCT_LOCALHOST_NODEPORTS,
    RenderOptions,
    ServiceChains,
    is_service_chain,
)
from kproxy.proxy.topology import Categorized, categorize_endpoints
from kproxy.proxy.types import EndpointInfo, NamespacedName, ServicePortInfo, ServicePortName

__all__ = ["IPTablesRenderer", "RenderResult"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RenderResult:
    """The restore input and what upstream's metrics and logs count about it."""

    text: str
    full: bool
    filter_chains: int
    filter_rules: int
    nat_chains: int
    nat_rules: int  # lines written to the nat table, including ``-X`` lines
    skipped_nat_chains: int
    skipped_nat_rules: int
    deleted_chains: int
    active_nat_chains: frozenset[str]
    large_cluster_mode: bool
    total_endpoints: int
    no_local_endpoints_internal: int
    no_local_endpoints_external: int

    @property
    def nat_rules_total(self) -> int:
        """``sync_proxy_rules_iptables_total{table="nat"}``: rules kube-proxy owns."""
        return self.nat_rules + self.skipped_nat_rules - self.deleted_chains

    @property
    def nat_rules_last(self) -> int:
        """``sync_proxy_rules_iptables_last{table="nat"}``: rules written this sync."""
        return self.nat_rules - self.deleted_chains


# ServicePortName's own ordering, as a C-level key: the dataclass __lt__ costs
# a Python call per comparison (~140,000 of them for 10,000 ports).
_SPN_ORDER = operator.attrgetter("namespace", "name", "port", "protocol")


def _chain_line(chain: str) -> str:
    return f":{chain} - [0:0]"


@dataclass(frozen=True, slots=True)
class _Unchanged:
    """What one service port contributed to the last render that computed it.

    Valid while the port's ServicePortInfo and endpoint tuple are the same
    objects (both maps replace, never mutate, a changed entry) and the options
    and large-cluster mode are the same: then a partial sync that does not
    write this port's chains re-emits ``nat``/``filter`` (its lines in the
    top-level chains) and counts ``chains``/``rules`` without recomputing.
    """

    svc: ServicePortInfo
    source: Sequence[EndpointInfo]
    options: RenderOptions
    large: bool
    nat: tuple[str, ...]
    filter: tuple[str, ...]
    chains: int
    rules: int
    active: tuple[str, ...]
    no_local_internal: int
    no_local_external: int


class _PortStrings:
    """Cached strings of one service port, valid while ``source`` is the same tuple.

    ``keys``/``ips``/``seps`` are parallel to ``source`` (``IP:port``, IP, SEP
    chain). The endpoints map replaces a port's tuple when it changes, so
    identity is a sound (and O(1)) freshness test.
    """

    __slots__ = ("_sep_by_key", "chains", "ips", "keys", "last", "seps", "source")

    def __init__(self, chains: ServiceChains) -> None:
        self.chains = chains
        self.last: _Unchanged | None = None
        self.source: Sequence[EndpointInfo] = ()
        self.keys: tuple[str, ...] = ()
        self.ips: tuple[str, ...] = ()
        self.seps: tuple[str, ...] = ()
        self._sep_by_key: dict[str, str] | None = None

    def refresh(self, source: Sequence[EndpointInfo]) -> None:
        if source is self.source:
            return
        # Hash only the endpoints this port did not have before.
        old = dict(zip(self.keys, self.seps, strict=True))
        keys = tuple([ep.endpoint for ep in source])
        missing = [k for k in keys if k not in old]
        if missing:
            ch = self.chains
            old.update(
                zip(
                    missing,
                    fastpath.endpoint_chain_names(ch.name, ch.protocol, missing),
                    strict=True,
                )
            )
        self.source = source
        self.keys = keys
        self.ips = tuple([ep.ip for ep in source])
        self.seps = tuple([old[k] for k in keys])
        self._sep_by_key = None

    def subset(
        self, eps: Sequence[EndpointInfo]
    ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """(keys, ips, seps) of ``eps``, a sub-sequence of ``source``."""
        # Tuple equality tries identity per element first, so this is cheap
        # in the common case of "every endpoint is usable".
        if eps is self.source or (len(eps) == len(self.source) and eps == self.source):
            return self.keys, self.ips, self.seps
        if self._sep_by_key is None:
            self._sep_by_key = dict(zip(self.keys, self.seps, strict=True))
        by_key = self._sep_by_key
        keys = tuple([ep.endpoint for ep in eps])
        return keys, tuple([ep.ip for ep in eps]), tuple([by_key[k] for k in keys])


class IPTablesRenderer:
    """Renders restore inputs; caches chain names and probabilities across syncs."""

    def __init__(self, options: RenderOptions) -> None:
        self.options = options
        self._ports: dict[ServicePortName, _PortStrings] = {}

    def _port(self, spn: ServicePortName) -> _PortStrings:
        port = self._ports.get(spn)
        if port is None:
            port = self._ports[spn] = _PortStrings(ServiceChains.of(spn))
        return port

    def chains(self, spn: ServicePortName) -> ServiceChains:
        return self._port(spn).chains

    def _prune_caches(self, services: Mapping[ServicePortName, ServicePortInfo]) -> None:
        if len(self._ports) > 2 * len(services) + 64:
            self._ports = {k: v for k, v in self._ports.items() if k in services}

    def render(
        self,
        services: Mapping[ServicePortName, ServicePortInfo],
        endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]],
        changed: Set[NamespacedName] = frozenset(),
        *,
        full: bool = True,
        existing_nat_chains: Iterable[str] | None = (),
    ) -> RenderResult:
        """The restore input for this snapshot.

        ``existing_nat_chains`` are the nat chains present now (from
        ``iptables-save -t nat``); None skips stale-chain deletion (upstream does
        that in large-cluster mode between cleanups, or when the save failed).
        """
        opts = self.options
        mark = opts.masquerade_mark
        detector = opts.local_detector
        labels = dict(opts.topology_labels)
        filter_chains = [_chain_line(c) for c in FILTER_TOP_CHAINS]
        filter_rules: list[str] = []
        nat_chains = [_chain_line(c) for c in NAT_TOP_CHAINS]
        nat_rules = [
            f"-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN",
            f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}",
            f"-A {KUBE_POSTROUTING} -m comment --comment"
            ' "kubernetes service traffic requiring SNAT" -j MASQUERADE'
            + (" --random-fully" if opts.random_fully else ""),
            f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}",
        ]
        if opts.localhost_nodeports_active:
            # Mitigates CVE-2020-8558 (route_localnet=1); kubelet writes the same rule.
            filter_chains.append(_chain_line(KUBELET_FIREWALL))
            filter_rules.append(
                f'-A {KUBELET_FIREWALL} -m comment --comment "block incoming localnet connections"'
                " -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT"
                " -j DROP"
            )
        skipped_chains: list[str] = []
        skipped_rules: list[str] = []
        # Lines of unchanged Services counted without being built.
        skipped_ep_chains = skipped_ep_rules = 0
        active: set[str] = set()

        total_endpoints = 0
        for spn in services:
            total_endpoints += len(endpoints.get(spn, ()))
        large = total_endpoints > opts.large_cluster_threshold
        no_local_internal = no_local_external = 0
        localhost_np_nfacct = opts.localhost_nodeports_active and opts.nfacct_localhost_nodeports
        if_not_local = " ".join(detector.if_not_local)
        if_local = " ".join(detector.if_local)
        node_ip = ipaddress.ip_address(opts.node_ip) if opts.node_ip else None

        for spn in sorted(services, key=_SPN_ORDER):
            svc = services[spn]
            port_strings = self._port(spn)
            ch = port_strings.chains
            name = ch.name
            p = ch.protocol
            source = endpoints.get(spn, ())
            # Unchanged Services' own chains are computed (for the counts) but not written.
            write = full or spn.service in changed
            last = port_strings.last
            if (
                not write
                and last is not None
                and last.svc is svc
                and last.source is source
                and last.options is opts
                and last.large == large
            ):
                nat_rules.extend(last.nat)
                filter_rules.extend(last.filter)
                skipped_ep_chains += last.chains
                skipped_ep_rules += last.rules
                active.update(last.active)
                no_local_internal += last.no_local_internal
                no_local_external += last.no_local_external
                continue
            nat0, filter0, nli0, nle0 = (
                len(nat_rules),
                len(filter_rules),
                no_local_internal,
                no_local_external,
            )
            port_active: list[str] = []
            cat = categorize_endpoints(
                source,
                svc,
                opts.node_name,
                labels,
                prefer_same_node=opts.prefer_same_node,
            )
            has_endpoints = cat.has_any
            internal_chain = ch.svc
            has_internal = has_endpoints
            if svc.internal_policy_local:
                internal_chain = ch.svl
                has_internal = has_internal and bool(cat.local)
            external_policy_chain = ch.svc
            has_external = has_endpoints
            if svc.external_policy_local:
                external_policy_chain = ch.svl
                has_external = has_external and bool(cat.local)
            uses_ext_chain = has_endpoints and svc.externally_accessible
            uses_fw_chain = (
                has_endpoints
                and bool(svc.load_balancer_vips)
                and bool(svc.load_balancer_source_ranges)
            )
            lb_chain = ch.fw if uses_fw_chain else ch.ext

            internal_target = internal_comment = external_target = external_comment = ""
            if not has_endpoints:
                internal_target = external_target = "REJECT"
                internal_comment = external_comment = f'"{name} has no endpoints"'
            else:
                if not has_internal:
                    internal_target = "DROP"
                    internal_comment = f'"{name} has no local endpoints"'
                    no_local_internal += 1
                if not has_external:
                    external_target = "DROP"
                    external_comment = f'"{name} has no local endpoints"'
                    no_local_external += 1

            port = svc.port
            cluster_ip = str(svc.cluster_ip)
            match = f"-m {p} -p {p}"
            if has_internal:
                nat_rules.append(
                    f'-A {KUBE_SERVICES} -m comment --comment "{name} cluster IP" {match}'
                    f" -d {cluster_ip} --dport {port} -j {internal_chain}"
                )
            else:
                filter_rules.append(
                    f"-A {KUBE_SERVICES} -m comment --comment {internal_comment} {match}"
                    f" -d {cluster_ip} --dport {port} -j {internal_target}"
                )

            for eip in svc.external_ips:
                if has_endpoints:
                    nat_rules.append(
                        f'-A {KUBE_SERVICES} -m comment --comment "{name} external IP" {match}'
                        f" -d {eip} --dport {port} -j {ch.ext}"
                    )
                if not has_external:
                    filter_rules.append(
                        f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment}"
                        f" {match} -d {eip} --dport {port} -j {external_target}"
                    )

            for lbip in svc.load_balancer_vips:
                if has_endpoints:
                    nat_rules.append(
                        f'-A {KUBE_SERVICES} -m comment --comment "{name} loadbalancer IP"'
                        f" {match} -d {lbip} --dport {port} -j {lb_chain}"
                    )
                if uses_fw_chain:
                    filter_rules.append(
                        f"-A {KUBE_PROXY_FIREWALL} -m comment --comment"
                        f' "{name} traffic not accepted by {ch.fw}" {match}'
                        f" -d {lbip} --dport {port} -j DROP"
                    )
            if not has_external:
                for lbip in svc.load_balancer_vips:
                    filter_rules.append(
                        f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment}"
                        f" {match} -d {lbip} --dport {port} -j {external_target}"
                    )

            if svc.node_port:
                np = svc.node_port
                if has_endpoints:
                    if localhost_np_nfacct:
                        nat_rules.append(
                            f"-A {KUBE_NODEPORTS} -m comment --comment {name} {match}"
                            f" -d 127.0.0.0/8 --dport {np} -m nfacct --nfacct-name"
                            f" {NFACCT_LOCALHOST_NODEPORTS} -j {ch.ext}"
                        )
                    nat_rules.append(
                        f"-A {KUBE_NODEPORTS} -m comment --comment {name} {match}"
                        f" --dport {np} -j {ch.ext}"
                    )
                if not has_external:
                    filter_rules.append(
                        f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {external_comment}"
                        f" -m addrtype --dst-type LOCAL {match} --dport {np} -j {external_target}"
                    )

            if svc.health_check_node_port:
                filter_rules.append(
                    f'-A {KUBE_NODEPORTS} -m comment --comment "{name} health check node port"'
                    f" -m tcp -p tcp --dport {svc.health_check_node_port} -j ACCEPT"
                )

            nat_top = len(nat_rules)
            if write:
                svc_chains, svc_rules = nat_chains, nat_rules
            else:
                svc_chains, svc_rules = skipped_chains, skipped_rules
            chains0, rules0 = len(svc_chains), len(svc_rules)
            ep_chains0, ep_rules0 = skipped_ep_chains, skipped_ep_rules

            if has_internal:
                masq = (
                    f'-A {internal_chain} -m comment --comment "{name} cluster IP" {match}'
                    f" -d {cluster_ip} --dport {port}"
                )
                if opts.masquerade_all:
                    svc_rules.append(f"{masq} -j {KUBE_MARK_MASQ}")
                elif detector.implemented:
                    # Off-cluster traffic to a VIP may be bridged to another node.
                    svc_rules.append(f"{masq} {if_not_local} -j {KUBE_MARK_MASQ}")

            if uses_ext_chain:
                ext = ch.ext
                svc_chains.append(_chain_line(ext))
                port_active.append(ext)
                if not svc.external_policy_local:
                    svc_rules.append(
                        f"-A {ext} -m comment --comment"
                        f' "masquerade traffic for {name} external destinations"'
                        f" -j {KUBE_MARK_MASQ}"
                    )
                else:
                    if detector.implemented:
                        svc_rules.append(
                            f"-A {ext} -m comment --comment"
                            f' "pod traffic for {name} external destinations"'
                            f" {if_local} -j {ch.svc}"
                        )
                    svc_rules.append(
                        f"-A {ext} -m comment --comment"
                        f' "masquerade LOCAL traffic for {name} external destinations"'
                        f" -m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}"
                    )
                    svc_rules.append(
                        f"-A {ext} -m comment --comment"
                        f' "route LOCAL traffic for {name} external destinations"'
                        f" -m addrtype --src-type LOCAL -j {ch.svc}"
                    )
                if has_external:
                    svc_rules.append(f"-A {ext} -j {external_policy_chain}")

            if uses_fw_chain:
                fw = ch.fw
                svc_chains.append(_chain_line(fw))
                port_active.append(fw)
                head = f'-A {fw} -m comment --comment "{name} loadbalancer IP"'
                allow_from_node = False
                for cidr in svc.load_balancer_source_ranges:
                    svc_rules.append(f"{head} -s {cidr} -j {ch.ext}")
                    if node_ip is not None and node_ip in cidr:
                        allow_from_node = True
                if allow_from_node:
                    # A VIP-like LB address is often local: node traffic to it
                    # loops back with the VIP as its source.
                    for lbip in svc.load_balancer_vips:
                        svc_rules.append(f"{head} -s {lbip} -j {ch.ext}")
                svc_rules.append(
                    f"-A {fw} -m comment --comment"
                    f' "other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL"'
                )

            if cat.all_reachable:
                counted_chains, counted_rules = self._write_endpoints(
                    port_strings,
                    svc,
                    source,
                    cat,
                    match,
                    large,
                    write,
                    svc_chains,
                    svc_rules,
                    port_active,
                )
                skipped_ep_chains += counted_chains
                skipped_ep_rules += counted_rules
            active.update(port_active)
            port_strings.last = _Unchanged(
                svc=svc,
                source=source,
                options=opts,
                large=large,
                nat=tuple(nat_rules[nat0:nat_top]),
                filter=tuple(filter_rules[filter0:]),
                chains=len(svc_chains) - chains0 + skipped_ep_chains - ep_chains0,
                rules=len(svc_rules) - rules0 + skipped_ep_rules - ep_rules0,
                active=tuple(port_active),
                no_local_internal=no_local_internal - nli0,
                no_local_external=no_local_external - nle0,
            )

        deleted = 0
        if existing_nat_chains is not None:
            for chain in sorted(set(existing_nat_chains) - active):
                if not is_service_chain(chain):
                    continue
                # A chain line flushes the chain, which -X requires.
                nat_chains.append(_chain_line(chain))
                nat_rules.append(f"-X {chain}")
                deleted += 1

        self._write_nodeport_tail(nat_rules)

        if not opts.conntrack_tcp_be_liberal:
            # INVALID packets would otherwise reset connections (#74839, #117924).
            nfacct = (
                f" -m nfacct --nfacct-name {NFACCT_CT_STATE_INVALID}"
                if opts.nfacct_ct_state_invalid
                else ""
            )
            filter_rules.append(f"-A {KUBE_FORWARD} -m conntrack --ctstate INVALID{nfacct} -j DROP")
        filter_rules.append(
            f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules"'
            f" -m mark --mark {mark}/{mark} -j ACCEPT"
        )
        filter_rules.append(
            f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule"'
            " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        )

        text = "\n".join(
            ["*filter", *filter_chains, *filter_rules, "COMMIT",
             "*nat", *nat_chains, *nat_rules, "COMMIT", ""]
        )  # fmt: skip
        self._prune_caches(services)
        return RenderResult(
            text=text,
            full=full,
            filter_chains=len(filter_chains),
            filter_rules=len(filter_rules),
            nat_chains=len(nat_chains),
            nat_rules=len(nat_rules),
            skipped_nat_chains=len(skipped_chains) + skipped_ep_chains,
            skipped_nat_rules=len(skipped_rules) + skipped_ep_rules,
            deleted_chains=deleted,
            active_nat_chains=frozenset(active),
            large_cluster_mode=large,
            total_endpoints=total_endpoints,
            no_local_endpoints_internal=no_local_internal,
            no_local_endpoints_external=no_local_external,
        )

    def _write_endpoints(
        self,
        port_strings: _PortStrings,
        svc: ServicePortInfo,
        source: Sequence[EndpointInfo],
        cat: Categorized,
        match: str,
        large: bool,
        write: bool,
        svc_chains: list[str],
        svc_rules: list[str],
        port_active: list[str],
    ) -> tuple[int, int]:
        """SVC/SVL → SEP jumps and the SEP chains of one port, via the fast path.

        When not ``write`` only the chain names are recorded (for ``active``)
        and the lines are counted, not built: returns (chains, rules) counted.
        """
        ch = port_strings.chains
        name = ch.name
        port_strings.refresh(source)
        affinity = svc.session_affinity_client_ip
        seconds = svc.sticky_max_age_seconds
        comments = not large
        counted_chains = counted_rules = 0
        picks: list[tuple[str, Sequence[EndpointInfo]]] = []
        if cat.cluster and svc.uses_cluster_endpoints:
            picks.append((ch.svc, cat.cluster))
        if cat.local and svc.uses_local_endpoints:
            picks.append((ch.svl, cat.local))
        for chain, eps in picks:
            svc_chains.append(_chain_line(chain))
            port_active.append(chain)
            if write:
                keys, _, seps = port_strings.subset(eps)
                svc_rules.extend(
                    fastpath.service_to_endpoint_rules(
                        chain, name, keys, seps, affinity, seconds, comments
                    )
                )
            else:
                counted_rules += len(eps) * (2 if affinity else 1)

        keys, ips, seps = port_strings.subset(cat.all_reachable)
        port_active.extend(seps)
        if write:
            sep_chains, sep_rules = fastpath.endpoint_chain_rules(
                name, match, keys, seps, ips, affinity, comments
            )
            # Only reached for written ports, whose svc_chains are nat_chains.
            svc_chains.extend(sep_chains)
            svc_rules.extend(sep_rules)
        else:
            counted_chains += len(seps)
            counted_rules += 2 * len(seps)
        return counted_chains, counted_rules

    def _write_nodeport_tail(self, nat_rules: list[str]) -> None:
        opts = self.options
        comment = '"kubernetes service nodeports; NOTE: this must be the last rule in this chain"'
        if opts.nodeport_ips is None:
            dest = "-m addrtype --dst-type LOCAL"
            # Localhost NodePorts never work on IPv6, and on IPv4 only with route_localnet.
            if opts.ipv6:
                dest += " ! -d ::1/128"
            elif not opts.localhost_nodeports:
                dest += " ! -d 127.0.0.0/8"
            nat_rules.append(
                f"-A {KUBE_SERVICES} -m comment --comment {comment} {dest} -j {KUBE_NODEPORTS}"
            )
            return
        for ip_text in opts.nodeport_ips:
            ip = ipaddress.ip_address(ip_text)
            if ip.is_loopback:
                if opts.ipv6:
                    log.error(
                        "--nodeport-addresses includes localhost %s but localhost NodePorts "
                        "are not supported on IPv6",
                        ip,
                    )
                    continue
                if not opts.localhost_nodeports:
                    log.error(
                        "--nodeport-addresses includes localhost %s but "
                        "--iptables-localhost-nodeports=false was passed",
                        ip,
                    )
                    continue
            nat_rules.append(
                f"-A {KUBE_SERVICES} -m comment --comment {comment} -d {ip} -j {KUBE_NODEPORTS}"
            )
