"""The NFQUEUE data path's pure renderer and its thin mode, against the stateful fake iptables."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import pytest

from kproxy.kernel.fakes.iptables import FakeIptables
from kproxy.kernel.iptables import IptablesError
from kproxy.proxy.core import Snapshot
from kproxy.proxy.endpoints import EndpointsMap
from kproxy.proxy.nfqueue.mode import NfqueueMode, NfqueueOptions, cleanup_rules
from kproxy.proxy.nfqueue.rules import (
    MAX_ENDPOINT_ID,
    EndpointRule,
    RuleOptions,
    ServiceRule,
    endpoint_chain,
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


def snapshot(ips: list[str], *, affinity: bool = False) -> Snapshot:
    info = ServicePortInfo(
        ipaddress.ip_address("10.96.0.10"), 80, "TCP", session_affinity_client_ip=affinity
    )
    eps = tuple(EndpointInfo(ip, 8080) for ip in sorted(ips))
    return Snapshot(ServicePortMap({SPN: info}), EndpointsMap({SPN: eps}), frozenset())


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
