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

The string building is plain loops over lists so that it can move into the
Cython fast path unchanged.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass

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
    Probabilities,
    RenderOptions,
    ServiceChains,
    is_service_chain,
)
from kproxy.proxy.topology import categorize_endpoints
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


def _chain_line(chain: str) -> str:
    return f":{chain} - [0:0]"


class IPTablesRenderer:
    """Renders restore inputs; caches chain names and probabilities across syncs."""

    def __init__(self, options: RenderOptions) -> None:
        self.options = options
        self._chains: dict[ServicePortName, ServiceChains] = {}
        self._sep: dict[tuple[ServicePortName, str], str] = {}
        self._probability = Probabilities()

    def chains(self, spn: ServicePortName) -> ServiceChains:
        c = self._chains.get(spn)
        if c is None:
            c = self._chains[spn] = ServiceChains.of(spn)
        return c

    def endpoint_chain(self, spn: ServicePortName, chains: ServiceChains, endpoint: str) -> str:
        key = (spn, endpoint)
        name = self._sep.get(key)
        if name is None:
            name = self._sep[key] = chains.endpoint_chain(endpoint)
        return name

    def _prune_caches(self, services: Mapping[ServicePortName, ServicePortInfo]) -> None:
        if len(self._chains) > 2 * len(services) + 64:
            self._chains = {k: v for k, v in self._chains.items() if k in services}
        if len(self._sep) > 4 * len(self._chains) + 256:
            self._sep = {k: v for k, v in self._sep.items() if k[0] in self._chains}

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

        for spn in sorted(services):
            svc = services[spn]
            ch = self.chains(spn)
            name = ch.name
            p = ch.protocol
            cat = categorize_endpoints(
                endpoints.get(spn, ()),
                svc,
                opts.node_name,
                labels,
                prefer_same_node=opts.prefer_same_node,
            )
            has_endpoints = cat.has_any
            uses_cluster_chain = bool(cat.cluster) and svc.uses_cluster_endpoints
            uses_local_chain = bool(cat.local) and svc.uses_local_endpoints
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

            # Unchanged Services' own chains are computed (for the counts) but not written.
            if full or spn.service in changed:
                svc_chains, svc_rules = nat_chains, nat_rules
            else:
                svc_chains, svc_rules = skipped_chains, skipped_rules

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
                active.add(ext)
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
                active.add(fw)
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

            if uses_cluster_chain:
                svc_chains.append(_chain_line(ch.svc))
                active.add(ch.svc)
                self._write_service_to_endpoints(
                    svc_rules, spn, ch, svc, ch.svc, cat.cluster, large
                )
            if uses_local_chain:
                svc_chains.append(_chain_line(ch.svl))
                active.add(ch.svl)
                self._write_service_to_endpoints(svc_rules, spn, ch, svc, ch.svl, cat.local, large)

            comment = "" if large else f" -m comment --comment {name}"
            affinity = svc.session_affinity_client_ip
            for ep in cat.all_reachable:
                sep = self.endpoint_chain(spn, ch, ep.endpoint)
                svc_chains.append(_chain_line(sep))
                active.add(sep)
                svc_rules.append(f"-A {sep}{comment} -s {ep.ip} -j {KUBE_MARK_MASQ}")
                recent = f" -m recent --name {sep} --set" if affinity else ""
                svc_rules.append(
                    f"-A {sep}{comment}{recent} {match} -j DNAT --to-destination {ep.endpoint}"
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
            skipped_nat_chains=len(skipped_chains),
            skipped_nat_rules=len(skipped_rules),
            deleted_chains=deleted,
            active_nat_chains=frozenset(active),
            large_cluster_mode=large,
            total_endpoints=total_endpoints,
            no_local_endpoints_internal=no_local_internal,
            no_local_endpoints_external=no_local_external,
        )

    def _write_service_to_endpoints(
        self,
        rules: list[str],
        spn: ServicePortName,
        ch: ServiceChains,
        svc: ServicePortInfo,
        chain: str,
        endpoints: Sequence[EndpointInfo],
        large: bool,
    ) -> None:
        name = ch.name
        if svc.session_affinity_client_ip:
            seconds = svc.sticky_max_age_seconds
            for ep in endpoints:
                sep = self.endpoint_chain(spn, ch, ep.endpoint)
                comment = "" if large else f' -m comment --comment "{name} -> {ep.endpoint}"'
                rules.append(
                    f"-A {chain}{comment} -m recent --name {sep}"
                    f" --rcheck --seconds {seconds} --reap -j {sep}"
                )
        n = len(endpoints)
        for i, ep in enumerate(endpoints):
            sep = self.endpoint_chain(spn, ch, ep.endpoint)
            comment = "" if large else f' -m comment --comment "{name} -> {ep.endpoint}"'
            if i < n - 1:
                rules.append(
                    f"-A {chain}{comment} -m statistic --mode random"
                    f" --probability {self._probability(n - i)} -j {sep}"
                )
            else:
                rules.append(f"-A {chain}{comment} -j {sep}")

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
