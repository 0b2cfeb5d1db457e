"""Unit tests of the proxy core: service/endpoint translation, trackers, categorization."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import pytest

from kproxy.proxy.endpoints import EndpointsChangeTracker, EndpointsMap
from kproxy.proxy.services import ServiceChangeTracker, ServicePortMap, service_to_port_map
from kproxy.proxy.topology import categorize_endpoints
from kproxy.proxy.types import (
    EndpointInfo,
    NamespacedName,
    ServicePortInfo,
    ServicePortName,
    parse_cidr_sloppy,
    parse_ip_sloppy,
)
from tests.unit.proxy.goldens import make_service, make_slice

SPN = ServicePortName("ns1", "svc1", "p80", "TCP")


def test_service_port_name_string() -> None:
    assert str(SPN) == "ns1/svc1:p80"
    assert str(ServicePortName("ns1", "svc1", "", "TCP")) == "ns1/svc1"
    assert SPN.service == NamespacedName("ns1", "svc1")


def test_sloppy_parsing() -> None:
    assert str(parse_ip_sloppy("010.001.002.003")) == "10.1.2.3"
    assert str(parse_ip_sloppy("::ffff:1.2.3.4")) == "1.2.3.4"
    assert parse_ip_sloppy("1.2.3") is None
    assert parse_ip_sloppy(" 1.2.3.4") is None
    assert parse_ip_sloppy("bad") is None
    assert str(parse_cidr_sloppy("10.0.0.1/8")) == "10.0.0.0/8"
    assert parse_cidr_sloppy("10.0.0.0/33") is None
    assert parse_cidr_sloppy("10.0.0.0") is None


def test_endpoint_string() -> None:
    assert str(EndpointInfo("10.0.0.1", 80)) == "10.0.0.1:80"
    assert str(EndpointInfo("2001:db8::1", 80)) == "[2001:db8::1]:80"


def test_service_to_port_map_lb_local() -> None:
    svc = make_service(
        "ns2",
        "svc2",
        "172.30.0.42",
        type="LoadBalancer",
        nodePort=3001,
        externalTrafficPolicy="Local",
        healthCheckNodePort=30000,
        externalIPs=["192.168.99.22", "2001:db8::9", "bad"],
        ingress=[{"ip": "1.2.3.4"}, {"ip": "9.10.11.12", "ipMode": "Proxy"}],
        loadBalancerSourceRanges=[" 203.0.113.0/25", "nope", "2001:db8::/64"],
    )
    ports = service_to_port_map(svc)
    assert ports is not None
    info = ports[ServicePortName("ns2", "svc2", "p80", "TCP")]
    assert info.cluster_ip == ipaddress.IPv4Address("172.30.0.42")
    assert [str(i) for i in info.external_ips] == ["192.168.99.22"]
    assert [str(i) for i in info.load_balancer_vips] == ["1.2.3.4"]
    assert [str(c) for c in info.load_balancer_source_ranges] == ["203.0.113.0/25"]
    assert info.external_policy_local and not info.internal_policy_local
    assert info.health_check_node_port == 30000
    assert info.node_port == 3001


def test_health_check_port_only_for_lb_local() -> None:
    svc = make_service(
        "ns5",
        "svc5",
        "172.30.0.45",
        type="LoadBalancer",
        healthCheckNodePort=30000,
        externalTrafficPolicy="Cluster",
    )
    ports = service_to_port_map(svc)
    assert ports is not None
    assert all(i.health_check_node_port == 0 for i in ports.values())


def test_external_policy_ignored_when_not_externally_accessible() -> None:
    ports = service_to_port_map(make_service("a", "b", "172.30.0.1", externalTrafficPolicy="Local"))
    assert ports is not None and not any(i.external_policy_local for i in ports.values())


def test_affinity_timeout() -> None:
    svc = make_service(
        "a",
        "b",
        "172.30.0.1",
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 10800}},
    )
    ports = service_to_port_map(svc)
    assert ports is not None
    (info,) = ports.values()
    assert info.session_affinity_client_ip and info.sticky_max_age_seconds == 10800


@pytest.mark.parametrize("cluster_ip", ["None", "", None])
def test_headless_skipped(cluster_ip: Any) -> None:
    svc = make_service("a", "b", "x")
    svc["spec"]["clusterIP"] = cluster_ip
    assert service_to_port_map(svc) is None


def test_external_name_and_other_family_skipped() -> None:
    assert service_to_port_map(make_service("a", "b", "172.30.0.1", type="ExternalName")) is None
    assert service_to_port_map(make_service("a", "b", "fd00::1")) is None
    assert service_to_port_map(make_service("a", "b", "fd00::1"), "IPv6") is not None


def test_dual_stack_cluster_ips() -> None:
    svc = make_service("a", "b", "172.30.0.1")
    svc["spec"]["ipFamilies"] = ["IPv6", "IPv4"]
    svc["spec"]["clusterIPs"] = ["fd00::1", "172.30.0.1"]
    v4 = service_to_port_map(svc, "IPv4")
    v6 = service_to_port_map(svc, "IPv6")
    assert v4 is not None and v6 is not None
    assert str(next(iter(v4.values())).cluster_ip) == "172.30.0.1"
    assert str(next(iter(v6.values())).cluster_ip) == "fd00::1"


def test_bad_service_logged_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    svc = make_service("bad", "svc", "172.30.0.1")
    svc["spec"]["ports"] = [
        {"name": "a", "port": 99999},
        {"name": "b", "port": 80, "protocol": "ICMP"},
        {"name": "c", "port": "80"},
        {"name": "ok", "port": 81},
    ]
    ports = service_to_port_map(svc)
    assert ports is not None
    assert [p.port for p in ports] == ["ok"]
    assert "bad/svc" in caplog.text
    assert service_to_port_map(make_service("bad", "ip", "300.1.1.1")) is None
    assert service_to_port_map({"metadata": {"name": "x"}, "spec": "junk"}) is None


def test_service_tracker_cancel_out() -> None:
    tracker = ServiceChangeTracker()
    svc = make_service("ns1", "svc1", "172.30.0.41")
    assert tracker.update(None, svc)
    assert not tracker.update(svc, None)  # add then delete: nothing pending
    assert tracker.pending == 0
    spm = ServicePortMap()
    assert spm.update(tracker).updated_services == frozenset()


def test_service_tracker_update_and_delete() -> None:
    tracker = ServiceChangeTracker()
    spm = ServicePortMap()
    a = make_service("ns1", "svc1", "172.30.0.41")
    b = make_service("ns2", "svc2", "172.30.0.42")
    tracker.update(None, a)
    tracker.update(None, b)
    assert spm.update(tracker).updated_services == {
        NamespacedName("ns1", "svc1"),
        NamespacedName("ns2", "svc2"),
    }
    assert len(spm) == 2
    # A no-op update cancels out; a real change is reported.
    assert not tracker.update(a, make_service("ns1", "svc1", "172.30.0.41"))
    a2 = make_service("ns1", "svc1", "172.30.0.41", port=8080)
    assert tracker.update(a, a2)
    tracker.update(b, None)
    result = spm.update(tracker)
    assert result.updated_services == {NamespacedName("ns1", "svc1"), NamespacedName("ns2", "svc2")}
    assert [i.port for i in spm.values()] == [8080]
    # A changed then restored service is not pending.
    tracker.update(a2, a)
    tracker.update(a, a2)
    assert tracker.pending == 0


def test_port_rename_replaces_port() -> None:
    tracker = ServiceChangeTracker()
    spm = ServicePortMap()
    a = make_service("ns1", "svc1", "172.30.0.41")
    tracker.update(None, a)
    spm.update(tracker)
    a2 = make_service("ns1", "svc1", "172.30.0.41", port_name="http")
    tracker.update(a, a2)
    spm.update(tracker)
    assert list(spm) == [ServicePortName("ns1", "svc1", "http", "TCP")]


def test_endpoints_merged_deduplicated_sorted() -> None:
    tracker = EndpointsChangeTracker("test-node")
    em = EndpointsMap()
    s1 = make_slice(
        "ns1", "svc1", 1, [{"addresses": ["10.180.0.2"]}, {"addresses": ["10.180.0.10"]}]
    )
    s2 = make_slice(
        "ns1",
        "svc1",
        2,
        [
            {"addresses": ["10.180.0.2"], "nodeName": "test-node"},
            {"addresses": ["10.180.0.1"], "conditions": {"ready": False}},
        ],
    )
    assert tracker.endpoint_slice_update(s1)
    assert tracker.endpoint_slice_update(s2)
    result = em.update(tracker)
    assert result.updated_services == {NamespacedName("ns1", "svc1")}
    assert not result.conntrack_cleanup_required
    eps = em[SPN]
    assert [str(e) for e in eps] == ["10.180.0.10:80", "10.180.0.1:80", "10.180.0.2:80"]
    assert eps[2].is_local and eps[2].node_name == "test-node"
    assert not eps[1].ready and eps[1].serving and not eps[1].terminating
    assert em.local_ready_endpoints() == {NamespacedName("ns1", "svc1"): 1}


def test_endpoint_slice_cancel_out_and_removal() -> None:
    tracker = EndpointsChangeTracker("test-node")
    em = EndpointsMap()
    s1 = make_slice("ns1", "svc1", 1, [{"addresses": ["10.180.0.1"]}])
    tracker.endpoint_slice_update(s1)
    em.update(tracker)
    assert not tracker.endpoint_slice_update(s1)  # same as applied
    s1b = make_slice("ns1", "svc1", 1, [{"addresses": ["10.180.0.9"]}])
    assert tracker.endpoint_slice_update(s1b)
    assert tracker.endpoint_slice_update(s1)  # back to the applied value: still staged
    assert em.update(tracker).updated_services == {NamespacedName("ns1", "svc1")}
    assert [str(e) for e in em[SPN]] == ["10.180.0.1:80"]
    assert tracker.endpoint_slice_update(s1, remove=True)
    em.update(tracker)
    assert SPN not in em
    # Removing an unknown slice is no change.
    assert not tracker.endpoint_slice_update(make_slice("x", "y", 1, []), remove=True)


def test_endpoint_slice_bad_input_ignored() -> None:
    tracker = EndpointsChangeTracker("n")
    es = make_slice("ns1", "svc1", 1, [{"addresses": ["10.180.0.1"]}])
    del es["metadata"]["labels"]
    assert not tracker.endpoint_slice_update(es)
    fqdn = make_slice("ns1", "svc1", 1, [{"addresses": ["a.example"]}])
    fqdn["addressType"] = "FQDN"
    assert not tracker.endpoint_slice_update(fqdn)
    mixed = make_slice(
        "ns1",
        "svc1",
        1,
        [{"addresses": ["fd00::1"]}, {"addresses": []}, {"addresses": ["10.1.2.3"]}],
    )
    mixed["ports"].append({"port": 81, "protocol": "TCP"})  # no name: ignored as upstream
    tracker.endpoint_slice_update(mixed)
    em = EndpointsMap()
    em.update(tracker)
    assert {str(k): [str(e) for e in v] for k, v in em.items()} == {"ns1/svc1:p80": ["10.1.2.3:80"]}


def test_udp_change_requires_conntrack_cleanup() -> None:
    tracker = EndpointsChangeTracker("n")
    es = make_slice("ns1", "dns", 1, [{"addresses": ["10.180.0.1"]}], protocol="UDP")
    tracker.endpoint_slice_update(es)
    assert EndpointsMap().update(tracker).conntrack_cleanup_required


def _info(**kw: Any) -> ServicePortInfo:
    return ServicePortInfo(cluster_ip=ipaddress.IPv4Address("172.30.0.1"), port=80, **kw)


def _eps(*specs: tuple[str, bool, bool, bool, bool]) -> tuple[EndpointInfo, ...]:
    return tuple(
        EndpointInfo(ip, 80, ready=r, serving=s, terminating=t, is_local=loc)
        for ip, r, s, t, loc in specs
    )


def test_categorize_cluster_ready_and_fallback() -> None:
    eps = _eps(("10.0.0.1", True, True, False, False), ("10.0.0.2", False, True, True, True))
    c = categorize_endpoints(eps, _info(), "n")
    assert [e.ip for e in c.cluster] == ["10.0.0.1"] and c.has_any
    assert c.all_reachable == c.cluster and c.local == ()
    only_term = _eps(
        ("10.0.0.2", False, True, True, False), ("10.0.0.3", False, False, True, False)
    )
    c = categorize_endpoints(only_term, _info(), "n")
    assert [e.ip for e in c.cluster] == ["10.0.0.2"] and c.has_any
    none = _eps(("10.0.0.3", False, False, False, False))
    assert categorize_endpoints(none, _info(), "n") == categorize_endpoints((), _info(), "n")


def test_categorize_internal_local() -> None:
    eps = _eps(("10.0.0.1", True, True, False, False), ("10.0.0.2", True, True, False, True))
    c = categorize_endpoints(eps, _info(internal_policy_local=True), "n")
    assert c.cluster == () and [e.ip for e in c.local] == ["10.0.0.2"]
    assert c.all_reachable == c.local and c.has_any
    remote = _eps(("10.0.0.1", True, True, False, False))
    c = categorize_endpoints(remote, _info(internal_policy_local=True), "n")
    assert c.local == () and c.has_any and c.all_reachable == ()


def test_categorize_external_local_with_terminating_local() -> None:
    eps = _eps(("10.0.0.1", True, True, False, False), ("10.0.0.2", False, True, True, True))
    svc = _info(external_policy_local=True, node_port=3001)
    c = categorize_endpoints(eps, svc, "n")
    assert [e.ip for e in c.cluster] == ["10.0.0.1"]
    assert [e.ip for e in c.local] == ["10.0.0.2"]
    assert [e.ip for e in c.all_reachable] == ["10.0.0.1", "10.0.0.2"]


def test_categorize_zone_hints() -> None:
    a = EndpointInfo("10.0.0.1", 80, zone_hints=frozenset({"z1"}))
    b = EndpointInfo("10.0.0.2", 80, zone_hints=frozenset({"z2"}))
    labels = {"topology.kubernetes.io/zone": "z2"}
    assert [e.ip for e in categorize_endpoints((a, b), _info(), "n", labels).cluster] == [
        "10.0.0.2"
    ]
    # Hints for another zone only: ignore topology.
    labels = {"topology.kubernetes.io/zone": "z3"}
    assert len(categorize_endpoints((a, b), _info(), "n", labels).cluster) == 2
    # Node hints win when every endpoint has one (PreferSameNode).
    a2 = EndpointInfo("10.0.0.1", 80, node_hints=frozenset({"n"}))
    b2 = EndpointInfo("10.0.0.2", 80, node_hints=frozenset({"m"}))
    assert [e.ip for e in categorize_endpoints((a2, b2), _info(), "n").cluster] == ["10.0.0.1"]
    off = categorize_endpoints((a2, b2), _info(), "n", prefer_same_node=False)
    assert len(off.cluster) == 2
