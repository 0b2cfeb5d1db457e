"""The fast path's packet parser agrees with scapy, and its two builds with each other.

Packets are built with scapy (IPv4 with options and fragments, IPv6 with
hop-by-hop/routing/destination-options/fragment headers, TCP/UDP/ICMP), parsed
back by scapy itself for the expected fields, then cut at every interesting
length: once all the headers the parser needs are there the result is the full
packet's, before that it is TRUNCATED. Garbage never raises. Scapy is only a
fixture builder here (reference userspace-upstream.md §6), so it is optional.
"""

from __future__ import annotations

import socket
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy import _fastpath_py
from tests.support.impls import COMPILED
from tests.support.tiers import require_module

scapy_all = require_module("scapy.all")
IP: Any = scapy_all.IP
IPv6: Any = scapy_all.IPv6
TCP: Any = scapy_all.TCP
UDP: Any = scapy_all.UDP
ICMP: Any = scapy_all.ICMP
Raw: Any = scapy_all.Raw
IPOption_NOP: Any = scapy_all.IPOption_NOP
IPOption_RR: Any = scapy_all.IPOption_RR
HopByHop: Any = scapy_all.IPv6ExtHdrHopByHop
Routing: Any = scapy_all.IPv6ExtHdrRouting
DestOpt: Any = scapy_all.IPv6ExtHdrDestOpt
Fragment6: Any = scapy_all.IPv6ExtHdrFragment


IMPLS: list[ModuleType] = [_fastpath_py] + ([COMPILED] if COMPILED is not None else [])
P = _fastpath_py
OK, TRUNC, FRAG, UNSUP, BAD = (
    P.PARSE_OK,
    P.PARSE_TRUNCATED,
    P.PARSE_FRAGMENT,
    P.PARSE_UNSUPPORTED,
    P.PARSE_MALFORMED,
)

Parsed = tuple[int, int, int, bytes, int, bytes, int]


def _all_parse(buf: bytes) -> Parsed:
    """Every build's parse (both entry points), checked equal; returns the tuple."""
    results: list[Parsed] = [impl.parse_packet(buf) for impl in IMPLS]
    assert all(r == results[0] for r in results), results
    records = []
    for impl in IMPLS:
        out = bytearray(P.PARSED_SIZE)
        assert impl.parse_into(buf, out) == results[0][0]
        records.append(bytes(out))
        assert impl.parse_packet(bytearray(buf)) == results[0]
        assert impl.parse_packet(memoryview(buf)) == results[0]
    assert all(r == records[0] for r in records)
    _, family, proto, src, sport, dst, dport = results[0]
    rec = records[0]
    assert (rec[0], rec[1], rec[6]) == (family, proto, len(src))
    assert int.from_bytes(rec[2:4], "big") == sport and int.from_bytes(rec[4:6], "big") == dport
    assert rec[8 : 8 + len(src)] == src and rec[24 : 24 + len(dst)] == dst
    return results[0]


def _expected(raw: bytes) -> tuple[Parsed, int]:
    """What scapy makes of ``raw``, and the header length the parser must see to say so."""
    v4 = raw[0] >> 4 == 4
    pkt = IP(raw) if v4 else IPv6(raw)
    src = socket.inet_pton(socket.AF_INET if v4 else socket.AF_INET6, pkt.src)
    dst = socket.inet_pton(socket.AF_INET if v4 else socket.AF_INET6, pkt.dst)
    family = 4 if v4 else 6
    if v4:
        proto, end = pkt.proto, pkt.ihl * 4
        seen = end
        if pkt.frag:
            return (FRAG, 4, proto, src, 0, dst, 0), end
    else:
        layer, end, proto = pkt.payload, 40, pkt.nh
        seen = end  # an unsupported protocol is known once its next-header byte is
        while isinstance(layer, HopByHop | Routing | DestOpt | Fragment6):
            seen = end + (8 if isinstance(layer, Fragment6) else 2)
            end += len(layer) - len(layer.payload)
            proto = layer.nh
            if isinstance(layer, Fragment6) and layer.offset:
                return (FRAG, 6, proto, src, 0, dst, 0), end
            layer = layer.payload
    if proto == 6 and TCP in pkt:
        return (OK, family, 6, src, pkt[TCP].sport, dst, pkt[TCP].dport), end + 20
    if proto == 17 and UDP in pkt:
        return (OK, family, 17, src, pkt[UDP].sport, dst, pkt[UDP].dport), end + 8
    if proto in (6, 17):
        # A first fragment too short for the whole TCP/UDP header: scapy leaves it raw.
        return (TRUNC, family, proto, src, 0, dst, 0), len(raw) + 1
    return (UNSUP, family, proto, src, 0, dst, 0), seen


def _check_with_truncations(raw: bytes) -> None:
    expected, need = _expected(raw)
    assert _all_parse(raw) == expected
    for cut in sorted({0, 1, 19, 20, 39, 40, need - 1, need, len(raw) - 1}):
        if not 0 <= cut <= len(raw):
            continue
        got = _all_parse(raw[:cut])
        if cut >= need:
            assert got == expected, cut
        else:
            assert got[0] == TRUNC, (cut, got)


_addr4 = st.integers(0, 2**32 - 1).map(lambda n: socket.inet_ntop(socket.AF_INET, n.to_bytes(4)))
_addr6 = st.integers(0, 2**128 - 1).map(lambda n: socket.inet_ntop(socket.AF_INET6, n.to_bytes(16)))
_port = st.integers(0, 65535)
_payload = st.binary(max_size=64)


@st.composite
def _l4(draw: st.DrawFn, v6: bool) -> Any:
    kind = draw(st.sampled_from(["tcp", "tcp-opts", "udp", "icmp"]))
    sport, dport = draw(_port), draw(_port)
    if kind == "tcp":
        layer = TCP(sport=sport, dport=dport, flags="S")
    elif kind == "tcp-opts":
        layer = TCP(sport=sport, dport=dport, options=[("MSS", 1460), ("NOP", None), ("WScale", 7)])
    elif kind == "udp":
        layer = UDP(sport=sport, dport=dport)
    else:
        layer = ICMP() if not v6 else scapy_all.ICMPv6EchoRequest()
    return layer / Raw(draw(_payload))


@st.composite
def _ipv4(draw: st.DrawFn) -> bytes:
    options = draw(st.sampled_from([[], [IPOption_NOP()] * 3, [IPOption_RR(routers=["1.2.3.4"])]]))
    pkt = IP(src=draw(_addr4), dst=draw(_addr4), options=options) / draw(_l4(False))
    if draw(st.booleans()):
        frags = scapy_all.fragment(pkt, fragsize=draw(st.sampled_from([8, 16, 24, 48])))
        return bytes(frags[draw(st.integers(0, len(frags) - 1))])
    return bytes(pkt)


@st.composite
def _ipv6(draw: st.DrawFn) -> bytes:
    pkt = IPv6(src=draw(_addr6), dst=draw(_addr6))
    for kind in draw(st.lists(st.sampled_from(["hbh", "rt", "dst", "frag"]), max_size=4)):
        if kind == "hbh":
            pkt = pkt / HopByHop()
        elif kind == "rt":
            pkt = pkt / Routing(addresses=[draw(_addr6)])
        elif kind == "dst":
            pkt = pkt / DestOpt()
        else:
            pkt = pkt / Fragment6(offset=draw(st.sampled_from([0, 0, 1, 185])), m=1)
    return bytes(pkt / draw(_l4(True)))


_slow = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_slow
@given(_ipv4())
def test_ipv4_matches_scapy(raw: bytes) -> None:
    _check_with_truncations(raw)


@_slow
@given(_ipv6())
def test_ipv6_matches_scapy(raw: bytes) -> None:
    _check_with_truncations(raw)


def test_known_packets() -> None:
    tcp = bytes(IP(src="10.0.0.1", dst="10.96.0.10") / TCP(sport=40000, dport=443))
    assert _all_parse(tcp) == (OK, 4, 6, b"\n\x00\x00\x01", 40000, b"\n`\x00\n", 443)
    frag = bytes(IP(src="10.0.0.1", dst="10.0.0.2", frag=3, proto=17) / Raw(b"x" * 8))
    assert _all_parse(frag)[:3] == (FRAG, 4, 17)
    bad_ihl = bytearray(tcp)
    bad_ihl[0] = 0x44
    assert _all_parse(bytes(bad_ihl))[0] == BAD
    assert _all_parse(b"\x00" * 40)[0] == BAD
    assert _all_parse(b"")[0] == TRUNC
    # More extension headers than the parser walks: reported, not followed.
    many = IPv6(src="fd00::1", dst="fd00::2")
    for _ in range(P.MAX_EXTENSION_HEADERS + 1):
        many = many / DestOpt()
    assert _all_parse(bytes(many / UDP(sport=1, dport=2)))[:3] == (UNSUP, 6, 60)
    # The IPv6 fragment header's first fragment still has ports.
    first = bytes(IPv6(src="fd00::1", dst="fd00::2") / Fragment6(m=1) / UDP(sport=5, dport=53))
    got = _all_parse(first)
    assert (got[0], got[4], got[6]) == (OK, 5, 53)


def test_parse_into_needs_room() -> None:
    for impl in IMPLS:
        with pytest.raises(ValueError):
            impl.parse_into(b"", bytearray(39))
        with pytest.raises((TypeError, BufferError)):
            impl.parse_into(b"", b"\x00" * 40)  # read-only


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120))
def test_garbage_never_raises(buf: bytes) -> None:
    status = _all_parse(buf)[0]
    assert status in (OK, TRUNC, FRAG, UNSUP, BAD)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([0x45, 0x46, 0x4F, 0x60]), st.binary(min_size=1, max_size=120))
def test_garbage_after_a_version_never_raises(first: int, rest: bytes) -> None:
    _all_parse(bytes([first]) + rest)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda m: m.__name__)
def test_lookup_packet(impl: ModuleType) -> None:
    m = impl.Maglev([f"10.1.0.{i}:80" for i in range(7)], table_size=251)
    pkt = bytes(IP(src="10.0.0.1", dst="10.96.0.10") / TCP(sport=40000, dport=443))
    expected = m.lookup(impl.flow_hash(6, "10.0.0.1", 40000, "10.96.0.10", 443))
    assert m.lookup_packet(pkt) == expected
    assert m.lookup_packet(pkt[:30]) == -TRUNC
    assert m.select((6, "10.0.0.1", 40000, "10.96.0.10", 443)) == m.backends[expected]
