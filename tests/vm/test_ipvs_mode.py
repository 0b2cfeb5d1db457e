"""Acceptance of the IPVS mode: the real ``kproxy proxy --proxy-mode ipvs`` process, real traffic.

Runs inside the VM (IPVS, dummy links and ipsets exist only there).  The topology
is the iptables acceptance tests' (:mod:`tests.support.cluster_topology`: a node
namespace running ``kproxy proxy --objects FILE``, three echo pods behind its pod
bridge, two clients routed to the node), built here with budgets for an emulated
guest, where every Python start takes seconds.
Two tests share one topology (a boot and a topology cost tens of seconds under
emulation):

- traffic: ClusterIP and NodePort reach every endpoint in ``rr`` order, ClientIP
  affinity keeps a client on one endpoint, a Service without endpoints answers
  nobody;
- graceful termination then cleanup: a TCP connection held open to an endpoint
  that is then removed keeps working (its real server is at weight 0) while new
  connections go to the others; after the endpoint is back it has weight 1
  again; finally ``kproxy proxy --cleanup`` leaves no virtual server, no set, no
  KUBE- rule and no kube-ipvs0.
"""

from __future__ import annotations

import itertools
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest

from tests.support.cluster_topology import (
    CLIENT_IPS,
    CLUSTER_CIDR,
    ECHO_PORT,
    ECHO_SERVER,
    HEALTHZ_PORT,
    KPROXY,
    METRICS_PORT,
    NODE_IP,
    NODE_NAME,
    POD_GATEWAY,
    SERVICE_CIDR,
    Agent,
    Client,
    Cluster,
    endpoint_slice,
    node_object,
    pod_ip,
    service,
)
from tests.support.netns import NetnsFactory

pytestmark = pytest.mark.vm

BACKEND: Final = "legacy"
ECHO_VIP, EMPTY_VIP, STICKY_VIP, DRAIN_VIP = "10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13"
PORT: Final = 80
NODEPORT: Final = 30080
HOLD_PORT: Final = 9090
PODS: Final = ("pod1", "pod2", "pod3")

TCP = {"name": "tcp", "port": PORT, "targetPort": ECHO_PORT, "protocol": "TCP"}
SLICE_PORTS = [{"name": "tcp", "port": ECHO_PORT, "protocol": "TCP"}]
HOLD_SLICE_PORTS = [{"name": "tcp", "port": HOLD_PORT, "protocol": "TCP"}]
ALL_PODS = [(pod_ip(i), NODE_NAME) for i in (1, 2, 3)]

# A pod server that keeps each connection open: greets like the echo server, then
# answers one line with "<pod> bye" and closes.
HOLD_SERVER: Final = r"""
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port)); srv.listen(16)
def serve(c, peer):
    with c:
        c.sendall(f"{name} saw {peer[0]}:{peer[1]}\n".encode())
        f = c.makefile()
        if f.readline():
            c.sendall(f"{name} bye\n".encode())
while True:
    c, peer = srv.accept()
    threading.Thread(target=serve, args=(c, peer), daemon=True).start()
"""

# A client holding one connection: prints the greeting, waits for a line on stdin,
# says bye and prints the answer.
HOLD_CLIENT: Final = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
f = s.makefile()
print(f.readline().strip(), flush=True)
sys.stdin.readline()
s.sendall(b"bye\n")
print(f.readline().strip(), flush=True)
"""


def objects(drain_pods: tuple[int, ...] = (1, 2)) -> list[dict[str, Any]]:
    hold = {"name": "tcp", "port": PORT, "targetPort": HOLD_PORT, "protocol": "TCP"}
    return [
        node_object(),
        service("echo", ECHO_VIP, [{**TCP, "nodePort": NODEPORT}], type="NodePort"),
        endpoint_slice("echo", ALL_PODS, SLICE_PORTS),
        service("empty", EMPTY_VIP, [TCP]),
        service(
            "sticky",
            STICKY_VIP,
            [TCP],
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 300}},
        ),
        endpoint_slice("sticky", ALL_PODS, SLICE_PORTS),
        service("drain", DRAIN_VIP, [hold]),
        endpoint_slice("drain", [(pod_ip(i), NODE_NAME) for i in drain_pods], HOLD_SLICE_PORTS),
    ]


def _warm(agent: Agent) -> None:
    # A Python start takes seconds under emulation; the helper's budgets assume a
    # native one, so the first request of each agent gets a long one.
    agent.call({"op": "http", "ip": NODE_IP, "port": 1, "path": "/", "timeout": 0.2}, 120.0)


def _build(c: Cluster, n_pods: int = 3, n_clients: int = 2) -> None:
    """:meth:`Cluster.build` with budgets for an emulated guest (same topology)."""
    f = c.factory
    c.node = node = f()
    f.bridge(node, "cbr0", addr=f"{POD_GATEWAY}/24")
    f.bridge(node, "up0", addr=f"{NODE_IP}/24")
    for i in range(1, n_pods + 1):
        pod, name = f(), f"pod{i}"
        f.attach(pod, node, "cbr0", addr=f"{pod_ip(i)}/24", ifname="eth0")
        pod.ip("route", "add", "default", "via", POD_GATEWAY)
        pod.popen([sys.executable, str(ECHO_SERVER), name, str(ECHO_PORT)])
        if i <= 2:
            pod.popen([sys.executable, "-c", HOLD_SERVER, name, str(HOLD_PORT)])
        c.pods[name] = pod
    for ip in CLIENT_IPS[:n_clients]:
        ns = f()
        f.attach(ns, node, "up0", addr=f"{ip}/24", ifname="eth0")
        ns.ip("route", "add", SERVICE_CIDR, "via", NODE_IP)
        c.clients.append(Client(ns, ip, Agent(ns)))
    node.ip("route", "add", "default", "via", CLIENT_IPS[0])
    for conf in ("all", "default", "up0", "cbr0"):
        node.run(["sysctl", "-qw", f"net.ipv4.conf.{conf}.send_redirects=0"])
    c.node_agent = Agent(node)
    for agent in (c.node_agent, *(cl.agent for cl in c.clients)):
        _warm(agent)
    for i in range(1, n_pods + 1):
        for port in (ECHO_PORT, HOLD_PORT) if i <= 2 else (ECHO_PORT,):
            deadline = time.monotonic() + 90
            while c.node_agent.connect("tcp", pod_ip(i), port, 1, 0.5)[0].outcome != "ok":
                assert time.monotonic() < deadline, f"pod{i} :{port} never answered"
                time.sleep(0.5)


def _start_proxy(c: Cluster) -> None:
    """:meth:`Cluster.start_proxy` in ipvs mode, with a budget for an emulated start."""
    c.proxy = c.node.popen(
        [
            str(KPROXY), "-v", "proxy", "--proxy-mode", "ipvs",
            "--objects", str(c.objects_path), "--hostname-override", NODE_NAME,
            "--cluster-cidr", CLUSTER_CIDR,
            "--healthz-bind-address", f"{NODE_IP}:{HEALTHZ_PORT}",
            "--metrics-bind-address", f"{NODE_IP}:{METRICS_PORT}",
            "--iptables-backend", BACKEND,
            "--iptables-min-sync-period", "0.1s", "--iptables-sync-period", "1s",
        ],
        stdout=c.log_path.open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    c.wait_synced(timeout=120)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    assert os.environ.get("KPROXY_IN_VM") == "1", "programs IPVS: only inside the VM"
    workdir: Path = tmp_path_factory.mktemp("ipvs-cluster")
    with NetnsFactory() as factory:
        c = Cluster(factory, workdir, BACKEND)
        try:
            _build(c)
            c.set_objects(objects())
            _start_proxy(c)
            yield c
        finally:
            c.stop_proxy()
            c.close_logs()


def ipvsadm(cluster: Cluster) -> str:
    return cluster.node.run(["ipvsadm", "-Ln"]).stdout


def weights(cluster: Cluster, vip: str, port: int) -> dict[str, int]:
    """``ip:port`` → weight of the real servers of ``vip:port`` (TCP)."""
    out = cluster.node.run(["ipvsadm", "-Ln", "-t", f"{vip}:{port}"]).stdout
    found = re.findall(r"->\s+(\d+\.\d+\.\d+\.\d+:\d+)\s+Masq\s+(\d+)", out)
    return {rs: int(w) for rs, w in found}


def pods_of(cluster: Cluster, client: int, ip: str, port: int, n: int) -> list[str]:
    answers = cluster.ask_tcp_many(client, ip, port, n, timeout=2.0)
    assert all(a.outcome == "ok" for a in answers), answers
    return [a.pod for a in answers]


def assert_round_robin(seen: list[str]) -> None:
    assert set(seen) == set(PODS), seen
    # rr: each endpoint once per round, the same order every round
    assert all(a != b for a, b in itertools.pairwise(seen)), seen
    assert seen[: len(PODS)] == seen[len(PODS) : 2 * len(PODS)], seen


def test_cluster_ip_node_port_affinity_and_no_endpoints(cluster: Cluster) -> None:
    assert_round_robin(pods_of(cluster, 0, ECHO_VIP, PORT, 6))
    assert_round_robin(pods_of(cluster, 0, NODE_IP, NODEPORT, 6))
    for client in (0, 1):
        assert len(set(pods_of(cluster, client, STICKY_VIP, PORT, 6))) == 1
    empty = cluster.ask_tcp_many(0, EMPTY_VIP, PORT, 2, timeout=1.0)
    assert all(a.outcome != "ok" for a in empty), empty
    table = ipvsadm(cluster)
    assert f"TCP  {ECHO_VIP}:{PORT} rr" in table
    assert f"TCP  {NODE_IP}:{NODEPORT} rr" in table
    assert re.search(rf"TCP  {re.escape(STICKY_VIP)}:{PORT} rr persistent 300", table), table
    link = cluster.node.run(["ip", "-o", "addr", "show", "dev", "kube-ipvs0"]).stdout
    assert {ECHO_VIP, EMPTY_VIP, STICKY_VIP, DRAIN_VIP} <= set(re.findall(r"inet (\S+)/32", link))


def test_graceful_termination_then_cleanup(cluster: Cluster) -> None:
    # One connection held open to one of the two "drain" endpoints.
    client = subprocess.Popen(
        [
            "ip", "netns", "exec", cluster.clients[0].ns.name,
            sys.executable, "-c", HOLD_CLIENT, DRAIN_VIP, str(PORT),
        ],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert client.stdout is not None and client.stdin is not None
        ready, _, _ = select.select([client.stdout], [], [], 60)
        assert ready, "the held connection got no greeting"
        held = client.stdout.readline().split()[0]
        other = "pod2" if held == "pod1" else "pod1"
        held_ip, other_ip = pod_ip(int(held[-1])), pod_ip(int(other[-1]))

        # The endpoint goes: weight 0 while its connection lives, new ones go elsewhere.
        cluster.set_objects(objects(drain_pods=(int(other[-1]),)))
        cluster.wait_synced(timeout=30)
        assert weights(cluster, DRAIN_VIP, PORT) == {
            f"{held_ip}:{HOLD_PORT}": 0,
            f"{other_ip}:{HOLD_PORT}": 1,
        }
        assert set(pods_of(cluster, 1, DRAIN_VIP, PORT, 4)) == {other}

        # The established connection finishes normally.
        client.stdin.write("go\n")
        client.stdin.flush()
        out, err = client.communicate(timeout=30)
        assert out.strip() == f"{held} bye", (out, err)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=5)

    # Back while still draining (TIME_WAIT counts as inactive): weight 1 again.
    cluster.set_objects(objects())
    cluster.wait_synced(timeout=30)
    assert set(weights(cluster, DRAIN_VIP, PORT).values()) == {1}

    # --cleanup leaves nothing behind.
    status = cluster.stop_proxy()
    assert status == 0, cluster.proxy_log()
    cleanup = cluster.node.run(
        [
            str(KPROXY), "proxy", "--cleanup", "--proxy-mode", "ipvs",
            "--iptables-backend", BACKEND, "--cluster-cidr", CLUSTER_CIDR,
            "--hostname-override", NODE_NAME,
        ],
        check=False, timeout=120,
    )  # fmt: skip
    assert cleanup.returncode == 0, (cleanup.stdout, cleanup.stderr)
    assert "TCP" not in ipvsadm(cluster)
    sets = cluster.node.run(["ipset", "list", "-n"]).stdout.split()
    assert [s for s in sets if s.startswith("KUBE-")] == []
    assert "KUBE-" not in cluster.save()
    link = cluster.node.run(["ip", "link", "show", "kube-ipvs0"], check=False)
    assert link.returncode != 0
