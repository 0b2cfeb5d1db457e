"""Golden tests of the IPVS planner, written from upstream's pkg/proxy/ipvs/proxier_test.go.

Each test names the upstream test it follows. Upstream checks the fake IPVS
(virtual servers and destinations), the fake ipsets (entries) and the chains
of the fake iptables (jump targets and matched sets); these tests check the
same facts on the plan, plus the exact restore text upstream's
``writeIptablesRules`` produces for them. ``0x4000`` is the mark, as in
upstream's fake proxier.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from kproxy.kernel.ipvs import IPProtocol, RealServer, ServiceFlags, VirtualServer
from kproxy.proxy.config import ProxyConfig
from kproxy.proxy.ipvs import (
    JUMP_RULES,
    IPSetEntry,
    IpvsOptions,
    IpvsPlan,
    ipvs_options,
    masquerade_mark,
    plan_ipvs,
    render_ipvs,
    sysctls,
)
from kproxy.proxy.ipvs.ipsets import kernel_set_name
from kproxy.proxy.ipvs.rules import missing_jumps, with_jumps
from tests.unit.proxy.goldens import NODE_NAME, make_service, make_slice, snapshot

ip = ipaddress.ip_address


def options(**overrides: Any) -> IpvsOptions:
    """Upstream's ``NewFakeProxier``: no-op local detector, node IPs on eth0."""
    base: dict[str, Any] = {"node_name": NODE_NAME, "masquerade_mark": "0x4000"}
    base.update(overrides)
    for key in ("node_ips", "nodeport_ips"):
        if base.get(key) is not None:
            base[key] = tuple(ip(a) for a in base[key])
    if isinstance(base.get("node_ip"), str):
        base["node_ip"] = ip(base["node_ip"])
    return IpvsOptions(**base)


def plan(services: list[dict[str, Any]], slices: list[dict[str, Any]], **opts: Any) -> IpvsPlan:
    spm, em = snapshot(services, slices)
    return plan_ipvs(spm, em, options(**opts))


def servers(p: IpvsPlan) -> dict[str, list[str]]:
    """``addr:port/PROTO`` → its real servers, like upstream's FakeIPVS maps."""
    return {str(s.server): [str(rs) for rs in s.destinations] for s in p.servers}


def entries(p: IpvsPlan, name: str) -> list[str]:
    return [str(e) for e in p.ipset(name).entries]


def chain(p: IpvsPlan, name: str, table: str = "nat") -> list[str]:
    block = p.restore.split(f"*{table}\n", 1)[1].split("COMMIT\n", 1)[0]
    return [line for line in block.splitlines() if line.startswith(f"-A {name} ")]


def jumps(p: IpvsPlan, name: str, table: str = "nat") -> list[tuple[str, str]]:
    """(target, matched set) per rule: upstream's ExpectedIptablesChain."""
    out = []
    for rule in chain(p, name, table):
        words = rule.split()
        target = words[words.index("-j") + 1]
        match_set = words[words.index("--match-set") + 1] if "--match-set" in words else ""
        out.append((target, match_set))
    return out


def ep(address: str, node: str | None = None, **cond: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"addresses": [address]}
    if node is not None:
        out["nodeName"] = node
    if cond:
        out["conditions"] = cond
    return out


NODEPORT_SVC = make_service("ns1", "svc1", "10.20.30.41", type="NodePort", nodePort=3001)


# -- TestClusterIPNoEndpoint / TestClusterIP -------------------------------------------


def test_cluster_ip_no_endpoint() -> None:
    p = plan([make_service("ns1", "svc1", "10.20.30.41")], [])
    assert servers(p) == {"10.20.30.41:80/TCP": []}
    vs = p.servers[0].server
    assert vs == VirtualServer(ip("10.20.30.41"), 80, IPProtocol.TCP, "rr")
    assert vs.netmask == 0xFFFFFFFF
    assert entries(p, "KUBE-CLUSTER-IP") == ["10.20.30.41,tcp:80"]
    assert p.bind_addresses == (ip("10.20.30.41"),)
    assert entries(p, "KUBE-IPVS-IPS") == ["10.20.30.41"]


def test_cluster_ip_restore_text_is_upstreams() -> None:
    p = plan(
        [make_service("ns1", "svc1", "10.20.30.41")],
        [make_slice("ns1", "svc1", 1, [ep("10.180.0.1")])],
    )
    assert servers(p) == {"10.20.30.41:80/TCP": ["10.180.0.1:80"]}
    rs = p.servers[0].destinations[0]
    assert (rs.weight, rs.forwarding) == (1, 0)  # weight 1, masquerading
    cip = '"Kubernetes service cluster ip + port for masquerade purpose"'
    assert p.restore == (
        "*nat\n"
        ":KUBE-SERVICES - [0:0]\n"
        ":KUBE-POSTROUTING - [0:0]\n"
        ":KUBE-NODE-PORT - [0:0]\n"
        ":KUBE-LOAD-BALANCER - [0:0]\n"
        ":KUBE-MARK-MASQ - [0:0]\n"
        "-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN\n"
        f"-A KUBE-SERVICES -m comment --comment {cip} -m set --match-set KUBE-CLUSTER-IP"
        " src,dst -j KUBE-MARK-MASQ\n"
        "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT\n"
        "-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ\n"
        "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT\n"
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n"
        "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n"
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT"'
        " -j MASQUERADE\n"
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n"
        "COMMIT\n"
        "*filter\n"
        ":KUBE-FORWARD - [0:0]\n"
        ":KUBE-NODE-PORT - [0:0]\n"
        ":KUBE-PROXY-FIREWALL - [0:0]\n"
        ":KUBE-SOURCE-RANGES-FIREWALL - [0:0]\n"
        ":KUBE-IPVS-FILTER - [0:0]\n"
        ":KUBE-IPVS-OUT-FILTER - [0:0]\n"
        "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP\n"
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules"'
        " -m mark --mark 0x4000/0x4000 -j ACCEPT\n"
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule"'
        " -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
        '-A KUBE-NODE-PORT -m comment --comment "Kubernetes health check node port"'
        " -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT\n"
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN\n"
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN\n"
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP dst,dst -j RETURN\n"
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP-LOCAL dst,dst -j RETURN\n"
        "-A KUBE-IPVS-FILTER -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j RETURN\n"
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst"
        " -j REJECT\n"
        "COMMIT\n"
    )
    assert (p.nat_rules, p.filter_rules) == (9, 10)


@pytest.mark.parametrize(
    ("opts", "rule_tail"),
    [
        ({"masquerade_all": True}, "KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ"),
        (
            {"if_not_local": ("!", "-s", "10.0.0.0/8")},
            "KUBE-CLUSTER-IP dst,dst ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
        ),
        ({}, "KUBE-CLUSTER-IP src,dst -j KUBE-MARK-MASQ"),
    ],
)
def test_cluster_ip_masquerade_variants(opts: dict[str, Any], rule_tail: str) -> None:
    # TestMasqueradeRule / writeIptablesRules' three KUBE-CLUSTER-IP variants.
    p = plan([make_service("ns1", "svc1", "10.20.30.41")], [], **opts)
    masq = [r for r in chain(p, "KUBE-SERVICES") if "KUBE-MARK-MASQ" in r]
    assert len(masq) == 1 and masq[0].endswith(rule_tail)


def test_random_fully_and_mark() -> None:
    p = plan([], [], random_fully=True, masquerade_mark=masquerade_mark(14))
    assert "-j MASQUERADE --random-fully\n" in p.restore
    assert "-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000\n" in p.restore


# -- TestNodePortIPv4 ------------------------------------------------------------------


def test_nodeport_one_vs_per_node_ip_of_the_family() -> None:
    p = plan(
        [NODEPORT_SVC],
        [
            make_slice("ns1", "svc1", 1, [ep("10.180.0.1")]),
            make_slice("ns1", "svc1", 2, [ep("1002:ab8::2:10")], address_type="IPv6"),
        ],
        node_ips=["100.101.102.103", "2001:db8::1:1"],
    )
    assert servers(p) == {
        "10.20.30.41:80/TCP": ["10.180.0.1:80"],
        "100.101.102.103:3001/TCP": ["10.180.0.1:80"],
    }
    assert entries(p, "KUBE-NODE-PORT-TCP") == ["3001"]
    # Node IPs carry NodePorts but are never bound to kube-ipvs0.
    assert p.bind_addresses == (ip("10.20.30.41"),)


def test_nodeport_udp() -> None:
    svc = make_service("ns1", "svc1", "10.20.30.41", type="NodePort", nodePort=3001, protocol="UDP")
    p = plan(
        [svc],
        [make_slice("ns1", "svc1", 1, [ep("10.180.0.1")], protocol="UDP")],
        node_ips=["100.101.102.103"],
        nodeport_ips=["100.101.102.103"],
    )
    assert servers(p) == {
        "10.20.30.41:80/UDP": ["10.180.0.1:80"],
        "100.101.102.103:3001/UDP": ["10.180.0.1:80"],
    }
    assert entries(p, "KUBE-NODE-PORT-UDP") == ["3001"]
    assert jumps(p, "KUBE-NODE-PORT") == [("KUBE-MARK-MASQ", "KUBE-NODE-PORT-UDP")]
    assert jumps(p, "KUBE-NODE-PORT", "filter") == [("ACCEPT", "KUBE-HEALTH-CHECK-NODE-PORT")]
    assert jumps(p, "KUBE-SERVICES") == [
        ("RETURN", ""),
        ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"),
        ("KUBE-NODE-PORT", ""),
        ("ACCEPT", "KUBE-CLUSTER-IP"),
    ]


def test_nodeport_no_endpoints() -> None:
    p = plan([NODEPORT_SVC], [], node_ips=["100.101.102.103"])
    assert servers(p) == {"10.20.30.41:80/TCP": [], "100.101.102.103:3001/TCP": []}


def test_nodeport_sctp_multiple_node_ips() -> None:
    svc = make_service(
        "ns1", "svc1", "10.20.30.41", type="NodePort", nodePort=3001, protocol="SCTP"
    )
    node_ips = ["100.101.102.103", "100.101.102.104", "100.101.102.105", "2001:db8::1:1"]
    p = plan(
        [svc],
        [make_slice("ns1", "svc1", 1, [ep("10.180.0.1")], protocol="SCTP")],
        node_ips=node_ips,
    )
    assert servers(p) == {
        "10.20.30.41:80/SCTP": ["10.180.0.1:80"],
        "100.101.102.103:3001/SCTP": ["10.180.0.1:80"],
        "100.101.102.104:3001/SCTP": ["10.180.0.1:80"],
        "100.101.102.105:3001/SCTP": ["10.180.0.1:80"],
    }
    assert entries(p, "KUBE-NODE-PORT-SCTP-HASH") == [
        "100.101.102.103,sctp:3001",
        "100.101.102.104,sctp:3001",
        "100.101.102.105,sctp:3001",
    ]
    assert chain(p, "KUBE-NODE-PORT")[0].startswith("-A KUBE-NODE-PORT -p sctp -m comment")
    assert chain(p, "KUBE-NODE-PORT")[0].endswith(
        "KUBE-NODE-PORT-SCTP-HASH dst,dst -j KUBE-MARK-MASQ"
    )


def test_nodeport_sctp_external_policy_local() -> None:
    svc = make_service(
        "ns1",
        "svc1",
        "10.20.30.41",
        type="NodePort",
        nodePort=3001,
        protocol="SCTP",
        externalTrafficPolicy="Local",
    )
    eps = [ep("10.180.0.1", NODE_NAME), ep("10.180.1.1", "other-node")]
    p = plan(
        [svc], [make_slice("ns1", "svc1", 1, eps, protocol="SCTP")], node_ips=["100.101.102.103"]
    )
    assert servers(p) == {
        "10.20.30.41:80/SCTP": ["10.180.0.1:80", "10.180.1.1:80"],
        "100.101.102.103:3001/SCTP": ["10.180.0.1:80"],
    }
    assert entries(p, "KUBE-NODE-PORT-SCTP-HASH") == ["100.101.102.103,sctp:3001"]
    assert entries(p, "KUBE-NODE-PORT-LOCAL-SCTP-HASH") == ["100.101.102.103,sctp:3001"]
    assert jumps(p, "KUBE-NODE-PORT") == [
        ("RETURN", "KUBE-NODE-PORT-LOCAL-SCTP-HASH"),
        ("KUBE-MARK-MASQ", "KUBE-NODE-PORT-SCTP-HASH"),
    ]


def test_nodeport_without_node_ips_skips_the_rest_of_the_port() -> None:
    svc = make_service(
        "ns1",
        "svc1",
        "10.20.30.41",
        type="LoadBalancer",
        nodePort=3001,
        externalTrafficPolicy="Local",
        healthCheckNodePort=30000,
    )
    p = plan([svc], [], node_ips=["127.0.0.1"])  # loopback carries no NodePort
    assert servers(p) == {"10.20.30.41:80/TCP": []}
    assert entries(p, "KUBE-NODE-PORT-TCP") == []
    assert entries(p, "KUBE-HEALTH-CHECK-NODE-PORT") == []


# -- TestOnlyLocalNodePorts / TestOnlyLocalLoadBalancing --------------------------------


def test_only_local_nodeports() -> None:
    svc = make_service(
        "ns1",
        "svc1",
        "10.20.30.41",
        type="NodePort",
        nodePort=3001,
        externalTrafficPolicy="Local",
    )
    eps = [ep("10.180.0.1", NODE_NAME), ep("10.180.1.1", "other-node")]
    p = plan([svc], [make_slice("ns1", "svc1", 1, eps)], node_ips=["100.101.102.103"])
    assert servers(p) == {
        "10.20.30.41:80/TCP": ["10.180.0.1:80", "10.180.1.1:80"],
        "100.101.102.103:3001/TCP": ["10.180.0.1:80"],
    }
    assert entries(p, "KUBE-NODE-PORT-TCP") == ["3001"]
    assert entries(p, "KUBE-NODE-PORT-LOCAL-TCP") == ["3001"]
    assert entries(p, "KUBE-LOOP-BACK") == ["10.180.0.1,tcp:80,10.180.0.1"]
    assert jumps(p, "KUBE-NODE-PORT") == [
        ("RETURN", "KUBE-NODE-PORT-LOCAL-TCP"),
        ("KUBE-MARK-MASQ", "KUBE-NODE-PORT-TCP"),
    ]
    assert p.no_local_endpoints_external == 0


def test_only_local_load_balancing() -> None:
    svc = make_service(
        "ns1",
        "svc1",
        "10.20.30.41",
        type="LoadBalancer",
        nodePort=3001,
        externalTrafficPolicy="Local",
        ingress=[{"ip": "1.2.3.4"}],
    )
    eps = [ep("10.180.0.1", NODE_NAME), ep("10.180.1.1", "other-node")]
    p = plan([svc], [make_slice("ns1", "svc1", 1, eps)])
    assert servers(p)["1.2.3.4:80/TCP"] == ["10.180.0.1:80"]
    assert len(p.servers) == 2  # no node IPs: ClusterIP + LB
    assert entries(p, "KUBE-LOAD-BALANCER") == ["1.2.3.4,tcp:80"]
    assert entries(p, "KUBE-LOAD-BALANCER-LOCAL") == ["1.2.3.4,tcp:80"]
    assert jumps(p, "KUBE-SERVICES") == [
        ("RETURN", ""),
        ("KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER"),
        ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"),
        ("KUBE-NODE-PORT", ""),
        ("ACCEPT", "KUBE-CLUSTER-IP"),
        ("ACCEPT", "KUBE-LOAD-BALANCER"),
    ]
    assert jumps(p, "KUBE-LOAD-BALANCER") == [
        ("RETURN", "KUBE-LOAD-BALANCER-LOCAL"),
        ("KUBE-MARK-MASQ", ""),
    ]
    assert p.bind_addresses == (ip("1.2.3.4"), ip("10.20.30.41"))


def test_external_policy_local_falls_back_to_cluster_endpoints() -> None:
    # PR #97081: with no local endpoint the external VS still gets the cluster
    # endpoints, and the Service counts as having no local endpoints.
    svc = make_service(
        "ns1",
        "svc1",
        "10.20.30.41",
        type="NodePort",
        nodePort=3001,
        externalTrafficPolicy="Local",
    )
    p = plan(
        [svc],
        [make_slice("ns1", "svc1", 1, [ep("10.180.1.1", "other-node")])],
        node_ips=["100.101.102.103"],
    )
    assert servers(p)["100.101.102.103:3001/TCP"] == ["10.180.1.1:80"]
    assert (p.no_local_endpoints_internal, p.no_local_endpoints_external) == (0, 1)


def test_internal_policy_local() -> None:
    svc = make_service("ns1", "svc1", "10.20.30.41", internalTrafficPolicy="Local")
    local = plan(
        [svc],
        [make_slice("ns1", "svc1", 1, [ep("10.180.0.1", NODE_NAME), ep("10.180.1.1", "other")])],
    )
    assert servers(local) == {"10.20.30.41:80/TCP": ["10.180.0.1:80"]}
    # No local endpoint: iTP=Local uses no cluster endpoints, so none at all.
    remote = plan([svc], [make_slice("ns1", "svc1", 1, [ep("10.180.1.1", "other")])])
    assert servers(remote) == {"10.20.30.41:80/TCP": []}
    assert (remote.no_local_endpoints_internal, remote.no_local_endpoints_external) == (1, 0)


def test_terminating_endpoints_used_only_without_ready_ones() -> None:
    eps = [
        ep("10.180.0.1", ready=False, serving=True, terminating=True),
        ep("10.180.0.2", ready=False, serving=False, terminating=True),
    ]
    p = plan([make_service("ns1", "svc1", "10.20.30.41")], [make_slice("ns1", "svc1", 1, eps)])
    assert servers(p) == {"10.20.30.41:80/TCP": ["10.180.0.1:80"]}
    eps.append(ep("10.180.0.3"))
    p = plan([make_service("ns1", "svc1", "10.20.30.41")], [make_slice("ns1", "svc1", 1, eps)])
    assert servers(p) == {"10.20.30.41:80/TCP": ["10.180.0.3:80"]}


# -- TestExternalIPs / TestOnlyLocalExternalIPs / TestAcceptIPVSTraffic -----------------


def test_external_ips() -> None:
    svc = make_service(
        "ns1",
        "svc1",
        "10.20.30.41",
        externalIPs=["50.60.70.81", "2012::51", "100.101.102.103"],
    )
    eps = [ep("10.180.0.1", NODE_NAME), ep("10.180.1.1", "other-node")]
    p = plan([svc], [make_slice("ns1", "svc1", 1, eps)], node_ips=["100.101.102.103"])
    assert servers(p) == {
        "10.20.30.41:80/TCP": ["10.180.0.1:80", "10.180.1.1:80"],
        "50.60.70.81:80/TCP": ["10.180.0.1:80", "10.180.1.1:80"],
        "100.101.102.103:80/TCP": ["10.180.0.1:80", "10.180.1.1:80"],
    }
    assert entries(p, "KUBE-EXTERNAL-IP") == ["50.60.70.81,tcp:80", "100.101.102.103,tcp:80"]
    # An external IP that is a node address stays where it is.
    assert p.bind_addresses == (ip("10.20.30.41"), ip("50.60.70.81"))
    assert entries(p, "KUBE-IPVS-IPS") == ["10.20.30.41", "50.60.70.81"]
    assert jumps(p, "KUBE-SERVICES") == [
        ("RETURN", ""),
        ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"),
        ("KUBE-MARK-MASQ", "KUBE-EXTERNAL-IP"),
        ("ACCEPT", "KUBE-EXTERNAL-IP"),
        ("ACCEPT", "KUBE-EXTERNAL-IP"),
        ("KUBE-NODE-PORT", ""),
        ("ACCEPT", "KUBE-CLUSTER-IP"),
    ]
    ext = chain(p, "KUBE-SERVICES")[3:5]
    assert ext[0].endswith(
        "KUBE-EXTERNAL-IP dst,dst -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL"
        " -j ACCEPT"
    )
    assert ext[1].endswith("KUBE-EXTERNAL-IP dst,dst -m addrtype --dst-type LOCAL -j ACCEPT")


def test_only_local_external_ips() -> None:
    svc = make_service(
        "ns1",
        "svc1",
        "10.20.30.41",
        type="NodePort",
        externalIPs=["50.60.70.81"],
        externalTrafficPolicy="Local",
    )
    eps = [ep("10.180.0.1", NODE_NAME), ep("10.180.1.1", "other-node")]
    p = plan([svc], [make_slice("ns1", "svc1", 1, eps)])
    assert servers(p)["50.60.70.81:80/TCP"] == ["10.180.0.1:80"]
    assert entries(p, "KUBE-EXTERNAL-IP") == []
    assert entries(p, "KUBE-EXTERNAL-IP-LOCAL") == ["50.60.70.81,tcp:80"]
    assert jumps(p, "KUBE-SERVICES") == [
        ("RETURN", ""),
        ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"),
        ("ACCEPT", "KUBE-EXTERNAL-IP-LOCAL"),
        ("ACCEPT", "KUBE-EXTERNAL-IP-LOCAL"),
        ("KUBE-NODE-PORT", ""),
        ("ACCEPT", "KUBE-CLUSTER-IP"),
    ]


# -- TestLoadBalancerSourceRanges ------------------------------------------------------

LB_SVC = make_service(
    "ns1",
    "svc1",
    "10.20.30.41",
    type="LoadBalancer",
    ingress=[{"ip": "1.2.3.4"}],
    loadBalancerSourceRanges=["10.0.0.0/8"],
)


def test_load_balancer_source_ranges() -> None:
    p = plan([LB_SVC], [make_slice("ns1", "svc1", 1, [ep("10.180.0.1")])])
    assert servers(p) == {
        "1.2.3.4:80/TCP": ["10.180.0.1:80"],
        "10.20.30.41:80/TCP": ["10.180.0.1:80"],
    }
    assert entries(p, "KUBE-LOAD-BALANCER") == ["1.2.3.4,tcp:80"]
    assert entries(p, "KUBE-LOAD-BALANCER-FW") == ["1.2.3.4,tcp:80"]
    assert entries(p, "KUBE-LOAD-BALANCER-SOURCE-CIDR") == ["1.2.3.4,tcp:80,10.0.0.0/8"]
    assert entries(p, "KUBE-LOAD-BALANCER-SOURCE-IP") == []
    assert jumps(p, "KUBE-SERVICES") == [
        ("RETURN", ""),
        ("KUBE-LOAD-BALANCER", "KUBE-LOAD-BALANCER"),
        ("KUBE-MARK-MASQ", "KUBE-CLUSTER-IP"),
        ("KUBE-NODE-PORT", ""),
        ("ACCEPT", "KUBE-CLUSTER-IP"),
        ("ACCEPT", "KUBE-LOAD-BALANCER"),
    ]
    assert jumps(p, "KUBE-PROXY-FIREWALL", "filter") == [
        ("KUBE-SOURCE-RANGES-FIREWALL", "KUBE-LOAD-BALANCER-FW")
    ]
    assert jumps(p, "KUBE-SOURCE-RANGES-FIREWALL", "filter") == [
        ("RETURN", "KUBE-LOAD-BALANCER-SOURCE-CIDR"),
        ("DROP", ""),
    ]
    # The node is outside every range: its own traffic to the VIP is dropped (#119656).
    assert chain(p, "KUBE-IPVS-OUT-FILTER", "filter") == [
        "-A KUBE-IPVS-OUT-FILTER -s 1.2.3.4 -m ipvs --vaddr 1.2.3.4 --vproto tcp --vport 80 -j DROP"
    ]


def test_load_balancer_source_ranges_containing_the_node() -> None:
    p = plan([LB_SVC], [], node_ip="10.1.2.3")
    assert entries(p, "KUBE-LOAD-BALANCER-SOURCE-IP") == ["1.2.3.4,tcp:80,1.2.3.4"]
    assert chain(p, "KUBE-IPVS-OUT-FILTER", "filter") == []
    assert jumps(p, "KUBE-SOURCE-RANGES-FIREWALL", "filter") == [
        ("RETURN", "KUBE-LOAD-BALANCER-SOURCE-CIDR"),
        ("RETURN", "KUBE-LOAD-BALANCER-SOURCE-IP"),
        ("DROP", ""),
    ]


def test_lb_ip_that_is_a_node_address_is_not_bound() -> None:
    svc = make_service(
        "ns1", "svc1", "10.20.30.41", type="LoadBalancer", ingress=[{"ip": "1.2.3.4"}]
    )
    p = plan([svc], [], node_ips=["1.2.3.4"], nodeport_ips=[])
    assert "1.2.3.4:80/TCP" in servers(p)
    assert p.bind_addresses == (ip("10.20.30.41"),)


def test_health_check_node_port() -> None:
    svc = make_service(
        "ns1",
        "svc1",
        "10.20.30.41",
        type="LoadBalancer",
        nodePort=3001,
        externalTrafficPolicy="Local",
        healthCheckNodePort=30000,
    )
    p = plan([svc], [], node_ips=["100.101.102.103"])
    assert entries(p, "KUBE-HEALTH-CHECK-NODE-PORT") == ["30000"]


# -- TestSessionAffinity / scheduler flags --------------------------------------------


def test_session_affinity() -> None:
    svc = make_service(
        "ns1",
        "svc1",
        "10.20.30.41",
        type="NodePort",
        nodePort=3001,
        externalIPs=["50.60.70.81"],
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 10800}},
    )
    p = plan([svc], [], node_ips=["100.101.102.103"])
    assert len(p.servers) == 3
    for planned in p.servers:
        assert planned.server.flags == ServiceFlags.PERSISTENT
        assert planned.server.timeout == 10800
    assert "-A -t 10.20.30.41:80 -s rr -p 10800\n" in p.render()


def test_mh_scheduler_sets_source_hash_flag() -> None:
    p = plan([make_service("ns1", "svc1", "10.20.30.41")], [], scheduler="mh")
    vs = p.servers[0].server
    assert (vs.scheduler, vs.flags) == ("mh", ServiceFlags.SCHED2)


# -- IPv6 ------------------------------------------------------------------------------


def test_ipv6_set_names_and_rules() -> None:
    assert kernel_set_name("KUBE-LOAD-BALANCER-SOURCE-CIDR", True) == (
        "KUBE-6-LOAD-BALANCER-SOURCE-CID"
    )
    from kproxy.proxy.endpoints import EndpointsChangeTracker, EndpointsMap
    from kproxy.proxy.services import ServiceChangeTracker, ServicePortMap

    st = ServiceChangeTracker("IPv6")
    st.update(None, make_service("ns1", "svc1", "2020::1", type="NodePort", nodePort=3001))
    et = EndpointsChangeTracker(NODE_NAME, "IPv6")
    et.endpoint_slice_update(
        make_slice("ns1", "svc1", 1, [ep("1002:ab8::2:10", NODE_NAME)], address_type="IPv6")
    )
    spm, em = ServicePortMap(), EndpointsMap()
    spm.update(st)
    em.update(et)
    p = plan_ipvs(spm, em, options(ipv6=True, node_ips=["2001:db8::1:1", "fe80::1", "10.0.0.1"]))
    assert servers(p) == {
        "[2001:db8::1:1]:3001/TCP": ["[1002:ab8::2:10]:80"],
        "[2020::1]:80/TCP": ["[1002:ab8::2:10]:80"],
    }
    assert p.servers[0].server.netmask == 128
    assert p.ipset("KUBE-CLUSTER-IP").name == "KUBE-6-CLUSTER-IP"
    assert entries(p, "KUBE-CLUSTER-IP") == ["2020::1,tcp:80"]
    assert entries(p, "KUBE-LOOP-BACK") == ["1002:ab8::2:10,tcp:80,1002:ab8::2:10"]
    assert p.ipset("KUBE-NODE-PORT-TCP").name == "KUBE-6-NODE-PORT-TCP"
    assert "-A KUBE-SERVICES -s ::1/128 -j RETURN\n" in p.restore
    assert "--match-set KUBE-6-IPVS-IPS dst -j REJECT" in p.restore
    text = p.render()
    assert "create KUBE-6-CLUSTER-IP hash:ip,port family inet6 hashsize 1024 maxelem 65536" in text
    assert "create KUBE-6-NODE-PORT-TCP bitmap:port range 0-65535" in text
    assert "2020::1/128\n" in text


# -- entries, options, sysctls, rendering ----------------------------------------------


def test_entry_strings() -> None:
    assert str(IPSetEntry("hash:ip", "10.96.0.10")) == "10.96.0.10"
    assert str(IPSetEntry("hash:ip,port", "10.96.0.10", 53, "udp")) == "10.96.0.10,udp:53"
    assert str(IPSetEntry("hash:ip,port,ip", "10.0.1.1", 80, "tcp", ip2="10.0.1.1")) == (
        "10.0.1.1,tcp:80,10.0.1.1"
    )
    assert str(IPSetEntry("hash:ip,port,net", "1.2.3.4", 80, "tcp", net="10.0.0.0/8")) == (
        "1.2.3.4,tcp:80,10.0.0.0/8"
    )
    assert str(IPSetEntry("bitmap:port", port=30080, protocol="tcp")) == "30080"


def test_every_set_is_planned_in_upstream_order() -> None:
    p = plan([], [])
    assert [s.base_name for s in p.ipsets] == [
        "KUBE-LOOP-BACK",
        "KUBE-CLUSTER-IP",
        "KUBE-EXTERNAL-IP",
        "KUBE-EXTERNAL-IP-LOCAL",
        "KUBE-LOAD-BALANCER",
        "KUBE-LOAD-BALANCER-FW",
        "KUBE-LOAD-BALANCER-LOCAL",
        "KUBE-LOAD-BALANCER-SOURCE-IP",
        "KUBE-LOAD-BALANCER-SOURCE-CIDR",
        "KUBE-NODE-PORT-TCP",
        "KUBE-NODE-PORT-LOCAL-TCP",
        "KUBE-NODE-PORT-UDP",
        "KUBE-NODE-PORT-LOCAL-UDP",
        "KUBE-NODE-PORT-SCTP-HASH",
        "KUBE-NODE-PORT-LOCAL-SCTP-HASH",
        "KUBE-HEALTH-CHECK-NODE-PORT",
        "KUBE-IPVS-IPS",
    ]
    assert [(j.table, j.source, j.chain) for j in p.jump_rules] == [
        ("nat", "OUTPUT", "KUBE-SERVICES"),
        ("nat", "PREROUTING", "KUBE-SERVICES"),
        ("nat", "POSTROUTING", "KUBE-POSTROUTING"),
        ("filter", "FORWARD", "KUBE-FORWARD"),
        ("filter", "INPUT", "KUBE-NODE-PORT"),
        ("filter", "INPUT", "KUBE-PROXY-FIREWALL"),
        ("filter", "FORWARD", "KUBE-PROXY-FIREWALL"),
        ("filter", "INPUT", "KUBE-IPVS-FILTER"),
        ("filter", "OUTPUT", "KUBE-IPVS-OUT-FILTER"),
    ]


def test_ipvs_options_from_config() -> None:
    cfg = ProxyConfig(
        cluster_cidrs=("10.0.0.0/8", "fd00::/48"),
        nodeport_addresses=("192.168.0.0/16",),
        ipvs_scheduler="lc",
        ipvs_exclude_cidrs=("172.16.0.0/12", "fd01::/64"),
        ipvs_strict_arp=True,
    )
    o = ipvs_options(cfg, node_name="n1", node_ips=("192.168.0.2", "10.1.0.5", "2001:db8::2"))
    assert o.masquerade_mark == "0x00004000"
    assert o.if_not_local == ("!", "-s", "10.0.0.0/8")
    assert o.node_ip == ip("192.168.0.2")
    assert o.node_ips == (ip("192.168.0.2"), ip("10.1.0.5"))
    assert o.nodeport_addresses() == (ip("192.168.0.2"),)
    assert o.scheduler == "lc"
    assert o.exclude_cidrs == (ipaddress.ip_network("172.16.0.0/12"),)
    p = plan_ipvs({}, {}, o)
    assert p.may_delete(VirtualServer(ip("10.96.0.1"), 443, IPProtocol.TCP))
    assert not p.may_delete(VirtualServer(ip("172.16.1.1"), 443, IPProtocol.TCP))
    assert not p.may_delete(VirtualServer(ip("2001:db8::1"), 443, IPProtocol.TCP))
    v6 = ipvs_options(cfg, node_name="n1", node_ips=("192.168.0.2", "2001:db8::2"), family="IPv6")
    assert v6.ipv6 and v6.node_ips == (ip("2001:db8::2"),)
    assert v6.if_not_local == ("!", "-s", "fd00::/48")


def test_sysctls() -> None:
    assert sysctls(IpvsOptions()) == (
        ("net/ipv4/vs/conntrack", 1),
        ("net/ipv4/vs/expire_nodest_conn", 1),
        ("net/ipv4/vs/expire_quiescent_template", 1),
        ("net/ipv4/ip_forward", 1),
    )
    old = dict(sysctls(IpvsOptions(strict_arp=True, kernel_version=(4, 19))))
    assert old["net/ipv4/vs/conn_reuse_mode"] == 0
    assert old["net/ipv4/conf/all/arp_ignore"] == 1
    assert old["net/ipv4/conf/all/arp_announce"] == 2
    assert "net/ipv4/vs/conn_reuse_mode" not in dict(sysctls(IpvsOptions(kernel_version=(6, 1))))
    assert plan([], [], udp_timeout=30).timeouts == (0, 0, 30)
    assert plan([], []).timeouts is None


def test_render_ipvs_is_deterministic() -> None:
    svcs = [
        make_service("ns2", "b", "10.20.30.42", type="NodePort", nodePort=3002),
        make_service("ns1", "a", "10.20.30.41", sessionAffinity="ClientIP"),
    ]
    slices = [
        make_slice("ns1", "a", 1, [ep("10.180.0.2"), ep("10.180.0.10")]),
        make_slice("ns2", "b", 1, [ep("10.180.0.3", NODE_NAME)]),
    ]
    spm, em = snapshot(svcs, slices)
    cfg = ProxyConfig(cluster_cidrs=("10.0.0.0/8",))
    text = render_ipvs(cfg, spm, em, node_name=NODE_NAME, node_ips=("192.168.0.2",))
    assert text == render_ipvs(cfg, spm, em, node_name=NODE_NAME, node_ips=("192.168.0.2",))
    head = text.split("# kube-ipvs0 addresses\n")[0]
    assert head == (
        "# ipvs (ipvsadm -S -n)\n"
        "-A -t 10.20.30.41:80 -s rr -p 10800\n"
        "-a -t 10.20.30.41:80 -r 10.180.0.10:80 -m -w 1\n"
        "-a -t 10.20.30.41:80 -r 10.180.0.2:80 -m -w 1\n"
        "-A -t 10.20.30.42:80 -s rr\n"
        "-a -t 10.20.30.42:80 -r 10.180.0.3:80 -m -w 1\n"
        "-A -t 192.168.0.2:3002 -s rr\n"
        "-a -t 192.168.0.2:3002 -r 10.180.0.3:80 -m -w 1\n"
    )
    assert "10.20.30.41/32\n10.20.30.42/32\n# ipsets (ipset save)\n" in text
    assert "add KUBE-LOOP-BACK 10.180.0.3,tcp:80,10.180.0.3\n" in text
    assert (
        '-t nat -I OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES\n'
        in text
    )
    assert text.endswith("COMMIT\n")
    assert "KUBE-CLUSTER-IP dst,dst ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ" in text


def test_plan_uses_kernel_value_types() -> None:
    p = plan(
        [make_service("ns1", "svc1", "10.20.30.41")],
        [make_slice("ns1", "svc1", 1, [ep("10.180.0.1")])],
    )
    assert p.server("10.20.30.41", 80).destinations == (RealServer(ip("10.180.0.1"), 80),)
    assert p.servers[0].kind == "cluster-ip"
    hash(p)  # frozen all the way down


# -- jump rules: one save says which are missing, the restore inserts them ---------------------


def test_missing_jumps_reads_iptables_save_output() -> None:
    save = (
        "*nat\n:PREROUTING ACCEPT [0:0]\n"
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES\n'
        "COMMIT\n*filter\n"
        # The same rule text in another table does not count for nat's OUTPUT.
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES\n'
        "COMMIT\n"
    )
    missing = missing_jumps(save)
    assert ("nat", "PREROUTING") not in {(j.table, j.source) for j in missing}
    assert [(j.table, j.source, j.chain) for j in missing][:2] == [
        ("nat", "OUTPUT", "KUBE-SERVICES"),
        ("nat", "POSTROUTING", "KUBE-POSTROUTING"),
    ]
    assert len(missing) == len(JUMP_RULES) - 1
    assert missing_jumps("") == JUMP_RULES


def test_with_jumps_inserts_before_each_tables_commit() -> None:
    text = "*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n*filter\n:KUBE-FORWARD - [0:0]\nCOMMIT\n"
    assert with_jumps(text, ()) == text
    nat_out, fwd = JUMP_RULES[0], JUMP_RULES[3]
    assert with_jumps(text, (fwd, nat_out)).splitlines() == [
        "*nat",
        ":KUBE-SERVICES - [0:0]",
        '-I OUTPUT 1 -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        "COMMIT",
        "*filter",
        ":KUBE-FORWARD - [0:0]",
        '-I FORWARD 1 -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        "COMMIT",
    ]
    with pytest.raises(ValueError, match="no \\*filter table"):
        with_jumps("*nat\nCOMMIT\n", (fwd,))
