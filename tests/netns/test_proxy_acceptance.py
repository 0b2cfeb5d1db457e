"""Acceptance of the proxy core and iptables mode: the real ``kproxy proxy`` process, real traffic.

One topology per iptables backend (legacy, nft), from
:func:`tests.support.cluster_topology.cluster_topology`: a node namespace running
``kproxy proxy --objects FILE``, three echo pods behind its pod bridge, two
clients routed to the node. Every test starts from :func:`baseline` (re-applied
and synced by an autouse fixture) and sends traffic from a client namespace:

- ClusterIP, NodePort and an external IP reach every endpoint (TCP), the
  ClusterIP over UDP too;
- sessionAffinity ClientIP keeps a client on one endpoint;
- externalTrafficPolicy Local keeps the client's source IP, and with only
  remote endpoints the NodePort drops (the connect times out);
- a Service without endpoints is refused at once (REJECT);
- flushing the rules and deleting the canary chains makes the proxy restore
  everything within its sync period (``--iptables-sync-period 1s``);
- ``/healthz``, ``/livez``, ``/metrics`` and ``/proxyMode`` answer as upstream's;
- an endpoint change is a partial sync, and traffic follows it.
"""

from __future__ import annotations

import collections
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster_topology import (
    CLIENT_IPS,
    ECHO_PORT,
    HEALTHZ_PORT,
    METRICS_PORT,
    NODE_IP,
    NODE_NAME,
    POD_GATEWAY,
    Answer,
    Cluster,
    cluster_topology,
    endpoint_slice,
    metric,
    node_object,
    pod_ip,
    service,
)

pytestmark = pytest.mark.netns

PODS = ("pod1", "pod2", "pod3")
CONNECTIONS = 30
SYNC_PERIOD_S = 1.0

ECHO_VIP, EMPTY_VIP, STICKY_VIP, LOCAL_VIP, REMOTE_VIP = (
    "10.96.0.10",
    "10.96.0.11",
    "10.96.0.12",
    "10.96.0.13",
    "10.96.0.14",
)
EXTERNAL_IP = "203.0.113.10"  # in EXTERNAL_CIDR: routed to the node, assigned nowhere
PORT = 80
ECHO_NODEPORT, ECHO_UDP_NODEPORT, LOCAL_NODEPORT, REMOTE_NODEPORT = 30080, 30081, 30083, 30084

TCP = {"name": "tcp", "port": PORT, "targetPort": ECHO_PORT, "protocol": "TCP"}
UDP = {"name": "udp", "port": PORT, "targetPort": ECHO_PORT, "protocol": "UDP"}
SLICE_PORTS = [
    {"name": "tcp", "port": ECHO_PORT, "protocol": "TCP"},
    {"name": "udp", "port": ECHO_PORT, "protocol": "UDP"},
]
LOCAL_PODS = [(pod_ip(i), NODE_NAME) for i in (1, 2, 3)]


def baseline(echo_pods: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    """The objects every test starts from; ``echo_pods`` replaces echo's endpoints."""
    return [
        node_object(),
        # ClusterIP + NodePort (TCP and UDP) + an external IP, eTP Cluster.
        service(
            "echo",
            ECHO_VIP,
            [{**TCP, "nodePort": ECHO_NODEPORT}, {**UDP, "nodePort": ECHO_UDP_NODEPORT}],
            type="NodePort",
            externalIPs=[EXTERNAL_IP],
        ),
        endpoint_slice("echo", LOCAL_PODS if echo_pods is None else echo_pods, SLICE_PORTS),
        service("empty", EMPTY_VIP, [TCP]),
        service(
            "sticky",
            STICKY_VIP,
            [TCP],
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 300}},
        ),
        endpoint_slice("sticky", LOCAL_PODS, SLICE_PORTS),
        service(
            "local",
            LOCAL_VIP,
            [{**TCP, "nodePort": LOCAL_NODEPORT}],
            type="NodePort",
            externalTrafficPolicy="Local",
        ),
        endpoint_slice("local", LOCAL_PODS, SLICE_PORTS),
        # eTP Local whose endpoints all live on another node (their address is
        # never sent to: only the NodePort is, and it must drop).
        service(
            "remote",
            REMOTE_VIP,
            [{**TCP, "nodePort": REMOTE_NODEPORT}],
            type="NodePort",
            externalTrafficPolicy="Local",
        ),
        endpoint_slice("remote", [("10.244.2.2", "node-b")], SLICE_PORTS),
    ]


@pytest.fixture(scope="module", params=["legacy", "nft"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    backend = str(request.param)
    workdir: Path = tmp_path_factory.mktemp(f"cluster-{backend}")
    with cluster_topology(
        workdir, backend=backend, objects=baseline(), sync_period=f"{SYNC_PERIOD_S:g}s"
    ) as c:
        yield c
        # SIGTERM is the normal way a kube-proxy ends: a clean exit, not a crash.
        status = c.stop_proxy()
        assert status == 0, f"kproxy proxy exited {status} on SIGTERM:\n{c.proxy_log()}"


@pytest.fixture(autouse=True)
def at_baseline(cluster: Cluster) -> Cluster:
    """Each test starts from the baseline objects, synced (a no-op when unchanged)."""
    cluster.set_objects(baseline())
    cluster.wait_synced()
    return cluster


def pods_seen(answers: list[Answer]) -> collections.Counter[str]:
    assert all(a.outcome == "ok" for a in answers), [a for a in answers if a.outcome != "ok"]
    return collections.Counter(a.pod for a in answers)


def rules(save: str) -> list[str]:
    """The chains and rules of an ``iptables-save`` dump (no counters, no comments)."""
    return [
        line.split(" [", 1)[0] if line.startswith(":") else line
        for line in save.splitlines()
        if line.startswith((":KUBE-", "-A"))
    ]


# -- traffic -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "port"),
    [(ECHO_VIP, PORT), (NODE_IP, ECHO_NODEPORT), (EXTERNAL_IP, PORT)],
    ids=["clusterip", "nodeport", "externalip"],
)
def test_tcp_reaches_every_endpoint(cluster: Cluster, ip: str, port: int) -> None:
    seen = pods_seen(cluster.ask_tcp_many(0, ip, port, CONNECTIONS))
    assert set(seen) == set(PODS), seen


def test_udp_cluster_ip_reaches_every_endpoint(cluster: Cluster) -> None:
    # Each request is a new socket, hence a new conntrack flow and a new pick.
    seen = pods_seen(cluster.ask_udp_many(0, ECHO_VIP, PORT, CONNECTIONS))
    assert set(seen) == set(PODS), seen


def test_client_ip_affinity_keeps_a_client_on_one_endpoint(cluster: Cluster) -> None:
    for client in range(len(cluster.clients)):
        seen = pods_seen(cluster.ask_tcp_many(client, STICKY_VIP, PORT, 20))
        assert len(seen) == 1, (CLIENT_IPS[client], seen)
    # The stickiness is the kernel's, through upstream's `-m recent` rules.
    assert "--rcheck --seconds 300 --reap" in cluster.save("nat")


def test_etp_local_keeps_the_client_source_ip(cluster: Cluster) -> None:
    local = cluster.ask_tcp_many(0, NODE_IP, LOCAL_NODEPORT, 10)
    assert set(pods_seen(local)) <= set(PODS)
    assert {a.seen for a in local} == {CLIENT_IPS[0]}, local
    # The contrast: eTP Cluster masquerades NodePort traffic to the node's pod-side address.
    cluster_policy = cluster.ask_tcp_many(0, NODE_IP, ECHO_NODEPORT, 5)
    assert {a.seen for a in cluster_policy} == {POD_GATEWAY}, cluster_policy


def test_etp_local_without_local_endpoints_drops_nodeport(cluster: Cluster) -> None:
    # Dropped, not refused: the connect times out (a REJECT would answer at once).
    answers = cluster.ask_tcp_many(0, NODE_IP, REMOTE_NODEPORT, 2, timeout=1.0)
    assert [a.outcome for a in answers] == ["timeout", "timeout"], answers
    assert all(a.elapsed < 1.5 for a in answers), answers
    filter_rules = cluster.save("filter")
    assert re.search(
        # iptables-save prints the matches in its own order: anchor on what matters.
        r'-A KUBE-EXTERNAL-SERVICES .*"default/remote:tcp has no local endpoints".* '
        rf"--dport {REMOTE_NODEPORT} -j DROP",
        filter_rules,
    ), filter_rules


def test_service_without_endpoints_is_refused_at_once(cluster: Cluster) -> None:
    answers = cluster.ask_tcp_many(0, EMPTY_VIP, PORT, 3, timeout=2.0)
    assert all(a.outcome == "refused" and a.elapsed < 1.0 for a in answers), answers


# -- rule restoration ------------------------------------------------------------


def test_deleted_canary_restores_every_rule(cluster: Cluster) -> None:
    before = {t: rules(cluster.save(t)) for t in ("nat", "filter")}
    full_before = metric(
        cluster.metrics(), "kubeproxy_sync_full_proxy_rules_duration_seconds_count"
    )
    # What a careless admin (or a firewall reload) does: the service rules go,
    # then the canary chains in every table it lives in.
    cluster.iptables("-t", "nat", "-F", "KUBE-SERVICES")
    for table in ("mangle", "nat", "filter"):
        cluster.iptables("-t", table, "-X", "KUBE-PROXY-CANARY")
    flushed = cluster.save("nat")
    assert "-A KUBE-SERVICES" not in flushed and "KUBE-PROXY-CANARY" not in flushed

    # The canary is polled every sync period; allow one period, the sync, and slack.
    deadline = time.monotonic() + 2 * SYNC_PERIOD_S + 3.0
    while rules(cluster.save("nat")) != before["nat"]:
        assert time.monotonic() < deadline, (
            f"rules not restored within {2 * SYNC_PERIOD_S + 3.0:.0f}s:\n"
            + cluster.save("nat")
            + cluster.proxy_log()
        )
        time.sleep(0.1)
    assert rules(cluster.save("filter")) == before["filter"]
    for table in ("mangle", "nat", "filter"):
        assert ":KUBE-PROXY-CANARY" in cluster.save(table), table
    full_after = metric(cluster.metrics(), "kubeproxy_sync_full_proxy_rules_duration_seconds_count")
    assert full_before is not None and full_after is not None and full_after > full_before
    seen = pods_seen(cluster.ask_tcp_many(0, ECHO_VIP, PORT, CONNECTIONS))
    assert set(seen) == set(PODS), seen


# -- health and metrics ----------------------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/livez"])
def test_health_endpoints_answer_as_upstream(cluster: Cluster, path: str) -> None:
    res = cluster.get(0, HEALTHZ_PORT, path)
    assert res.status == 200, res
    assert res.headers.get("Content-Type") == "application/json", res.headers
    assert res.headers.get("X-Content-Type-Options") == "nosniff", res.headers
    body = json.loads(res.body)
    want = {"lastUpdated", "currentTime", "healthy", "status"}
    if path == "/healthz":
        want.add("nodeEligible")
        assert body["nodeEligible"] is True
    assert set(body) == want, body
    assert body["healthy"] is True
    assert set(body["status"]) == {"IPv4"}, body
    assert body["status"]["IPv4"]["healthy"] is True
    # Go's time.Time.String() in UTC.
    go_time = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? \+0000 UTC"
    for value in (body["lastUpdated"], body["currentTime"], body["status"]["IPv4"]["lastUpdated"]):
        assert re.fullmatch(go_time, value), value
    counter = (
        "kubeproxy_proxy_healthz_total" if path == "/healthz" else "kubeproxy_proxy_livez_total"
    )
    assert (metric(cluster.metrics(), counter, code="200") or 0) >= 1


def test_metrics_and_proxy_mode(cluster: Cluster) -> None:
    res = cluster.get(0, METRICS_PORT, "/metrics")
    assert res.status == 200, res
    assert res.headers.get("Content-Type", "").startswith("text/plain"), res.headers
    text = res.body
    assert "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram" in text
    for name in (
        "kubeproxy_sync_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    ):
        value = metric(text, name, ip_family="IPv4")
        assert value is not None and value > 0, name
    assert (
        metric(
            text, "kubeproxy_sync_proxy_rules_duration_seconds_bucket", ip_family="IPv4", le="0.001"
        )
        is not None
    )
    assert (metric(text, "kubeproxy_sync_proxy_rules_iptables_total", table="nat") or 0) > 0
    # A labelled counter has no sample until it is first counted (as upstream's vectors).
    failures = "kubeproxy_sync_proxy_rules_iptables_restore_failures_total"
    assert (metric(text, failures) or 0) == 0
    assert (
        metric(
            text, "kubeproxy_sync_proxy_rules_no_local_endpoints_total", traffic_policy="external"
        )
        == 1
    ), "the remote Service has endpoints, none local"

    mode = cluster.get(0, METRICS_PORT, "/proxyMode")
    assert (mode.status, mode.body) == (200, "iptables"), mode


# -- partial sync ----------------------------------------------------------------


def test_endpoint_change_is_a_partial_sync_and_traffic_follows(cluster: Cluster) -> None:
    partial = "kubeproxy_sync_partial_proxy_rules_duration_seconds_count"
    full = "kubeproxy_sync_full_proxy_rules_duration_seconds_count"
    before = cluster.metrics()
    dnat_pod3 = f"--to-destination {pod_ip(3)}:{ECHO_PORT}"
    dnats_before = cluster.save("nat").count(dnat_pod3)
    assert cluster.set_objects(baseline(echo_pods=LOCAL_PODS[:2]))
    cluster.wait_synced()
    after = cluster.metrics()
    assert (metric(after, partial) or 0) > (metric(before, partial) or 0), after
    assert metric(after, full) == metric(before, full), "an endpoint change forced a full sync"
    # echo's TCP and UDP endpoint chains for pod3 are gone; sticky's and local's stay.
    assert cluster.save("nat").count(dnat_pod3) == dnats_before - 2
    seen = pods_seen(cluster.ask_tcp_many(0, ECHO_VIP, PORT, CONNECTIONS))
    assert set(seen) == {"pod1", "pod2"}, seen
