"""Real traffic through the NFQUEUE data path: the real ``kproxy proxy`` process on two nodes.

Topology (all in namespaces of one :class:`~tests.support.netns.NetnsFactory`):
a switch namespace holds bridge ``br0`` (10.244.1.0/24) with three echo pods and
both node namespaces on it; each node has its own client namespace behind a veth,
and the two clients have the SAME address (10.77.0.2), so a 5-tuple sent through
node A can be sent unchanged through node B. Each node runs
``kproxy proxy --proxy-mode userspace --userspace-datapath nfqueue --masquerade-all``
on its own objects file.

The expected endpoint of every flow is computed in the test from its 5-tuple
with :class:`kproxy.fastpath.Maglev` over the endpoints' ``IP:port`` names.
Checked: TCP and UDP reach that endpoint; the two nodes agree flow by flow;
removing an endpoint keeps (almost) every other flow where it was; with the
proxy stopped an established connection keeps working and new connections
still flow (queue bypass + the kernel fallback), and the restarted proxy
reports exactly those connections in ``kubeproxy_nfqueue_bypassed_packets_total``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest

from kproxy import fastpath
from tests.support.cluster_topology import endpoint_slice, node_object, service
from tests.support.netns import Netns, NetnsFactory
from tests.support.tiers import require, require_commands, require_module, require_root

pytestmark = pytest.mark.netns

KPROXY: Final = Path(sys.executable).with_name("kproxy")
BACKEND: Final = "nft"
CLIENT_IP, GATEWAY = "10.77.0.2", "10.77.0.1"
NODE_IPS: Final = {"node-a": "10.244.1.250", "node-b": "10.244.1.251"}
PODS: Final = {"pod1": "10.244.1.2", "pod2": "10.244.1.3", "pod3": "10.244.1.4"}
VIP, PORT, HOLD_PORT, TARGET, HOLD_TARGET = "10.96.0.10", 80, 90, 8080, 9090

POD_SERVER = r"""
import socket, socketserver, sys, threading
name, port, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

class Once(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(f"{name} saw {self.client_address[0]}\n".encode())

class Lines(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            self.wfile.write(f"{name} {line.decode().strip()}\n".encode())

socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
for handler, p in ((Once, port), (Lines, hold)):
    srv = socketserver.ThreadingTCPServer(("0.0.0.0", p), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(("0.0.0.0", port))
while True:
    data, peer = udp.recvfrom(2048)
    udp.sendto(f"{name} saw {peer[0]}\n".encode(), peer)
"""

# One batch of flows with chosen source ports; prints one JSON list of pod names
# ("" for a failure). Bounded: 1 s per flow.
CLIENT = r"""
import json, socket, sys
kind, ip, port, sports = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
out = []
for sport in (int(p) for p in sports.split(",")):
    t = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET, t)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(1.0)
    try:
        s.bind(("0.0.0.0", sport))
        s.connect((ip, port))
        if kind == "udp":
            s.send(b"hi")
        out.append(s.recv(200).decode().split()[0])
    except OSError as e:
        out.append("")
    finally:
        s.close()
print(json.dumps(out))
"""

# A long-lived connection: one line in on stdin → one answer line out.
HOLD = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
f = s.makefile("rw")
for line in sys.stdin:
    try:
        f.write(line); f.flush()
        print(f.readline().strip(), flush=True)
    except OSError as e:
        print(f"error {e!r}", flush=True)
"""

METRICS = r"""
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
"""

PORTS = [
    {"name": "tcp", "port": PORT, "targetPort": TARGET, "protocol": "TCP"},
    {"name": "udp", "port": PORT, "targetPort": TARGET, "protocol": "UDP"},
    {"name": "hold", "port": HOLD_PORT, "targetPort": HOLD_TARGET, "protocol": "TCP"},
]
SLICE_PORTS = [
    {"name": "tcp", "port": TARGET, "protocol": "TCP"},
    {"name": "udp", "port": TARGET, "protocol": "UDP"},
    {"name": "hold", "port": HOLD_TARGET, "protocol": "TCP"},
]


def objects(node: str, pods: Sequence[str]) -> list[dict[str, Any]]:
    eps = [(PODS[p], "node-a") for p in pods]
    return [
        node_object(node, NODE_IPS[node]),
        service("echo", VIP, PORTS),
        endpoint_slice("echo", eps, SLICE_PORTS),
    ]


def expected(proto: int, sport: int, pods: Sequence[str], port: int = PORT) -> str:
    """The pod Maglev picks for CLIENT_IP:sport → VIP:port over ``pods``."""
    names = sorted(f"{PODS[p]}:{TARGET}" for p in pods)
    chosen = fastpath.Maglev(names).select((proto, CLIENT_IP, sport, VIP, port))
    return next(p for p, ip in PODS.items() if chosen.startswith(ip + ":"))


def wait(what: str, cond: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Node:
    name: str
    ns: Netns
    client: Netns
    workdir: Path
    proxy: subprocess.Popen[str] | None = None
    pods: tuple[str, ...] = ()
    logs: list[Any] = field(default_factory=list)

    def write_objects(self, pods: Sequence[str]) -> None:
        path = self.workdir / f"{self.name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"apiVersion": "v1", "kind": "List", "items": objects(self.name, pods)})
        )
        tmp.replace(path)
        self.pods = tuple(pods)

    def start(self) -> None:
        log = open(self.workdir / f"{self.name}.log", "a")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        self.proxy = self.ns.popen(
            [
                str(KPROXY), "-v", "proxy",
                "--proxy-mode", "userspace", "--userspace-datapath", "nfqueue",
                "--objects", str(self.workdir / f"{self.name}.json"),
                "--hostname-override", self.name,
                "--masquerade-all",
                "--healthz-bind-address", f"{GATEWAY}:10256",
                "--metrics-bind-address", f"{GATEWAY}:10249",
                "--iptables-backend", BACKEND,
                "--iptables-min-sync-period", "0.1s",
                "--iptables-sync-period", "1s",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.wait_rules()
        wait(f"{self.name}: NFQUEUE 0 bound", lambda: self.queue_bound())

    def stop(self) -> None:
        proc, self.proxy = self.proxy, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for log in self.logs:
            log.close()
        self.logs.clear()

    def log(self) -> str:
        return (self.workdir / f"{self.name}.log").read_text(errors="replace")[-3000:]

    def queue_bound(self) -> bool:
        out = self.ns.run(["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
        return any(line.split()[:1] == ["0"] for line in out.splitlines())

    def wait_rules(self) -> None:
        """Until the nat rules DNAT to exactly this node's current pods."""
        want = {PODS[p] for p in self.pods}

        def ok() -> bool:
            assert self.proxy is not None and self.proxy.poll() is None, self.log()
            nat = self.ns.run([f"iptables-{BACKEND}-save", "-t", "nat"]).stdout
            seen = {
                ln.split("--to-destination ")[1].split(":")[0]
                for ln in nat.splitlines()
                if "--to-destination" in ln and f":{TARGET}" in ln
            }
            return seen == want

        wait(f"{self.name}: rules for {sorted(want)}", ok)

    def metrics(self) -> str:
        argv = [sys.executable, "-c", METRICS, f"http://{GATEWAY}:10249/metrics"]
        return self.ns.run(argv, timeout=15).stdout

    def metric(self, name: str) -> float | None:
        m = re.search(rf"^{re.escape(name)} (\S+)$", self.metrics(), re.M)
        return float(m[1]) if m else None

    def flows(self, kind: str, sports: Sequence[int], port: int = PORT) -> list[str]:
        argv = [sys.executable, "-c", CLIENT, kind, VIP, str(port), ",".join(map(str, sports))]
        res = self.client.run(argv, timeout=len(sports) * 1.5 + 10)
        return list(json.loads(res.stdout))


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    require_root()
    require_commands("ip", "sysctl", f"iptables-{BACKEND}", f"iptables-{BACKEND}-save")
    require(KPROXY.exists(), f"no kproxy entry point next to {sys.executable}")
    require_module("netfilterqueue")
    workdir = tmp_path_factory.mktemp("nfq")
    with NetnsFactory() as f:
        sw = f()
        f.bridge(sw, "br0")
        for name, ip in PODS.items():
            pod = f()
            f.attach(pod, sw, "br0", addr=f"{ip}/24", ifname="eth0")
            pod.popen([sys.executable, "-c", POD_SERVER, name, str(TARGET), str(HOLD_TARGET)])
        out: dict[str, Node] = {}
        for name, ip in NODE_IPS.items():
            ns, client = f(), f()
            f.attach(ns, sw, "br0", addr=f"{ip}/24", ifname="pods")
            f.link(
                client,
                ns,
                addr_a=f"{CLIENT_IP}/24",
                addr_b=f"{GATEWAY}/24",
                ifname_a="eth0",
                ifname_b="cl0",
            )
            client.ip("route", "add", "10.96.0.0/12", "via", GATEWAY)
            ns.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            out[name] = Node(name, ns, client, workdir)
        try:
            for node in out.values():
                node.write_objects(tuple(PODS))
                node.start()
            yield out
        finally:
            for node in out.values():
                node.stop()


@pytest.fixture(autouse=True)
def baseline(nodes: dict[str, Node]) -> None:
    """Every test starts with both proxies running on all three pods."""
    for node in nodes.values():
        if node.proxy is None:
            node.write_objects(tuple(PODS))
            node.start()
        elif node.pods != tuple(PODS):
            node.write_objects(tuple(PODS))
            node.wait_rules()


def test_tcp_and_udp_reach_the_endpoint_maglev_chose(nodes: dict[str, Node]) -> None:
    a = nodes["node-a"]
    sports = list(range(31000, 31040))
    for kind, proto in (("tcp", 6), ("udp", 17)):
        got = a.flows(kind, sports)
        want = [expected(proto, s, tuple(PODS)) for s in sports]
        assert got == want, (
            f"{kind}: {sum(g != w for g, w in zip(got, want, strict=True))} flows differ"
        )
    assert len(set(want)) == 3  # the flows spread over every pod


def test_two_nodes_choose_the_same_endpoint_for_the_same_5_tuple(nodes: dict[str, Node]) -> None:
    sports = list(range(32000, 32060))
    got_a = nodes["node-a"].flows("tcp", sports)
    got_b = nodes["node-b"].flows("tcp", sports)
    assert "" not in got_a and got_a == got_b
    assert got_a == [expected(6, s, tuple(PODS)) for s in sports]


def test_removing_an_endpoint_keeps_the_other_flows(nodes: dict[str, Node]) -> None:
    a = nodes["node-a"]
    sports = list(range(33000, 33150))
    before = a.flows("tcp", sports)
    assert "" not in before
    a.write_objects(("pod1", "pod2"))
    a.wait_rules()
    after = a.flows("tcp", sports)
    assert "" not in after and "pod3" not in after
    kept = [b == c for b, c in zip(before, after, strict=True) if b != "pod3"]
    share = sum(kept) / len(kept)
    print(f"flows not on the removed endpoint that kept theirs: {share:.3f} of {len(kept)}")
    assert share >= 0.97
    assert after == [expected(6, s, ("pod1", "pod2")) for s in sports]


def test_established_connection_and_new_ones_survive_a_stopped_proxy(
    nodes: dict[str, Node],
) -> None:
    a = nodes["node-a"]
    hold = a.client.popen([sys.executable, "-c", HOLD, VIP, str(HOLD_PORT)], stdin=subprocess.PIPE)
    assert hold.stdin is not None and hold.stdout is not None

    def ask(line: str) -> str:
        assert hold.stdin is not None and hold.stdout is not None
        hold.stdin.write(line + "\n")
        hold.stdin.flush()
        return hold.stdout.readline().strip()

    try:
        first = ask("one")
        pod = first.split()[0]
        assert first == f"{pod} one" and pod in PODS
        a.stop()
        wait("the queue to be unbound", lambda: not a.queue_bound(), 10)
        # Rules stay: mangle still queues NEW packets, with bypass.
        assert "--queue-bypass" in a.ns.run([f"iptables-{BACKEND}-save", "-t", "mangle"]).stdout
        for i in range(5):
            assert ask(f"again{i}") == f"{pod} again{i}"
        sports = list(range(34000, 34030))
        got = a.flows("tcp", sports)
        assert "" not in got, got
        # The fallback is random, not Maglev: several pods, not the Maglev sequence.
        assert len(set(got)) >= 2
        # The kernel counts no bypass: the restarted proxy reads them from the
        # fallback rules' counters at its first sync (one nat packet per connection).
        a.start()
        bypassed = a.metric("kubeproxy_nfqueue_bypassed_packets_total")
        fallback = a.metric(
            'kubeproxy_nfqueue_fallback_packets_total{service_port="default/echo:tcp"}'
        )
        print(f"bypassed {bypassed}, tcp fallback {fallback} for {len(sports)} connections")
        assert bypassed is not None and len(sports) <= bypassed <= len(sports) + 3
        assert fallback is not None and len(sports) <= fallback <= len(sports) + 3
        # While the handler serves the queue, new connections are marked, not bypassed.
        assert "" not in a.flows("tcp", list(range(34100, 34110)))
        assert a.metric("kubeproxy_nfqueue_bypassed_packets_total") == bypassed
    finally:
        hold.kill()
        hold.wait(timeout=5)
