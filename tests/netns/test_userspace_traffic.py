"""Real traffic through the userspace mode, inside throwaway network namespaces.

Topology (all from the ``netns`` fixture, nothing in the root namespace): a node
namespace with bridge ``br0`` (10.244.0.1/24), three pod namespaces on it
(10.244.0.2-4) each running a TCP+UDP server, and a client pod (10.244.0.10).
The mode runs in tests/netns/userspace_driver.py, started inside the node
namespace, behind the real proxy loop; its sockets and portal rules live there.
Pod clients take PREROUTING → KUBE-PORTALS-CONTAINER (REDIRECT); clients in the
node namespace take OUTPUT → KUBE-PORTALS-HOST (DNAT to the node IP).

The pod servers read a TCP request until the client's FIN and then answer
``<pod IP> <bytes read>``, so every TCP check also checks half-close; UDP
datagrams are answered ``<pod IP> <bytes>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.netns import Netns, NetnsFactory
from tests.support.tiers import require_commands

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "tests" / "netns" / "userspace_driver.py"
NODE = "node-1"
NODE_IP = "10.244.0.1"
POD_IPS = ("10.244.0.2", "10.244.0.3", "10.244.0.4")
CLIENT_IP = "10.244.0.10"
VIP, VIP_EMPTY, VIP_STICKY = "172.30.0.10", "172.30.0.11", "172.30.0.12"
PORT, DNS_PORT, NODE_PORT, TARGET = 80, 53, 30080, 8080
UDP_TIMEOUT = 0.3

SERVER = r"""
import socket, socketserver, sys, threading
ip, port = sys.argv[1], int(sys.argv[2])

class Tcp(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.settimeout(30)
        n = 0
        while chunk := self.request.recv(65536):
            n += len(chunk)
        self.request.sendall(f"{ip} {n}".encode())

socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
tcp = socketserver.ThreadingTCPServer((ip, port), Tcp)
threading.Thread(target=tcp.serve_forever, daemon=True).start()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((ip, port))
while True:
    data, peer = udp.recvfrom(65536)
    udp.sendto(f"{ip} {len(data)}".encode(), peer)
"""

CLIENT = r"""
import json, socket, sys, time
kind, ip, port, count, size, pause = sys.argv[1:7]
port, count, size, pause = int(port), int(count), int(size), float(pause)
out = []
udp = None
for _ in range(count):
    t = time.monotonic()
    try:
        if kind == "tcp":
            with socket.create_connection((ip, port), timeout=5) as c:
                c.settimeout(5)
                c.sendall(b"x" * size)
                c.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := c.recv(65536):
                    data += chunk
            out.append(["ok", data.decode(), time.monotonic() - t])
        else:
            # "udp": a new socket per datagram; "udp1": one socket (one association).
            if udp is None or kind == "udp":
                if udp is not None:
                    udp.close()
                udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                udp.settimeout(3)
            udp.sendto(b"u" * size, (ip, port))
            out.append(["ok", udp.recv(65536).decode(), time.monotonic() - t])
    except ConnectionResetError as e:
        out.append(["reset", repr(e), time.monotonic() - t])
    except OSError as e:
        out.append(["error", repr(e), time.monotonic() - t])
    time.sleep(pause)
print(json.dumps(out))
"""


def service(name: str, vip: str, ports: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "kind": "Service",
        "metadata": {"namespace": "default", "name": name},
        "spec": {"clusterIP": vip, "ports": ports, **spec},
    }


def slice_for(name: str, ips: tuple[str, ...], ports: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "default",
            "name": f"{name}-1",
            "labels": {"kubernetes.io/service-name": name},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
        "ports": ports,
    }


def objects() -> str:
    tcp = {"name": "http", "port": PORT, "protocol": "TCP", "targetPort": TARGET}
    udp = {"name": "dns", "port": DNS_PORT, "protocol": "UDP", "targetPort": TARGET}
    ep_ports = [
        {"name": "http", "port": TARGET, "protocol": "TCP"},
        {"name": "dns", "port": TARGET, "protocol": "UDP"},
    ]
    docs = [
        service("echo", VIP, [{**tcp, "nodePort": NODE_PORT}, udp], type="NodePort"),
        service("empty", VIP_EMPTY, [tcp]),
        service("sticky", VIP_STICKY, [tcp], sessionAffinity="ClientIP"),
        slice_for("echo", POD_IPS, ep_ports),
        slice_for("sticky", POD_IPS, ep_ports[:1]),
    ]
    return json.dumps({"kind": "List", "items": docs})


@dataclass
class Cluster:
    node: Netns
    client: Netns
    driver: subprocess.Popen[str]
    status: Path
    servers: dict[str, subprocess.Popen[str]]

    def ask(
        self, ns: Netns, kind: str, ip: str, port: int, count: int, size: int = 5, pause: float = 0
    ) -> list[tuple[str, str, float]]:
        argv = [
            sys.executable,
            "-c",
            CLIENT,
            kind,
            ip,
            str(port),
            str(count),
            str(size),
            str(pause),
        ]
        proc = ns.run(argv, timeout=30 + count * (5 + pause))
        return [(str(r[0]), str(r[1]), float(r[2])) for r in json.loads(proc.stdout)]

    def pods(self, answers: list[tuple[str, str, float]]) -> Counter[str]:
        assert all(a[0] == "ok" for a in answers), answers
        return Counter(a[1].split()[0] for a in answers)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.driver.pid}/fd"))

    def settled_fds(self) -> int:
        """The driver's fd count once it stopped changing (relays close asynchronously)."""
        deadline, last = time.monotonic() + 10, -1
        while time.monotonic() < deadline:
            now = self.fds()
            if now == last:
                return now
            last = now
            time.sleep(0.3)
        raise AssertionError("the driver's descriptors never settled")

    def state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.status.read_text())
            return data
        except (OSError, ValueError):
            return {}


@pytest.fixture
def cluster(netns: NetnsFactory, tmp_path: Path) -> Iterator[Cluster]:
    require_commands("iptables-nft-restore")
    node = netns()
    netns.bridge(node, "br0", addr=f"{NODE_IP}/24")
    # The node's own packets to a VIP need a route before nat OUTPUT rewrites them.
    node.ip("route", "add", "172.30.0.0/16", "dev", "br0")
    servers: dict[str, subprocess.Popen[str]] = {}
    for ip in POD_IPS:
        pod = netns()
        netns.attach(pod, node, "br0", addr=f"{ip}/24", ifname="eth0")
        pod.ip("route", "add", "default", "via", NODE_IP)
        servers[ip] = pod.popen([sys.executable, "-c", SERVER, ip, str(TARGET)])
    client = netns()
    netns.attach(client, node, "br0", addr=f"{CLIENT_IP}/24", ifname="eth0")
    client.ip("route", "add", "default", "via", NODE_IP)

    objects_file, status = tmp_path / "objects.json", tmp_path / "status.json"
    objects_file.write_text(objects())
    args = [str(objects_file), str(status), NODE, NODE_IP, "nft", str(UDP_TIMEOUT)]
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 - closed at teardown
    driver = node.popen(
        [sys.executable, str(DRIVER), *args],
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    c = Cluster(node, client, driver, status, servers)
    try:
        wait_ready(c, tmp_path)
        yield c
    finally:
        if driver.poll() is None:
            driver.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                driver.wait(timeout=15)
        log.close()


def wait_ready(c: Cluster, tmp_path: Path) -> None:
    deadline = time.monotonic() + 20
    while not (c.state().get("ok") and len(c.state().get("ports", {})) == 4):
        assert c.driver.poll() is None, (tmp_path / "driver.log").read_text()
        assert time.monotonic() < deadline, f"no sync: {c.state()}"
        time.sleep(0.1)
    # Servers up (bounded wait): each answers directly.
    for ip in POD_IPS:
        while c.ask(c.node, "tcp", ip, TARGET, 1)[0][0] != "ok":
            assert time.monotonic() < deadline, f"pod server {ip} did not come up"
            time.sleep(0.1)


def test_tcp_and_udp_through_portals(cluster: Cluster) -> None:
    c = cluster
    everyone = set(POD_IPS)
    # Pod → ClusterIP (REDIRECT) and node → ClusterIP (DNAT), TCP with half-close.
    assert set(c.pods(c.ask(c.client, "tcp", VIP, PORT, 12))) == everyone
    assert set(c.pods(c.ask(c.node, "tcp", VIP, PORT, 12))) == everyone
    # NodePort, from a pod and from the node itself (addrtype LOCAL chains).
    assert set(c.pods(c.ask(c.client, "tcp", NODE_IP, NODE_PORT, 6))) == everyone
    assert set(c.pods(c.ask(c.node, "tcp", NODE_IP, NODE_PORT, 6))) == everyone
    # UDP: each new client socket is a new association, round robin across pods.
    assert set(c.pods(c.ask(c.client, "udp", VIP, DNS_PORT, 9))) == everyone
    assert set(c.pods(c.ask(c.node, "udp", VIP, DNS_PORT, 6))) == everyone
    # 60 000-byte datagrams arrive whole (upstream truncated at 4 KiB).
    big = c.ask(c.client, "udp", VIP, DNS_PORT, 2, size=60000)
    assert all(a[0] == "ok" and a[1].endswith(" 60000") for a in big), big
    # One UDP socket = one association = one pod while datagrams keep flowing; once
    # idle for --udp-timeout the association is gone: the next datagram from the
    # same socket is a new association and goes to the next pod.
    burst = c.ask(c.client, "udp1", VIP, DNS_PORT, 6, pause=UDP_TIMEOUT / 3)
    assert len(c.pods(burst)) == 1, burst
    spaced = c.ask(c.client, "udp1", VIP, DNS_PORT, 4, pause=UDP_TIMEOUT * 3)
    assert set(c.pods(spaced)) == everyone, spaced
    # ClientIP affinity: one client, one pod.
    assert len(c.pods(c.ask(c.client, "tcp", VIP_STICKY, PORT, 10))) == 1
    # No endpoints: the connection is reset at once.
    refused = c.ask(c.client, "tcp", VIP_EMPTY, PORT, 3)
    assert all(a[0] in ("reset", "error") and a[2] < 1.0 for a in refused), refused
    # Half-close with a large request: the whole request arrives, the reply comes back.
    large = c.ask(c.client, "tcp", VIP, PORT, 2, size=4 << 20)
    assert all(a[0] == "ok" and a[1].endswith(f" {4 << 20}") for a in large), large
    # Rules: REDIRECT for pods, DNAT to the node IP for the node.
    nat = c.node.run(["iptables-nft-save", "-t", "nat"]).stdout
    assert "-j REDIRECT --to-ports" in nat and f"-j DNAT --to-destination {NODE_IP}:" in nat


def test_retry_no_fd_leak_and_cleanup(cluster: Cluster) -> None:
    c = cluster
    # A dead endpoint (server killed, pod still there: refused) is skipped by the retry.
    dead = POD_IPS[0]
    c.servers[dead].kill()
    c.servers[dead].wait(timeout=5)
    answers = c.pods(c.ask(c.client, "tcp", VIP, PORT, 20))
    assert set(answers) == set(POD_IPS[1:]), answers

    # No descriptor leaks after 1,000 connections.
    before = c.settled_fds()
    results = c.ask(c.client, "tcp", VIP, PORT, 1000)
    assert all(r[0] == "ok" for r in results), [r for r in results if r[0] != "ok"][:5]
    assert c.settled_fds() == before

    # SIGTERM: the driver runs cleanup(); every portal chain and jump is gone.
    c.driver.terminate()
    assert c.driver.wait(timeout=15) == 0
    assert c.state().get("cleaned") is True
    for table in ("nat", "filter"):
        saved = c.node.run(["iptables-nft-save", "-t", table]).stdout
        assert "KUBE-" not in saved, saved
