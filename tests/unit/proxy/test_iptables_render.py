"""Golden tests of the iptables renderer against upstream kube-proxy's rules."""

from __future__ import annotations

from typing import Any

import pytest

from kproxy.proxy.endpoints import EndpointsChangeTracker, EndpointsMap
from kproxy.proxy.iptables import IPTablesRenderer, LocalDetector, masquerade_mark
from kproxy.proxy.iptables.chains import JUMP_CHAINS, Probabilities, compute_probability
from kproxy.proxy.services import ServiceChangeTracker, ServicePortMap
from tests.unit.proxy import golden_dumps as G
from tests.unit.proxy.goldens import (
    NODE_NAME,
    make_service,
    make_slice,
    overall_objects,
    snapshot,
    sort_iptables_rules,
    test_options,
)


def render(services: list[dict[str, Any]], slices: list[dict[str, Any]], **opts: Any) -> str:
    spm, em = snapshot(services, slices)
    return IPTablesRenderer(test_options(**opts)).render(spm, em, full=True).text


def rules(text: str) -> list[str]:
    return text.splitlines()


def test_overall_matches_upstream_golden() -> None:
    text = render(*overall_objects())
    assert sort_iptables_rules(text) == G.UPSTREAM_OVERALL_SORTED


def test_overall_exact_emission_order() -> None:
    assert render(*overall_objects()) == G.OVERALL


def test_overall_counts() -> None:
    spm, em = snapshot(*overall_objects())
    r = IPTablesRenderer(test_options()).render(spm, em, full=True)
    nat = [line for line in G.OVERALL.split("*nat\n")[1].splitlines() if line.startswith("-A")]
    assert r.nat_rules == r.nat_rules_total == r.nat_rules_last == len(nat) == 55
    assert r.filter_rules == 10 and r.filter_chains == 6 and r.nat_chains == 20
    assert r.no_local_endpoints_external == 1 and r.no_local_endpoints_internal == 0
    assert not r.large_cluster_mode and r.total_endpoints == 6


def test_partial_sync_steps() -> None:
    st, et = ServiceChangeTracker(), EndpointsChangeTracker(NODE_NAME)
    spm, em = ServicePortMap(), EndpointsMap()
    r = IPTablesRenderer(
        test_options(nfacct_ct_state_invalid=False, nfacct_localhost_nodeports=False)
    )
    a = make_service("ns1", "svc1", "172.30.0.41")
    b = make_service("ns2", "svc2", "172.30.0.42")
    st.update(None, a)
    st.update(None, b)
    et.endpoint_slice_update(make_slice("ns1", "svc1", 1, [{"addresses": ["10.0.1.1"]}]))
    et.endpoint_slice_update(make_slice("ns2", "svc2", 1, [{"addresses": ["10.0.2.1"]}]))

    def sync(full: bool, existing: Any) -> Any:
        changed = spm.update(st).updated_services | em.update(et).updated_services
        return r.render(spm, em, changed, full=full, existing_nat_chains=existing)

    r1 = sync(True, ())
    assert r1.text == G.PARTIAL_STEP1
    # Step 2: add a Service; only its chains are written.
    st.update(None, make_service("ns3", "svc3", "172.30.0.43"))
    et.endpoint_slice_update(make_slice("ns3", "svc3", 1, [{"addresses": ["10.0.3.1"]}]))
    r2 = sync(False, r1.active_nat_chains)
    assert r2.text == G.PARTIAL_STEP2
    assert (r2.nat_rules, r2.skipped_nat_rules, r2.nat_rules_total) == (12, 8, 20)
    # Step 3: delete a Service; its chains are flushed and deleted.
    st.update(b, None)
    r3 = sync(False, r2.active_nat_chains)
    assert r3.text == G.PARTIAL_STEP3
    assert "-X KUBE-SVC-GNZBNJ2PO5MGZ6GT" in rules(r3.text)
    assert (r3.deleted_chains, r3.nat_rules_last, r3.nat_rules_total) == (2, 7, 15)
    # Step 4: an endpoint change rewrites only that Service's chains.
    et.endpoint_slice_update(
        make_slice("ns1", "svc1", 1, [{"addresses": ["10.0.1.1"]}, {"addresses": ["10.0.1.2"]}])
    )
    r4 = sync(False, r3.active_nat_chains)
    assert r4.text == G.PARTIAL_STEP4
    # Step 5: nothing changed; only the top-level chains and filter rules.
    r5 = sync(False, r4.active_nat_chains)
    assert r5.text == G.PARTIAL_STEP5
    assert r5.skipped_nat_rules == 11 and r5.nat_rules_total == 18
    # A full sync of the same state writes everything the partial ones skipped.
    full = r.render(spm, em, frozenset(), full=True, existing_nat_chains=r5.active_nat_chains)
    assert full.nat_rules == r5.nat_rules_total and full.deleted_chains == 0


def test_stale_chains_only_service_chains_deleted_and_none_skips() -> None:
    spm, em = snapshot([], [])
    r = IPTablesRenderer(test_options())
    existing = [
        "KUBE-SVC-AAAA",
        "KUBE-SEP-BBBB",
        "KUBE-MARK-MASQ",
        "DOCKER",
        "KUBE-FW-C",
        "KUBE-EXT-D",
        "KUBE-SVL-E",
        "KUBE-XLB-OLD",
    ]
    text = r.render(spm, em, existing_nat_chains=existing).text
    nat = text.split("*nat\n")[1]
    for chain in ("KUBE-EXT-D", "KUBE-FW-C", "KUBE-SEP-BBBB", "KUBE-SVC-AAAA", "KUBE-SVL-E"):
        assert f":{chain} - [0:0]" in nat and f"-X {chain}" in nat
    assert "DOCKER" not in nat and "KUBE-XLB-OLD" not in nat
    assert "-X" not in r.render(spm, em, existing_nat_chains=None).text


def test_probabilities() -> None:
    p = Probabilities()
    assert [p(2), p(3), p(10)] == ["0.5000000000", "0.3333333333", "0.1000000000"]
    assert compute_probability(100001) == "0.0000099999"
    eps = [{"addresses": [f"10.180.0.{i}"]} for i in range(1, 5)]
    text = render([make_service("ns1", "svc1", "172.30.0.41")], [make_slice("ns1", "svc1", 1, eps)])
    svc = [
        r
        for r in rules(text)
        if r.startswith('-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 ->')
    ]
    assert [r.split("--probability ")[1].split()[0] if "statistic" in r else None for r in svc] == [
        "0.2500000000",
        "0.3333333333",
        "0.5000000000",
        None,
    ]


def test_endpoints_sorted_as_strings() -> None:
    eps = [{"addresses": ["10.180.0.2"]}, {"addresses": ["10.180.0.10"]}]
    text = render([make_service("ns1", "svc1", "172.30.0.41")], [make_slice("ns1", "svc1", 1, eps)])
    order = [r.split("-> ")[1].split('"')[0] for r in rules(text) if "-> " in r]
    assert order == ["10.180.0.10:80", "10.180.0.2:80"]


def test_masquerade_mark_and_random_fully() -> None:
    assert masquerade_mark() == "0x00004000"
    assert masquerade_mark(0) == "0x00000001" and masquerade_mark(31) == "0x80000000"
    with pytest.raises(ValueError):
        masquerade_mark(32)
    text = render([], [], masquerade_mark=masquerade_mark(), random_fully=True)
    assert rules(text)[-4:-1] == [
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT"'
        " -j MASQUERADE --random-fully",
        "-A KUBE-MARK-MASQ -j MARK --or-mark 0x00004000",
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be'
        ' the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS',
    ]
    assert "-A KUBE-POSTROUTING -m mark ! --mark 0x00004000/0x00004000 -j RETURN" in rules(text)


def test_forward_rules_be_liberal_and_no_localhost_nodeports() -> None:
    text = render([], [], conntrack_tcp_be_liberal=True, localhost_nodeports=False)
    assert "INVALID" not in text and "KUBE-FIREWALL" not in text
    assert (
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must'
        ' be the last rule in this chain" -m addrtype --dst-type LOCAL ! -d 127.0.0.0/8'
        " -j KUBE-NODEPORTS"
    ) in rules(text)
    text = render([], [], nfacct_ct_state_invalid=False)
    assert "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP" in rules(text)


def test_nodeport_addresses() -> None:
    text = render([], [], nodeport_ips=("192.168.0.2", "127.0.0.1"), localhost_nodeports=False)
    tail = [r for r in rules(text) if "must be the last rule" in r]
    assert tail == [
        '-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: '
        'this must be the last rule in this chain" -d 192.168.0.2 -j KUBE-NODEPORTS'
    ]


def test_ipv6_tail_and_no_kubelet_firewall() -> None:
    text = render([], [], ipv6=True, local_detector=LocalDetector.by_cidr("fd00:10::/64"))
    assert "KUBE-FIREWALL" not in text
    assert any(r.endswith("--dst-type LOCAL ! -d ::1/128 -j KUBE-NODEPORTS") for r in rules(text))


def _local_svc(**spec: Any) -> dict[str, Any]:
    return make_service(
        "ns1",
        "svc1",
        "172.30.0.41",
        type="LoadBalancer",
        nodePort=3001,
        ingress=[{"ip": "1.2.3.4"}],
        **spec,
    )


def test_external_traffic_policy_local_with_local_endpoint() -> None:
    svc = _local_svc(externalTrafficPolicy="Local", healthCheckNodePort=30000)
    es = make_slice(
        "ns1",
        "svc1",
        1,
        [
            {"addresses": ["10.180.0.1"], "nodeName": NODE_NAME},
            {"addresses": ["10.180.0.2"], "nodeName": "other"},
        ],
    )
    r = rules(render([svc], [es]))
    h = "XPGD46QRK7WJZT7O"
    assert f":KUBE-SVL-{h} - [0:0]" in r and f":KUBE-SVC-{h} - [0:0]" in r
    assert f"-A KUBE-EXT-{h} -j KUBE-SVL-{h}" in r
    sep = "KUBE-SEP-SXIVWICOYRO3J4NJ"
    assert f'-A KUBE-SVL-{h} -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j {sep}' in r
    assert (
        '-A KUBE-NODEPORTS -m comment --comment "ns1/svc1:p80 health check node port"'
        " -m tcp -p tcp --dport 30000 -j ACCEPT"
    ) in r
    assert not any("KUBE-EXTERNAL-SERVICES -m" in x for x in r)


def test_internal_traffic_policy_local_without_local_endpoints() -> None:
    svc = make_service("ns1", "svc1", "172.30.0.41", internalTrafficPolicy="Local")
    es = make_slice("ns1", "svc1", 1, [{"addresses": ["10.180.0.2"], "nodeName": "other"}])
    text = render([svc], [es])
    assert (
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 has no local endpoints"'
        " -m tcp -p tcp -d 172.30.0.41 --dport 80 -j DROP"
    ) in rules(text)
    assert "KUBE-SVC-" not in text and "KUBE-SEP-" not in text


def test_internal_traffic_policy_local_with_local_endpoint() -> None:
    svc = make_service("ns1", "svc1", "172.30.0.41", internalTrafficPolicy="Local")
    es = make_slice("ns1", "svc1", 1, [{"addresses": ["10.180.0.1"], "nodeName": NODE_NAME}])
    r = rules(render([svc], [es]))
    assert (
        '-A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp'
        " -d 172.30.0.41 --dport 80 -j KUBE-SVL-XPGD46QRK7WJZT7O"
    ) in r
    assert (
        '-A KUBE-SVL-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp'
        " -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ"
    ) in r


def test_no_endpoints_reject_everywhere() -> None:
    svc = _local_svc(externalIPs=["192.168.99.11"])
    r = [x for x in rules(render([svc], [])) if "has no endpoints" in x]
    c = '-m comment --comment "ns1/svc1:p80 has no endpoints"'
    assert r == [
        f"-A KUBE-SERVICES {c} -m tcp -p tcp -d 172.30.0.41 --dport 80 -j REJECT",
        f"-A KUBE-EXTERNAL-SERVICES {c} -m tcp -p tcp -d 192.168.99.11 --dport 80 -j REJECT",
        f"-A KUBE-EXTERNAL-SERVICES {c} -m tcp -p tcp -d 1.2.3.4 --dport 80 -j REJECT",
        f"-A KUBE-EXTERNAL-SERVICES {c} -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001"
        " -j REJECT",
    ]


def test_source_ranges_including_node_ip() -> None:
    svc = _local_svc(loadBalancerSourceRanges=["192.168.0.0/24", "203.0.113.0/25"])
    es = make_slice("ns1", "svc1", 1, [{"addresses": ["10.180.0.1"]}])
    r = [x for x in rules(render([svc], [es])) if x.startswith("-A KUBE-FW-")]
    head = '-A KUBE-FW-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 loadbalancer IP"'
    assert r == [
        f"{head} -s 192.168.0.0/24 -j KUBE-EXT-XPGD46QRK7WJZT7O",
        f"{head} -s 203.0.113.0/25 -j KUBE-EXT-XPGD46QRK7WJZT7O",
        f"{head} -s 1.2.3.4 -j KUBE-EXT-XPGD46QRK7WJZT7O",
        '-A KUBE-FW-XPGD46QRK7WJZT7O -m comment --comment "other traffic to ns1/svc1:p80 will be'
        ' dropped by KUBE-PROXY-FIREWALL"',
    ]


def test_masquerade_all_and_noop_detector() -> None:
    svc = make_service("ns1", "svc1", "172.30.0.41")
    es = make_slice("ns1", "svc1", 1, [{"addresses": ["10.180.0.1"]}])
    r = rules(render([svc], [es], masquerade_all=True))
    assert (
        '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp'
        " -p tcp -d 172.30.0.41 --dport 80 -j KUBE-MARK-MASQ"
    ) in r
    r = rules(render([svc], [es], local_detector=LocalDetector()))
    assert not any("cluster IP" in x and "KUBE-MARK-MASQ" in x for x in r)


def test_bad_ips_dropped() -> None:
    svc = make_service(
        "ns1",
        "svc1",
        "172.30.0.41",
        type="LoadBalancer",
        nodePort=3001,
        externalIPs=["192.168.99.11", "bad", "2001:db8::1", ""],
        loadBalancerSourceRanges=["203.0.113.0/25", "bad/33", "2001:db8::/64"],
        ingress=[{"ip": "1.2.3.4"}, {"ip": "2001:db8::2"}, {"ip": "5.6.7.8", "ipMode": "Proxy"}],
    )
    es = make_slice("ns1", "svc1", 1, [{"addresses": ["10.180.0.1"]}])
    text = render([svc], [es])
    assert "bad" not in text and "2001:db8" not in text and "5.6.7.8" not in text
    assert "-d 192.168.99.11" in text and "-d 1.2.3.4" in text and "-s 203.0.113.0/25" in text


def test_large_cluster_mode_drops_endpoint_comments() -> None:
    eps = [{"addresses": [f"10.{i // 250}.{i % 250}.1"]} for i in range(1001)]
    svc = make_service(
        "ns1",
        "svc1",
        "172.30.0.41",
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
    )
    spm, em = snapshot([svc], [make_slice("ns1", "svc1", 1, eps)])
    res = IPTablesRenderer(test_options()).render(spm, em)
    assert res.large_cluster_mode and res.total_endpoints == 1001
    r = rules(res.text)
    sep = [x for x in r if x.startswith("-A KUBE-SEP-")]
    assert len(sep) == 2002 and not any("comment" in x for x in sep)
    svc_rules = [x for x in r if x.startswith("-A KUBE-SVC-")]
    assert svc_rules[0].endswith("! -s 10.0.0.0/8 -j KUBE-MARK-MASQ")
    assert "comment" in svc_rules[0]
    assert not any("comment" in x for x in svc_rules[1:])
    assert "--rcheck --seconds 60 --reap" in svc_rules[1]
    assert "--probability 0.0009990010" in svc_rules[1 + 1001]


def test_jump_chains_data() -> None:
    assert len(JUMP_CHAINS) == 12
    assert JUMP_CHAINS[0].rule_args() == (
        "-m",
        "conntrack",
        "--ctstate",
        "NEW",
        "-m",
        "comment",
        "--comment",
        "kubernetes externally-visible service portals",
        "-j",
        "KUBE-EXTERNAL-SERVICES",
    )
