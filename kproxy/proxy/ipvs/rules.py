"""The fixed iptables rules of the IPVS mode (upstream's ``writeIptablesRules``).

Owns the chain names, the jump rules from built-in chains (upstream's
``iptablesJumpChain``: :func:`missing_jumps` reads which ones an ``iptables-save``
lacks and :func:`with_jumps` inserts those at position 1 in the restore input,
where upstream runs ``iptables -C``/``-I`` per jump), the set → chain table
(``ipsetWithIptablesChain``) and :func:`restore_text`, which writes the nat and
filter tables for ``iptables-restore --noflush``.

Invariants:
- the text is ``*nat``, chains, rules, ``COMMIT``, ``*filter``, chains, rules,
  ``COMMIT``, each rule byte-for-byte what upstream writes in upstream's order
  (rules matching a set appear only when that set is non-empty, except the
  KUBE-NODE-PORT health-check and KUBE-IPVS-FILTER rules, which upstream always
  writes);
- the number of rules does not depend on the number of Services (only the
  KUBE-IPVS-OUT-FILTER drops grow, one per LB IP:port whose source ranges
  exclude the node).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from kproxy.proxy.ipvs import ipsets as s
from kproxy.proxy.ipvs.ipsets import IPSet, IPSetEntry
from kproxy.proxy.ipvs.options import IpvsOptions

__all__ = [
    "FILTER_CHAINS",
    "JUMP_RULES",
    "NAT_CHAINS",
    "JumpRule",
    "RestoreText",
    "missing_jumps",
    "restore_text",
    "with_jumps",
]

KUBE_SERVICES: Final = "KUBE-SERVICES"
KUBE_PROXY_FIREWALL: Final = "KUBE-PROXY-FIREWALL"
KUBE_SOURCE_RANGES_FIREWALL: Final = "KUBE-SOURCE-RANGES-FIREWALL"
KUBE_POSTROUTING: Final = "KUBE-POSTROUTING"
KUBE_MARK_MASQ: Final = "KUBE-MARK-MASQ"
KUBE_NODE_PORT: Final = "KUBE-NODE-PORT"
KUBE_FORWARD: Final = "KUBE-FORWARD"
KUBE_LOAD_BALANCER: Final = "KUBE-LOAD-BALANCER"
KUBE_IPVS_FILTER: Final = "KUBE-IPVS-FILTER"
KUBE_IPVS_OUT_FILTER: Final = "KUBE-IPVS-OUT-FILTER"

NAT_CHAINS: Final = (
    KUBE_SERVICES,
    KUBE_POSTROUTING,
    KUBE_NODE_PORT,
    KUBE_LOAD_BALANCER,
    KUBE_MARK_MASQ,
)
FILTER_CHAINS: Final = (
    KUBE_FORWARD,
    KUBE_NODE_PORT,
    KUBE_PROXY_FIREWALL,
    KUBE_SOURCE_RANGES_FIREWALL,
    KUBE_IPVS_FILTER,
    KUBE_IPVS_OUT_FILTER,
)


@dataclass(frozen=True, slots=True)
class JumpRule:
    """A jump from a built-in chain, kept at position 1 when added (``iptables -I``)."""

    table: str
    source: str  # the built-in chain
    chain: str  # the kube chain jumped to
    comment: str

    def rule_args(self) -> tuple[str, ...]:
        """The rule's arguments as given to ``iptables -C/-I`` (comment unquoted)."""
        return ("-m", "comment", "--comment", self.comment, "-j", self.chain)

    def rule_text(self) -> str:
        """The rule's arguments as ``iptables-save`` prints them (comment quoted)."""
        return f'-m comment --comment "{self.comment}" -j {self.chain}'


JUMP_RULES: Final = (
    JumpRule("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    JumpRule("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    JumpRule("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
    JumpRule("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    JumpRule("filter", "INPUT", KUBE_NODE_PORT, "kubernetes health check rules"),
    JumpRule("filter", "INPUT", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    JumpRule("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    JumpRule("filter", "INPUT", KUBE_IPVS_FILTER, "kubernetes ipvs access filter"),
    JumpRule("filter", "OUTPUT", KUBE_IPVS_OUT_FILTER, "kubernetes ipvs access filter"),
)


@dataclass(frozen=True, slots=True)
class _SetRule:
    set_name: str
    table: str
    source: str
    target: str
    match: str
    protocol: str = ""


# Local NodePort sets must precede their masquerading twins (RETURN first).
_SET_RULES: Final = (
    _SetRule(s.LOOP_BACK, "nat", KUBE_POSTROUTING, "MASQUERADE", "dst,dst,src"),
    _SetRule(s.LOAD_BALANCER, "nat", KUBE_SERVICES, KUBE_LOAD_BALANCER, "dst,dst"),
    _SetRule(s.LOAD_BALANCER_LOCAL, "nat", KUBE_LOAD_BALANCER, "RETURN", "dst,dst"),
    _SetRule(s.NODE_PORT_LOCAL_TCP, "nat", KUBE_NODE_PORT, "RETURN", "dst", "tcp"),
    _SetRule(s.NODE_PORT_TCP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "tcp"),
    _SetRule(s.NODE_PORT_LOCAL_UDP, "nat", KUBE_NODE_PORT, "RETURN", "dst", "udp"),
    _SetRule(s.NODE_PORT_UDP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst", "udp"),
    _SetRule(s.NODE_PORT_LOCAL_SCTP, "nat", KUBE_NODE_PORT, "RETURN", "dst,dst", "sctp"),
    _SetRule(s.NODE_PORT_SCTP, "nat", KUBE_NODE_PORT, KUBE_MARK_MASQ, "dst,dst", "sctp"),
    _SetRule(
        s.LOAD_BALANCER_FW, "filter", KUBE_PROXY_FIREWALL, KUBE_SOURCE_RANGES_FIREWALL, "dst,dst"
    ),
    _SetRule(
        s.LOAD_BALANCER_SOURCE_CIDR, "filter", KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src"
    ),
    _SetRule(
        s.LOAD_BALANCER_SOURCE_IP, "filter", KUBE_SOURCE_RANGES_FIREWALL, "RETURN", "dst,dst,src"
    ),
)


@dataclass(frozen=True, slots=True)
class RestoreText:
    """The restore input and its rule counts per table (for the rules metrics)."""

    text: str
    nat_rules: int
    filter_rules: int


def _match(ipset: IPSet, match: str) -> str:
    return f"-m comment --comment {ipset.quoted_comment} -m set --match-set {ipset.name} {match}"


def restore_text(
    sets: Mapping[str, IPSet], options: IpvsOptions, lb_no_node_access: Sequence[IPSetEntry]
) -> RestoreText:
    """The nat and filter tables; ``sets`` keyed by upstream (IPv4) set name.

    ``lb_no_node_access`` are the LB ``ip,proto:port`` entries whose source ranges
    do not contain the node IP: node-originated traffic to them is dropped.
    """
    mark = options.masquerade_mark
    nat: list[str] = [
        f"-A {KUBE_SERVICES} -s {'::1/128' if options.ipv6 else '127.0.0.0/8'} -j RETURN"
    ]
    flt: list[str] = []

    for rule in _SET_RULES:
        ipset = sets[rule.set_name]
        if not ipset.entries:
            continue
        proto = f"-p {rule.protocol} " if rule.protocol else ""
        line = f"-A {rule.source} {proto}{_match(ipset, rule.match)} -j {rule.target}"
        (flt if rule.table == "filter" else nat).append(line)

    cluster = sets[s.CLUSTER_IP]
    if cluster.entries:
        base = f"-A {KUBE_SERVICES} {_match(cluster, '')}"
        if options.masquerade_all:
            nat.append(f"{base}dst,dst -j {KUBE_MARK_MASQ}")
        elif options.if_not_local:
            # Off-cluster traffic to a VIP (e.g. a static route to the service
            # range) may bounce off-node, so it is masqueraded.
            nat.append(f"{base}dst,dst {' '.join(options.if_not_local)} -j {KUBE_MARK_MASQ}")
        else:
            # Without a detector: masquerade node-originated traffic whose source
            # is a VIP (kube-ipvs0 holds every VIP, so the kernel may pick one).
            nat.append(f"{base}src,dst -j {KUBE_MARK_MASQ}")

    def external_rules(prefix: str) -> None:
        # From off the machine (not a bridge, not a local process)...
        nat.append(
            f"{prefix} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT"
        )
        # ...or to an external IP that is local (e.g. GCE LBs in the local table).
        nat.append(f"{prefix} -m addrtype --dst-type LOCAL -j ACCEPT")

    external = sets[s.EXTERNAL_IP]
    if external.entries:
        prefix = f"-A {KUBE_SERVICES} {_match(external, 'dst,dst')}"
        nat.append(f"{prefix} -j {KUBE_MARK_MASQ}")
        external_rules(prefix)
    external_local = sets[s.EXTERNAL_IP_LOCAL]
    if external_local.entries:
        external_rules(f"-A {KUBE_SERVICES} {_match(external_local, 'dst,dst')}")

    nat.append(f"-A {KUBE_SERVICES} -m addrtype --dst-type LOCAL -j {KUBE_NODE_PORT}")
    nat.append(f"-A {KUBE_LOAD_BALANCER} -j {KUBE_MARK_MASQ}")
    flt.append(f"-A {KUBE_SOURCE_RANGES_FIREWALL} -j DROP")
    for e in lb_no_node_access:
        flt.append(
            f"-A {KUBE_IPVS_OUT_FILTER} -s {e.ip} -m ipvs --vaddr {e.ip}"
            f" --vproto {e.protocol} --vport {e.port} -j DROP"
        )

    # Accept traffic to virtual services at the end of KUBE-SERVICES, in case
    # other rules would block it.
    for name in (s.CLUSTER_IP, s.LOAD_BALANCER):
        ipset = sets[name]
        if ipset.entries:
            match = "dst" if ipset.set_type == s.BITMAP_PORT else "dst,dst"
            nat.append(f"-A {KUBE_SERVICES} -m set --match-set {ipset.name} {match} -j ACCEPT")

    flt.append(
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules"'
        f" -m mark --mark {mark}/{mark} -j ACCEPT"
    )
    flt.append(
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule"'
        " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    )
    health = sets[s.HEALTH_CHECK_NODE_PORT]
    flt.append(f"-A {KUBE_NODE_PORT} {_match(health, 'dst')} -j ACCEPT")
    # Host ports must not be reachable through VIPs bound on kube-ipvs0 (#72236).
    for name, match in (
        (s.LOAD_BALANCER, "dst,dst"),
        (s.CLUSTER_IP, "dst,dst"),
        (s.EXTERNAL_IP, "dst,dst"),
        (s.EXTERNAL_IP_LOCAL, "dst,dst"),
        (s.HEALTH_CHECK_NODE_PORT, "dst"),
    ):
        flt.append(f"-A {KUBE_IPVS_FILTER} -m set --match-set {sets[name].name} {match} -j RETURN")
    flt.append(
        f"-A {KUBE_IPVS_FILTER} -m conntrack --ctstate NEW"
        f" -m set --match-set {sets[s.IPVS_IPS].name} dst -j REJECT"
    )

    nat.append(f"-A {KUBE_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN")
    # Clear the mark so a packet that re-traverses the stack is not masqueraded twice.
    nat.append(f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {mark}")
    nat.append(
        f'-A {KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT"'
        " -j MASQUERADE" + (" --random-fully" if options.random_fully else "")
    )
    nat.append(f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {mark}")

    lines = [
        "*nat",
        *(f":{c} - [0:0]" for c in NAT_CHAINS),
        *nat,
        "COMMIT",
        "*filter",
        *(f":{c} - [0:0]" for c in FILTER_CHAINS),
        *flt,
        "COMMIT",
    ]
    return RestoreText("\n".join(lines) + "\n", len(nat), len(flt))


def missing_jumps(save: str, jumps: Sequence[JumpRule] = JUMP_RULES) -> tuple[JumpRule, ...]:
    """The ``jumps`` absent from ``iptables-save`` output (upstream's ``iptables -C``).

    One save replaces a ``-C`` (and ``-N``) exec per jump: under emulation each exec
    costs a third of a second, which made the fixed rules most of a small full sync.
    """
    present: set[tuple[str, str]] = set()
    table = ""
    for line in save.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A "):
            chain, _, rest = line[3:].partition(" ")
            present.add((table, f"{chain} {rest.strip()}"))
    return tuple(j for j in jumps if (j.table, f"{j.source} {j.rule_text()}") not in present)


def with_jumps(text: str, jumps: Sequence[JumpRule]) -> str:
    """``text`` (restore input) with each jump inserted at position 1 of its built-in chain.

    Inserted in ``jumps`` order just before the table's ``COMMIT``, after the kube
    chains are declared, so the last jump of a chain ends up first, exactly as
    upstream's ``iptables -I`` one jump at a time leaves them.
    """
    if not jumps:
        return text
    out: list[str] = []
    table = ""
    pending = list(jumps)
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line == "COMMIT":
            out += [f"-I {j.source} 1 {j.rule_text()}" for j in pending if j.table == table]
            pending = [j for j in pending if j.table != table]
        out.append(line)
    if pending:
        # The jump's chain must be declared in the same input: never guess it here.
        raise ValueError(f"restore input has no *{pending[0].table} table for its jump rules")
    return "\n".join(out) + "\n"
