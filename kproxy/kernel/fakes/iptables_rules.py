"""Tokenising and canonicalising iptables rule specs for the fake.

Owns the text side of :mod:`kproxy.kernel.fakes.iptables`: splitting a restore
line into words the way ``iptables-restore`` does, and rendering a rule spec the
way ``iptables-save`` prints it, so the fake's ``save()`` compares equal (after
normalising comments and counters) with the real tool's for the rules kproxy writes.

Invariants: a rule's canonical text is its identity (``-C``/``-D`` compare it);
rendering is a fixed point (canonicalising rendered text gives the same text).
Only what kube-proxy style rules need is canonicalised: generic options first in
the order ``-s -d -i -o -p``, ``/32``/``/128`` on bare addresses, the implicit
``-m tcp``/``-m udp``/``-m sctp`` before port options, ``--probability`` with
11 decimals and ``xtables_save_string`` quoting. Anything it cannot parse raises
:class:`RuleSyntaxError`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Final, Literal

STANDARD_TARGETS: Final = frozenset({"ACCEPT", "DROP", "RETURN", "QUEUE"})
# The extensions Debian's iptables 1.8.9 ships (/usr/lib/*/xtables): libxt_* for both
# families, libipt_* IPv4 only, libip6t_* IPv6 only. Upper case = target, lower = match.
_XT_TARGETS: Final = frozenset({
    "AUDIT", "CHECKSUM", "CLASSIFY", "CONNMARK", "CONNSECMARK", "CT", "DNAT", "DSCP",
    "HMARK", "IDLETIMER", "LED", "LOG", "MARK", "MASQUERADE", "NFLOG", "NFQUEUE",
    "NOTRACK", "RATEEST", "REDIRECT", "SECMARK", "SET", "SNAT", "SYNPROXY", "TCPMSS",
    "TCPOPTSTRIP", "TEE", "TOS", "TPROXY", "TRACE",
})  # fmt: skip
_XT_MATCHES: Final = frozenset({
    "addrtype", "bpf", "cgroup", "cluster", "comment", "connbytes", "connlabel", "connlimit",
    "connmark", "conntrack", "cpu", "dccp", "devgroup", "dscp", "ecn", "esp", "hashlimit",
    "helper", "ipcomp", "iprange", "ipvs", "length", "limit", "mac", "mark", "multiport",
    "nfacct", "osf", "owner", "physdev", "pkttype", "policy", "quota", "rateest", "recent",
    "rpfilter", "sctp", "set", "socket", "state", "statistic", "string", "tcp", "tcpmss",
    "time", "tos", "u32", "udp",
})  # fmt: skip
EXTENSION_TARGETS: Final = {
    "ipv4": _XT_TARGETS | {"CLUSTERIP", "ECN", "NETMAP", "REJECT", "TTL", "ULOG"},
    "ipv6": _XT_TARGETS | {"DNPT", "HL", "NETMAP", "REJECT", "SNPT"},
}
MATCHES: Final = {
    "ipv4": _XT_MATCHES | {"ah", "icmp", "realm", "ttl"},
    "ipv6": _XT_MATCHES | {"ah", "dst", "eui64", "frag", "hbh", "hl", "icmp6", "ipv6header",
                           "mh", "rt", "srh"},
}  # fmt: skip
MAX_CHAIN_NAME: Final = 28

_GENERIC: Final = {
    "-s": "-s", "--source": "-s", "--src": "-s",
    "-d": "-d", "--destination": "-d", "--dst": "-d",
    "-i": "-i", "--in-interface": "-i",
    "-o": "-o", "--out-interface": "-o",
    "-p": "-p", "--protocol": "-p",
}  # fmt: skip
_GENERIC_ORDER: Final = ("-s", "-d", "-i", "-o", "-p")
_PORT_PROTOCOLS: Final = frozenset({"tcp", "udp", "sctp"})
_PORT_OPTIONS: Final = frozenset(
    {"--dport", "--sport", "--destination-port", "--source-port", "--tcp-flags", "--syn"}
)
_NO_QUOTE: Final = frozenset("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class RuleSyntaxError(ValueError):
    """A restore line or rule spec the real tool would reject (as far as we can tell)."""


def tokenize(line: str) -> list[str]:
    """Split like ``iptables-restore``: whitespace, ``"..."`` grouping, ``\\"`` escapes."""
    words: list[str] = []
    cur: list[str] = []
    quoted = in_word = False
    i = 0
    while i < len(line):
        c = line[i]
        if quoted and c == "\\" and i + 1 < len(line) and line[i + 1] in "\"\\'":
            cur.append(line[i + 1])
            i += 2
            continue
        if c == '"':
            quoted = not quoted
            in_word = True
        elif c.isspace() and not quoted:
            if in_word:
                words.append("".join(cur))
                cur, in_word = [], False
        else:
            cur.append(c)
            in_word = True
        i += 1
    if quoted:
        raise RuleSyntaxError("unterminated quoted string")
    if in_word:
        words.append("".join(cur))
    return words


def quote(value: str) -> str:
    """Quote a value as ``xtables_save_string`` does (only when needed)."""
    if value and all(c in _NO_QUOTE for c in value):
        return value
    escaped = "".join("\\" + c if c in "\"\\'" else c for c in value)
    return f'"{escaped}"'


def valid_chain_name(name: str) -> bool:
    return 0 < len(name) <= MAX_CHAIN_NAME and not name.startswith(("-", "!"))


def _address(value: str, family: Literal["ipv4", "ipv6"]) -> str:
    try:
        net = ipaddress.ip_network(value, strict=False)
    except ValueError as e:
        raise RuleSyntaxError(f"host/network `{value}' not found") from e
    if (net.version == 4) != (family == "ipv4"):
        raise RuleSyntaxError(f"host/network `{value}' not found")
    return str(net)


@dataclass(slots=True)
class _Match:
    name: str
    words: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """A parsed rule: canonical text (identity), jump target and counters."""

    text: str
    target: str | None
    goto: bool
    counters: tuple[int, int] | None


def _value(words: list[str], i: int, opt: str) -> str:
    if i >= len(words):
        raise RuleSyntaxError(f'option "{opt}" requires an argument')
    return words[i]


def _render_value(opt: str, value: str) -> str:
    if opt == "--probability":
        try:
            return f"{float(value):.11f}"
        except ValueError as e:
            raise RuleSyntaxError(f"bad probability {value!r}") from e
    if opt == "--comment" or not value or any(c.isspace() for c in value):
        return quote(value)
    return value


def parse_rule(words: list[str], family: Literal["ipv4", "ipv6"]) -> RuleSpec:
    """Parse the words of a rule spec (after ``-A CHAIN``) into canonical form."""
    generic: dict[str, str] = {}
    matches: list[_Match] = []
    target: str | None = None
    goto = False
    target_words: list[str] = []
    counters: tuple[int, int] | None = None
    negate = False
    loaded: set[str] = set()
    i = 0
    while i < len(words):
        w = words[i]
        if target is not None and not goto and w not in ("-c", "--set-counters"):
            # Everything after -j belongs to the target (kproxy writes targets last).
            target_words.append(w if w and not any(c.isspace() for c in w) else quote(w))
            i += 1
            continue
        if w == "!":
            negate = True
            i += 1
            continue
        neg = "! " if negate else ""
        negate = False
        if w in _GENERIC:
            opt = _GENERIC[w]
            if opt in generic:
                raise RuleSyntaxError(f"multiple {opt} flags not allowed")
            value = _value(words, i + 1, w)
            if opt in ("-s", "-d"):
                value = _address(value, family)
            elif opt == "-p":
                value = value.lower()
            generic[opt] = f"{neg}{opt} {value}"
            i += 2
        elif w in ("-m", "--match"):
            name = _value(words, i + 1, w)
            if name not in MATCHES[family]:
                raise RuleSyntaxError(f"Couldn't load match `{name}':No such file or directory")
            matches.append(_Match(name))
            loaded.add(name)
            i += 2
        elif w in ("-j", "--jump", "-g", "--goto"):
            if target is not None:
                raise RuleSyntaxError("multiple targets")
            target = _value(words, i + 1, w)
            goto = w in ("-g", "--goto")
            i += 2
        elif w in ("-c", "--set-counters"):
            try:
                counters = (int(_value(words, i + 1, w)), int(_value(words, i + 2, w)))
            except ValueError as e:
                raise RuleSyntaxError("bad counters") from e
            i += 3
        elif w.startswith("--"):
            proto = generic.get("-p", "").removeprefix("! ").removeprefix("-p ")
            if w in _PORT_OPTIONS and proto in _PORT_PROTOCOLS and proto not in loaded:
                # Like iptables, a port option after -p tcp loads the tcp match itself.
                matches.append(_Match(proto))
                loaded.add(proto)
            elif not matches:
                raise RuleSyntaxError(f'unknown option "{w}"')
            opt_words = [f"{neg}{w}"]
            i += 1
            while i < len(words) and not words[i].startswith("-") and words[i] != "!":
                opt_words.append(_render_value(w, words[i]))
                i += 1
            matches[-1].words.append(" ".join(opt_words))
        else:
            raise RuleSyntaxError(f"Bad argument `{w}'")
    if target is not None and not target:
        raise RuleSyntaxError("empty target")
    parts = [generic[o] for o in _GENERIC_ORDER if o in generic]
    parts += [" ".join([f"-m {m.name}", *m.words]) for m in matches]
    if target is not None:
        parts.append(" ".join([f"{'-g' if goto else '-j'} {target}", *target_words]))
    return RuleSpec(" ".join(parts), target, goto, counters)


def parse_counters(text: str) -> tuple[int, int]:
    """``(packets, bytes)`` from ``[p:b]``."""
    inner = text.strip()
    if not (inner.startswith("[") and inner.endswith("]")):
        raise RuleSyntaxError(f"bad counters {text!r}")
    p, sep, b = inner[1:-1].partition(":")
    if not sep or not p.isdigit() or not b.isdigit():
        raise RuleSyntaxError(f"bad counters {text!r}")
    return int(p), int(b)
