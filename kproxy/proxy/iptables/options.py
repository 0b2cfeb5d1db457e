"""ProxyConfig + host facts → :class:`RenderOptions` (shared by render and the proxy).

Host features the rules depend on (``random-fully``, ``nfacct``,
``tcp-be-liberal``) are detected on the host by default, or given as a list
for a dry run (``--host-features``), so that ``kproxy render`` can reproduce
another machine's ruleset.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kproxy.errors import KProxyError
from kproxy.kernel import sysctl
from kproxy.kernel.iptables import IptablesBackend, IptablesError
from kproxy.proxy.config import ProxyConfig
from kproxy.proxy.iptables.chains import LocalDetector, RenderOptions
from kproxy.proxy.masquerade import masquerade_mark
from kproxy.proxy.types import IPV6, parse_cidr_sloppy, parse_ip_sloppy

log = logging.getLogger(__name__)

FEATURES = ("random-fully", "nfacct", "tcp-be-liberal")


@dataclass(frozen=True, slots=True)
class HostFeatures:
    random_fully: bool = False
    nfacct: bool = False
    tcp_be_liberal: bool = False

    @classmethod
    def parse(cls, text: str) -> HostFeatures:
        """``"random-fully,nfacct"``; an empty string means none."""
        names = {n.strip() for n in text.split(",") if n.strip()}
        unknown = names - set(FEATURES)
        if unknown:
            raise KProxyError(
                f"unknown host feature(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(FEATURES)}"
            )
        return cls("random-fully" in names, "nfacct" in names, "tcp-be-liberal" in names)


def detect_host_features(ipt: IptablesBackend | None, cfg: ProxyConfig) -> HostFeatures:
    """What this host's iptables and conntrack support (None: no iptables to ask)."""
    random_fully = False
    if ipt is not None:
        try:
            random_fully = ipt.has_random_fully()
        except (IptablesError, OSError) as exc:
            log.warning("cannot probe iptables (%s); assuming no --random-fully", exc)
    liberal = cfg.conntrack_tcp_be_liberal or (
        sysctl.read("net/netfilter/nf_conntrack_tcp_be_liberal") not in (None, "", "0")
    )
    # kproxy does not create nfacct counters, so it writes -m nfacct rules only
    # when asked to reproduce a host that has them (--host-features nfacct).
    return HostFeatures(random_fully=random_fully, nfacct=False, tcp_be_liberal=liberal)


def node_ip(cfg: ProxyConfig, node_ips: tuple[str, ...]) -> str | None:
    """``--node-ip``, else ``--bind-address`` unless unspecified (upstream), else the
    Node's primary IP."""
    if cfg.node_ips:
        return cfg.node_ips[0]
    if cfg.bind_address not in ("", "0.0.0.0", "::"):
        return cfg.bind_address
    return node_ips[0] if node_ips else None


def nodeport_ips(cfg: ProxyConfig, node_ips: tuple[str, ...]) -> tuple[str, ...] | None:
    """The node IPs NodePorts answer on; None = every local address (flag unset)."""
    if not cfg.nodeport_addresses:
        return None
    out: list[str] = []
    for spec in cfg.nodeport_addresses:
        if spec == "primary":
            out.extend(node_ips[:1])
            continue
        net = parse_cidr_sloppy(spec)
        for ip in node_ips:
            addr = parse_ip_sloppy(ip)
            if net is not None and addr is not None and addr in net and ip not in out:
                out.append(ip)
    return tuple(out)


def render_options(
    cfg: ProxyConfig,
    *,
    node_name: str,
    node_ips: tuple[str, ...],
    features: HostFeatures,
    family: str = "IPv4",
    topology_labels: tuple[tuple[str, str], ...] = (),
) -> RenderOptions:
    """``node_ips`` are the node's addresses known so far (flags first, then the Node)."""
    node_ips = tuple(dict.fromkeys([*cfg.node_ips, *node_ips]))
    ipv6 = family == IPV6
    cidrs = [c for c in cfg.cluster_cidrs if (":" in c) == ipv6]
    detector = LocalDetector.by_cidr(cidrs[0]) if cidrs else LocalDetector()
    return RenderOptions(
        masquerade_mark=masquerade_mark(cfg.masquerade_bit),
        masquerade_all=cfg.masquerade_all,
        local_detector=detector,
        random_fully=features.random_fully,
        ipv6=ipv6,
        localhost_nodeports=cfg.localhost_nodeports,
        conntrack_tcp_be_liberal=features.tcp_be_liberal or cfg.conntrack_tcp_be_liberal,
        nfacct_ct_state_invalid=features.nfacct,
        nfacct_localhost_nodeports=features.nfacct,
        nodeport_ips=nodeport_ips(cfg, node_ips),
        node_ip=node_ip(cfg, node_ips),
        node_name=node_name,
        topology_labels=topology_labels,
    )
