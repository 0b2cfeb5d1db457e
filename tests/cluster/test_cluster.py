"""Control plane II acceptance: a two-node cluster on one machine, end to end.

One cluster for the whole module (:mod:`tests.support.cluster`): a hub namespace with
the apiserver (SQLite, TLS), controller-manager and scheduler; node-1 and node-2 (node-2
labelled ``kproxy.test/disk=ssd``), each a namespace with its kubelet and ``kproxy
proxy`` (iptables, nft backend); host-gw routes between their podCIDRs. A third node
joins during the placement test. The tests run in file order and build on each other's
objects (the ``web`` Deployment and Service live for the whole module):

1. placement: nodeSelector, required pod anti-affinity, a pod that fits nowhere
   (FailedScheduling) and runs once a fitting node joins;
2. pod IPs from each node's podCIDR, the echo served, pod → pod across nodes by IP;
3. Service traffic from a node spreads over pods on both nodes, in each proxy mode
   this machine runs (iptables, userspace; IPVS needs the vm tier);
4. probes: readiness failure leaves the EndpointSlice within
   ``periodSeconds × failureThreshold`` plus one controller sync (measured); liveness
   failure restarts; a startup probe holds both off;
5. a rolling update never leaves the Service with zero ready endpoints (every watch
   event of its EndpointSlices is sampled);
6. a stopped kubelet: node Unknown, its endpoints not ready; restarted: pods adopted;
7. kubectl sees it all (skipped, visibly, where kubectl is not installed).
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest

from kproxy.client.rest import (
    DEPLOYMENTS,
    ENDPOINTSLICES,
    EVENTS,
    NODES,
    PODS,
    SERVICES,
    WatchEvent,
)
from tests.support.cluster import ECHO_PORT, Cluster, Reply, running_cluster, wait_for
from tests.support.tiers import optional_command, require_commands, require_root

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

Obj = dict[str, Any]
SSD = {"kproxy.test/disk": "ssd"}
LATE = {"kproxy.test/late": "yes"}
HOSTNAME = "kubernetes.io/hostname"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# The readiness probe of the removal-latency test, and the controller sync allowed on top.
PERIOD_S, FAILURE_THRESHOLD = 1, 2
CONTROLLER_SYNC_S = 1.0


# -- objects -------------------------------------------------------------------------


def echo_container(**extra: Any) -> Obj:
    return {
        "name": "echo",
        "image": "kproxy/echo:latest",
        "ports": [{"name": "http", "containerPort": ECHO_PORT}],
        **extra,
    }


READINESS = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1}


def deployment(name: str, replicas: int, **pod_spec: Any) -> Obj:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "containers": [echo_container(readinessProbe=READINESS)],
                    **pod_spec,
                },
            },
        },
    }


def pod(name: str, *, labels: dict[str, str] | None = None, **spec: Any) -> Obj:
    containers = spec.pop("containers", None) or [echo_container()]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": labels or {"app": name}},
        "spec": {"terminationGracePeriodSeconds": 2, "containers": containers, **spec},
    }


def service(name: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": ECHO_PORT, "protocol": "TCP"}],
        },
    }


def anti_affinity(app: str, *, required: bool) -> Obj:
    term = {"labelSelector": {"matchLabels": {"app": app}}, "topologyKey": HOSTNAME}
    if required:
        return {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [term]}}
    return {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": term}
            ]
        }
    }


# -- reading state ---------------------------------------------------------------------


def condition(obj: Obj | None, ctype: str) -> str:
    for c in ((obj or {}).get("status") or {}).get("conditions") or ():
        if c.get("type") == ctype:
            return str(c.get("status"))
    return ""


def container_status(obj: Obj | None) -> Obj:
    statuses = ((obj or {}).get("status") or {}).get("containerStatuses") or [{}]
    return dict(statuses[0])


def pods_of(c: Cluster, app: str) -> list[Obj]:
    """The app's pods that are not being deleted."""
    api = c.api
    assert api is not None
    return [
        p
        for p in api.list(PODS, label_selector=f"app={app}")
        if not p["metadata"].get("deletionTimestamp")
    ]


def pod_if(c: Cluster, name: str, pred: Callable[[Obj], bool]) -> Obj | None:
    """Pod ``name`` if it exists and satisfies ``pred``."""
    assert c.api is not None
    obj = c.api.get(PODS, name)
    return obj if obj is not None and pred(obj) else None


def ready_pods(c: Cluster, app: str, count: int) -> list[Obj] | None:
    pods = pods_of(c, app)
    if len(pods) == count and all(condition(p, "Ready") == "True" for p in pods):
        return pods
    return None


def endpoints(c: Cluster, svc: str) -> list[Obj]:
    """Every endpoint of every EndpointSlice of Service ``svc``."""
    api = c.api
    assert api is not None
    out: list[Obj] = []
    for s in api.list(ENDPOINTSLICES, label_selector=f"{SERVICE_NAME_LABEL}={svc}"):
        out.extend(s.get("endpoints") or ())
    return out


def is_ready(ep: Obj) -> bool:
    return bool((ep.get("conditions") or {}).get("ready"))


def ready_ips(c: Cluster, svc: str) -> set[str]:
    return {a for ep in endpoints(c, svc) if is_ready(ep) for a in ep.get("addresses") or ()}


def cluster_ip(c: Cluster, svc: str) -> str:
    api = c.api
    assert api is not None
    obj = api.get(SERVICES, svc) or {}
    return str(obj["spec"]["clusterIP"])


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_root()
    require_commands("ip", "nsenter", "iptables-nft-save")
    workdir = tmp_path_factory.mktemp("cluster")
    prefix = f"kpt-{os.getpid()}-{secrets.token_hex(2)}-"
    with running_cluster(workdir, prefix, nodes={"node-1": {}, "node-2": SSD}) as c:
        yield c


@pytest.fixture(scope="module")
def web(cluster: Cluster) -> str:
    """Deployment ``web`` (3 replicas, readiness-probed, spread by preferred
    anti-affinity) and its ClusterIP Service; returns the ClusterIP."""
    api = cluster.api
    assert api is not None
    api.create(DEPLOYMENTS, deployment("web", 3, affinity=anti_affinity("web", required=False)))
    api.create(SERVICES, service("web"))
    pods = wait_for("3 ready web pods", lambda: ready_pods(cluster, "web", 3), 60)
    assert {p["spec"]["nodeName"] for p in pods} == {"node-1", "node-2"}, [
        (p["metadata"]["name"], p["spec"]["nodeName"]) for p in pods
    ]
    wait_for("3 ready web endpoints", lambda: len(ready_ips(cluster, "web")) == 3, 30)
    return cluster_ip(cluster, "web")


def _fail_with_logs(c: Cluster) -> None:
    print(c.logs(60), file=sys.stderr)


# -- 1. placement --------------------------------------------------------------------


def test_placement_selector_anti_affinity_and_late_node(cluster: Cluster) -> None:
    api = cluster.api
    assert api is not None
    try:
        api.create(DEPLOYMENTS, deployment("pinned", 3, nodeSelector=SSD))
        api.create(
            DEPLOYMENTS, deployment("spread", 2, affinity=anti_affinity("spread", required=True))
        )
        api.create(PODS, pod("late", nodeSelector=LATE))

        pinned = wait_for("3 ready pinned pods", lambda: ready_pods(cluster, "pinned", 3), 60)
        assert {p["spec"]["nodeName"] for p in pinned} == {"node-2"}
        spread = wait_for("2 ready spread pods", lambda: ready_pods(cluster, "spread", 2), 60)
        assert sorted(p["spec"]["nodeName"] for p in spread) == ["node-1", "node-2"]

        def failed_scheduling() -> Obj | None:
            for ev in api.list(EVENTS):
                if (ev.get("involvedObject") or {}).get("name") == "late" and ev.get(
                    "reason"
                ) == "FailedScheduling":
                    return ev
            return None

        event = wait_for("FailedScheduling for pod late", failed_scheduling, 30)
        print("FailedScheduling:", event.get("message"))
        assert "node affinity/selector" in str(event.get("message")), event
        assert not (api.get(PODS, "late") or {})["spec"].get("nodeName")

        # A fitting node joins: the pod is scheduled there and runs.
        cluster.add_node("node-3", labels=LATE, proxy=False)
        late = wait_for(
            "pod late Ready on node-3",
            lambda: pod_if(cluster, "late", lambda o: condition(o, "Ready") == "True"),
            60,
        )
        assert late["spec"]["nodeName"] == "node-3"
        assert ip_address(late["status"]["podIP"]) in ip_network(cluster.nodes["node-3"].pod_cidr)
        # Later tests are about node-1 and node-2: nothing more goes to node-3.
        api.patch(NODES, "node-3", {"spec": {"unschedulable": True}}, namespace="")
    except BaseException:
        _fail_with_logs(cluster)
        raise
    finally:
        for name in ("pinned", "spread"):
            api.delete(DEPLOYMENTS, name)
        api.delete(PODS, "late")


# -- 2. pod IPs, the echo, pod to pod across nodes ------------------------------------


def test_pod_ips_echo_and_cross_node_pod_traffic(cluster: Cluster, web: str) -> None:
    pods = pods_of(cluster, "web")
    for p in pods:
        node = cluster.nodes[p["spec"]["nodeName"]]
        ip = p["status"]["podIP"]
        assert ip_address(ip) in ip_network(node.pod_cidr), (ip, node.pod_cidr)
        [reply] = cluster.from_node(node.name, ip, ECHO_PORT)
        assert reply.status == 200 and reply.pod == p["metadata"]["name"], reply

    a = next(p for p in pods if p["spec"]["nodeName"] == "node-1")
    b = next(p for p in pods if p["spec"]["nodeName"] == "node-2")
    for src, dst in ((a, b), (b, a)):
        code = (
            "import sys, urllib.request\n"
            "print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())"
        )
        url = f"http://{dst['status']['podIP']}:{ECHO_PORT}/"
        res = cluster.exec_in_pod(src, [sys.executable, "-c", code, url])
        assert res.returncode == 0, res.stderr
        # Routed, not NATed: the far pod sees the near pod's own address.
        assert res.stdout.split() == [
            dst["metadata"]["name"],
            "saw",
            res.stdout.split()[2],
        ] and res.stdout.split()[2].startswith(src["status"]["podIP"] + ":"), res.stdout


# -- 3. Service traffic through the proxies ---------------------------------------------


@pytest.mark.parametrize("mode", ["iptables", "userspace", "ipvs"])
def test_cluster_ip_spreads_over_both_nodes(cluster: Cluster, web: str, mode: str) -> None:
    if mode == "ipvs" and not Path("/proc/net/ip_vs").exists():
        pytest.skip("this kernel has no ip_vs: the IPVS mode is tested in the vm tier")
    if cluster.proxy_mode != mode:
        cluster.switch_proxy_mode(mode)
    where = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in pods_of(cluster, "web")}
    try:
        for node in ("node-1", "node-2"):

            def answered(node: str = node) -> dict[str, int] | None:
                replies = cluster.from_node(node, web, 80, count=40, max_failures=40)
                counts: dict[str, int] = {}
                for r in replies:
                    key = r.pod or f"failed: {r.status} {r.body[:60]}"
                    counts[key] = counts.get(key, 0) + 1
                nodes = {where.get(p) for p in counts}
                return counts if nodes == {"node-1", "node-2"} else None

            counts = wait_for(f"{mode}: {web}:80 from {node} answered on both nodes", answered, 30)
            print(f"{mode} from {node}: {counts}")
        if mode == "iptables":
            nat = cluster.save("node-1")
            assert f"-d {web}/32" in nat
    except BaseException:
        _fail_with_logs(cluster)
        raise


# -- 4. probes ---------------------------------------------------------------------------


def test_readiness_failure_leaves_endpointslice_within_bound(cluster: Cluster) -> None:
    api = cluster.api
    assert api is not None
    probe = {
        "httpGet": {"path": "/readyz", "port": "http"},
        "periodSeconds": PERIOD_S,
        "failureThreshold": FAILURE_THRESHOLD,
    }
    api.create(
        PODS, pod("ready", nodeName="node-1", containers=[echo_container(readinessProbe=probe)])
    )
    api.create(SERVICES, service("ready"))
    try:
        obj = wait_for(
            "pod ready Ready",
            lambda: pod_if(cluster, "ready", lambda o: condition(o, "Ready") == "True"),
            40,
        )
        ip = obj["status"]["podIP"]
        wait_for("its endpoint ready", lambda: ready_ips(cluster, "ready") == {ip}, 20)

        bound = PERIOD_S * FAILURE_THRESHOLD + CONTROLLER_SYNC_S
        latencies = []
        for _ in range(2):  # twice, to see it is not a lucky phase of the probe timer
            [r] = cluster.from_node("node-1", ip, ECHO_PORT, "/control/ready/0")
            t0 = time.monotonic()
            assert r.status == 200, r
            wait_for("endpoint not ready", lambda: ip not in ready_ips(cluster, "ready"), 15, 0.05)
            latencies.append(time.monotonic() - t0)
            [r] = cluster.from_node("node-1", ip, ECHO_PORT, "/control/ready/1")
            assert r.status == 200, r
            wait_for("endpoint ready again", lambda: ready_ips(cluster, "ready") == {ip}, 15, 0.05)
        print(f"readiness removal latency: {[round(x, 2) for x in latencies]} s (bound {bound} s)")
        assert max(latencies) <= bound, (latencies, bound)
    except BaseException:
        _fail_with_logs(cluster)
        raise
    finally:
        api.delete(SERVICES, "ready")
        api.delete(PODS, "ready")


def test_liveness_failure_restarts_container(cluster: Cluster) -> None:
    api = cluster.api
    assert api is not None
    probe = {
        "httpGet": {"path": "/livez", "port": "http"},
        # Probed 2 ms after the start, a Python echo is not listening yet: without a
        # delay a liveness probe would restart it forever (upstream's semantics too).
        "initialDelaySeconds": 2,
        "periodSeconds": 1,
        "failureThreshold": 2,
    }
    api.create(
        PODS, pod("live", nodeName="node-2", containers=[echo_container(livenessProbe=probe)])
    )
    try:
        obj = wait_for(
            "live running",
            lambda: pod_if(cluster, "live", lambda o: "running" in container_status(o)["state"]),
            40,
        )
        ip = obj["status"]["podIP"]
        assert container_status(obj)["restartCount"] == 0
        # "running" is the process, not yet its listening socket.
        wait_for("the echo", lambda: cluster.from_node("node-2", ip, ECHO_PORT)[0].pod == "live")
        [r] = cluster.from_node("node-2", ip, ECHO_PORT, "/control/live/0")
        assert r.status == 200, r
        restarted = wait_for(
            "restartCount >= 1",
            lambda: pod_if(cluster, "live", lambda o: container_status(o)["restartCount"] >= 1),
            20,
        )
        print("liveness restart:", container_status(restarted).get("lastState"))

        # The restarted container is a fresh process: live again, and it serves.
        def answers() -> Reply | None:
            [reply] = cluster.from_node("node-2", ip, ECHO_PORT)
            assert reply.status in (0, 200), reply
            return reply if reply.pod == "live" else None

        wait_for("the restarted echo answers", answers, 20)
    finally:
        api.delete(PODS, "live")


def test_startup_probe_holds_off_liveness_and_readiness(cluster: Cluster) -> None:
    api = cluster.api
    assert api is not None
    marker = cluster.workdir / f"started-{secrets.token_hex(3)}"
    check = {"exec": {"command": ["/bin/sh", "-c", f"test -e {marker}"]}, "periodSeconds": 1}
    container = echo_container(
        startupProbe={**check, "failureThreshold": 60},
        # Would restart the container at once if it ran before startup succeeded.
        livenessProbe={**check, "failureThreshold": 1},
        readinessProbe={"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1},
    )
    api.create(PODS, pod("slow", nodeName="node-1", containers=[container]))
    try:
        wait_for(
            "slow running",
            lambda: "running" in container_status(api.get(PODS, "slow")).get("state", {}),
            40,
        )
        time.sleep(5)  # five liveness periods: it would have restarted by now
        obj = api.get(PODS, "slow")
        st = container_status(obj)
        assert st["restartCount"] == 0 and not st.get("started"), st
        assert condition(obj, "Ready") == "False", obj and obj["status"]
        marker.write_text("ok")
        obj = wait_for(
            "slow Ready after startup",
            lambda: pod_if(cluster, "slow", lambda o: condition(o, "Ready") == "True"),
            20,
        )
        st = container_status(obj)
        assert st["restartCount"] == 0 and st.get("started") is True, st
    finally:
        api.delete(PODS, "slow")


# -- 5. rolling update -----------------------------------------------------------------


def test_rolling_update_never_zero_ready_endpoints(cluster: Cluster, web: str) -> None:
    api = cluster.api
    assert api is not None
    old = {p["metadata"]["name"] for p in pods_of(cluster, "web")}
    slices: dict[str, Obj] = {}
    samples: list[int] = []
    lock = threading.Lock()

    def on_event(ev: WatchEvent) -> None:
        name = ev.object["metadata"]["name"]
        with lock:
            if ev.type == "DELETED":
                slices.pop(name, None)
            else:
                slices[name] = ev.object
            samples.append(
                sum(1 for s in slices.values() for ep in s.get("endpoints") or () if is_ready(ep))
            )

    watch = api.watch(ENDPOINTSLICES, on_event, label_selector=f"{SERVICE_NAME_LABEL}=web")
    try:
        api.patch(
            DEPLOYMENTS,
            "web",
            {"spec": {"template": {"metadata": {"annotations": {"kproxy.test/rev": "2"}}}}},
        )

        def rolled() -> list[Obj] | None:
            pods = ready_pods(cluster, "web", 3)
            if pods and not ({p["metadata"]["name"] for p in pods} & old):
                all_pods = api.list(PODS, label_selector="app=web")
                if len(all_pods) == 3:  # the old ones are gone, not just terminating
                    return pods
            return None

        new = wait_for("the rollout", rolled, 120)
        wait_for("3 ready endpoints", lambda: len(ready_ips(cluster, "web")) == 3, 30)
        time.sleep(0.5)  # the last slice events reach the watch
    except BaseException:
        _fail_with_logs(cluster)
        raise
    finally:
        watch.stop()
    assert not watch.errors, watch.errors
    print(f"rolling update: {len(samples)} EndpointSlice events, ready counts {samples}")
    assert len(samples) >= 6, samples
    assert min(samples) > 0, samples
    assert {p["spec"]["nodeName"] for p in new} == {"node-1", "node-2"}


# -- 6. a kubelet goes away and comes back --------------------------------------------------


def test_stopped_kubelet_node_unknown_then_pods_adopted(cluster: Cluster, web: str) -> None:
    api = cluster.api
    assert api is not None
    before = {
        p["metadata"]["uid"]: p
        for p in pods_of(cluster, "web")
        if p["spec"]["nodeName"] == "node-2"
    }
    assert before, "no web pod on node-2"
    pids = {uid: sorted(cluster.pod_pids(p)) for uid, p in before.items()}
    restarts = {uid: container_status(p)["restartCount"] for uid, p in before.items()}
    ips = {p["status"]["podIP"] for p in before.values()}
    try:
        t0 = time.monotonic()
        cluster.stop_kubelet("node-2")
        wait_for("node-2 Unknown", lambda: cluster.node_ready("node-2") == "Unknown", 30)
        t_unknown = time.monotonic() - t0

        def node2_not_ready() -> bool:
            eps = [ep for ep in endpoints(cluster, "web") if ep.get("nodeName") == "node-2"]
            return bool(eps) and not any(is_ready(ep) for ep in eps)

        wait_for("node-2's endpoints not ready", node2_not_ready, 20)
        t_eps = time.monotonic() - t0
        print(f"kubelet stopped: node Unknown after {t_unknown:.1f}s,", end=" ")
        print(f"its endpoints not ready after {t_eps:.1f}s")
        assert ready_ips(cluster, "web").isdisjoint(ips)
        # The Service keeps working on node-1's pods.
        replies = cluster.from_node("node-1", web, 80, count=10)
        assert all(r.status == 200 for r in replies), replies

        cluster.start_kubelet("node-2")
        wait_for("node-2 Ready", lambda: cluster.node_ready("node-2") == "True", 30)
        wait_for("node-2's endpoints ready again", lambda: ips <= ready_ips(cluster, "web"), 30)
        after = {p["metadata"]["uid"]: p for p in pods_of(cluster, "web")}
        assert len(after) == 3, sorted(after)
        for uid, p in before.items():
            assert uid in after, f"pod {p['metadata']['name']} was replaced"
            assert sorted(cluster.pod_pids(after[uid])) == pids[uid], "container restarted"
            assert container_status(after[uid])["restartCount"] == restarts[uid]
        assert "adopted container" in cluster.nodes["node-2"].kubelet.tail(200)
    except BaseException:
        _fail_with_logs(cluster)
        raise


# -- 7. kubectl --------------------------------------------------------------------------


def test_kubectl_sees_the_cluster(cluster: Cluster, web: str) -> None:
    optional_command("kubectl")
    res = cluster.kubectl("get", "pods", "-o", "wide")
    assert res.returncode == 0, res.stderr
    print(res.stdout)
    for p in pods_of(cluster, "web"):
        line = next(
            (ln for ln in res.stdout.splitlines() if ln.startswith(p["metadata"]["name"] + " ")),
            "",
        )
        assert (
            "Running" in line and p["status"]["podIP"] in line and p["spec"]["nodeName"] in line
        ), line
    res = cluster.kubectl("describe", "node", "node-1")
    assert res.returncode == 0, res.stderr
    print(res.stdout)
    assert "PodCIDR:" in res.stdout and cluster.nodes["node-1"].pod_cidr in res.stdout
    assert "Ready" in res.stdout and "10.99.0.11" in res.stdout
    res = cluster.kubectl("get", "endpointslices", "-l", f"{SERVICE_NAME_LABEL}=web")
    assert res.returncode == 0 and "web-" in res.stdout, res.stdout + res.stderr
