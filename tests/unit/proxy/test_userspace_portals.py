# ruff: noqa: E501  (golden restore text is compared byte for byte; upstream-length lines)
"""The userspace portal renderer: golden text as upstream's userspace proxier wrote it.

Also holds the rendered text and the jump rules to the stateful iptables fake
(which the contract suite holds to the real tools), and the empty-snapshot
sync/cleanup cycle of the mode against that fake (no sockets are opened).
"""

from __future__ import annotations

from ipaddress import IPv4Address as A

import pytest

from kproxy.kernel.fakes.iptables import FakeIptables
from kproxy.kernel.iptables import RulePosition
from kproxy.proxy.core import Snapshot
from kproxy.proxy.endpoints import EndpointsMap
from kproxy.proxy.services import ServicePortMap
from kproxy.proxy.types import ServicePortInfo, ServicePortName
from kproxy.proxy.userspace.mode import UserspaceMode, UserspaceOptions
from kproxy.proxy.userspace.portals import (
    JUMPS,
    Portal,
    PortalOptions,
    render_portals,
)

WEB = ServicePortName("ns1", "svc1", "p80", "TCP")
DNS = ServicePortName("ns2", "dns", "", "UDP")
PORTALS = [
    Portal(
        WEB,
        ServicePortInfo(
            A("172.30.0.41"),
            80,
            "TCP",
            node_port=3001,
            external_ips=(A("192.168.99.11"),),
            load_balancer_vips=(A("1.2.3.4"),),
        ),
        36001,
    ),
    Portal(DNS, ServicePortInfo(A("172.30.0.10"), 53, "UDP"), 36002),
]

GOLDEN_ANY = """\
*filter
:KUBE-NODEPORT-NON-LOCAL - [0:0]
-A KUBE-NODEPORT-NON-LOCAL -m comment --comment "ns1/svc1:p80" -p tcp -m tcp --dport 36001 -m state --state NEW -j ACCEPT
COMMIT
*nat
:KUBE-PORTALS-CONTAINER - [0:0]
:KUBE-PORTALS-HOST - [0:0]
:KUBE-NODEPORT-CONTAINER - [0:0]
:KUBE-NODEPORT-HOST - [0:0]
-A KUBE-PORTALS-CONTAINER -m comment --comment "ns1/svc1:p80" -p tcp -m tcp --dport 80 -d 172.30.0.41/32 -j REDIRECT --to-ports 36001
-A KUBE-PORTALS-CONTAINER -m comment --comment "ns1/svc1:p80" -p tcp -m tcp --dport 80 -d 192.168.99.11/32 -m physdev ! --physdev-is-in -j REDIRECT --to-ports 36001
-A KUBE-PORTALS-CONTAINER -m comment --comment "ns1/svc1:p80" -p tcp -m tcp --dport 80 -d 192.168.99.11/32 -m addrtype --dst-type LOCAL -j REDIRECT --to-ports 36001
-A KUBE-PORTALS-CONTAINER -m comment --comment "ns1/svc1:p80" -p tcp -m tcp --dport 80 -d 1.2.3.4/32 -j REDIRECT --to-ports 36001
-A KUBE-PORTALS-CONTAINER -m comment --comment "ns2/dns" -p udp -m udp --dport 53 -d 172.30.0.10/32 -j REDIRECT --to-ports 36002
-A KUBE-PORTALS-HOST -m comment --comment "ns1/svc1:p80" -p tcp -m tcp --dport 80 -d 172.30.0.41/32 -j DNAT --to-destination 10.0.0.5:36001
-A KUBE-PORTALS-HOST -m comment --comment "ns1/svc1:p80" -p tcp -m tcp --dport 80 -d 192.168.99.11/32 -m addrtype --dst-type LOCAL -j DNAT --to-destination 10.0.0.5:36001
-A KUBE-PORTALS-HOST -m comment --comment "ns1/svc1:p80" -p tcp -m tcp --dport 80 -d 1.2.3.4/32 -j DNAT --to-destination 10.0.0.5:36001
-A KUBE-PORTALS-HOST -m comment --comment "ns2/dns" -p udp -m udp --dport 53 -d 172.30.0.10/32 -j DNAT --to-destination 10.0.0.5:36002
-A KUBE-NODEPORT-CONTAINER -m comment --comment "ns1/svc1:p80" -p tcp -m tcp --dport 3001 -j REDIRECT --to-ports 36001
-A KUBE-NODEPORT-HOST -m comment --comment "ns1/svc1:p80" -p tcp -m tcp --dport 3001 -j DNAT --to-destination 10.0.0.5:36001
COMMIT
"""

GOLDEN_BOUND = """\
*filter
:KUBE-NODEPORT-NON-LOCAL - [0:0]
COMMIT
*nat
:KUBE-PORTALS-CONTAINER - [0:0]
:KUBE-PORTALS-HOST - [0:0]
:KUBE-NODEPORT-CONTAINER - [0:0]
:KUBE-NODEPORT-HOST - [0:0]
-A KUBE-PORTALS-CONTAINER -m comment --comment "ns2/dns" -p udp -m udp --dport 53 -d 172.30.0.10/32 -j DNAT --to-destination 10.0.0.7:36002
-A KUBE-PORTALS-HOST -m comment --comment "ns2/dns" -p udp -m udp --dport 53 -d 172.30.0.10/32 -j DNAT --to-destination 10.0.0.7:36002
COMMIT
"""


def test_golden_listen_on_any_address() -> None:
    # Given in reverse order: the output is sorted by service port name.
    r = render_portals(reversed(PORTALS), PortalOptions(host_ip=A("10.0.0.5")))
    assert r.text == GOLDEN_ANY
    assert (r.nat_rules, r.filter_rules) == (11, 1)


def test_golden_bound_to_one_address_dnats_everything() -> None:
    r = render_portals(PORTALS[1:], PortalOptions(listen_ip=A("10.0.0.7")))
    assert r.text == GOLDEN_BOUND


def test_no_portals_still_flushes_every_chain() -> None:
    r = render_portals([], PortalOptions(host_ip=A("10.0.0.5")))
    assert r.text.count(" - [0:0]") == 5 and "-A " not in r.text


def test_options_refuse_loopback_and_missing_host_ip() -> None:
    with pytest.raises(ValueError, match="loopback"):
        PortalOptions(listen_ip=A("127.0.0.1"))
    with pytest.raises(ValueError, match="host_ip"):
        PortalOptions()


def test_jump_rules_are_upstreams() -> None:
    assert [(j.table, j.source, j.chain, j.prepend) for j in JUMPS] == [
        ("nat", "PREROUTING", "KUBE-PORTALS-CONTAINER", True),
        ("nat", "OUTPUT", "KUBE-PORTALS-HOST", True),
        ("nat", "PREROUTING", "KUBE-NODEPORT-CONTAINER", False),
        ("nat", "OUTPUT", "KUBE-NODEPORT-HOST", False),
        ("filter", "INPUT", "KUBE-NODEPORT-NON-LOCAL", True),
    ]
    assert JUMPS[2].rule_args() == [
        "-m", "addrtype", "--dst-type", "LOCAL",
        "-m", "comment", "--comment",
        "handle service NodePorts; NOTE: this must be the last rule in the chain",
        "-j", "KUBE-NODEPORT-CONTAINER",
    ]  # fmt: skip


def test_text_restores_into_the_fake() -> None:
    ipt = FakeIptables()
    ipt.restore(GOLDEN_ANY, noflush=True, counters=False)
    ipt.restore(GOLDEN_BOUND, noflush=True, counters=False)  # replaces, not appends
    nat = ipt.save("nat")
    assert "ns1/svc1" not in nat and nat.count("-A KUBE-PORTALS-") == 2


def _empty() -> Snapshot:
    return Snapshot(ServicePortMap(), EndpointsMap(), frozenset())


def test_mode_sync_and_cleanup_with_no_services() -> None:
    ipt = FakeIptables()
    # An existing rule in PREROUTING: our prepended jump must come before it.
    ipt.ensure_rule(RulePosition.APPEND, "nat", "PREROUTING", ["-p", "tcp", "-j", "ACCEPT"])
    mode = UserspaceMode(ipt, UserspaceOptions(host_ip=A("10.0.0.5"), raise_nofile=False))
    try:
        result = mode.sync(_empty(), full=False)
        assert result.ok and result.full  # the first sync is always full
        nat = ipt.save("nat")
        prerouting = [line for line in nat.splitlines() if line.startswith("-A PREROUTING")]
        assert prerouting[0].endswith("-j KUBE-PORTALS-CONTAINER"), prerouting
        assert prerouting[1] == "-A PREROUTING -p tcp -j ACCEPT"
        assert prerouting[2].endswith("-j KUBE-NODEPORT-CONTAINER"), prerouting
        assert "-j KUBE-NODEPORT-HOST" in nat
        assert "-j KUBE-NODEPORT-NON-LOCAL" in ipt.save("filter")
        assert mode.canary_present()
        again = mode.sync(_empty(), full=False)
        assert again.ok and not again.full
        assert ipt.save("nat").count("-j KUBE-PORTALS-HOST") == 1  # jumps not duplicated
    finally:
        mode.cleanup()
    assert "KUBE-" not in ipt.save("nat") + ipt.save("filter")
    assert "-A PREROUTING -p tcp -j ACCEPT" in ipt.save("nat")  # not ours: kept
    assert not mode.canary_present()
    mode.cleanup()  # idempotent
