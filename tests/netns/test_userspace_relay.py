"""The userspace mode's relays under real traffic: the ``kproxy proxy`` process in a node netns.

Topology (from the ``netns`` fixture; nothing in the root namespace): a node
namespace with bridge ``br0`` (10.244.0.1/24), three backend pods (10.244.0.2-4)
and a client pod (10.244.0.10) on it. The node namespace runs the real
``kproxy proxy --proxy-mode userspace --objects FILE`` with
``--userspace-relay`` splice or asyncio; pods reach the ClusterIP through the
portal rules (REDIRECT).

Each backend pod serves:

- ``SUM_PORT``: reads until the client's FIN, then answers ``<pod IP> <bytes>
  <sha256>`` (so every request also checks half-close and integrity);
- ``ECHO_PORT``: sends ``<pod IP>\\n`` and then echoes everything;
- ``SUM_PORT`` over UDP: answers each datagram with ``<pod IP> <bytes>``.

What is checked, for both relays unless said otherwise: 100 MiB echoed intact
(sha256 both ways) while the endpoints change under the connection; half-close
(a large request, FIN, then the reply); no descriptor leak after 10,000
connections; a dead endpoint skipped by the dial retry (also with
``--userspace-lb=maglev``); UDP associations expire after ``--udp-timeout``.
Every client loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import hashlib
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
KPROXY = [sys.executable, "-m", "kproxy.cli"]
NODE = "node-1"
NODE_IP = "10.244.0.1"
POD_IPS = ("10.244.0.2", "10.244.0.3", "10.244.0.4")
CLIENT_IP = "10.244.0.10"
VIP = "172.30.0.20"
SUM_SVC, ECHO_SVC, UDP_SVC = 80, 81, 53
SUM_PORT, ECHO_PORT = 8080, 8081
UDP_TIMEOUT = 0.3
MiB = 1024 * 1024

SERVER = r"""
import hashlib, socket, socketserver, sys, threading
ip = sys.argv[1]
sum_port, echo_port = int(sys.argv[2]), int(sys.argv[3])

class Sum(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.settimeout(60)
        h, n, buf = hashlib.sha256(), 0, bytearray(1 << 20)
        while r := self.request.recv_into(buf):
            h.update(memoryview(buf)[:r])
            n += r
        self.request.sendall(f"{ip} {n} {h.hexdigest()}".encode())

class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.settimeout(60)
        self.request.sendall(f"{ip}\n".encode())
        buf = bytearray(1 << 20)
        while r := self.request.recv_into(buf):
            self.request.sendall(memoryview(buf)[:r])

socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer.request_queue_size = 1024
for port, handler in ((sum_port, Sum), (echo_port, Echo)):
    srv = socketserver.ThreadingTCPServer((ip, port), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((ip, sum_port))
while True:
    data, peer = udp.recvfrom(65536)
    udp.sendto(f"{ip} {len(data)}".encode(), peer)
"""

# Runs in the client pod: one JSON result on stdout. Every loop is bounded.
CLIENT = r"""
import hashlib, json, os, socket, sys, threading, time
cmd, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
args = sys.argv[4:]
MiB = 1 << 20

def ask(size, timeout=10):
    with socket.create_connection((ip, port), timeout=timeout) as c:
        c.settimeout(timeout)
        block = b"x" * min(size, MiB)
        sent = 0
        while sent < size:
            c.sendall(block[: size - sent])
            sent += min(size - sent, MiB)
        c.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    return data.decode()

if cmd == "ask":  # N requests of SIZE bytes: [status, answer]
    n, size = int(args[0]), int(args[1])
    out = []
    for _ in range(n):
        try:
            out.append(["ok", ask(size)])
        except ConnectionResetError as e:
            out.append(["reset", repr(e)])
        except OSError as e:
            out.append(["error", repr(e)])
    print(json.dumps(out))

elif cmd == "many":  # up to N connections in at most SECONDS: counts
    n, seconds = int(args[0]), float(args[1])
    ok = bad = 0
    deadline = time.monotonic() + seconds
    addr = (ip, port)
    while ok + bad < n and time.monotonic() < deadline:
        s = socket.socket()
        try:
            s.settimeout(5)
            s.connect(addr)
            s.sendall(b"x")
            s.shutdown(socket.SHUT_WR)
            got = s.recv(256)
            while s.recv(256):
                pass
            ok += got.endswith(b" 1 " + hashlib.sha256(b"x").hexdigest().encode())
            bad += not got.endswith(b" 1 " + hashlib.sha256(b"x").hexdigest().encode())
        except OSError:
            bad += 1
        finally:
            s.close()
    print(json.dumps({"ok": ok, "bad": bad}))

elif cmd == "stream":  # TOTAL MiB echoed; pauses at PAUSE MiB until the GO file exists
    total, pause_at, ready, go = int(args[0]), int(args[1]), args[2], args[3]
    c = socket.create_connection((ip, port), timeout=30)
    c.settimeout(60)
    f = c.makefile("rb")
    pod = f.readline().decode().strip()
    up, down = hashlib.sha256(), hashlib.sha256()
    got = [0]
    def reader():
        buf = bytearray(MiB)
        while True:
            r = f.readinto(buf)
            if not r:
                return
            down.update(memoryview(buf)[:r])
            got[0] += r
    t = threading.Thread(target=reader)
    t.start()
    rng = hashlib.sha256(b"seed").digest()
    for i in range(total):
        if i == pause_at:
            open(ready, "w").write(pod)
            deadline = time.monotonic() + 60
            while not os.path.exists(go) and time.monotonic() < deadline:
                time.sleep(0.05)
        block = (rng + i.to_bytes(4, "big")) * (MiB // 36) + b"\0" * (MiB % 36)
        up.update(block)
        c.sendall(block)
    c.shutdown(socket.SHUT_WR)
    t.join(120)
    c.close()
    print(json.dumps({"pod": pod, "sent": total * MiB, "echoed": got[0],
                      "up": up.hexdigest(), "down": down.hexdigest()}))

elif cmd == "udp":  # N datagrams from ONE socket, PAUSE apart: answers
    n, pause = int(args[0]), float(args[1])
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(3)
    out = []
    for _ in range(n):
        u.sendto(b"u", (ip, port))
        try:
            out.append(u.recv(256).decode())
        except OSError as e:
            out.append("error " + repr(e))
        time.sleep(pause)
    print(json.dumps(out))

elif cmd == "udpmany":  # N client sockets, one datagram each; PID's fds right after
    n, pid = int(args[0]), int(args[1])
    socks, out = [], []
    for _ in range(n):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(3)
        u.sendto(b"u", (ip, port))
        try:
            out.append(u.recv(256).decode())
        except OSError as e:
            out.append("error " + repr(e))
        socks.append(u)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    print(json.dumps({"answers": out, "fds": fds}))
"""


def objects(endpoints: tuple[str, ...]) -> str:
    ports = [
        {"name": "sum", "port": SUM_SVC, "protocol": "TCP", "targetPort": SUM_PORT},
        {"name": "echo", "port": ECHO_SVC, "protocol": "TCP", "targetPort": ECHO_PORT},
        {"name": "dns", "port": UDP_SVC, "protocol": "UDP", "targetPort": SUM_PORT},
    ]
    docs = [
        {
            "kind": "Service",
            "metadata": {"namespace": "default", "name": "relay"},
            "spec": {"clusterIP": VIP, "ports": ports},
        },
        {
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": "default",
                "name": "relay-1",
                "labels": {"kubernetes.io/service-name": "relay"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in endpoints],
            "ports": [
                {"name": "sum", "port": SUM_PORT, "protocol": "TCP"},
                {"name": "echo", "port": ECHO_PORT, "protocol": "TCP"},
                {"name": "dns", "port": SUM_PORT, "protocol": "UDP"},
            ],
        },
    ]
    return json.dumps({"kind": "List", "items": docs})


@dataclass
class Node:
    node: Netns
    client: Netns
    servers: dict[str, subprocess.Popen[str]]
    objects_file: Path
    tmp: Path
    proxy: subprocess.Popen[str] | None = None

    def start_proxy(self, relay: str, lb: str = "rr") -> None:
        argv = [
            *KPROXY,
            "-v",  # INFO: the mode logs the relay it built
            "proxy",
            "--proxy-mode=userspace",
            f"--objects={self.objects_file}",
            f"--node-ip={NODE_IP}",
            f"--hostname-override={NODE}",
            "--iptables-backend=nft",
            "--iptables-min-sync-period=100ms",
            "--healthz-bind-address=",
            "--metrics-bind-address=",
            f"--udp-timeout={int(UDP_TIMEOUT * 1000)}ms",
            f"--userspace-relay={relay}",
            f"--userspace-lb={lb}",
        ]
        log = open(self.tmp / f"kproxy-{relay}-{lb}.log", "w")  # noqa: SIM115 - closed below
        try:
            self.proxy = self.node.popen(
                argv,
                cwd=str(REPO),
                env={**os.environ, "PYTHONPATH": str(REPO)},
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        finally:
            log.close()
        deadline = time.monotonic() + 30
        while True:
            assert self.proxy.poll() is None, self.log()
            answers = self.run("ask", SUM_SVC, 1, 1, timeout=20)
            if answers[0][0] == "ok":
                break
            assert time.monotonic() < deadline, f"proxy never answered: {answers}\n{self.log()}"
            time.sleep(0.2)
        # The flag took effect: the mode names the relay it built.
        want = {"splice": "SpliceRelay", "asyncio": "AsyncioRelay"}[relay]
        assert f"userspace relay: {want}" in self.log(), self.log()

    def log(self) -> str:
        return "\n".join(p.read_text()[-4000:] for p in self.tmp.glob("kproxy-*.log"))

    def run(self, cmd: str, port: int, *args: object, timeout: float = 60) -> Any:
        argv = [sys.executable, "-c", CLIENT, cmd, VIP, str(port), *map(str, args)]
        proc = self.client.run(argv, timeout=timeout)
        return json.loads(proc.stdout)

    def set_endpoints(self, endpoints: tuple[str, ...]) -> None:
        tmp = self.objects_file.with_suffix(".tmp")
        tmp.write_text(objects(endpoints))
        tmp.replace(self.objects_file)

    def fds(self) -> int:
        assert self.proxy is not None
        return len(os.listdir(f"/proc/{self.proxy.pid}/fd"))

    def settled_fds(self) -> int:
        """The proxy's descriptor count once it stopped changing (relays close asynchronously)."""
        deadline, last = time.monotonic() + 15, -1
        while time.monotonic() < deadline:
            now = self.fds()
            if now == last:
                return now
            last = now
            time.sleep(0.5)
        raise AssertionError("the proxy's descriptors never settled")

    def wait_pods(self, want: set[str], seconds: float = 20) -> None:
        """New connections reach exactly ``want`` (the proxy applied an endpoint change)."""
        deadline = time.monotonic() + seconds
        seen: Counter[str] = Counter()
        while time.monotonic() < deadline:
            answers = self.run("ask", SUM_SVC, 9, 1)
            seen = Counter(a[1].split()[0] for a in answers if a[0] == "ok")
            if set(seen) == want and all(a[0] == "ok" for a in answers):
                return
            time.sleep(0.2)
        raise AssertionError(f"new connections reach {dict(seen)}, want {sorted(want)}")


@pytest.fixture
def cluster(netns: NetnsFactory, tmp_path: Path) -> Iterator[Node]:
    require_commands("iptables-nft-restore")
    node = netns()
    netns.bridge(node, "br0", addr=f"{NODE_IP}/24")
    node.run(["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
    servers: dict[str, subprocess.Popen[str]] = {}
    for ip in POD_IPS:
        pod = netns()
        netns.attach(pod, node, "br0", addr=f"{ip}/24", ifname="eth0")
        pod.ip("route", "add", "default", "via", NODE_IP)
        servers[ip] = pod.popen(
            [sys.executable, "-c", SERVER, ip, str(SUM_PORT), str(ECHO_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    client = netns()
    netns.attach(client, node, "br0", addr=f"{CLIENT_IP}/24", ifname="eth0")
    client.ip("route", "add", "default", "via", NODE_IP)
    objects_file = tmp_path / "objects.json"
    objects_file.write_text(objects(POD_IPS))
    n = Node(node, client, servers, objects_file, tmp_path)
    try:
        yield n
    finally:
        if n.proxy is not None and n.proxy.poll() is None:
            n.proxy.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                n.proxy.wait(timeout=15)


RELAYS = ["splice", "asyncio"]


@pytest.mark.parametrize("relay", RELAYS)
def test_100mib_intact_while_endpoints_change(cluster: Node, relay: str) -> None:
    c = cluster
    c.start_proxy(relay)
    ready, go = c.tmp / "ready", c.tmp / "go"
    argv = [sys.executable, "-c", CLIENT, "stream", VIP, str(ECHO_SVC), "100", "30"]
    stream = c.client.popen([*argv, str(ready), str(go)])
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert stream.poll() is None, stream.communicate()
            assert time.monotonic() < deadline, "the stream never got going"
            time.sleep(0.05)
        serving = ready.read_text().strip()
        # Mid-transfer: the serving pod leaves the endpoints; the others stay.
        rest = tuple(ip for ip in POD_IPS if ip != serving)
        c.set_endpoints(rest)
        c.wait_pods(set(rest))
        go.write_text("go")
        out, err = stream.communicate(timeout=120)
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.communicate()
    assert stream.returncode == 0, err
    r = json.loads(out)
    assert r["pod"] == serving
    assert r["echoed"] == r["sent"] == 100 * MiB, r
    assert r["down"] == r["up"], "the echoed bytes differ from the bytes sent"


@pytest.mark.parametrize("relay", RELAYS)
def test_half_close_and_integrity(cluster: Node, relay: str) -> None:
    c = cluster
    c.start_proxy(relay)
    size = 8 * MiB
    want = hashlib.sha256(b"x" * size).hexdigest()
    answers = c.run("ask", SUM_SVC, 3, size)
    # The request ends with the client's FIN; the reply comes after it.
    assert all(a[0] == "ok" and a[1].split()[1:] == [str(size), want] for a in answers), answers
    # An empty request (FIN at once) still gets its reply.
    empty = c.run("ask", SUM_SVC, 2, 0)
    assert all(a[0] == "ok" and a[1].split()[1] == "0" for a in empty), empty


@pytest.mark.parametrize("relay", RELAYS)
def test_no_fd_leak_after_10k_connections(cluster: Node, relay: str) -> None:
    c = cluster
    c.start_proxy(relay)
    c.run("many", SUM_SVC, 200, 30)  # warm-up: pooled pipes, lazily opened fds
    before = c.settled_fds()
    r = c.run("many", SUM_SVC, 10_000, 150, timeout=200)
    assert r == {"ok": 10_000, "bad": 0}, r
    assert c.settled_fds() == before


@pytest.mark.parametrize(
    ("relay", "lb"), [("splice", "rr"), ("asyncio", "rr"), ("splice", "maglev")]
)
def test_dead_endpoint_skipped_by_retry(cluster: Node, relay: str, lb: str) -> None:
    c = cluster
    c.start_proxy(relay, lb)
    dead = POD_IPS[0]
    c.servers[dead].kill()
    c.servers[dead].wait(timeout=5)
    answers = c.run("ask", SUM_SVC, 20, 10)
    assert all(a[0] == "ok" for a in answers), answers
    pods = Counter(a[1].split()[0] for a in answers)
    assert dead not in pods, pods
    if lb == "rr":
        assert set(pods) == set(POD_IPS[1:]), pods


def test_udp_associations_expire(cluster: Node) -> None:
    c = cluster
    c.start_proxy("splice")
    # One socket, datagrams closer than the timeout: one association, one pod.
    burst = c.run("udp", UDP_SVC, 6, UDP_TIMEOUT / 3)
    assert len({a.split()[0] for a in burst}) == 1 and "error" not in " ".join(burst), burst
    # Idle longer than the timeout: each datagram opens a new association (round robin).
    spaced = c.run("udp", UDP_SVC, 4, UDP_TIMEOUT * 3)
    assert {a.split()[0] for a in spaced} == set(POD_IPS), spaced
    # 50 clients → 50 backend sockets in the proxy, all closed once idle.
    # (The client counts the proxy's fds itself, right after its last answer:
    # /proc is shared across network namespaces.)
    before = c.settled_fds()
    assert c.proxy is not None
    r = c.run("udpmany", UDP_SVC, 50, c.proxy.pid)
    assert all(not a.startswith("error") for a in r["answers"]), r
    assert r["fds"] >= before + 50, (before, r["fds"])
    time.sleep(UDP_TIMEOUT * 4)
    assert c.settled_fds() == before
