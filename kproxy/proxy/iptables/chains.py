"""Chain names, the fixed rules and the options of the iptables renderer.

Owns everything of upstream's iptables layout that does not depend on a Service:
the top-level chain names, the jump rules from built-in chains (ensured by the
applier, not restored), the per-service-port chain names (hashes from
:mod:`kproxy.fastpath`, cached per service port), the masquerade mark string,
the statistic probabilities and the local-traffic detector.

Invariant: every string here is byte-for-byte what upstream kube-proxy
(pkg/proxy/iptables/proxier.go) writes for the same input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from kproxy import fastpath
from kproxy.proxy.masquerade import masquerade_mark
from kproxy.proxy.types import ServicePortName

KUBE_SERVICES: Final = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES: Final = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS: Final = "KUBE-NODEPORTS"
KUBE_POSTROUTING: Final = "KUBE-POSTROUTING"
KUBE_MARK_MASQ: Final = "KUBE-MARK-MASQ"
KUBE_FORWARD: Final = "KUBE-FORWARD"
KUBE_PROXY_FIREWALL: Final = "KUBE-PROXY-FIREWALL"
KUBELET_FIREWALL: Final = "KUBE-FIREWALL"
KUBE_PROXY_CANARY: Final = "KUBE-PROXY-CANARY"

FILTER_TOP_CHAINS: Final = (
    KUBE_SERVICES,
    KUBE_EXTERNAL_SERVICES,
    KUBE_FORWARD,
    KUBE_NODEPORTS,
    KUBE_PROXY_FIREWALL,
)
NAT_TOP_CHAINS: Final = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)

SERVICE_CHAIN_PREFIXES: Final = ("KUBE-SVC-", "KUBE-SVL-", "KUBE-SEP-", "KUBE-FW-", "KUBE-EXT-")

NFACCT_CT_STATE_INVALID: Final = "ct_state_invalid_dropped_pkts"
NFACCT_LOCALHOST_NODEPORTS: Final = "localhost_nps_accepted_pkts"

LARGE_CLUSTER_ENDPOINTS_THRESHOLD: Final = 1000


@dataclass(frozen=True, slots=True)
class JumpChain:
    """A jump from a built-in chain, inserted at position 1 on full syncs."""

    table: str
    chain: str
    source: str
    comment: str
    extra_args: tuple[str, ...] = ()

    def rule_args(self) -> tuple[str, ...]:
        """The rule's arguments as given to ``iptables -C/-I`` (comment unquoted)."""
        args = self.extra_args
        if self.comment:
            args = (*args, "-m", "comment", "--comment", self.comment)
        return (*args, "-j", self.chain)


_NEW = ("-m", "conntrack", "--ctstate", "NEW")

JUMP_CHAINS: Final = (
    JumpChain(
        "filter",
        KUBE_EXTERNAL_SERVICES,
        "INPUT",
        "kubernetes externally-visible service portals",
        _NEW,
    ),
    JumpChain(
        "filter",
        KUBE_EXTERNAL_SERVICES,
        "FORWARD",
        "kubernetes externally-visible service portals",
        _NEW,
    ),
    JumpChain("filter", KUBE_NODEPORTS, "INPUT", "kubernetes health check service ports"),
    JumpChain("filter", KUBE_SERVICES, "FORWARD", "kubernetes service portals", _NEW),
    JumpChain("filter", KUBE_SERVICES, "OUTPUT", "kubernetes service portals", _NEW),
    JumpChain("filter", KUBE_FORWARD, "FORWARD", "kubernetes forwarding rules"),
    JumpChain("filter", KUBE_PROXY_FIREWALL, "INPUT", "kubernetes load balancer firewall", _NEW),
    JumpChain("filter", KUBE_PROXY_FIREWALL, "OUTPUT", "kubernetes load balancer firewall", _NEW),
    JumpChain("filter", KUBE_PROXY_FIREWALL, "FORWARD", "kubernetes load balancer firewall", _NEW),
    JumpChain("nat", KUBE_SERVICES, "OUTPUT", "kubernetes service portals"),
    JumpChain("nat", KUBE_SERVICES, "PREROUTING", "kubernetes service portals"),
    JumpChain("nat", KUBE_POSTROUTING, "POSTROUTING", "kubernetes postrouting rules"),
)
# Duplicates of kubelet's chains: created on startup, never cleaned up.
KUBELET_JUMP_CHAINS: Final = (
    JumpChain("filter", KUBELET_FIREWALL, "INPUT", ""),
    JumpChain("filter", KUBELET_FIREWALL, "OUTPUT", ""),
)


def compute_probability(n: int) -> str:
    """Go's ``fmt.Sprintf("%0.10f", 1.0/float64(n))``."""
    return "%0.10f" % (1.0 / n)


class Probabilities:
    """Cached ``1/n`` strings (upstream precomputes them the same way)."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: list[str] = ["<bad value>"]

    def __call__(self, n: int) -> str:
        values = self._values
        while len(values) <= n:
            values.append(compute_probability(len(values)))
        return values[n]


def is_service_chain(name: str) -> bool:
    return name.startswith(SERVICE_CHAIN_PREFIXES)


@dataclass(frozen=True, slots=True)
class ServiceChains:
    """Upstream's per-service-port strings, computed once per service port."""

    name: str  # "ns/name:port", the comment text and hash input
    protocol: str  # lower case, "tcp"
    svc: str
    svl: str
    ext: str
    fw: str

    @classmethod
    def of(cls, spn: ServicePortName) -> ServiceChains:
        name = str(spn)
        proto = spn.protocol.lower()
        h = fastpath.port_proto_hash(name, proto)
        return cls(name, proto, "KUBE-SVC-" + h, "KUBE-SVL-" + h, "KUBE-EXT-" + h, "KUBE-FW-" + h)

    def endpoint_chain(self, endpoint: str) -> str:
        return "KUBE-SEP-" + fastpath.endpoint_hash(self.name, self.protocol, endpoint)


@dataclass(frozen=True, slots=True)
class LocalDetector:
    """How rules tell pod traffic from other traffic (``--detect-local-mode``).

    ``if_local``/``if_not_local`` are inserted verbatim; both empty = no-op
    detector (no ``! -s`` masquerade rule, no pod short-circuit in EXT).
    """

    if_local: tuple[str, ...] = ()
    if_not_local: tuple[str, ...] = ()

    @property
    def implemented(self) -> bool:
        return bool(self.if_local)

    @classmethod
    def by_cidr(cls, cidr: str) -> LocalDetector:
        return cls(("-s", cidr), ("!", "-s", cidr))

    @classmethod
    def by_bridge_interface(cls, iface: str) -> LocalDetector:
        return cls(("-i", iface), ("!", "-i", iface))

    @classmethod
    def by_interface_prefix(cls, prefix: str) -> LocalDetector:
        return cls(("-i", prefix + "+"), ("!", "-i", prefix + "+"))


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """Host facts and flags that shape the ruleset.

    ``masquerade_mark`` is the string written in rules: real kube-proxy writes
    ``0x00004000`` for bit 14 (see :func:`masquerade_mark`); upstream's unit
    tests use ``0x4000``. ``nodeport_ips`` is None when ``--nodeport-addresses``
    is unset (match every local address), else the node IPs that matched it.
    """

    masquerade_mark: str = field(default_factory=masquerade_mark)
    masquerade_all: bool = False
    local_detector: LocalDetector = field(default_factory=LocalDetector)
    random_fully: bool = False
    ipv6: bool = False
    localhost_nodeports: bool = True
    conntrack_tcp_be_liberal: bool = False
    nfacct_ct_state_invalid: bool = False
    nfacct_localhost_nodeports: bool = False
    nodeport_ips: tuple[str, ...] | None = None
    node_ip: str | None = None
    node_name: str = ""
    topology_labels: tuple[tuple[str, str], ...] = ()
    prefer_same_node: bool = True
    large_cluster_threshold: int = LARGE_CLUSTER_ENDPOINTS_THRESHOLD

    @property
    def localhost_nodeports_active(self) -> bool:
        return self.localhost_nodeports and not self.ipv6
