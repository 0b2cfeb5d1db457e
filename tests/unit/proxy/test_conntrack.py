"""Stale UDP flow selection (upstream cleanup.go) and the reconciler, on the fake."""

from __future__ import annotations

import errno
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from ipaddress import ip_address

import pytest

from kproxy.kernel.conntrack import IPPROTO_TCP, IPPROTO_UDP, ConntrackError, Flow
from kproxy.kernel.fakes.conntrack import FakeConntrack
from kproxy.proxy.conntrack import ConntrackReconciler, stale_udp_flows
from kproxy.proxy.core import Snapshot
from kproxy.proxy.endpoints import EndpointsMap
from kproxy.proxy.metrics import ProxyMetrics
from kproxy.proxy.services import ServicePortMap
from kproxy.proxy.types import EndpointInfo, IPAddress, ServicePortInfo, ServicePortName

CLIENT = "10.180.0.9"
NODE = "192.168.0.2"
DNS = ServicePortName("kube-system", "dns", "dns", "UDP")
DNS_TCP = ServicePortName("kube-system", "dns", "dns-tcp", "TCP")
STATSD = ServicePortName("ns", "statsd", "", "UDP")

SERVICES = {
    DNS: ServicePortInfo(
        ip_address("10.96.0.10"),
        53,
        "UDP",
        node_port=30053,
        external_ips=(ip_address("203.0.113.7"),),
        load_balancer_vips=(ip_address("198.51.100.1"),),
    ),
    DNS_TCP: ServicePortInfo(ip_address("10.96.0.10"), 53, "TCP", node_port=30054),
    STATSD: ServicePortInfo(ip_address("10.96.0.20"), 8125, "UDP"),
}


def ep(
    ip: str, port: int = 53, *, ready: bool = True, serving: bool = True, is_local: bool = False
) -> EndpointInfo:
    return EndpointInfo(ip, port, ready=ready, serving=serving, is_local=is_local)


def flow(
    sport: int, dst: str, dport: int, endpoint: str, eport: int = 53, proto: int = IPPROTO_UDP
) -> Flow:
    return Flow.dnat(proto, (CLIENT, sport), (dst, dport), (endpoint, eport))


def stale(
    eps: Mapping[ServicePortName, Sequence[EndpointInfo]],
    flows: Iterable[Flow],
    node_ips: Collection[IPAddress] | None = None,
) -> list[Flow]:
    return stale_udp_flows(SERVICES, eps, list(flows), node_ips)


# -- which flows -----------------------------------------------------------------------


def test_flows_to_a_serving_endpoint_are_kept_others_are_stale() -> None:
    eps = {DNS: (ep("10.180.0.1"), ep("10.180.0.2"))}
    keep = [flow(1, "10.96.0.10", 53, "10.180.0.1"), flow(2, "10.96.0.10", 53, "10.180.0.2")]
    gone = [flow(3, "10.96.0.10", 53, "10.180.0.3")]
    assert stale(eps, [*keep, *gone]) == gone


@pytest.mark.parametrize("frontend", ["10.96.0.10", "203.0.113.7", "198.51.100.1"])
def test_every_service_ip_is_a_frontend(frontend: str) -> None:
    eps = {DNS: (ep("10.180.0.1"),)}
    f = flow(1, frontend, 53, "10.180.0.3")
    assert stale(eps, [f, flow(2, frontend, 53, "10.180.0.1")]) == [f]


def test_the_port_must_match_the_service_port() -> None:
    eps = {DNS: (ep("10.180.0.1"),)}
    assert stale(eps, [flow(1, "10.96.0.10", 54, "10.180.0.3")]) == []


def test_serving_counts_not_ready() -> None:
    # A terminating endpoint that still serves keeps its flows (upstream: IsServing).
    eps = {
        DNS: (
            ep("10.180.0.1", ready=False, serving=True),
            ep("10.180.0.2", ready=False, serving=False),
        )
    }
    serving = flow(1, "10.96.0.10", 53, "10.180.0.1")
    not_serving = flow(2, "10.96.0.10", 53, "10.180.0.2")
    assert stale(eps, [serving, not_serving]) == [not_serving]


def test_traffic_policy_and_locality_do_not_matter() -> None:
    eps = {DNS: (ep("10.180.0.1", is_local=False),)}
    services = {
        DNS: ServicePortInfo(ip_address("10.96.0.10"), 53, "UDP", internal_policy_local=True)
    }
    assert stale_udp_flows(services, eps, [flow(1, "10.96.0.10", 53, "10.180.0.1")]) == []


def test_scaled_to_zero_every_flow_is_stale() -> None:
    # kubernetes#139628: services without endpoints are not skipped.
    flows = [flow(1, "10.96.0.20", 8125, "10.180.0.7", 8125), flow(2, "10.96.0.20", 8125,
             "10.180.0.8", 8125)]  # fmt: skip
    assert stale({}, flows) == flows
    assert stale({STATSD: ()}, flows) == flows
    assert stale({STATSD: (ep("10.180.0.7", 8125, serving=False),)}, flows) == flows


def test_node_port_matches_any_destination_by_default() -> None:
    eps = {DNS: (ep("10.180.0.1"),)}
    to_node = flow(1, NODE, 30053, "10.180.0.3")
    to_other = flow(2, "10.0.0.99", 30053, "10.180.0.3")
    fine = flow(3, NODE, 30053, "10.180.0.1")
    assert stale(eps, [to_node, to_other, fine]) == [to_node, to_other]


def test_node_port_restricted_to_node_ips() -> None:
    eps = {DNS: (ep("10.180.0.1"),)}
    to_node = flow(1, NODE, 30053, "10.180.0.3")
    to_other = flow(2, "10.0.0.99", 30053, "10.180.0.3")
    assert stale(eps, [to_node, to_other], node_ips={ip_address(NODE)}) == [to_node]


def test_tcp_services_and_tcp_flows_are_ignored() -> None:
    tcp_flow = flow(1, "10.96.0.10", 53, "10.180.0.3", proto=IPPROTO_TCP)
    tcp_node_port = flow(2, NODE, 30054, "10.180.0.3")  # UDP to a TCP service's NodePort
    assert stale({}, [tcp_flow, tcp_node_port]) == []


def test_a_flow_matching_twice_is_listed_once_in_input_order() -> None:
    # An external IP equal to the node IP with service port == NodePort: both rules match.
    services = {STATSD: ServicePortInfo(ip_address("10.96.0.20"), 30080, "UDP", node_port=30080,
                                         external_ips=(ip_address(NODE),))}  # fmt: skip
    a = flow(1, NODE, 30080, "10.180.0.3", 30080)
    b = flow(2, "10.96.0.20", 30080, "10.180.0.3", 30080)
    assert stale_udp_flows(services, {}, [b, a]) == [b, a]


def test_ipv6_endpoint_text_is_compared_as_an_address() -> None:
    svc = ServicePortName("ns", "v6", "", "UDP")
    services = {svc: ServicePortInfo(ip_address("fd00:96::10"), 53, "UDP")}
    eps = {svc: (ep("fd00:180:0:0::1"),)}
    keep = Flow.dnat(IPPROTO_UDP, ("fd00::9", 1), ("fd00:96::10", 53), ("fd00:180::1", 53))
    gone = Flow.dnat(IPPROTO_UDP, ("fd00::9", 2), ("fd00:96::10", 53), ("fd00:180::2", 53))
    assert stale_udp_flows(services, eps, [keep, gone]) == [gone]


# -- the reconciler --------------------------------------------------------------------


def sample(metrics: ProxyMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels or None)


def test_reconciler_deletes_and_records_metrics() -> None:
    ct = FakeConntrack()
    keep = ct.add(flow(1, "10.96.0.10", 53, "10.180.0.1"))
    ct.add(flow(2, "10.96.0.10", 53, "10.180.0.3"))
    ct.add(flow(3, "10.96.0.20", 8125, "10.180.0.7", 8125))
    other = ct.add(flow(4, "10.0.0.1", 53, "10.0.0.1"))  # not a service: untouched
    metrics = ProxyMetrics()
    ticks = iter([10.0, 10.25])
    rec = ConntrackReconciler(ct, metrics, clock=lambda: next(ticks))
    assert rec.reconcile(SERVICES, {DNS: (ep("10.180.0.1"),)}) == 2
    assert set(ct.list_flows()) == {keep, other}
    # Deletes carry the listed ids, so a re-created flow would survive.
    assert all(f.id is not None for f in ct.state.delete_calls[0])
    fam = {"ip_family": "IPv4"}
    assert sample(metrics, "kubeproxy_conntrack_reconciler_deleted_entries_total", **fam) == 2
    assert (
        sample(
            metrics, "kubeproxy_conntrack_reconciler_sync_duration_seconds_count", ip_family="IPv4"
        )
        == 1
    )
    assert (
        sample(
            metrics, "kubeproxy_conntrack_reconciler_sync_duration_seconds_sum", ip_family="IPv4"
        )
        == 0.25
    )


def test_reconciler_with_nothing_stale_deletes_nothing() -> None:
    ct = FakeConntrack()
    ct.add(flow(1, "10.96.0.10", 53, "10.180.0.1"))
    metrics = ProxyMetrics()
    assert ConntrackReconciler(ct, metrics).reconcile(SERVICES, {DNS: (ep("10.180.0.1"),)}) == 0
    assert ct.state.delete_calls == []
    assert (
        sample(
            metrics, "kubeproxy_conntrack_reconciler_sync_duration_seconds_count", ip_family="IPv4"
        )
        == 1
    )


def test_after_sync_runs_only_when_udp_endpoints_changed() -> None:
    ct = FakeConntrack()
    ct.add(flow(1, "10.96.0.20", 8125, "10.180.0.7", 8125))
    rec = ConntrackReconciler(ct)
    snap = Snapshot(ServicePortMap(SERVICES), EndpointsMap({}), frozenset())
    assert rec.after_sync(snap) == 0
    assert len(ct.list_flows()) == 1
    snap = Snapshot(ServicePortMap(SERVICES), EndpointsMap({}), frozenset({STATSD.service}),
                    conntrack_cleanup_required=True)  # fmt: skip
    assert rec.after_sync(snap) == 1
    assert ct.list_flows() == []


def test_reconciler_ipv6_family_label() -> None:
    ct = FakeConntrack("ipv6")
    metrics = ProxyMetrics()
    rec = ConntrackReconciler(ct, metrics)
    assert rec.ip_family == "IPv6"
    rec.reconcile({}, {})
    count = "kubeproxy_conntrack_reconciler_sync_duration_seconds_count"
    assert sample(metrics, count, ip_family="IPv6") == 1


class FailingDelete(FakeConntrack):
    def delete(self, flows: Iterable[Flow]) -> int:
        todo = list(flows)
        done = super().delete(todo[:1])
        raise ConntrackError("delete", errno=errno.EPERM, flow=todo[1], flows=todo, deleted=done)


class FailingList(FakeConntrack):
    def list_flows(self, protocol: int | None = None) -> list[Flow]:
        raise ConntrackError("list", errno=errno.EPERM, netns="x")


def test_reconciler_logs_failures_and_counts_partial_deletes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ct = FailingDelete()
    ct.add(flow(1, "10.96.0.20", 8125, "10.180.0.7", 8125))
    ct.add(flow(2, "10.96.0.20", 8125, "10.180.0.8", 8125))
    metrics = ProxyMetrics()
    with caplog.at_level(logging.ERROR, logger="kproxy.proxy.conntrack"):
        assert ConntrackReconciler(ct, metrics).reconcile(SERVICES, {}) == 1
    assert "Failed to reconcile conntrack entries" in caplog.text
    assert "10.180.0.8" in caplog.text  # the failing flow is in the message
    assert sample(metrics, "kubeproxy_conntrack_reconciler_deleted_entries_total",
                  ip_family="IPv4") == 1  # fmt: skip

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="kproxy.proxy.conntrack"):
        assert ConntrackReconciler(FailingList(), metrics).reconcile(SERVICES, {}) == 0
    assert "EPERM" in caplog.text
    assert (
        sample(
            metrics, "kubeproxy_conntrack_reconciler_sync_duration_seconds_count", ip_family="IPv4"
        )
        == 2
    )


# -- the fake's own rules (the contract suite holds them to the kernel) ----------------


def test_fake_add_keeps_the_first_flow_for_a_tuple() -> None:
    ct = FakeConntrack()
    first = ct.add(flow(1, "10.96.0.10", 53, "10.180.0.1"))
    again = ct.add(flow(1, "10.96.0.10", 53, "10.180.0.2"))
    assert again == first and again.id == first.id
    assert ct.list_flows() == [first]


def test_fake_handles_share_a_table_but_list_their_family() -> None:
    v4 = FakeConntrack("ipv4")
    v6 = FakeConntrack("ipv6", state=v4.state)
    v6.add(Flow.dnat(IPPROTO_UDP, ("fd00::9", 1), ("fd00:96::10", 53), ("fd00:180::1", 53)))
    v4.add(flow(1, "10.96.0.10", 53, "10.180.0.1"))
    assert [f.family for f in v4.list_flows()] == ["ipv4"]
    assert [f.family for f in v6.list_flows()] == ["ipv6"]
