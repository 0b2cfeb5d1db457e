"""UDP conntrack cleanup, end to end: a live UDP flow follows its Service's endpoints.

UDP has no teardown, so once the node's conntrack has DNAT'ed a client's 5-tuple
to an endpoint, every later datagram of that 5-tuple goes there without meeting
the nat rules again, for as long as datagrams keep the entry alive. Only the
proxy's post-sync reconciler (upstream ``pkg/proxy/conntrack``, reference §1.10)
moves such a flow. Each test keeps one client socket with a fixed source port
sending a datagram every 100 ms to a ClusterIP (:class:`UdpFlow`), changes the
Service's endpoints in the objects file, and waits (bounded) for the same
5-tuple's datagrams to be answered by the new endpoint:

- replacing the one endpoint by another pod;
- scaling to zero (the flow must stop reaching the old pod: the REJECT answers
  once the stale flow is gone — kubernetes#139628, whose bug kept the flow on
  the old pod) and back to a different pod.

The old pods keep running throughout, so without the cleanup their answers
would keep coming. The topology is :func:`cluster_topology`'s, one per iptables
backend.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster_topology import (
    ECHO_PORT,
    NODE_NAME,
    Answer,
    Cluster,
    UdpFlow,
    cluster_topology,
    endpoint_slice,
    metric,
    node_object,
    pod_ip,
    service,
)

pytestmark = pytest.mark.netns

VIP = "10.96.0.40"
PORT = 53
UDP = {"name": "dns", "port": PORT, "targetPort": ECHO_PORT, "protocol": "UDP"}
SLICE_PORTS = [{"name": "dns", "port": ECHO_PORT, "protocol": "UDP"}]
# Generous against a 0.5 s file poll + 0.1 s min sync period, but bounded: a broken
# cleanup fails in seconds, not after the flow's 60 s lifetime.
MOVE_TIMEOUT_S = 8.0
STEADY = 5  # answers in a row that count as "the flow is on that pod"
SOURCE_PORTS = itertools.count(40001)
DELETED = "kubeproxy_conntrack_reconciler_deleted_entries_total"


def objects(pods: list[str]) -> list[dict[str, Any]]:
    """The node and one UDP ClusterIP Service whose endpoints are ``pods`` ("podN")."""
    endpoints = [(pod_ip(int(name.removeprefix("pod"))), NODE_NAME) for name in pods]
    return [
        node_object(),
        service("flow", VIP, [UDP]),
        endpoint_slice("flow", endpoints, SLICE_PORTS),
    ]


@pytest.fixture(scope="module", params=["legacy", "nft"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    backend = str(request.param)
    workdir: Path = tmp_path_factory.mktemp(f"udp-conntrack-{backend}")
    with cluster_topology(workdir, backend=backend, objects=objects(["pod1"]), n_clients=1) as c:
        yield c


@pytest.fixture
def flow_on_pod1(cluster: Cluster) -> Iterator[UdpFlow]:
    """A fresh flow (its own source port) settled on pod1, the Service's one endpoint."""
    cluster.set_objects(objects(["pod1"]))
    cluster.wait_synced()
    # A distinct source port per flow: no conntrack entry of an earlier test can
    # stand in for this flow's.
    flow = cluster.udp_flow(0, VIP, PORT, next(SOURCE_PORTS))
    try:
        flow.wait_for("the flow on pod1", on("pod1"), MOVE_TIMEOUT_S, in_a_row=STEADY)
        yield flow
    finally:
        flow.stop()


def on(pod: str) -> Callable[[Answer], bool]:
    def cond(a: Answer) -> bool:
        return a.outcome == "ok" and a.pod == pod

    return cond


def deleted_entries(cluster: Cluster) -> float:
    return metric(cluster.metrics(), DELETED, ip_family="IPv4") or 0.0


def conntrack_reply_sources(cluster: Cluster, sport: int) -> list[str]:
    """The endpoints the node's conntrack DNATs this flow to (reply ``src=``)."""
    sources = []
    for line in cluster.conntrack_udp(VIP).splitlines():
        if f"sport={sport} " not in line:
            continue
        # orig: src= dst= sport= dport=, then reply: src=<endpoint> ...
        srcs = [f.removeprefix("src=") for f in line.split() if f.startswith("src=")]
        if len(srcs) == 2:
            sources.append(srcs[1])
    return sources


def test_replacing_the_endpoint_moves_a_live_flow(cluster: Cluster, flow_on_pod1: UdpFlow) -> None:
    flow = flow_on_pod1
    # The kernel pinned the 5-tuple to pod1: without the cleanup it would stay there.
    assert conntrack_reply_sources(cluster, flow.sport) == [pod_ip(1)]
    before = deleted_entries(cluster)

    cluster.set_objects(objects(["pod2"]))
    cluster.wait_synced()
    read = flow.wait_for("the flow to move to pod2", on("pod2"), MOVE_TIMEOUT_S, in_a_row=STEADY)

    # Once on pod2 it stays there, and nothing but pod1 (in flight) or pod2 answered.
    assert {a.pod for a in read if a.outcome == "ok"} <= {"pod1", "pod2"}, read
    assert conntrack_reply_sources(cluster, flow.sport) == [pod_ip(2)]
    assert deleted_entries(cluster) >= before + 1


def test_scale_to_zero_and_back_moves_a_live_flow(cluster: Cluster, flow_on_pod1: UdpFlow) -> None:
    flow = flow_on_pod1
    before = deleted_entries(cluster)

    cluster.set_objects(objects([]))
    cluster.wait_synced()
    # kubernetes#139628: the reconciler must not skip a Service with no endpoints.
    # Once the stale flow is gone, the next datagram meets the filter REJECT of an
    # endpoint-less ClusterIP (refused), instead of pod1 for ever.
    flow.wait_for(
        "the flow to leave pod1 (REJECT)",
        lambda a: a.outcome == "refused",
        MOVE_TIMEOUT_S,
        in_a_row=STEADY,
    )
    assert conntrack_reply_sources(cluster, flow.sport) == []
    assert deleted_entries(cluster) >= before + 1

    cluster.set_objects(objects(["pod3"]))
    cluster.wait_synced()
    read = flow.wait_for("the flow to reach pod3", on("pod3"), MOVE_TIMEOUT_S, in_a_row=STEADY)
    assert {a.pod for a in read if a.outcome == "ok"} <= {"pod3"}, read
    assert conntrack_reply_sources(cluster, flow.sport) == [pod_ip(3)]
