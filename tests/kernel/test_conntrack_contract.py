"""One contract for the conntrack verbs: the fake and the real kernel in fresh netns.

Every ``test_contract_*`` case runs against
:class:`~kproxy.kernel.fakes.conntrack.FakeConntrack` and against
:class:`~kproxy.kernel.conntrack.Conntrack` in a throwaway topology (tier netns)::

    client ns  10.0.1.2 ──veth── 10.0.1.1  node ns  10.0.2.1 ──veth── 10.0.2.2, .3  endpoint ns
                                 (forwards, DNATs service IPs and a NodePort)

Real flows come from real UDP datagrams the client sends and the endpoint echoes
back from fixed source ports, so each flow's tuples are known exactly and the fake
is given the very flows the kernel makes. Conntrack is read in the node namespace,
where orig dst (the service) differs from reply src (the endpoint).
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from ipaddress import ip_address

import pytest

from kproxy.kernel.conntrack import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    Conntrack,
    ConntrackError,
    ConntrackVerbs,
    Flow,
)
from kproxy.kernel.fakes.conntrack import FakeConntrack
from kproxy.proxy.conntrack import ConntrackReconciler
from kproxy.proxy.metrics import ProxyMetrics
from kproxy.proxy.types import EndpointInfo, ServicePortInfo, ServicePortName
from tests.support.netns import NetnsFactory

CLIENT = "10.0.1.2"
NODE = "10.0.1.1"
EP1, EP2 = "10.0.2.2", "10.0.2.3"
VIP1, VIP2 = "10.96.0.10", "10.96.0.11"
NODE_PORT = 30053
EP_PORT = 5353

# (frontend ip, frontend port) -> (endpoint ip, endpoint port): the node's DNAT rules.
DNAT = {
    (VIP1, 53): (EP1, EP_PORT),
    (VIP2, 53): (EP2, EP_PORT),
    (NODE, NODE_PORT): (EP1, EP_PORT),
}
# (client source port, frontend ip, frontend port)
Send = tuple[int, str, int]
TRAFFIC: tuple[Send, ...] = (
    (40001, VIP1, 53),
    (40002, VIP1, 53),
    (40003, VIP2, 53),
    (40004, NODE, NODE_PORT),
)


def expected(sends: Iterable[Send]) -> set[Flow]:
    return {
        Flow.dnat(IPPROTO_UDP, (CLIENT, sport), (ip, port), DNAT[(ip, port)])
        for sport, ip, port in sends
    }


@dataclass
class Env:
    ct: ConntrackVerbs
    send: Callable[[Iterable[Send]], None]


# Echo every datagram from the address it arrived on, until idle for 20 s.
ECHO = """
import select, socket, sys
socks = []
for ip in sys.argv[2:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, int(sys.argv[1])))
    socks.append(s)
print("ready", flush=True)
while True:
    ready, _, _ = select.select(socks, [], [], 20.0)
    if not ready:
        break
    for s in ready:
        data, peer = s.recvfrom(2048)
        s.sendto(data, peer)
"""

# Send one datagram per (sport, ip, port) and wait for its echo: 20 tries of 0.5 s.
CLIENT_SCRIPT = """
import socket, sys
for spec in sys.argv[1:]:
    sport, ip, port = spec.split(",")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sport)))
    s.settimeout(0.5)
    for _ in range(20):
        s.sendto(b"ping", (ip, int(port)))
        try:
            s.recvfrom(2048)
            break
        except socket.timeout:
            continue
    else:
        sys.exit(f"no echo for {spec}")
    s.close()
"""


def real_env(factory: NetnsFactory) -> Env:
    client, node, endpoint = factory(), factory(), factory()
    factory.link(client, node, addr_a=f"{CLIENT}/24", addr_b=f"{NODE}/24")
    factory.link(endpoint, node, addr_a=f"{EP1}/24", addr_b="10.0.2.1/24")
    endpoint.ip("addr", "add", f"{EP2}/24", "dev", "veth0")
    client.ip("route", "add", "default", "via", NODE)
    endpoint.ip("route", "add", "default", "via", "10.0.2.1")
    node.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    for (ip, port), (ep, ep_port) in DNAT.items():
        node.run(
            ["iptables", "-t", "nat", "-A", "PREROUTING", "-p", "udp", "-d", ip,
             "--dport", str(port), "-j", "DNAT", "--to-destination", f"{ep}:{ep_port}"]
        )  # fmt: skip
    server = endpoint.popen([sys.executable, "-c", ECHO, str(EP_PORT), EP1, EP2])
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "ready"

    def send(sends: Iterable[Send]) -> None:
        args = [f"{sport},{ip},{port}" for sport, ip, port in sends]
        client.run([sys.executable, "-c", CLIENT_SCRIPT, *args], timeout=30)

    return Env(Conntrack("ipv4", netns=node.name), send)


def fake_env() -> Env:
    fake = FakeConntrack("ipv4")

    def send(sends: Iterable[Send]) -> None:
        for flow in expected(sends):
            fake.add(flow)

    return Env(fake, send)


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.netns)])
def env(request: pytest.FixtureRequest) -> Env:
    if request.param == "fake":
        return fake_env()
    from tests.support.tiers import require_commands

    factory: NetnsFactory = request.getfixturevalue("netns")
    require_commands("iptables")
    return real_env(factory)


def udp(ct: ConntrackVerbs) -> set[Flow]:
    return set(ct.list_flows(protocol=IPPROTO_UDP))


# -- listing -------------------------------------------------------------------------


def test_contract_lists_dnat_flows_with_both_tuples(env: Env) -> None:
    assert udp(env.ct) == set()
    env.send(TRAFFIC)
    flows = env.ct.list_flows(protocol=IPPROTO_UDP)
    assert set(flows) == expected(TRAFFIC)
    assert len(flows) == len(TRAFFIC)
    for flow in flows:
        assert flow.family == "ipv4"
        assert flow.orig_dst != flow.reply_src  # DNAT'ed
        assert flow.id is not None
    assert len({f.id for f in flows}) == len(flows)


def test_contract_list_filters_by_protocol(env: Env) -> None:
    env.send(TRAFFIC[:1])
    assert env.ct.list_flows(protocol=IPPROTO_TCP) == []
    assert set(env.ct.list_flows()) >= expected(TRAFFIC[:1])


def test_contract_repeated_traffic_keeps_one_flow(env: Env) -> None:
    env.send(TRAFFIC[:1])
    (first,) = env.ct.list_flows(protocol=IPPROTO_UDP)
    env.send(TRAFFIC[:1])
    (again,) = env.ct.list_flows(protocol=IPPROTO_UDP)
    assert again == first and again.id == first.id


# -- deleting ------------------------------------------------------------------------


def test_contract_delete_by_filter(env: Env) -> None:
    env.send(TRAFFIC)
    doomed = [f for f in env.ct.list_flows(protocol=IPPROTO_UDP) if f.orig_dst == ip_address(VIP1)]
    assert len(doomed) == 2
    assert env.ct.delete(doomed) == 2
    assert udp(env.ct) == expected(TRAFFIC[2:])


def test_contract_delete_of_a_gone_flow_is_not_counted(env: Env) -> None:
    env.send(TRAFFIC[:2])
    flows = env.ct.list_flows(protocol=IPPROTO_UDP)
    assert env.ct.delete(flows[:1]) == 1
    assert env.ct.delete(flows) == 1  # the first is gone already: not an error
    assert env.ct.delete(flows) == 0
    assert env.ct.delete([]) == 0
    assert udp(env.ct) == set()


def test_contract_delete_checks_the_listed_id(env: Env) -> None:
    env.send(TRAFFIC[:1])
    (flow,) = env.ct.list_flows(protocol=IPPROTO_UDP)
    assert flow.id is not None
    # The same tuple with another id: a flow re-created since the listing survives.
    assert env.ct.delete([replace(flow, id=flow.id ^ 0x5A5A)]) == 0
    assert udp(env.ct) == {flow}


def test_contract_delete_without_id_goes_by_tuple(env: Env) -> None:
    env.send(TRAFFIC[:2])
    by_hand = Flow.dnat(IPPROTO_UDP, (CLIENT, 40001), (VIP1, 53), (EP1, EP_PORT))
    assert by_hand.id is None
    assert env.ct.delete([by_hand]) == 1
    assert udp(env.ct) == expected(TRAFFIC[1:2])


def test_contract_delete_rejects_bad_input_before_deleting_anything(env: Env) -> None:
    env.send(TRAFFIC[:1])
    good = env.ct.list_flows(protocol=IPPROTO_UDP)
    v6 = Flow.dnat(IPPROTO_UDP, ("fd00::2", 40001), ("fd00:96::10", 53), ("fd00:2::2", 53))
    icmp = replace(good[0], protocol=1, id=None)
    for bad in (v6, icmp):
        with pytest.raises(ConntrackError) as info:
            env.ct.delete([*good, bad])
        assert info.value.errno == errno.EINVAL
        assert info.value.flow == bad
    assert udp(env.ct) == set(good)


# -- the reconciler on top -----------------------------------------------------------


def test_contract_reconciler_removes_exactly_the_stale_flows(env: Env) -> None:
    env.send(TRAFFIC)
    svc_a = ServicePortName("ns", "a", "dns", "UDP")
    svc_b = ServicePortName("ns", "b", "dns", "UDP")
    services = {
        # EP1 went away, EP2 serves now: flows to VIP1 and the NodePort (via EP1) are stale.
        svc_a: ServicePortInfo(ip_address(VIP1), 53, "UDP", node_port=NODE_PORT),
        # Scaled to zero: its flow (to EP2) is stale too (kubernetes#139628).
        svc_b: ServicePortInfo(ip_address(VIP2), 53, "UDP"),
    }
    metrics = ProxyMetrics()
    rec = ConntrackReconciler(env.ct, metrics)
    assert rec.reconcile(services, {svc_a: (EndpointInfo(EP2, EP_PORT),)}) == 4
    assert udp(env.ct) == set()
    assert (
        metrics.registry.get_sample_value(
            "kubeproxy_conntrack_reconciler_deleted_entries_total", {"ip_family": "IPv4"}
        )
        == 4.0
    )

    # With EP1 serving, flows to it are kept; VIP2 still has none.
    env.send(TRAFFIC)
    eps = {svc_a: (EndpointInfo(EP1, EP_PORT),), svc_b: ()}
    assert rec.reconcile(services, eps) == 1
    assert udp(env.ct) == expected([s for s in TRAFFIC if s[1] != VIP2])


# -- IPv6 -----------------------------------------------------------------------------

CLIENT6, NODE6, EP6, VIP6 = "fd00:1::2", "fd00:1::1", "fd00:2::2", "fd00:96::10"


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.netns)])
def env6(request: pytest.FixtureRequest) -> Env:
    """A one-service IPv6 variant: client → node (DNAT VIP6:53 → EP6:5353) → endpoint."""
    if request.param == "fake":
        fake = FakeConntrack("ipv6")

        def send_fake(sends: Iterable[Send]) -> None:
            for sport, ip, port in sends:
                fake.add(Flow.dnat(IPPROTO_UDP, (CLIENT6, sport), (ip, port), (EP6, EP_PORT)))

        return Env(fake, send_fake)
    from tests.support.tiers import require_commands

    factory: NetnsFactory = request.getfixturevalue("netns")
    require_commands("ip6tables")
    client, node, endpoint = factory(), factory(), factory()
    c_if, n_if = factory.link(client, node)
    e_if, n_if2 = factory.link(endpoint, node)
    # nodad: the addresses must be usable at once, not after duplicate detection.
    for ns, ifname, cidr in ((client, c_if, CLIENT6), (node, n_if, NODE6),
                             (node, n_if2, "fd00:2::1"), (endpoint, e_if, EP6)):  # fmt: skip
        ns.ip("-6", "addr", "add", f"{cidr}/64", "dev", ifname, "nodad")
    client.ip("-6", "route", "add", "default", "via", NODE6)
    endpoint.ip("-6", "route", "add", "default", "via", "fd00:2::1")
    node.run(["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
    node.run(
        ["ip6tables", "-t", "nat", "-A", "PREROUTING", "-p", "udp", "-d", VIP6, "--dport", "53",
         "-j", "DNAT", "--to-destination", f"[{EP6}]:{EP_PORT}"]
    )  # fmt: skip
    echo6 = ECHO.replace("socket.AF_INET,", "socket.AF_INET6,")
    server = endpoint.popen([sys.executable, "-c", echo6, str(EP_PORT), EP6])
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "ready"
    client6 = CLIENT_SCRIPT.replace("socket.AF_INET,", "socket.AF_INET6,").replace(
        '("0.0.0.0", int(sport))', '("::", int(sport))'
    )

    def send_real(sends: Iterable[Send]) -> None:
        args = [f"{sport},{ip},{port}" for sport, ip, port in sends]
        client.run([sys.executable, "-c", client6, *args], timeout=30)

    return Env(Conntrack("ipv6", netns=node.name), send_real)


def test_contract_ipv6_list_and_delete(env6: Env) -> None:
    env6.send([(40001, VIP6, 53), (40002, VIP6, 53)])
    flows = env6.ct.list_flows(protocol=IPPROTO_UDP)
    want = {
        Flow.dnat(IPPROTO_UDP, (CLIENT6, sport), (VIP6, 53), (EP6, EP_PORT))
        for sport in (40001, 40002)
    }
    assert set(flows) == want
    assert all(f.family == "ipv6" and f.id is not None for f in flows)
    doomed = [f for f in flows if f.orig_sport == 40001]
    assert env6.ct.delete(doomed) == 1
    assert {f.orig_sport for f in env6.ct.list_flows(protocol=IPPROTO_UDP)} == {40002}


# -- real only -----------------------------------------------------------------------


def test_missing_netns_is_an_error_and_is_not_created() -> None:
    from tests.support.netns import list_netns

    name = "kpt-conntrack-no-such-netns"
    ct = Conntrack("ipv4", netns=name)
    with pytest.raises(ConntrackError) as info:
        ct.list_flows()
    assert info.value.netns == name
    assert info.value.verb == "list"
    assert name in str(info.value)
    assert name not in list_netns()


def test_flow_str_reads_like_conntrack_tool() -> None:
    flow = Flow.dnat(IPPROTO_UDP, (CLIENT, 40001), (VIP1, 53), (EP1, EP_PORT))
    assert str(flow) == (
        "udp src=10.0.1.2 dst=10.96.0.10 sport=40001 dport=53 "
        "src=10.0.2.2 dst=10.0.1.2 sport=5353 dport=40001"
    )
