"""Part 1 of `make demo`: one node following an objects file, rules and partial sync.

A node namespace with a bridge for pods, three echo pods, and a client
namespace routed to the node.  The real proxy (`kproxy proxy --proxy-mode
iptables --objects FILE`) runs inside the node namespace; the client sends
requests to the ClusterIP and the NodePort and we count which pod answered.
Then one endpoint is removed from the objects file, the proxy does a partial
sync, and the traffic follows.  Everything is removed at the end, even on
failure; the host's own namespace is never touched.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TAG = f"kpdemo-{os.getpid()}"
NODE, CLIENT = f"{TAG}-node", f"{TAG}-client"
PODS = {f"{TAG}-pod{i}": f"10.244.1.{i + 1}" for i in (1, 2, 3)}
NODE_IP, CLIENT_IP = "10.77.0.1", "10.77.0.2"
CLUSTER_IP, PORT, NODE_PORT = "10.96.0.10", 80, 30080
procs: list[subprocess.Popen[bytes]] = []


def sh(*argv: str, ns: str | None = None, check: bool = True) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    return subprocess.run(cmd, check=check, capture_output=True, text=True).stdout


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def build_topology() -> None:
    for ns in (NODE, CLIENT, *PODS):
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "set", "lo", "up", ns=ns)
    sh("ip", "-n", NODE, "link", "add", "cbr0", "type", "bridge")
    sh("ip", "-n", NODE, "addr", "add", "10.244.1.1/24", "dev", "cbr0")
    sh("ip", "-n", NODE, "link", "set", "cbr0", "up")
    for i, (pod, ip) in enumerate(PODS.items()):
        host_if = f"veth{i}"
        sh("ip", "-n", NODE, "link", "add", host_if, "type", "veth", "peer", "eth0", "netns", pod)
        sh("ip", "-n", NODE, "link", "set", host_if, "master", "cbr0", "up")
        sh("ip", "-n", pod, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", pod, "link", "set", "eth0", "up")
        sh("ip", "-n", pod, "route", "add", "default", "via", "10.244.1.1")
    sh("ip", "-n", NODE, "link", "add", "eth0", "type", "veth", "peer", "eth0", "netns", CLIENT)
    sh("ip", "-n", NODE, "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
    sh("ip", "-n", NODE, "link", "set", "eth0", "up")
    sh("ip", "-n", CLIENT, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
    sh("ip", "-n", CLIENT, "link", "set", "eth0", "up")
    sh("ip", "-n", CLIENT, "route", "add", "10.96.0.0/12", "via", NODE_IP)
    # A real node routes everything it does not know to the outside world; without
    # a route, traffic to a ClusterIP with no endpoints dies in routing, before
    # the REJECT rule can answer it.
    sh("ip", "-n", NODE, "route", "add", "default", "via", CLIENT_IP)
    # That route leaves by the interface the client's packets come in on, so the
    # kernel would send ICMP redirects, and their rate limit would swallow the
    # REJECT's ICMP error.  A real node's uplink is elsewhere.
    for conf in ("all", "default", "eth0"):
        sh("sysctl", "-qw", f"net.ipv4.conf.{conf}.send_redirects=0", ns=NODE)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=NODE)


def start(ns: str, *argv: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out, stderr=out)
    procs.append(proc)
    return proc


def ask(ip: str, port: int) -> str:
    """One request from the client namespace; returns the pod that answered (or the error)."""
    code = (
        "import socket,sys\n"
        "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=2)\n"
        "print(s.recv(200).decode().split()[0])\n"
    )
    res = subprocess.run(
        ["ip", "netns", "exec", CLIENT, PY, "-c", code, ip, str(port)],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return res.stdout.strip() or res.stderr.strip().splitlines()[-1]


def fetch(url: str) -> str:
    """GET ``url`` from the client namespace."""
    code = (
        "import sys,urllib.request\n"
        "print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())"
    )
    return sh(PY, "-c", code, url, ns=CLIENT)


def spread(ip: str, port: int, n: int = 30) -> collections.Counter[str]:
    return collections.Counter(ask(ip, port).replace(f"{TAG}-", "") for _ in range(n))


def wait_for(what: str, cond: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(cond) and cond():
            return
        time.sleep(0.2)
    raise SystemExit(f"demo: timed out waiting for {what}")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="kpdemo-"))
    objects = work / "objects.yaml"
    shutil.copy(REPO / "examples" / "demo-objects.yaml", objects)
    kproxy = str(Path(PY).with_name("kproxy"))
    print(subprocess.run([kproxy, "version"], capture_output=True, text=True).stdout.strip())

    step("kproxy render iptables: the rules a full sync writes for examples/demo-objects.yaml")
    rendered = subprocess.run(
        [
            kproxy,
            "render",
            "iptables",
            "--objects",
            str(objects),
            "--hostname-override",
            "kpdemo-node",
            "--cluster-cidr",
            "10.244.0.0/16",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    print("\n".join(line for line in rendered.splitlines() if "default/echo" in line))

    step(f"network namespaces: node {NODE}, client {CLIENT}, pods {', '.join(PODS)}")
    build_topology()
    for pod in PODS:
        start(pod, PY, str(REPO / "scripts" / "echo_server.py"), pod, "8080")

    step("kproxy proxy --proxy-mode iptables --objects FILE, inside the node namespace")
    start(
        NODE,
        kproxy,
        "-v",
        "proxy",
        "--proxy-mode",
        "iptables",
        "--objects",
        str(objects),
        "--hostname-override",
        "kpdemo-node",
        "--cluster-cidr",
        "10.244.0.0/16",
        "--healthz-bind-address",
        f"{NODE_IP}:10256",
        "--metrics-bind-address",
        f"{NODE_IP}:10249",
        "--iptables-min-sync-period",
        "0.2s",
        log=work / "proxy.log",
    )
    wait_for(
        "the proxy's first sync", lambda: "KUBE-SVC-" in sh("iptables-save", "-t", "nat", ns=NODE)
    )
    nat = sh("iptables-save", "-t", "nat", ns=NODE)
    print(f"node namespace nat table: {nat.count(chr(10) + '-A ')} rules")

    step(f"30 connections to ClusterIP {CLUSTER_IP}:{PORT} (client -> node -> pod)")
    print(dict(spread(CLUSTER_IP, PORT)))
    step(f"30 connections to NodePort {NODE_IP}:{NODE_PORT}")
    print(dict(spread(NODE_IP, NODE_PORT)))
    step("a Service without endpoints is refused at once (REJECT)")
    t0 = time.monotonic()
    print(f"10.96.0.11:80 -> {ask('10.96.0.11', 80)} in {time.monotonic() - t0:.2f}s")

    step("/healthz and /proxyMode")
    for url in (f"http://{NODE_IP}:10256/healthz", f"http://{NODE_IP}:10249/proxyMode"):
        print(url, "->", fetch(url).strip())

    step("remove pod3's endpoint from the objects file: the proxy does a partial sync")
    pod3 = "- addresses: [10.244.1.4]\n  conditions: {ready: true}\n  nodeName: kpdemo-node\n"
    objects.write_text(objects.read_text().replace(pod3, ""))
    wait_for(
        "the partial sync", lambda: "10.244.1.4" not in sh("iptables-save", "-t", "nat", ns=NODE)
    )
    print(dict(spread(CLUSTER_IP, PORT)))
    metrics = fetch(f"http://{NODE_IP}:10249/metrics")
    for line in metrics.splitlines():
        if line.startswith(
            (
                "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
                "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
                "kubeproxy_sync_proxy_rules_iptables_total",
            )
        ):
            print(line)


def cleanup() -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
    for ns in (NODE, CLIENT, *PODS):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("demo: needs root (it creates network namespaces)")
    try:
        main()
    finally:
        cleanup()
        print(f"\ncleaned up: namespaces {TAG}-* removed")
