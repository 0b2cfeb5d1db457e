"""NfqLoop's decision without a queue: compiled C loop vs twin vs the Decider.

``NfqLoop.decide`` runs the same C function as the queue loop, so these
scapy-built packets hold the loop's parse → select → mark to the twin and to
:meth:`Decider.decide` (Maglev per 5-tuple, round robin in step, affinity
delegated, odd packets unmarked by reason, random bytes never raise), and
check the table swap (counts handed back, objects used in place).
"""

from __future__ import annotations

import importlib
import ipaddress
import threading
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment

from kproxy import _fastpath_py, fastpath
from kproxy.proxy.nfqueue.decider import Decider, ServiceSelection
from kproxy.proxy.nfqueue.rules import MARK_MASK
from kproxy.proxy.types import ServicePortName

VIP4, VIP6 = "10.96.0.10", "fd00:96::10"
EPS = ("10.244.1.2:8080", "10.244.1.3:8080", "10.244.1.4:8080")
M = 1021


def _impls() -> list[ModuleType]:
    out: list[ModuleType] = [_fastpath_py]
    if fastpath.COMPILED:
        out.insert(0, importlib.import_module("kproxy._fastpath"))
    return out


IMPLS = _impls()
IDS = [m.__name__ for m in IMPLS]


def packed(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def selections() -> list[ServiceSelection]:
    return [
        ServiceSelection(
            ServicePortName("default", "tcp", "", "TCP"),
            "TCP",
            (packed(VIP4), packed(VIP6)),
            80,
            EPS,
            (1, 2, 3),
        ),
        ServiceSelection(
            ServicePortName("default", "udp", "", "UDP"), "UDP", (packed(VIP4),), 53, EPS, (4, 5, 6)
        ),
        ServiceSelection(
            ServicePortName("default", "sticky", "", "TCP"),
            "TCP",
            (packed(VIP4),),
            81,
            EPS,
            (7, 8, 9),
            (),
            60.0,
        ),
    ]


def setup(impl: ModuleType, selection: str = "maglev") -> tuple[Decider, Any]:
    d = Decider(selection, table_size=M, clock=lambda: 0.0, impl=impl)
    d.update(selections())
    loop = impl.NfqLoop([0], mark_mask=MARK_MASK, delegate=d.decide)
    assert loop.set_services(d.loop_entries()) == []
    return d, loop


PACKETS = [
    *(bytes(IP(src="10.77.0.2", dst=VIP4) / TCP(sport=s, dport=80)) for s in range(40000, 40100)),
    *(bytes(IPv6(src="fd00::2", dst=VIP6) / TCP(sport=s, dport=80)) for s in range(1000, 1030)),
    *(bytes(IP(src=f"10.77.1.{i}", dst=VIP4) / UDP(dport=53) / b"q") for i in range(1, 40)),
]

ODD = [
    (bytes(IP(dst=VIP4, frag=8) / (b"x" * 16)), 2),
    (bytes(IPv6(dst=VIP6) / IPv6ExtHdrFragment(offset=4) / (b"y" * 16)), 2),
    (bytes(IP(dst=VIP4) / TCP(dport=80))[:30], 1),
    (bytes(IP(dst=VIP4) / ICMP()), 3),
    (b"\x75" + bytes(39), 4),
    (b"", 1),
    (bytes(IP(dst=VIP4) / TCP(dport=9999)), 5),
    (bytes(IPv6(dst=VIP6) / UDP(dport=80)), 5),
]


@pytest.mark.parametrize("selection", ["maglev", "rr"])
@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_loop_decides_as_the_decider(impl: ModuleType, selection: str) -> None:
    d_ref = Decider(selection, table_size=M, clock=lambda: 0.0, impl=impl)
    d_ref.update(selections())
    _, loop = setup(impl, selection)
    for pkt in PACKETS:
        assert loop.decide(pkt) == d_ref.decide(pkt)
    assert sum(n for _, n in loop.take_marked()) == len(PACKETS)
    assert loop.take_marked() == []


@pytest.mark.skipif(not fastpath.COMPILED, reason="compiled fast path not built")
@pytest.mark.parametrize("selection", ["maglev", "rr"])
def test_compiled_loop_and_twin_agree(selection: str) -> None:
    _, c = setup(IMPLS[0], selection)
    _, t = setup(_fastpath_py, selection)
    sticky = [bytes(IP(src=f"10.9.0.{i}", dst=VIP4) / TCP(sport=i, dport=81)) for i in range(1, 30)]
    for pkt in PACKETS + sticky + [b for b, _ in ODD]:
        assert c.decide(pkt) == t.decide(pkt)
    cs, ts = c.stats(), t.stats()
    assert cs["unmarked"] == ts["unmarked"] and cs["delegated"] == ts["delegated"] == len(sticky)
    assert sorted(c.take_marked()) == sorted(t.take_marked())


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_odd_packets_are_unmarked_by_reason(impl: ModuleType) -> None:
    _, loop = setup(impl)
    for buf, reason in ODD:
        before = loop.stats()["unmarked"][reason]
        assert loop.decide(buf) == 0
        assert loop.stats()["unmarked"][reason] == before + 1


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_affinity_services_are_delegated(impl: ModuleType) -> None:
    d, loop = setup(impl)
    pkts = [bytes(IP(src="10.77.0.2", dst=VIP4) / TCP(sport=s, dport=81)) for s in range(100, 120)]
    marks = {loop.decide(p) for p in pkts}
    assert len(marks) == 1 and marks != {0}
    assert loop.stats()["delegated"] == 20
    assert d.marks_by_service()["default/sticky"] == 20


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_a_raising_delegate_leaves_the_packet_unmarked(impl: ModuleType) -> None:
    d = Decider("maglev", table_size=M, impl=impl)
    d.update(selections())

    def boom(buf: bytes) -> int:
        raise RuntimeError("no")

    loop = impl.NfqLoop([0], delegate=boom)
    loop.set_services(d.loop_entries())
    assert loop.decide(bytes(IP(dst=VIP4) / TCP(dport=81))) == 0
    assert loop.stats()["errors"] == 1


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_swap_hands_back_counts_and_forgets_old_services(impl: ModuleType) -> None:
    d, loop = setup(impl)
    pkt = PACKETS[0]
    assert loop.decide(pkt)
    assert loop.set_services([]) == [(selections()[0].spn, 1)]
    assert loop.decide(pkt) == 0 and loop.stats()["unmarked"][5] == 1
    loop.set_services(d.loop_entries())
    assert loop.decide(pkt)


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_bad_entries_are_refused(impl: ModuleType) -> None:
    loop = impl.NfqLoop([0])
    other = _fastpath_py if impl is not _fastpath_py else IMPLS[0]
    bad: list[tuple[Any, ...]] = [
        ("k", [b"\x01\x02\x03"], 80, 6, impl.Maglev(EPS, None, M), None, (1, 2, 3), False),
        ("k", [packed(VIP4)], 80, 6, None, None, (1, 2, 3), False),
        ("k", [packed(VIP4)], 70000, 6, impl.Maglev(EPS, None, M), None, (1, 2, 3), False),
    ]
    if other is not impl:
        bad.append(("k", [packed(VIP4)], 80, 6, other.Maglev(EPS, None, M), None, (1, 2, 3), False))
    for entry in bad:
        with pytest.raises((ValueError, TypeError)):
            loop.set_services([entry])
    with pytest.raises(ValueError):
        impl.NfqLoop([70000])
    with pytest.raises(RuntimeError):
        impl.NfqLoop([0]).run(0.01)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=160))
def test_no_bytes_make_the_loop_raise_and_builds_agree(buf: bytes) -> None:
    marks = []
    for impl in IMPLS:
        _, loop = setup(impl)
        marks.append(loop.decide(buf))
    assert len(set(marks)) == 1


@pytest.mark.parametrize("impl", IMPLS, ids=IDS)
def test_swapping_while_deciding_is_safe(impl: ModuleType) -> None:
    d, loop = setup(impl)
    entries = d.loop_entries()
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            loop.set_services(entries)
            loop.set_services([])

    t = threading.Thread(target=swap)
    t.start()
    try:
        for _ in range(20):
            for pkt in PACKETS:
                assert loop.decide(pkt) in (0, *(m << 16 for m in range(1, 7)))
    finally:
        stop.set()
        t.join()
