"""The NFQUEUE data path's pure renderer and its thin mode, against the stateful fake iptables."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import generate_latest

from kproxy.kernel.fakes.iptables import FakeIptables
from kproxy.kernel.iptables import IptablesError
from kproxy.proxy.core import Snapshot
from kproxy.proxy.endpoints import EndpointsMap
from kproxy.proxy.metrics import ProxyMetrics
from kproxy.proxy.nfqueue.mode import NfqueueMode, NfqueueOptions, cleanup_rules
from kproxy.proxy.nfqueue.rules import (
    FALLBACK_COMMENT,
    MAX_ENDPOINT_ID,
    EndpointRule,
    RuleOptions,
    ServiceRule,
    endpoint_chain,
    fallback_counters,
    mark_value,
    render,
    service_chain,
)
from kproxy.proxy.services import ServicePortMap
from kproxy.proxy.types import EndpointInfo, ServicePortInfo, ServicePortName

SPN = ServicePortName("default", "echo", "tcp", "TCP")
UDP_SPN = ServicePortName("default", "echo", "udp", "UDP")
EPS = (EndpointRule("10.244.1.2:8080", "10.244.1.2", 8080, 1),
       EndpointRule("10.244.1.3:8080", "10.244.1.3", 8080, 2))  # fmt: skip


def svc(**kw: Any) -> ServiceRule:
    base: dict[str, Any] = dict(spn=SPN, protocol="TCP", cluster_ip="10.96.0.10", port=80)
    base.update(kw)
    return ServiceRule(
        endpoints=kw.pop("endpoints", EPS), **{k: v for k, v in base.items() if k != "endpoints"}
    )


def test_render_layout() -> None:
    r = render([svc(external=("203.0.113.10",))], RuleOptions(cluster_cidr="10.244.0.0/16"))
    lines = r.text.splitlines()
    sc = service_chain(SPN)
    sep0, sep1 = (endpoint_chain(SPN, e.endpoint) for e in EPS)
    assert lines[0] == "*mangle" and ":KUBE-NFQ - [0:0]" in lines
    assert (
        "-A KUBE-NFQ -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m conntrack --ctstate NEW"
        ' -m comment --comment "default/echo:tcp cluster IP"'
        " -j NFQUEUE --queue-num 0 --queue-bypass"
    ) in lines
    assert sum(line.startswith("-A KUBE-NFQ ") for line in lines) == 2  # cluster IP + external
    assert (
        "-A KUBE-NFQ-SERVICES ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m tcp --dport 80"
        " -j KUBE-NFQ-MARK-MASQ"
    ) in lines
    assert (
        "-A KUBE-NFQ-SERVICES -d 203.0.113.10/32 -p tcp -m tcp --dport 80 -j KUBE-NFQ-MARK-MASQ"
        in lines
    )
    assert f"-A {sc} -m mark --mark 0x10000/0xfff0000 -j {sep0}" in lines
    assert f"-A {sc} -m mark --mark 0x20000/0xfff0000 -j {sep1}" in lines
    fallback = [ln for ln in lines if ln.startswith(f"-A {sc}") and "unmarked" in ln]
    assert len(fallback) == 2
    assert "--probability 0.5000000000" in fallback[0] and "statistic" not in fallback[1]
    # Mark rules come before the fallback.
    assert lines.index(fallback[0]) > lines.index(
        f"-A {sc} -m mark --mark 0x20000/0xfff0000 -j {sep1}"
    )
    assert f"-A {sep0} -s 10.244.1.2/32 -j KUBE-NFQ-MARK-MASQ" in lines
    assert f"-A {sep0} -p tcp -m tcp -j DNAT --to-destination 10.244.1.2:8080" in lines
    assert "-A KUBE-NFQ-MARK-MASQ -j MARK --or-mark 0x00004000" in lines
    assert r.mangle_rules == 2 and r.deleted_chains == 0


def test_queue_balance_masquerade_all_and_no_endpoints() -> None:
    opts = RuleOptions(first_queue=2, last_queue=5, masquerade_all=True, random_fully=True)
    r = render([svc(), svc(spn=UDP_SPN, protocol="UDP", endpoints=())], opts)
    assert "-j NFQUEUE --queue-balance 2:5 --queue-bypass" in r.text
    assert (
        "-A KUBE-NFQ-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-NFQ-MARK-MASQ"
        in r.text
    )
    assert "MASQUERADE --random-fully" in r.text
    assert "udp" not in r.text  # no endpoints: nothing queued, nothing to DNAT to


def test_stale_chains_are_deleted_and_others_left_alone() -> None:
    gone = service_chain(UDP_SPN)
    existing = [("nat", gone), ("nat", "KUBE-SVC-ABC"), ("nat", service_chain(SPN))]
    r = render([svc()], RuleOptions(), existing)
    assert f"-X {gone}" in r.text and "KUBE-SVC-ABC" not in r.text
    assert r.deleted_chains == 1


def test_mark_values_stay_in_their_field() -> None:
    assert mark_value(1) == 0x10000 and mark_value(MAX_ENDPOINT_ID) == 0x0FFF0000
    for bad in (0, MAX_ENDPOINT_ID + 1):
        with pytest.raises(ValueError):
            mark_value(bad)


def test_rendered_text_restores_into_the_fake() -> None:
    ipt = FakeIptables()
    ipt.restore(render([svc()], RuleOptions()).text, noflush=True, counters=False)
    assert ipt.chain_exists("nat", service_chain(SPN))


# -- the mode -------------------------------------------------------------------


class NoQueue:
    def __init__(self, n: int, cb: Callable[[Any], None]) -> None:
        import os

        self.queue_num = n
        self.r, self.w = os.pipe()

    def fileno(self) -> int:
        return self.r

    def process_pending(self) -> None:
        pass

    def close(self) -> None:
        import os

        os.close(self.r)
        os.close(self.w)


def snapshot(ips: list[str], *, affinity: bool = False, udp: bool = False) -> Snapshot:
    info = ServicePortInfo(
        ipaddress.ip_address("10.96.0.10"), 80, "TCP", session_affinity_client_ip=affinity
    )
    eps = tuple(EndpointInfo(ip, 8080) for ip in sorted(ips))
    services = {SPN: info}
    endpoints = {SPN: eps}
    if udp:
        services[UDP_SPN] = ServicePortInfo(ipaddress.ip_address("10.96.0.10"), 80, "UDP")
        endpoints[UDP_SPN] = eps
    return Snapshot(ServicePortMap(services), EndpointsMap(endpoints), frozenset())


def test_mode_keeps_endpoint_ids_and_publishes_after_the_restore() -> None:
    ipt = FakeIptables()
    mode = NfqueueMode(ipt, NfqueueOptions(), queue_factory=NoQueue)
    try:
        r = mode.sync(snapshot(["10.244.1.2", "10.244.1.3", "10.244.1.4"]), full=True)
        assert r.ok and r.full, r.error
        assert mode._ids[SPN] == {"10.244.1.2:8080": 1, "10.244.1.3:8080": 2, "10.244.1.4:8080": 3}
        assert mode.handler.running
        # Remove the first endpoint, add one: survivors keep their ids and the new
        # one does not take the id just freed.
        r = mode.sync(snapshot(["10.244.1.3", "10.244.1.4", "10.244.1.5"]), full=False)
        assert r.ok
        assert mode._ids[SPN] == {"10.244.1.3:8080": 2, "10.244.1.4:8080": 3, "10.244.1.5:8080": 4}
        sel = mode.decider.services[SPN]
        assert sel.mark_ids == (2, 3, 4)
        nat = ipt.save("nat")
        assert "--mark 0x40000/0xfff0000" in nat and "--mark 0x10000/0xfff0000" not in nat
        assert mode.canary_present()
        assert "-j KUBE-NFQ" in ipt.save("mangle")
    finally:
        mode.cleanup()
    assert not mode.handler.running
    assert "KUBE-NFQ" not in ipt.save("mangle") and "KUBE-NQ" not in ipt.save("nat")
    cleanup_rules(ipt)  # idempotent


def test_failed_restore_keeps_the_old_tables_and_forces_a_full_sync() -> None:
    class Failing(FakeIptables):
        fail = False

        def restore(self, text: str, **kw: Any) -> None:
            if self.fail:
                raise IptablesError("boom")
            super().restore(text, **kw)

    ipt = Failing()
    mode = NfqueueMode(ipt, NfqueueOptions(), queue_factory=NoQueue)
    try:
        assert mode.sync(snapshot(["10.244.1.2"]), full=True).ok
        ipt.fail = True
        r = mode.sync(snapshot(["10.244.1.3"]), full=False)
        assert not r.ok and mode.need_full
        assert mode.decider.services[SPN].endpoints == ("10.244.1.2:8080",)
        ipt.fail = False
        r = mode.sync(snapshot(["10.244.1.3"]), full=False)
        assert r.ok and r.full
        assert mode.decider.services[SPN].endpoints == ("10.244.1.3:8080",)
    finally:
        mode.close()


def test_affinity_timeout_defaults_to_the_api_default() -> None:
    mode = NfqueueMode(FakeIptables(), NfqueueOptions(), queue_factory=NoQueue)
    try:
        assert mode.sync(snapshot(["10.244.1.2"], affinity=True), full=True).ok
        assert mode.decider.services[SPN].affinity_timeout == 10800.0
    finally:
        mode.close()


# -- bypass accounting (fallback rule counters) ---------------------------------


def count_fallback(ipt: FakeIptables, packets: dict[str, list[int]]) -> None:
    """Set the packet counters of each service port's fallback rules, in rule order.

    Stands in for the kernel counting: the nat table is saved with counters,
    edited and restored whole with counters.
    """
    left = {name: list(ns) for name, ns in packets.items()}
    out = []
    for line in ipt.save("nat", counters=True).splitlines():
        m = re.search(r'--comment "(\S+) ' + re.escape(FALLBACK_COMMENT), line)
        if m and left.get(m[1]):
            n = left[m[1]].pop(0)
            line = re.sub(r"^\[\d+:\d+\]", f"[{n}:{n * 60}]", line)
        out.append(line)
    ipt.restore("\n".join([*out, ""]), noflush=False, counters=True)


def metric(text: str, name: str) -> float | None:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m[1]) if m else None


def test_fallback_counters_sum_each_service_ports_fallback_rules_only() -> None:
    ipt = FakeIptables()
    ipt.restore(render([svc()], RuleOptions()).text, noflush=True, counters=False)
    assert fallback_counters(ipt.save("nat", counters=True)) == {"default/echo:tcp": 0}
    count_fallback(ipt, {"default/echo:tcp": [3, 4]})
    saved = ipt.save("nat", counters=True)
    assert fallback_counters(saved) == {"default/echo:tcp": 7}
    # The mark rules and the DNAT rules are not fallback rules; no counters, no match.
    assert sum(1 for ln in saved.splitlines() if FALLBACK_COMMENT in ln) == 2
    assert fallback_counters(ipt.save("nat")) == {}
    assert fallback_counters(
        '[5:300] -A KUBE-NQSVC-X -m comment --comment "ns/a:p unmarked (queue bypassed)"'
        " -m statistic --mode random --probability 0.5 -j KUBE-NQSEP-Y\n"
        '[9:9] -A KUBE-NFQ-SERVICES -m comment --comment "ns/a:p unmarked (queue bypassed)"'
        " -j KUBE-NQSVC-X\n"
    ) == {"ns/a:p": 5}


def test_bypassed_packets_survive_counter_resets_and_exclude_handler_unmarked() -> None:
    ipt = FakeIptables()
    metrics = ProxyMetrics()
    mode = NfqueueMode(ipt, NfqueueOptions(), metrics, queue_factory=NoQueue)
    ips = ["10.244.1.2", "10.244.1.3"]
    saves = 0
    real_save = ipt.save

    def counting_save(table: str | None = None, *, counters: bool = False) -> str:
        nonlocal saves
        saves += 1
        return real_save(table, counters=counters)

    ipt.save = counting_save  # type: ignore[method-assign]

    def scrape() -> str:
        mode._fallback_read_at = float("-inf")  # past the cache, as a later scrape would be
        return generate_latest(metrics.registry).decode()

    try:
        assert mode.sync(snapshot(ips, udp=True), full=True).ok
        out = scrape()
        assert metric(out, "kubeproxy_nfqueue_bypassed_packets_total") == 0
        # 5 + 1 connections took the TCP fallback, 2 the UDP one; the handler left 3
        # of them unmarked (it saw them): 5 were bypassed.
        count_fallback(ipt, {"default/echo:tcp": [5, 1], "default/echo:udp": [2]})
        mode.decider.unmarked[1] += 1  # truncated
        mode.decider.unmarked[5] += 2  # no service
        before = saves
        out = scrape()
        assert saves == before + 1  # one iptables-save -c -t nat per scrape
        tcp = 'kubeproxy_nfqueue_fallback_packets_total{service_port="default/echo:tcp"}'
        udp = 'kubeproxy_nfqueue_fallback_packets_total{service_port="default/echo:udp"}'
        assert metric(out, tcp) == 6 and metric(out, udp) == 2
        assert metric(out, "kubeproxy_nfqueue_bypassed_packets_total") == 5
        # Within the cache window a second scrape reads no counters.
        before = saves
        generate_latest(metrics.registry)
        assert saves == before
        # A sync rewrites the chains (the kernel counters restart at 0): folded, not lost.
        assert mode.sync(snapshot(ips, udp=True), full=False).ok
        assert fallback_counters(real_save("nat", counters=True)) == {
            "default/echo:tcp": 0,
            "default/echo:udp": 0,
        }
        count_fallback(ipt, {"default/echo:tcp": [2]})
        out = scrape()
        assert metric(out, tcp) == 8 and metric(out, udp) == 2
        assert metric(out, "kubeproxy_nfqueue_bypassed_packets_total") == 7
        # The UDP service goes away: its series goes, the total keeps its packets.
        assert mode.sync(snapshot(ips), full=False).ok
        out = scrape()
        assert metric(out, tcp) == 8 and metric(out, udp) is None
        assert metric(out, "kubeproxy_nfqueue_bypassed_packets_total") == 7
        # Handler-unmarked packets that nat never saw (later UDP packets) would make
        # the difference go down: the counter holds.
        mode.decider.unmarked[3] += 4
        assert metric(scrape(), "kubeproxy_nfqueue_bypassed_packets_total") == 7
    finally:
        mode.close()


def test_a_new_proxy_counts_the_bypasses_of_its_downtime_at_its_first_sync() -> None:
    ipt = FakeIptables()
    old = NfqueueMode(ipt, NfqueueOptions(), queue_factory=NoQueue)
    assert old.sync(snapshot(["10.244.1.2", "10.244.1.3"]), full=True).ok
    old.close()  # rules stay: new connections bypass the queue into the fallback
    count_fallback(ipt, {"default/echo:tcp": [4, 6]})
    metrics = ProxyMetrics()
    new = NfqueueMode(ipt, NfqueueOptions(), metrics, queue_factory=NoQueue)
    try:
        assert new.sync(snapshot(["10.244.1.2", "10.244.1.3"]), full=True).ok
        out = generate_latest(metrics.registry).decode()
        assert metric(out, "kubeproxy_nfqueue_bypassed_packets_total") == 10
    finally:
        new.close()


def test_unreadable_counters_keep_the_last_counts() -> None:
    class Failing(FakeIptables):
        fail = False

        def save(self, table: str | None = None, *, counters: bool = False) -> str:
            if self.fail:
                raise IptablesError("iptables-save failed")
            return super().save(table, counters=counters)

    ipt = Failing()
    mode = NfqueueMode(ipt, NfqueueOptions(), queue_factory=NoQueue)
    try:
        assert mode.sync(snapshot(["10.244.1.2"]), full=True).ok
        count_fallback(ipt, {"default/echo:tcp": [3]})
        assert mode.fallback_packets().total == 3
        ipt.fail = True
        mode._fallback_read_at = float("-inf")
        got = mode.fallback_packets()
        assert got.total == 3 and dict(got.by_service) == {"default/echo:tcp": 3}
    finally:
        mode.close()
