"""Pure-Python twin of :mod:`kproxy._fastpath`.

This module is the reference: every function and class of the compiled module
exists here with the same signature and the same results, and the test suite
checks the two against each other.  It is also what kproxy runs when the
extension is missing or ``KPROXY_NO_EXTENSIONS=1`` is set.

Owns:
- upstream kube-proxy's chain-name hash: SHA-256 of the service-port name plus
  the lower-case protocol (plus ``"IP:port"`` for an endpoint), RFC 4648
  base32, first 16 characters (``portProtoHash`` / ``servicePortEndpointChainName``);
- round-robin endpoint selection with upstream's userspace semantics: the
  index resets when the endpoint list changes;
- the per-endpoint iptables rules of one service port, which are most of a
  large ruleset: the SVC/SVL → SEP jumps (``-m statistic`` probabilities,
  ``-m recent`` affinity) and the SEP chains (hairpin masquerade + DNAT),
  byte for byte as upstream's ``writeServiceToEndpointRules`` and SEP loop.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

__all__ = [
    "RoundRobin",
    "endpoint_chain_names",
    "endpoint_chain_rules",
    "endpoint_hash",
    "port_proto_hash",
    "probability",
    "service_to_endpoint_rules",
]

_MARK_MASQ = "KUBE-MARK-MASQ"


def _hash16(text: str) -> str:
    # 16 base32 characters carry exactly the first 80 bits (10 bytes) of the digest.
    return base64.b32encode(hashlib.sha256(text.encode()).digest()[:10]).decode()


def port_proto_hash(service_port_name: str, protocol: str) -> str:
    """Hash shared by a service port's KUBE-SVC/SVL/EXT/FW chains.

    ``service_port_name`` is ``"ns/name"`` or ``"ns/name:port"``; ``protocol`` is
    lower-case (``"tcp"``), appended with no separator, as upstream does.
    """
    return _hash16(service_port_name + protocol)


def endpoint_hash(service_port_name: str, protocol: str, endpoint: str) -> str:
    """Hash of a KUBE-SEP chain; ``endpoint`` is ``"IP:port"`` (``"[v6]:port"``)."""
    return _hash16(service_port_name + protocol + endpoint)


def endpoint_chain_names(
    service_port_name: str, protocol: str, endpoints: Sequence[str]
) -> list[str]:
    """``"KUBE-SEP-" + endpoint_hash(...)`` for each of ``endpoints``, in order."""
    prefix = service_port_name + protocol
    return ["KUBE-SEP-" + _hash16(prefix + ep) for ep in endpoints]


class RoundRobin:
    """Round-robin over an endpoint list.

    Invariant: ``0 <= index < len(endpoints)`` whenever there are endpoints.
    Setting a different list resets the index to 0 (upstream's userspace
    load balancer does the same); setting an equal list keeps the position so
    that a no-op update does not skew the rotation.
    """

    __slots__ = ("_endpoints", "_index")

    def __init__(self, endpoints: Sequence[str] = ()) -> None:
        self._endpoints: tuple[str, ...] = tuple(endpoints)
        self._index = 0

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self._endpoints

    @property
    def index(self) -> int:
        return self._index

    def __len__(self) -> int:
        return len(self._endpoints)

    def set_endpoints(self, endpoints: Sequence[str]) -> bool:
        """Replace the endpoints; returns True when the list changed."""
        new = tuple(endpoints)
        if new == self._endpoints:
            return False
        self._endpoints = new
        self._index = 0
        return True

    def next_index(self) -> int:
        """Index of the next endpoint; raises LookupError when there is none."""
        n = len(self._endpoints)
        if n == 0:
            raise LookupError("no endpoints")
        i = self._index
        self._index = i + 1 if i + 1 < n else 0
        return i

    def next(self) -> str:
        """The next endpoint; raises LookupError when there is none."""
        return self._endpoints[self.next_index()]


# Upstream precomputes these strings too; index n holds 1/n.
_PROBABILITIES: list[str] = ["<bad value>"]


def probability(n: int) -> str:
    """Go's ``fmt.Sprintf("%0.10f", 1.0/float64(n))`` for ``n >= 1``, cached."""
    if n < 1:
        raise ValueError(f"probability needs n >= 1, got {n}")
    values = _PROBABILITIES
    while len(values) <= n:
        values.append("%0.10f" % (1.0 / len(values)))
    return values[n]


def service_to_endpoint_rules(
    chain: str,
    name: str,
    endpoints: Sequence[str],
    seps: Sequence[str],
    affinity: bool,
    seconds: int,
    comments: bool,
) -> list[str]:
    """The rules of a KUBE-SVC/KUBE-SVL ``chain`` that pick one of ``endpoints``.

    ``endpoints[i]`` is ``"IP:port"`` and ``seps[i]`` its KUBE-SEP chain, in
    upstream's order (sorted by ``"IP:port"``). With ``affinity`` the ``-m recent
    --rcheck`` rules (one per endpoint, ``--seconds seconds``) come first; then
    endpoint i of n jumps with probability ``1/(n-i)`` and the last one always.
    ``comments`` False is upstream's large-cluster mode (no ``-m comment``).
    """
    n = len(endpoints)
    if len(seps) != n:
        raise ValueError(f"{n} endpoints but {len(seps)} chains")
    out: list[str] = []
    if affinity:
        for i in range(n):
            sep = seps[i]
            comment = f' -m comment --comment "{name} -> {endpoints[i]}"' if comments else ""
            out.append(
                f"-A {chain}{comment} -m recent --name {sep}"
                f" --rcheck --seconds {seconds} --reap -j {sep}"
            )
    for i in range(n):
        comment = f' -m comment --comment "{name} -> {endpoints[i]}"' if comments else ""
        if i < n - 1:
            out.append(
                f"-A {chain}{comment} -m statistic --mode random"
                f" --probability {probability(n - i)} -j {seps[i]}"
            )
        else:
            out.append(f"-A {chain}{comment} -j {seps[i]}")
    return out


def endpoint_chain_rules(
    name: str,
    match: str,
    endpoints: Sequence[str],
    seps: Sequence[str],
    ips: Sequence[str],
    affinity: bool,
    comments: bool,
) -> tuple[list[str], list[str]]:
    """The chain lines and rules of the KUBE-SEP chains ``seps``.

    Per endpoint: a hairpin rule (traffic from the endpoint to itself through
    the VIP must be masqueraded, ``-s ips[i]``) and the DNAT to ``endpoints[i]``;
    ``match`` is ``"-m tcp -p tcp"``; ``affinity`` adds ``-m recent --set``.
    """
    n = len(seps)
    if len(endpoints) != n or len(ips) != n:
        raise ValueError(f"{n} chains but {len(endpoints)} endpoints and {len(ips)} IPs")
    chains: list[str] = []
    rules: list[str] = []
    comment = f" -m comment --comment {name}" if comments else ""
    for i in range(n):
        sep = seps[i]
        chains.append(f":{sep} - [0:0]")
        rules.append(f"-A {sep}{comment} -s {ips[i]} -j {_MARK_MASQ}")
        recent = f" -m recent --name {sep} --set" if affinity else ""
        rules.append(f"-A {sep}{comment}{recent} {match} -j DNAT --to-destination {endpoints[i]}")
    return chains, rules


# The userspace-mode fast path lives in modules of its own (one per .pxi of the
# compiled build); re-exported here so that the twin has the compiled module's API.
from kproxy._fastpath_parse_py import (  # noqa: E402
    MAX_EXTENSION_HEADERS,
    PARSE_FRAGMENT,
    PARSE_MALFORMED,
    PARSE_OK,
    PARSE_TRUNCATED,
    PARSE_UNSUPPORTED,
    PARSED_SIZE,
    parse_into,
    parse_packet,
)
from kproxy._fastpath_select_py import (  # noqa: E402
    FLOW_SEED,
    MAGLEV_OFFSET_SEED,
    MAGLEV_SKIP_SEED,
    ClientIPAffinity,
    Maglev,
    client_key,
    flow_hash,
    hash64,
)

__all__ += [
    "FLOW_SEED",
    "MAGLEV_OFFSET_SEED",
    "MAGLEV_SKIP_SEED",
    "MAX_EXTENSION_HEADERS",
    "PARSED_SIZE",
    "PARSE_FRAGMENT",
    "PARSE_MALFORMED",
    "PARSE_OK",
    "PARSE_TRUNCATED",
    "PARSE_UNSUPPORTED",
    "ClientIPAffinity",
    "Maglev",
    "client_key",
    "flow_hash",
    "hash64",
    "parse_into",
    "parse_packet",
]

from kproxy._fastpath_relay_py import RelayLoop  # noqa: E402
from kproxy._fastpath_splice_py import RELAY_COPY_BUFFER  # noqa: E402

__all__ += ["RELAY_COPY_BUFFER", "RelayLoop"]

from kproxy._fastpath_nfq_py import NFQ_BATCH, NfqLoop  # noqa: E402

__all__ += ["NFQ_BATCH", "NfqLoop"]
