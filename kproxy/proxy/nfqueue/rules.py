"""The NFQUEUE data path's rules: a pure renderer (plan → one ``iptables-restore`` input).

Layout (Nordix nfqlb's SYN-only pattern, DNAT by mark as in its NAT mode):

- mangle ``KUBE-NFQ`` (jumped to from PREROUTING and OUTPUT): per frontend
  (cluster IP, external IP, load-balancer VIP) and port, only ``ctstate NEW``
  goes to ``NFQUEUE --queue-num N`` (or ``--queue-balance A:B``) with
  ``--queue-bypass``; established traffic never leaves the kernel;
- the handler accepts each queued packet with :data:`MARK_MASK` bits set to
  the chosen endpoint's id (bits 16-27, clear of kube-proxy's 0x4000 masquerade
  and 0x8000 drop bits), keeping the packet's other mark bits;
- nat ``KUBE-NFQ-SERVICES`` (PREROUTING, OUTPUT; nat hooks run after mangle):
  masquerade marking as the iptables mode does it (off-cluster sources for the
  cluster IP, always for external frontends, everything with
  ``masquerade_all``), then a jump to the service port's ``KUBE-NQSVC-`` chain:
  one ``-m mark --mark ID<<16/MASK`` rule per endpoint to its ``KUBE-NQSEP-``
  chain (hairpin masquerade + DNAT), then the **fallback** for unmarked packets
  (the queue was bypassed because no handler is bound, or the handler could not
  parse the packet): ``statistic`` rules over all endpoints, so that traffic
  flows unbalanced rather than stopping when the proxy is down;
- nat ``KUBE-NFQ-POSTROUTING`` / ``KUBE-NFQ-MARK-MASQ``: upstream's
  KUBE-POSTROUTING / KUBE-MARK-MASQ semantics under this data path's own names,
  so that its cleanup never touches another mode's chains.

:func:`fallback_counters` reads the fallback rules' packet counters back out of
``iptables-save -c -t nat`` (by their comment, :data:`FALLBACK_COMMENT`): the
kernel counts no queue bypass and no fail-open accept anywhere else, so these
counters are the only record of the packets the handler never marked.

Invariants: the output is a pure function of (plans, options, existing chains);
every chain of ours that exists but is not wanted is deleted in the same
restore; endpoint ids are assigned by the caller (stable across syncs, see
:mod:`kproxy.proxy.nfqueue.mode`) and must be in ``1..MAX_ENDPOINT_ID``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from kproxy import fastpath
from kproxy.proxy.types import ServicePortName

__all__ = [
    "FALLBACK_COMMENT",
    "JUMPS",
    "MANGLE_CHAIN",
    "MARK_MASK",
    "MARK_SHIFT",
    "MAX_ENDPOINT_ID",
    "NAT_CHAINS",
    "EndpointRule",
    "Jump",
    "Rendered",
    "RuleOptions",
    "ServiceRule",
    "endpoint_chain",
    "fallback_counters",
    "mark_value",
    "owned_chain",
    "render",
    "service_chain",
]

MARK_SHIFT: Final = 16
MARK_MASK: Final = 0x0FFF0000
MAX_ENDPOINT_ID: Final = MARK_MASK >> MARK_SHIFT  # 4095

MANGLE_CHAIN: Final = "KUBE-NFQ"
NAT_SERVICES: Final = "KUBE-NFQ-SERVICES"
NAT_POSTROUTING: Final = "KUBE-NFQ-POSTROUTING"
NAT_MARK_MASQ: Final = "KUBE-NFQ-MARK-MASQ"
NAT_CHAINS: Final = (NAT_SERVICES, NAT_POSTROUTING, NAT_MARK_MASQ)
# 11 + 16 hash characters: within iptables' 28-character chain names.
SVC_PREFIX: Final = "KUBE-NQSVC-"
SEP_PREFIX: Final = "KUBE-NQSEP-"
# Suffix of the fallback rules' comment (after the service port name); also the
# key by which fallback_counters finds them again.
FALLBACK_COMMENT: Final = "unmarked (queue bypassed)"
# One saved fallback rule: "[packets:bytes] -A KUBE-NQSVC-... --comment "<spn> unmarked (...)"".
_FALLBACK_LINE: Final = re.compile(
    r"^\[(\d+):\d+\] -A "
    + re.escape(SVC_PREFIX)
    + r'\S+ .*?--comment "([^"]*) '
    + re.escape(FALLBACK_COMMENT)
    + '"',
    re.M,
)


@dataclass(frozen=True, slots=True)
class Jump:
    """A jump from a built-in chain, ensured (prepended) on full syncs."""

    table: str
    source: str
    chain: str

    def rule_args(self) -> tuple[str, ...]:
        return ("-m", "comment", "--comment", "kproxy nfqueue", "-j", self.chain)


JUMPS: Final = (
    Jump("mangle", "PREROUTING", MANGLE_CHAIN),
    Jump("mangle", "OUTPUT", MANGLE_CHAIN),
    Jump("nat", "PREROUTING", NAT_SERVICES),
    Jump("nat", "OUTPUT", NAT_SERVICES),
    Jump("nat", "POSTROUTING", NAT_POSTROUTING),
)


@dataclass(frozen=True, slots=True)
class EndpointRule:
    """One endpoint: ``IP:port`` (the Maglev backend name), its parts and its mark id."""

    endpoint: str
    ip: str
    port: int
    mark_id: int


@dataclass(frozen=True, slots=True)
class ServiceRule:
    """One service port as the rules see it (frontends of this proxy's family only)."""

    spn: ServicePortName
    protocol: str  # "TCP" | "UDP"
    cluster_ip: str
    port: int
    external: tuple[str, ...] = ()  # external IPs and load-balancer VIPs
    endpoints: tuple[EndpointRule, ...] = ()


@dataclass(frozen=True, slots=True)
class RuleOptions:
    """Queues (``first == last``: one queue) and the masquerade settings."""

    first_queue: int = 0
    last_queue: int = 0
    masquerade_mark: str = "0x00004000"
    masquerade_all: bool = False
    cluster_cidr: str = ""
    random_fully: bool = False


@dataclass(frozen=True, slots=True)
class Rendered:
    text: str
    mangle_rules: int
    nat_rules: int
    deleted_chains: int


def mark_value(mark_id: int) -> int:
    """The mark field value for endpoint id ``mark_id`` (1..MAX_ENDPOINT_ID)."""
    if not 1 <= mark_id <= MAX_ENDPOINT_ID:
        raise ValueError(f"endpoint mark id must be in 1..{MAX_ENDPOINT_ID}, got {mark_id}")
    return mark_id << MARK_SHIFT


def service_chain(spn: ServicePortName) -> str:
    return SVC_PREFIX + fastpath.port_proto_hash(str(spn), spn.protocol.lower())


def endpoint_chain(spn: ServicePortName, endpoint: str) -> str:
    return SEP_PREFIX + fastpath.endpoint_hash(str(spn), spn.protocol.lower(), endpoint)


def owned_chain(table: str, chain: str) -> bool:
    """Whether ``chain`` of ``table`` belongs to this data path."""
    if table == "mangle":
        return chain == MANGLE_CHAIN
    if table == "nat":
        return chain in NAT_CHAINS or chain.startswith((SVC_PREFIX, SEP_PREFIX))
    return False


def _host(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def _dnat_target(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _queue_target(opts: RuleOptions) -> str:
    if opts.first_queue == opts.last_queue:
        return f"-j NFQUEUE --queue-num {opts.first_queue} --queue-bypass"
    return f"-j NFQUEUE --queue-balance {opts.first_queue}:{opts.last_queue} --queue-bypass"


def render(
    services: Sequence[ServiceRule],
    opts: RuleOptions,
    existing: Iterable[tuple[str, str]] = (),
) -> Rendered:
    """The restore input for ``services``; ``existing`` are (table, chain) pairs present now.

    A service port without endpoints gets no rule at all (nothing to balance to;
    its traffic is not queued). Services are rendered in the given order.
    """
    mark = opts.masquerade_mark
    queue = _queue_target(opts)
    mangle = [f":{MANGLE_CHAIN} - [0:0]"]
    mangle_rules: list[str] = []
    nat_chains = [f":{c} - [0:0]" for c in NAT_CHAINS]
    nat_rules = [
        f"-A {NAT_POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN",
        f"-A {NAT_POSTROUTING} -j MARK --xor-mark {mark}",
        f'-A {NAT_POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT"'
        " -j MASQUERADE" + (" --random-fully" if opts.random_fully else ""),
        f"-A {NAT_MARK_MASQ} -j MARK --or-mark {mark}",
    ]
    wanted_nat: set[str] = set(NAT_CHAINS)
    for svc in services:
        if not svc.endpoints:
            continue
        proto = svc.protocol.lower()
        l4 = f"-p {proto} -m {proto} --dport {svc.port}"
        name = str(svc.spn)
        svc_chain = service_chain(svc.spn)
        wanted_nat.add(svc_chain)
        nat_chains.append(f":{svc_chain} - [0:0]")
        frontends = [(svc.cluster_ip, "cluster IP", False)]
        frontends += [(ip, "external IP", True) for ip in svc.external]
        for ip, kind, external in frontends:
            dst = f"-d {_host(ip)} {l4}"
            mangle_rules.append(
                f"-A {MANGLE_CHAIN} {dst} -m conntrack --ctstate NEW"
                f' -m comment --comment "{name} {kind}" {queue}'
            )
            if opts.masquerade_all or external:
                nat_rules.append(f"-A {NAT_SERVICES} {dst} -j {NAT_MARK_MASQ}")
            elif opts.cluster_cidr:
                nat_rules.append(
                    f"-A {NAT_SERVICES} ! -s {opts.cluster_cidr} {dst} -j {NAT_MARK_MASQ}"
                )
            nat_rules.append(
                f'-A {NAT_SERVICES} {dst} -m comment --comment "{name} {kind}" -j {svc_chain}'
            )
        seps = [(ep, endpoint_chain(svc.spn, ep.endpoint)) for ep in svc.endpoints]
        for ep, sep in seps:
            nat_rules.append(
                f"-A {svc_chain} -m mark --mark 0x{mark_value(ep.mark_id):x}/0x{MARK_MASK:x}"
                f" -j {sep}"
            )
        n = len(seps)
        for i, (_, sep) in enumerate(seps):
            stat = (
                f" -m statistic --mode random --probability {fastpath.probability(n - i)}"
                if i < n - 1
                else ""
            )
            nat_rules.append(
                f'-A {svc_chain} -m comment --comment "{name} {FALLBACK_COMMENT}"{stat} -j {sep}'
            )
        for ep, sep in seps:
            wanted_nat.add(sep)
            nat_chains.append(f":{sep} - [0:0]")
            nat_rules.append(f"-A {sep} -s {_host(ep.ip)} -j {NAT_MARK_MASQ}")
            nat_rules.append(
                f"-A {sep} -p {proto} -m {proto} -j DNAT"
                f" --to-destination {_dnat_target(ep.ip, ep.port)}"
            )
    stale = sorted(
        chain
        for table, chain in set(existing)
        if table == "nat" and owned_chain(table, chain) and chain not in wanted_nat
    )
    nat_chains += [f":{c} - [0:0]" for c in stale]
    deletes = [f"-X {c}" for c in stale]
    lines = ["*mangle", *mangle, *mangle_rules, "COMMIT", "*nat", *nat_chains, *nat_rules]
    lines += [*deletes, "COMMIT", ""]
    return Rendered("\n".join(lines), len(mangle_rules), len(nat_rules), len(stale))


def fallback_counters(saved: str) -> dict[str, int]:
    """Packets that took the fallback, per service port name, in ``iptables-save -c`` output.

    ``saved`` is the nat table saved with counters; the counts of one service
    port's fallback rules (one per endpoint) are summed. Lines without counters
    (a save without ``-c``) match nothing.
    """
    out: dict[str, int] = {}
    for packets, name in _FALLBACK_LINE.findall(saved):
        out[name] = out.get(name, 0) + int(packets)
    return out
