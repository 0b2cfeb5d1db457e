"""The NFQUEUE handler's decision, with scapy-built packets (no queue, no root).

Parsing and marking must agree with the fast path's Maglev for IPv4 and IPv6,
TCP and UDP (the expected endpoint is computed from the 5-tuple independently);
odd packets (IP options, fragments, truncated headers, other protocols, random
bytes) are accepted unmarked and never make the handler raise. Runs against
whichever fast-path build is selected (the Makefile runs the unit tier twice).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_RR  # type: ignore[attr-defined]
from scapy.layers.inet6 import (  # type: ignore[attr-defined]
    IPv6,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.packet import Packet, Raw

from kproxy import fastpath
from kproxy.proxy.nfqueue.collector import NfqueueCollector
from kproxy.proxy.nfqueue.decider import Decider, ServiceSelection
from kproxy.proxy.nfqueue.handler import QueueHandler
from kproxy.proxy.nfqueue.rules import MARK_MASK, MARK_SHIFT
from kproxy.proxy.types import ServicePortName

VIP4, VIP6, EXT4 = "10.96.0.10", "fd00:96::10", "203.0.113.10"
EPS = ("10.244.1.2:8080", "10.244.1.3:8080", "10.244.1.4:8080")
# A small prime keeps the pure twin's table builds quick; the handler takes any prime.
M = 1021
SPN_TCP = ServicePortName("default", "echo", "tcp", "TCP")
SPN_UDP = ServicePortName("default", "echo", "udp", "UDP")
SPN_STICKY = ServicePortName("default", "sticky", "", "TCP")
SPN6 = ServicePortName("default", "echo6", "", "TCP")


def packed(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def selections(endpoints: tuple[str, ...] = EPS, ids: tuple[int, ...] = (1, 2, 3)) -> list[Any]:
    return [
        ServiceSelection(SPN_TCP, "TCP", (packed(VIP4), packed(EXT4)), 80, endpoints, ids),
        ServiceSelection(SPN_UDP, "UDP", (packed(VIP4),), 80, endpoints, ids),
        ServiceSelection(SPN_STICKY, "TCP", (packed(VIP4),), 81, endpoints, ids, (), 60.0),
        ServiceSelection(SPN6, "TCP", (packed(VIP6),), 80, endpoints, ids),
    ]


def decider(selection: str = "maglev", clock: Callable[[], float] = lambda: 0.0) -> Decider:
    d = Decider(selection, table_size=M, clock=clock)
    d.update(selections())
    return d


def expected(proto: int, src: str, sport: int, dst: str, dport: int) -> str:
    """Maglev's choice computed from the 5-tuple, independently of the handler."""
    return fastpath.Maglev(EPS, None, M).select((proto, src, sport, dst, dport))


def mark_of(endpoint: str, endpoints: tuple[str, ...] = EPS) -> int:
    return (endpoints.index(endpoint) + 1) << MARK_SHIFT


@pytest.mark.parametrize(
    ("pkt", "tuple5"),
    [
        (IP(src="10.77.0.2", dst=VIP4) / TCP(sport=40000, dport=80, flags="S"), 6),
        (IP(src="10.77.0.3", dst=EXT4) / TCP(sport=51234, dport=80, flags="S"), 6),
        (IP(src="10.77.0.2", dst=VIP4) / UDP(sport=40001, dport=80) / b"hi", 17),
        (IPv6(src="fd00::2", dst=VIP6) / TCP(sport=40002, dport=80, flags="S"), 6),
        # Options and a first fragment still carry the ports: marked.
        (IP(src="10.77.0.2", dst=VIP4, options=[IPOption_RR()]) / TCP(sport=1, dport=80), 6),
        (IP(src="10.77.0.2", dst=VIP4, flags="MF") / UDP(sport=2, dport=80) / (b"x" * 64), 17),
        (
            IPv6(src="fd00::2", dst=VIP6)
            / IPv6ExtHdrHopByHop()
            / IPv6ExtHdrFragment(offset=0, m=1)
            / TCP(sport=3, dport=80),
            6,
        ),
    ],
)
def test_parsing_and_marking_agree_with_maglev(pkt: Packet, tuple5: int) -> None:
    d = decider()
    ip = pkt.getlayer(IP) or pkt.getlayer(IPv6)
    l4 = pkt.getlayer(TCP) or pkt.getlayer(UDP)
    want = expected(tuple5, ip.src, l4.sport, ip.dst, l4.dport)
    # Copy range: the handler only ever sees the first 128 bytes.
    decision = d.explain(bytes(pkt)[:128])
    assert decision.status == fastpath.PARSE_OK
    assert decision.endpoint == want
    assert decision.mark == mark_of(want)
    assert decision.mark & ~MARK_MASK == 0 and decision.mark & 0xC000 == 0


def test_spread_over_many_flows_matches_maglev_exactly() -> None:
    d = decider()
    for sport in range(20000, 20300):
        pkt = bytes(IP(src="10.77.0.2", dst=VIP4) / TCP(sport=sport, dport=80, flags="S"))
        assert d.decide(pkt) == mark_of(expected(6, "10.77.0.2", sport, VIP4, 80))
    assert d.marks_by_service()[str(SPN_TCP)] == 300


ODD: list[tuple[str, bytes, int]] = [
    (
        "non-first IPv4 fragment",
        bytes(IP(src="10.77.0.2", dst=VIP4, frag=8) / Raw(b"x" * 16)),
        fastpath.PARSE_FRAGMENT,
    ),
    (
        "non-first IPv6 fragment",
        bytes(IPv6(src="fd00::2", dst=VIP6) / IPv6ExtHdrFragment(offset=4) / Raw(b"y" * 16)),
        fastpath.PARSE_FRAGMENT,
    ),
    (
        "truncated TCP header",
        bytes(IP(src="10.77.0.2", dst=VIP4) / TCP(sport=1, dport=80))[:30],
        fastpath.PARSE_TRUNCATED,
    ),
    (
        "truncated IPv6 header",
        bytes(IPv6(src="fd00::2", dst=VIP6) / TCP())[:39],
        fastpath.PARSE_TRUNCATED,
    ),
    ("ICMP", bytes(IP(src="10.77.0.2", dst=VIP4) / ICMP()), fastpath.PARSE_UNSUPPORTED),
    ("bad version", b"\x75" + bytes(39), fastpath.PARSE_MALFORMED),
    ("IHL below 5", b"\x44" + bytes(39), fastpath.PARSE_MALFORMED),
    ("empty", b"", fastpath.PARSE_TRUNCATED),
]


@pytest.mark.parametrize(("what", "buf", "status"), ODD, ids=[o[0] for o in ODD])
def test_odd_packets_are_left_unmarked(what: str, buf: bytes, status: int) -> None:
    d = decider()
    assert d.decide(buf) == 0, what
    assert d.unmarked[status] == 1


def test_unknown_service_port_is_left_unmarked() -> None:
    d = decider()
    assert d.decide(bytes(IP(dst=VIP4) / TCP(dport=9999))) == 0
    assert d.decide(bytes(IP(dst="10.96.0.99") / TCP(dport=80))) == 0
    # UDP to the IPv6-only (TCP) service port.
    assert d.decide(bytes(IPv6(dst=VIP6) / UDP(dport=80))) == 0
    assert d.unmarked[5] == 3


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=160))
def test_no_bytes_make_decide_raise(buf: bytes) -> None:
    d = decider()
    mark = d.decide(buf)
    assert mark == 0 or mark in {mark_of(e) for e in EPS}


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 127), st.integers(0, 255))
def test_corrupting_a_real_packet_never_raises(pos: int, value: int) -> None:
    d = decider()
    buf = bytearray(bytes(IP(src="10.77.0.2", dst=VIP4) / TCP(sport=1234, dport=80)))
    buf = buf + bytearray(max(0, pos + 1 - len(buf)))
    buf[pos] = value
    d.decide(bytes(buf))


def test_client_ip_affinity_keeps_a_client_and_hashes_its_ip() -> None:
    now = [0.0]
    d = decider(clock=lambda: now[0])
    marks = {
        d.decide(bytes(IP(src="10.77.0.2", dst=VIP4) / TCP(sport=s, dport=81)))
        for s in range(1000, 1050)
    }
    assert len(marks) == 1
    # Maglev on the client IP alone: what every node computes for this client.
    owner = fastpath.Maglev(EPS, None, M).select(packed("10.77.0.2"))
    assert marks == {mark_of(owner)}
    # Survives an endpoint change that keeps its endpoint, even when its id stays.
    rest = tuple(e for e in EPS if e != owner)
    d.update(selections((owner, rest[0]), (mark_of(owner) >> MARK_SHIFT, 9)))
    assert d.decide(bytes(IP(src="10.77.0.2", dst=VIP4) / TCP(sport=7, dport=81))) == mark_of(owner)


def test_affinity_record_to_a_removed_endpoint_is_rewritten() -> None:
    d = decider()
    pkt = bytes(IP(src="10.77.0.2", dst=VIP4) / TCP(sport=1, dport=81))
    first = d.explain(pkt).endpoint
    assert first is not None
    rest = tuple(e for e in EPS if e != first)
    d.update(selections(rest, (5, 6)))
    again = d.explain(pkt)
    assert again.endpoint in rest
    assert again.mark in {5 << MARK_SHIFT, 6 << MARK_SHIFT}


def test_affinity_records_expire() -> None:
    now = [0.0]
    d = decider("rr", clock=lambda: now[0])
    pkt = bytes(IP(src="10.77.0.5", dst=VIP4) / TCP(sport=1, dport=81))
    first = d.decide(pkt)
    assert d.decide(pkt) == first
    now[0] = 61.0
    assert d.sweep() == 1
    # Round robin moved on while the record was alive? No: only the first choice used it.
    assert d.decide(pkt) != first


def test_round_robin_cycles_over_the_endpoints() -> None:
    d = decider("rr")
    got = [d.decide(bytes(IP(dst=VIP4) / UDP(sport=s, dport=80))) for s in range(6)]
    assert got == [mark_of(e) for e in EPS] * 2


def test_weights_follow_maglev_v2_shares() -> None:
    d = Decider("maglev", table_size=M)
    eps = ("10.0.0.1:80", "10.0.0.2:80")
    d.update([ServiceSelection(SPN_TCP, "TCP", (packed(VIP4),), 80, eps, (1, 2), (3, 1))])
    n = 4000
    counts = {1 << MARK_SHIFT: 0, 2 << MARK_SHIFT: 0}
    for s in range(n):
        counts[d.decide(bytes(IP(src="10.1.2.3", dst=VIP4) / TCP(sport=s, dport=80)))] += 1
    assert 0.70 < counts[1 << MARK_SHIFT] / n < 0.80


def test_update_rebuilds_only_changed_tables_and_keeps_counters() -> None:
    d = decider()
    before = d._by_spn[SPN_TCP].maglev
    d.decide(bytes(IP(dst=VIP4) / TCP(sport=1, dport=80)))
    d.update(selections())
    assert d._by_spn[SPN_TCP].maglev is before
    assert d.marks_by_service()[str(SPN_TCP)] == 1
    d.update(selections(EPS[:2], (1, 2)))
    assert d._by_spn[SPN_TCP].maglev is not before
    d.update([])
    assert d.decide(bytes(IP(dst=VIP4) / TCP(sport=1, dport=80))) == 0


# -- the callback and the thread, with fakes -------------------------------------


class FakePacket:
    def __init__(self, payload: bytes, mark: int = 0, fail: bool = False) -> None:
        self.payload, self.mark, self.fail = payload, mark, fail
        self.verdicts: list[tuple[str, int | None]] = []
        self.given: int | None = None

    def get_payload(self) -> bytes:
        if self.fail:
            raise RuntimeError("payload gone")
        return self.payload

    def set_mark(self, mark: int) -> None:
        self.given = mark

    def accept(self) -> None:
        self.verdicts.append(("accept", self.given))


def test_callback_marks_keeping_other_bits_and_always_accepts() -> None:
    h = QueueHandler(decider(), [0], lambda n, cb: FakeQueue(n, cb))
    pkt = FakePacket(bytes(IP(src="10.77.0.2", dst=VIP4) / TCP(sport=40000, dport=80)), 0x4001)
    h.callback(pkt)
    want = mark_of(expected(6, "10.77.0.2", 40000, VIP4, 80))
    assert pkt.verdicts == [("accept", 0x4001 | want)]
    odd = FakePacket(b"\x00" * 10)
    h.callback(odd)
    assert odd.verdicts == [("accept", None)]
    broken = FakePacket(b"", fail=True)
    h.callback(broken)
    assert broken.verdicts == [("accept", None)]
    assert (h.packets, h.errors) == (3, 1)


class FakeQueue:
    def __init__(self, n: int, cb: Callable[[Any], None]) -> None:
        import os

        self.queue_num, self.cb = n, cb
        self.r, self.w = os.pipe()
        self.closed = False
        self.pending: list[FakePacket] = []

    def fileno(self) -> int:
        return self.r

    def feed(self, pkt: FakePacket) -> None:
        import os

        self.pending.append(pkt)
        os.write(self.w, b"p")

    def process_pending(self) -> None:
        import os

        os.read(self.r, 4096)
        while self.pending:
            self.cb(self.pending.pop(0))

    def close(self) -> None:
        import os

        if not self.closed:
            self.closed = True
            os.close(self.r)
            os.close(self.w)


def test_handler_thread_serves_queues_and_stops() -> None:
    import time

    made: list[FakeQueue] = []

    def factory(n: int, cb: Callable[[Any], None]) -> FakeQueue:
        q = FakeQueue(n, cb)
        made.append(q)
        return q

    h = QueueHandler(decider(), [0, 1], factory, stats=dict)
    h.start()
    try:
        pkts = [FakePacket(bytes(IP(dst=VIP4) / TCP(sport=s, dport=80))) for s in range(10)]
        for i, p in enumerate(pkts):
            made[i % 2].feed(p)
        deadline = time.monotonic() + 5
        while h.packets < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(p.verdicts and p.verdicts[0][1] for p in pkts)
    finally:
        h.stop()
    assert not h.running and all(q.closed for q in made)
    h.stop()  # idempotent


def test_collector_exports_handler_and_queue_counters() -> None:
    from kproxy.kernel.nfqueue import parse_queue_stats

    text = "    0  12345     2 2   128     7     3      999  1\n"
    h = QueueHandler(
        decider(), [0], lambda n, cb: FakeQueue(n, cb), stats=lambda: parse_queue_stats(text)
    )
    h.callback(FakePacket(bytes(IP(dst=VIP4) / TCP(sport=1, dport=80))))
    h.callback(FakePacket(b"\x45"))
    reg = CollectorRegistry()
    reg.register(NfqueueCollector(h))
    out = generate_latest(reg).decode()
    assert "kubeproxy_nfqueue_packets_total 2.0" in out
    assert 'kubeproxy_nfqueue_marks_total{service_port="default/echo:tcp"} 1.0' in out
    assert 'kubeproxy_nfqueue_unmarked_total{reason="truncated"} 1.0' in out
    assert 'kubeproxy_nfqueue_queue_dropped{queue="0"} 7.0' in out
    assert 'kubeproxy_nfqueue_user_dropped{queue="0"} 3.0' in out
