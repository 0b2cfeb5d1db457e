"""Real traffic through the iptables mode, inside throwaway network namespaces.

Topology (all inside namespaces from the ``netns`` fixture, none in the root
namespace): a node namespace holding bridge ``br0`` (10.244.0.1/24) and three
pod namespaces on it (10.244.0.2-4), each running a tiny TCP server that answers
with its own address. The mode programs the node namespace with the real
``iptables-restore``; the client runs in the node namespace, so its packets take
nat OUTPUT → KUBE-SERVICES as a pod-less node's would.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from kproxy.kernel.iptables import BackendChoice, Iptables
from kproxy.proxy.core import ProxyCore
from kproxy.proxy.health import ProxyHealth
from kproxy.proxy.iptables.chains import LocalDetector, RenderOptions
from kproxy.proxy.iptables.mode import IptablesMode
from kproxy.proxy.metrics import ProxyMetrics
from kproxy.proxy.proxier import Proxier
from kproxy.proxy.sources import dispatch, parse_objects
from tests.support.netns import Netns, NetnsFactory
from tests.support.tiers import require_commands

pytestmark = pytest.mark.netns

NODE = "node-1"
POD_IPS = ("10.244.0.2", "10.244.0.3", "10.244.0.4")
VIP, VIP_EMPTY, PORT, TARGET = "172.30.0.10", "172.30.0.11", 80, 8080
CONNECTIONS = 30

SERVER = r"""
import socket, sys
ip, port = sys.argv[1], int(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ip, port))
s.listen(64)
s.settimeout(60)  # never outlive a stuck test for long; teardown kills it anyway
while True:
    c, _ = s.accept()
    with c:
        c.sendall(c.getsockname()[0].encode())
"""

CLIENT = r"""
import json, socket, sys, time
ip, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = []
for _ in range(count):
    t = time.monotonic()
    try:
        with socket.create_connection((ip, port), timeout=3) as c:
            c.settimeout(3)
            out.append(["ok", c.recv(64).decode(), time.monotonic() - t])
    except ConnectionRefusedError:
        out.append(["refused", "", time.monotonic() - t])
    except OSError as e:
        out.append(["error", repr(e), time.monotonic() - t])
print(json.dumps(out))
"""


def objects(endpoints: tuple[str, ...]) -> str:
    def svc(name: str, vip: str) -> dict[str, Any]:
        return {
            "kind": "Service",
            "metadata": {"namespace": "default", "name": name},
            "spec": {
                "clusterIP": vip,
                "ports": [{"name": "http", "port": PORT, "protocol": "TCP", "targetPort": TARGET}],
            },
        }

    es = {
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "default",
            "name": "echo-1",
            "labels": {"kubernetes.io/service-name": "echo"},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in endpoints],
        "ports": [{"name": "http", "port": TARGET, "protocol": "TCP"}],
    }
    docs = [svc("echo", VIP), svc("empty", VIP_EMPTY), es]
    return json.dumps({"kind": "List", "items": docs})


def connect(node: Netns, ip: str, count: int) -> list[tuple[str, str, float]]:
    proc = node.run([sys.executable, "-c", CLIENT, ip, str(PORT), str(count)], timeout=count * 7)
    return [(str(r[0]), str(r[1]), float(r[2])) for r in json.loads(proc.stdout)]


@pytest.fixture
def cluster(netns: NetnsFactory) -> Iterator[Netns]:
    """The node namespace with three echo pods behind its bridge."""
    require_commands("iptables-legacy-restore", "iptables-nft-restore")
    node = netns()
    netns.bridge(node, "br0", addr="10.244.0.1/24")
    # Locally generated packets need a route before nat OUTPUT rewrites them.
    node.ip("route", "add", "172.30.0.0/16", "dev", "br0")
    for ip in POD_IPS:
        pod = netns()
        netns.attach(pod, node, "br0", addr=f"{ip}/24", ifname="eth0")
        pod.ip("route", "add", "default", "via", "10.244.0.1")
        pod.popen([sys.executable, "-c", SERVER, ip, str(TARGET)])
    # Servers up: each answers on its own address (bounded wait).
    deadline = time.monotonic() + 15
    for ip in POD_IPS:
        while True:
            proc = node.run(
                [sys.executable, "-c", CLIENT, ip, str(TARGET), "1"], check=False, timeout=15
            )
            if proc.returncode == 0 and json.loads(proc.stdout)[0][0] == "ok":
                break
            assert time.monotonic() < deadline, f"echo server {ip} did not come up"
            time.sleep(0.1)
    yield node


def proxy_for(node: Netns, backend: BackendChoice) -> tuple[ProxyCore, IptablesMode, Proxier]:
    core = ProxyCore(NODE)
    ipt = Iptables("ipv4", backend, netns=node.name)
    options = RenderOptions(
        local_detector=LocalDetector.by_cidr("10.244.0.0/16"),
        random_fully=ipt.has_random_fully(),
        node_ip="10.244.0.1",
        node_name=NODE,
    )
    mode = IptablesMode(ipt, options, ProxyMetrics())
    proxier = Proxier(core, mode, health=ProxyHealth(60), metrics=ProxyMetrics())
    return core, mode, proxier


@pytest.mark.parametrize("backend", ["legacy", "nft"])
def test_cluster_ip_reaches_every_endpoint(cluster: Netns, backend: BackendChoice) -> None:
    node = cluster
    core, mode, proxier = proxy_for(node, backend)
    try:
        before = parse_objects(objects(POD_IPS))
        dispatch(core, {}, before, NODE)
        core.synced()
        result = proxier.sync_now()
        assert result is not None and result.ok and result.full, result

        answers = connect(node, VIP, CONNECTIONS)
        assert all(r[0] == "ok" for r in answers), answers
        assert {r[1] for r in answers} == set(POD_IPS)

        # No endpoints: REJECT, so refused at once rather than a timeout.
        refused = connect(node, VIP_EMPTY, 3)
        assert all(r[0] == "refused" and r[2] < 1.0 for r in refused), refused

        # A partial sync after one endpoint goes: traffic reaches only the others.
        after = parse_objects(objects(POD_IPS[:2]))
        dispatch(core, before, after, NODE)
        result = proxier.sync_now()
        assert result is not None and result.ok and not result.full, result
        answers = connect(node, VIP, CONNECTIONS)
        assert all(r[0] == "ok" for r in answers), answers
        assert {r[1] for r in answers} == set(POD_IPS[:2])
    finally:
        mode.cleanup()
    saved = node.run([f"iptables-{backend}-save"]).stdout
    assert "KUBE-" not in saved, saved
    assert connect(node, VIP, 1)[0][0] != "ok"
