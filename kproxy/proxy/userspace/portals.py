"""The userspace mode's "portal" rules: steer service traffic to the proxy ports.

A pure renderer (no I/O): given, per service port, the :class:`ServicePortInfo`
and the port the proxy listens on for it, it returns one ``iptables-restore
--noflush`` input that rewrites the mode's chains completely, plus the jump rules
from the built-in chains (which the applier ensures one by one on full syncs,
since a ``--noflush`` restore can only append to a built-in chain).

The rules are upstream's userspace proxier's (``pkg/proxy/userspace/proxier.go``,
``iptablesInit``, ``openOnePortal``, ``openNodePort`` and the ``iptables*Args``
builders), argument for argument:

- nat ``KUBE-PORTALS-CONTAINER`` (from PREROUTING, i.e. pods and other hosts) and
  ``KUBE-PORTALS-HOST`` (from OUTPUT, the node itself), both *prepended* to their
  built-in chain; one rule per portal (cluster IP, each external IP, each LB IP);
- nat ``KUBE-NODEPORT-CONTAINER`` / ``KUBE-NODEPORT-HOST``, *appended* behind
  ``-m addrtype --dst-type LOCAL`` ("must be the last rule in the chain");
- filter ``KUBE-NODEPORT-NON-LOCAL`` (prepended to INPUT): ACCEPT new connections
  to the proxy port of each node port, for default-deny hosts;
- container rules REDIRECT to the proxy port when the proxy listens on the
  unspecified address (the reply then leaves from the address the packet came
  in on, so UDP un-NATs), else DNAT to ``listen_ip:port``; host rules always DNAT
  to ``host_ip:port`` (REDIRECT of local packets answers from the wrong address);
- an external IP gets a container rule with ``-m physdev ! --physdev-is-in``, a
  second container rule and the host rule with ``-m addrtype --dst-type LOCAL``.

Invariants: output is deterministic (service ports sorted by name); a service
port whose protocol the userspace proxy cannot carry (SCTP) has no proxy port
and therefore never reaches this module; every chain line flushes the chain, so
one restore replaces the whole previous rule set.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from kproxy.proxy.types import IPAddress, ServicePortInfo, ServicePortName

__all__ = [
    "ANY_IPV4",
    "FILTER_CHAINS",
    "JUMPS",
    "NAT_CHAINS",
    "Jump",
    "Portal",
    "PortalOptions",
    "RenderedPortals",
    "render_portals",
]

PORTALS_CONTAINER: Final = "KUBE-PORTALS-CONTAINER"
PORTALS_HOST: Final = "KUBE-PORTALS-HOST"
NODEPORT_CONTAINER: Final = "KUBE-NODEPORT-CONTAINER"
NODEPORT_HOST: Final = "KUBE-NODEPORT-HOST"
NODEPORT_NON_LOCAL: Final = "KUBE-NODEPORT-NON-LOCAL"

ANY_IPV4: Final = ipaddress.IPv4Address("0.0.0.0")

NAT_CHAINS: Final = (PORTALS_CONTAINER, PORTALS_HOST, NODEPORT_CONTAINER, NODEPORT_HOST)
FILTER_CHAINS: Final = (NODEPORT_NON_LOCAL,)


@dataclass(frozen=True, slots=True)
class Jump:
    """A jump rule from a built-in chain into one of ours (``iptablesInit``)."""

    table: str
    source: str
    chain: str
    prepend: bool
    args: tuple[str, ...]

    def rule_args(self) -> list[str]:
        return [*self.args, "-j", self.chain]


_CLUSTER_IP_COMMENT: Final = (
    "-m",
    "comment",
    "--comment",
    "handle ClusterIPs; NOTE: this must be before the NodePort rules",
)
_NODEPORT_MATCH: Final = (
    "-m",
    "addrtype",
    "--dst-type",
    "LOCAL",
    "-m",
    "comment",
    "--comment",
    "handle service NodePorts; NOTE: this must be the last rule in the chain",
)
# In iptablesInit's order; the applier ensures them in this order too.
JUMPS: Final = (
    Jump("nat", "PREROUTING", PORTALS_CONTAINER, True, _CLUSTER_IP_COMMENT),
    Jump("nat", "OUTPUT", PORTALS_HOST, True, _CLUSTER_IP_COMMENT),
    Jump("nat", "PREROUTING", NODEPORT_CONTAINER, False, _NODEPORT_MATCH),
    Jump("nat", "OUTPUT", NODEPORT_HOST, False, _NODEPORT_MATCH),
    Jump(
        "filter",
        "INPUT",
        NODEPORT_NON_LOCAL,
        True,
        ("-m", "comment", "--comment", "Ensure that non-local NodePort traffic can flow"),
    ),
)


@dataclass(frozen=True, slots=True)
class PortalOptions:
    """Where the proxy listens (``--bind-address``) and the node's own address.

    ``host_ip`` is the DNAT target for the node's own traffic when ``listen_ip``
    is unspecified (upstream's ``ChooseHostInterface``); it must be a local,
    non-loopback address (DNAT to 127.0.0.1 drops the packets).
    """

    listen_ip: IPAddress = ANY_IPV4
    host_ip: IPAddress | None = None

    def __post_init__(self) -> None:
        if self.listen_ip.is_loopback:
            # Upstream's ErrProxyOnLocalhost: portals cannot reach a loopback listener.
            raise ValueError(f"the userspace proxy cannot listen on loopback {self.listen_ip}")
        if self.listen_ip.is_unspecified and self.host_ip is None:
            raise ValueError("listening on the unspecified address needs a host_ip for DNAT")


@dataclass(frozen=True, slots=True)
class Portal:
    """One service port and the proxy port that serves it."""

    name: ServicePortName
    info: ServicePortInfo
    proxy_port: int


@dataclass(frozen=True, slots=True)
class RenderedPortals:
    text: str
    nat_rules: int
    filter_rules: int


def _join_host_port(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _quote(text: str) -> str:
    # iptables-save quotes a comment with anything outside [A-Za-z0-9_-]; restore
    # needs quotes only around spaces, but the saved form is what a reader greps for.
    if text and all(c.isascii() and (c.isalnum() or c in "_-") for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Rules:
    """Builds the argument lists exactly as upstream's ``iptables*Args`` did."""

    def __init__(self, options: PortalOptions) -> None:
        self.listen_ip = options.listen_ip
        self.host_ip = options.host_ip if options.listen_ip.is_unspecified else options.listen_ip

    @staticmethod
    def common(
        dest: IPAddress | None, physdev: bool, dst_local: bool, port: int, p: Portal
    ) -> list[str]:
        proto = p.info.protocol.lower()
        args = ["-m", "comment", "--comment", _quote(str(p.name))]
        args += ["-p", proto, "-m", proto, "--dport", str(port)]
        if dest is not None:
            args += ["-d", f"{dest}/{dest.max_prefixlen}"]
        if physdev:
            args += ["-m", "physdev", "!", "--physdev-is-in"]
        if dst_local:
            args += ["-m", "addrtype", "--dst-type", "LOCAL"]
        return args

    def container(
        self, dest: IPAddress | None, physdev: bool, dst_local: bool, port: int, p: Portal
    ) -> list[str]:
        args = self.common(dest, physdev, dst_local, port, p)
        if self.listen_ip.is_unspecified:
            return [*args, "-j", "REDIRECT", "--to-ports", str(p.proxy_port)]
        return [
            *args,
            "-j",
            "DNAT",
            "--to-destination",
            _join_host_port(self.listen_ip, p.proxy_port),
        ]

    def host(self, dest: IPAddress | None, dst_local: bool, port: int, p: Portal) -> list[str]:
        args = self.common(dest, False, dst_local, port, p)
        assert self.host_ip is not None  # PortalOptions guarantees it
        return [
            *args,
            "-j",
            "DNAT",
            "--to-destination",
            _join_host_port(self.host_ip, p.proxy_port),
        ]

    def non_local_node_port(self, p: Portal) -> list[str]:
        # Upstream matches the *proxy* port here: the packet is already REDIRECTed/DNATed.
        args = self.common(None, False, False, p.proxy_port, p)
        return [*args, "-m", "state", "--state", "NEW", "-j", "ACCEPT"]


def render_portals(portals: Iterable[Portal], options: PortalOptions) -> RenderedPortals:
    """The restore input that makes the mode's chains hold exactly ``portals``' rules."""
    r = _Rules(options)
    chains: dict[str, list[list[str]]] = {c: [] for c in (*NAT_CHAINS, *FILTER_CHAINS)}

    def one_portal(ip: IPAddress, external: bool, p: Portal) -> None:
        port = p.info.port
        chains[PORTALS_CONTAINER].append(r.container(ip, external, False, port, p))
        if external:
            # Traffic to an external IP that is local to this node but arrives from
            # outside (not via a bridge port) still needs the proxy.
            chains[PORTALS_CONTAINER].append(r.container(ip, False, True, port, p))
            chains[PORTALS_HOST].append(r.host(ip, True, port, p))
        else:
            chains[PORTALS_HOST].append(r.host(ip, False, port, p))

    for p in sorted(portals, key=lambda p: p.name):
        one_portal(p.info.cluster_ip, False, p)
        for ip in p.info.external_ips:
            one_portal(ip, True, p)
        for ip in p.info.load_balancer_vips:
            one_portal(ip, False, p)
        if p.info.node_port:
            chains[NODEPORT_CONTAINER].append(r.container(None, False, False, p.info.node_port, p))
            chains[NODEPORT_HOST].append(r.host(None, False, p.info.node_port, p))
            chains[NODEPORT_NON_LOCAL].append(r.non_local_node_port(p))

    lines: list[str] = []
    for table, names in (("filter", FILTER_CHAINS), ("nat", NAT_CHAINS)):
        lines.append(f"*{table}")
        lines += [f":{c} - [0:0]" for c in names]
        for c in names:
            lines += [" ".join(["-A", c, *args]) for args in chains[c]]
        lines.append("COMMIT")
    return RenderedPortals(
        text="\n".join(lines) + "\n",
        nat_rules=sum(len(chains[c]) for c in NAT_CHAINS),
        filter_rules=len(chains[NODEPORT_NON_LOCAL]),
    )
