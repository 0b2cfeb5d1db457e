"""The IPVS data path, end to end inside the guest: a ClusterIP balanced round-robin.

One node namespace and two pod namespaces (veth, pods route through the node)::

    pod-a 10.244.1.2 ──veth── 10.244.1.1  node  10.244.2.1 ──veth── 10.244.2.2 pod-b
                                          kube-ipvs0 (dummy, down): 10.96.0.10/32
                                          IPVS 10.96.0.10:80/TCP rr → both pods :8080 (NAT)

The node is programmed with kproxy's own verbs (:class:`~kproxy.kernel.links.Links`
for kube-ipvs0, :class:`~kproxy.kernel.ipvs_batch.IpvsBatch` for IPVS, run in the
node namespace because IPVS tables are per namespace) and upstream's sysctls
(``net.ipv4.vs.conntrack=1``, ``ip_forward=1``).  A client in the node connects to
the ClusterIP six times; ``rr`` must alternate between the two echo pods.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
import time
from ipaddress import ip_address
from pathlib import Path

import pytest

from kproxy.kernel import sysctl
from kproxy.kernel.ipvs import IPProtocol, RealServer, VirtualServer
from kproxy.kernel.ipvs_batch import IpvsBatch, IpvsOp
from kproxy.kernel.links import Links
from tests.support.netns import NetnsFactory

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parents[2]
VIP, PORT, POD_PORT = "10.96.0.10", 80, 8080
PODS = {"pod-a": ("10.244.1.1", "10.244.1.2"), "pod-b": ("10.244.2.1", "10.244.2.2")}


def _program_ipvs() -> list[str]:
    vs = VirtualServer(ip_address(VIP), PORT, IPProtocol.TCP, scheduler="rr")
    ops = [IpvsOp.add_service(vs)]
    ops += [
        IpvsOp.add_destination(vs, RealServer(ip_address(p[1]), POD_PORT)) for p in PODS.values()
    ]
    with IpvsBatch() as batch:
        batch.apply(ops).raise_for_failures()
        return sorted(str(rs) for rs in batch.dump()[vs])


def _connect(host: str, port: int, n: int) -> list[str]:
    """Connect ``n`` times (a new connection each); the pod names that answered."""
    names = []
    for _ in range(n):
        for _attempt in range(50):  # the echo servers may still be starting
            try:
                with socket.create_connection((host, port), timeout=5) as s:
                    names.append(s.makefile().readline().split()[0])
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise AssertionError(f"no answer from {host}:{port}")
    return names


def test_cluster_ip_round_robins_between_two_pods(netns: NetnsFactory) -> None:
    assert os.environ.get("KPROXY_IN_VM") == "1", "programs IPVS: only inside the VM"
    node = netns()
    for name, (gw, ip) in PODS.items():
        pod = netns()
        netns.link(node, pod, addr_a=f"{gw}/24", addr_b=f"{ip}/24", ifname_b="eth0")
        pod.ip("route", "add", "default", "via", gw)
        pod.popen([sys.executable, str(ROOT / "scripts" / "echo_server.py"), name, str(POD_PORT)])
    for key in ("net.ipv4.ip_forward", "net.ipv4.vs.conntrack"):
        sysctl.write(key, "1", netns=node.name)

    with Links(netns=node.name) as links:
        assert links.ensure_link() is True
        links.add_address(ip_address(VIP))
    assert "state DOWN" in node.ip("link", "show", "kube-ipvs0").stdout

    # every pod answers directly first (and the servers are up)
    for name, (_gw, ip) in PODS.items():
        assert node.call(_connect, ip, POD_PORT, 1) == [name]

    assert node.call(_program_ipvs) == ["10.244.1.2:8080", "10.244.2.2:8080"]
    answers = node.call(_connect, VIP, PORT, 6)
    assert len(answers) == 6
    assert sorted(set(answers)) == ["pod-a", "pod-b"]
    assert all(a != b for a, b in itertools.pairwise(answers)), answers
