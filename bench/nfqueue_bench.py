"""NFQUEUE first-packet selection vs the iptables mode and the socket relay, in one run.

Everything runs in throwaway network namespaces (root needed; without root only
the in-process decision rate is measured), bounded in count and time:

1. handler rate: a real NFQUEUE in a namespace, UDP datagrams (each one a
   ``ctstate NEW`` packet: no reply ever comes) queued in mangle OUTPUT from a
   sender process, served by a consumer process with (a) accept only, (b) the
   :class:`~kproxy.proxy.nfqueue.handler.QueueHandler` callback with the
   compiled fast path, (c) the same with the pure twin, (d) ``c-loop``: the
   compiled ``NfqLoop`` (recv → parse → Maglev → verdict in C, no GIL), (e)
   ``twin-loop``: its twin. The sender is back-pressured by the queue, so the
   rate is the consumer's capacity, unless the sender itself is slower: each
   variant runs once with the Python sender and once with a C ``sendmmsg``
   sender compiled here with gcc (bench only, not part of the package);
2. the decision alone (:meth:`Decider.decide` on a ready IPv4/TCP packet), per build;
3. the real ``kproxy proxy`` in a node namespace, three echo pods, a client
   namespace: new connections per second and connect latency (SYN → SYN-ACK as
   the client sees it) through a ClusterIP for ``iptables``, ``userspace``
   (socket relay) and ``userspace --userspace-datapath nfqueue``, plus direct to
   a pod; bulk single-stream throughput through the ClusterIP for iptables and
   nfqueue (target ≥ 0.95×).

Ratios measured in this run are what to read. Output: a table on stdout and
``nfqueue_bench.json`` in ``--out``. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
KPROXY = Path(sys.executable).with_name("kproxy")
VIP, NODE_IP, CLIENT_IP = "10.96.0.10", "10.77.0.1", "10.77.0.2"
PODS = {"pod1": "10.244.1.2", "pod2": "10.244.1.3", "pod3": "10.244.1.4"}

# -- 1. the handler behind a real queue -------------------------------------------------

CONSUMER = r"""
import importlib, ipaddress, json, sys, time
from kproxy.kernel.nfqueue import NfQueue, read_queue_stats
from kproxy.proxy.nfqueue.decider import Decider, ServiceSelection
from kproxy.proxy.nfqueue.handler import QueueHandler
from kproxy.proxy.types import ServicePortName
variant, seconds = sys.argv[1], float(sys.argv[2])
eps = tuple(f"10.1.0.{i}:8080" for i in range(1, 11))
count = [0]
if variant == "accept":
    def cb(pkt):
        count[0] += 1
        pkt.accept()
else:
    mod = "kproxy._fastpath" if variant == "compiled" else "kproxy._fastpath_py"
    impl = importlib.import_module(mod)
    d = Decider("maglev", impl=impl)
    spn = ServicePortName("default", "bench", "", "UDP")
    d.update([ServiceSelection(spn, "UDP", (ipaddress.ip_address("127.0.0.1").packed,), 5000,
                               eps, tuple(range(1, 11)))])
    h = QueueHandler(d, [0], lambda n, c: None)
    cb = h.callback
q = NfQueue(0, cb)
print("ready", flush=True)
import select
t0 = None
deadline = time.monotonic() + seconds + 5
n0 = 0
while time.monotonic() < deadline:
    r, _, _ = select.select([q.fileno()], [], [], 0.5)
    if r:
        if t0 is None:
            t0, n0 = time.monotonic(), 0
            deadline = t0 + seconds
        q.process_pending()
t1 = time.monotonic()
n = count[0] if variant == "accept" else h.packets
st = read_queue_stats().get(0)
marked = 0 if variant == "accept" else sum(d.marks_by_service().values())
print(json.dumps({"packets": n, "seconds": t1 - (t0 or t1), "marked": marked,
                  "queue_dropped": st.queue_dropped if st else -1,
                  "user_dropped": st.user_dropped if st else -1}), flush=True)
q.close()
"""

LOOP_CONSUMER = r"""
import importlib, ipaddress, json, sys, time
from kproxy.kernel.nfqueue import read_queue_stats
from kproxy.proxy.nfqueue.decider import Decider, ServiceSelection
from kproxy.proxy.nfqueue.rules import MARK_MASK
from kproxy.proxy.types import ServicePortName
variant, seconds = sys.argv[1], float(sys.argv[2])
impl = importlib.import_module("kproxy._fastpath" if variant == "c-loop" else "kproxy._fastpath_py")
eps = tuple(f"10.1.0.{i}:8080" for i in range(1, 11))
d = Decider("maglev", impl=impl)
spn = ServicePortName("default", "bench", "", "UDP")
d.update([ServiceSelection(spn, "UDP", (ipaddress.ip_address("127.0.0.1").packed,), 5000,
                           eps, tuple(range(1, 11)))])
loop = impl.NfqLoop([0], mark_mask=MARK_MASK, delegate=d.decide)
loop.open()
loop.set_services(d.loop_entries())
print("ready", flush=True)
deadline = time.monotonic() + 10
# The window starts with the run() call that saw the first packet: the twin's
# binding drains until the queue is empty, so that one call may last long.
t0 = time.monotonic()
while time.monotonic() < deadline and loop.run(0.01) == 0:
    t0 = time.monotonic()
n0 = 0
while (left := t0 + seconds - time.monotonic()) > 0:
    loop.run(left)
t1 = time.monotonic()
st = read_queue_stats().get(0)
print(json.dumps({"packets": loop.stats()["packets"] - n0, "seconds": t1 - t0,
                  "marked": sum(n for _, n in loop.take_marked()),
                  "fail_open": loop.fail_open, "gso": loop.gso,
                  "queue_dropped": st.queue_dropped if st else -1,
                  "user_dropped": st.user_dropped if st else -1}), flush=True)
loop.close()
"""

# Bench only (never shipped): a sendmmsg sender, so that a Python sender's
# ~120-200k datagrams/s does not cap what the consumer can show.
C_SENDER = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
static double now(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
int main(int argc, char **argv) {
    double end = now() + atof(argv[1]);
    int s = socket(AF_INET, SOCK_DGRAM, 0), big = 1 << 20;
    setsockopt(s, SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(5000)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) return 1;
    static char payload[64];
    struct iovec iov = {payload, sizeof payload};
    struct mmsghdr m[64];
    memset(m, 0, sizeof m);
    for (int i = 0; i < 64; i++) { m[i].msg_hdr.msg_iov = &iov; m[i].msg_hdr.msg_iovlen = 1; }
    while (now() < end) sendmmsg(s, m, 64, 0);
    return 0;
}
"""


def c_sender(workdir: Path) -> Path | None:
    """Compile the bench's C sender with gcc; None when there is no compiler."""
    src, exe = workdir / "nfq_sender.c", workdir / "nfq_sender"
    src.write_text(C_SENDER)
    try:
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(src)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return exe


SENDER = r"""
import socket, sys, time
seconds = float(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
payload = b"x" * 64
end = time.monotonic() + seconds
addr = ("127.0.0.1", 5000)
while time.monotonic() < end:
    for _ in range(256):
        try:
            s.sendto(payload, addr)
        except OSError:
            pass
"""

SINK = r"""
import socket, time, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
s.bind(("127.0.0.1", 5000))
time.sleep(float(sys.argv[1]))
"""


def _netns() -> str:
    name = f"kpbench-nfq-{os.getpid()}-{os.urandom(2).hex()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return name


@contextlib.contextmanager
def scratch_netns() -> Iterator[str]:
    name = _netns()
    try:
        yield name
    finally:
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for pid in out.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "del", name], check=False)


def handler_rate(variant: str, seconds: float, sender: Path | None = None) -> dict[str, Any]:
    with scratch_netns() as ns:
        ex = ["ip", "netns", "exec", ns]
        rule = "-t mangle -A OUTPUT -p udp --dport 5000 -j NFQUEUE --queue-num 0 --queue-bypass"
        subprocess.run([*ex, "iptables-nft", *rule.split()], check=True)
        sink = subprocess.Popen([*ex, PY, "-c", SINK, str(seconds + 15)], cwd=REPO)
        script = LOOP_CONSUMER if variant.endswith("-loop") else CONSUMER
        cons = subprocess.Popen(
            [*ex, "taskset", "-c", "0", PY, "-c", script, variant, str(seconds)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert cons.stdout is not None
        cons.stdout.readline()  # "ready"
        cpus = os.cpu_count() or 1
        pin = ["taskset", "-c", "1"] if cpus > 1 else []
        argv = [str(sender)] if sender is not None else [PY, "-c", SENDER]
        send = subprocess.Popen([*ex, *pin, *argv, str(seconds + 1)], cwd=REPO)
        try:
            out, _ = cons.communicate(timeout=seconds + 30)
        finally:
            for p in (send, sink, cons):
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(timeout=10)
        res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        res["pps"] = res["packets"] / res["seconds"] if res["seconds"] else 0.0
        res["sender"] = "c-sendmmsg" if sender is not None else "python"
        return res


# -- 2. the decision alone ---------------------------------------------------------------


def decide_rate(module: str, n: int) -> float:
    import ipaddress

    from kproxy.proxy.nfqueue.decider import Decider, ServiceSelection
    from kproxy.proxy.types import ServicePortName

    impl = importlib.import_module(module)
    d = Decider("maglev", impl=impl)
    eps = tuple(f"10.1.0.{i}:8080" for i in range(1, 11))
    spn = ServicePortName("default", "bench", "", "TCP")
    vip = ipaddress.ip_address(VIP).packed
    d.update([ServiceSelection(spn, "TCP", (vip,), 80, eps, tuple(range(1, 11)))])
    pkt = bytes.fromhex("450000280001000040060000" + "0a4d0002" + "0a60000a") + bytes.fromhex(
        "9c400050000000000000000050022000" + "00000000"
    )
    decide = d.decide
    t = time.perf_counter()
    for _ in range(n):
        decide(pkt)
    return n / (time.perf_counter() - t)


# -- 3. the real proxy, three modes ----------------------------------------------------

POD = r"""
import socket, socketserver, sys, threading
name = sys.argv[1]
class Once(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(name.encode())
class Sink(socketserver.BaseRequestHandler):
    def handle(self):
        n = 0
        while True:
            b = self.request.recv(1 << 18)
            if not b:
                break
            n += len(b)
        self.request.sendall(str(n).encode())
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer.request_queue_size = 1024
a = socketserver.ThreadingTCPServer(("0.0.0.0", 8080), Once)
b = socketserver.ThreadingTCPServer(("0.0.0.0", 5001), Sink)
threading.Thread(target=a.serve_forever, daemon=True).start()
b.serve_forever()
"""

CONNECT = r"""
import json, socket, sys, time
ip, port, seconds, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
lat, fail = [], 0
t0 = time.monotonic()
while time.monotonic() - t0 < seconds and len(lat) + fail < limit:
    s = socket.socket()
    s.settimeout(2)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    try:
        t = time.perf_counter()
        s.connect((ip, port))
        lat.append(time.perf_counter() - t)
        s.recv(64)
    except OSError:
        fail += 1
    finally:
        s.close()
el = time.monotonic() - t0
lat.sort()
pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6 if lat else None
row = {"conn_s": len(lat) / el, "p50_us": pick(0.5), "p99_us": pick(0.99), "failed": fail}
print(json.dumps(row))
"""

BULK = r"""
import json, socket, sys, time
ip, port, mib, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
buf = b"\0" * (1 << 18)
s = socket.create_connection((ip, port), timeout=5)
t0 = time.monotonic()
sent = 0
while sent < mib << 20 and time.monotonic() - t0 < seconds:
    s.sendall(buf)
    sent += len(buf)
s.shutdown(socket.SHUT_WR)
s.settimeout(30)
got = int(s.recv(64) or b"0")
el = time.monotonic() - t0
print(json.dumps({"gbit_s": got * 8 / el / 1e9, "bytes": got}))
"""


def _objects(path: Path) -> None:
    ports = [
        {"name": "echo", "port": 80, "targetPort": 8080, "protocol": "TCP"},
        {"name": "sink", "port": 81, "targetPort": 5001, "protocol": "TCP"},
    ]
    items = [
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "bench-node"},
            "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"namespace": "default", "name": "echo"},
            "spec": {"clusterIP": VIP, "ports": ports},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": "default",
                "name": "echo-x",
                "labels": {"kubernetes.io/service-name": "echo"},
            },
            "addressType": "IPv4",
            "ports": [
                {"name": "echo", "port": 8080, "protocol": "TCP"},
                {"name": "sink", "port": 5001, "protocol": "TCP"},
            ],
            "endpoints": [
                {"addresses": [ip], "conditions": {"ready": True}, "nodeName": "bench-node"}
                for ip in PODS.values()
            ],
        },
    ]
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def modes_compare(seconds: float, bulk_mib: int) -> dict[str, Any]:
    from tests.support.netns import NetnsFactory

    results: dict[str, Any] = {}
    with NetnsFactory() as f, tempfile.TemporaryDirectory() as tmp:
        objects = Path(tmp) / "objects.json"
        _objects(objects)
        node, client = f(), f()
        f.bridge(node, "cbr0", addr="10.244.1.1/24")
        for name, ip in PODS.items():
            pod = f()
            f.attach(pod, node, "cbr0", addr=f"{ip}/24", ifname="eth0")
            pod.ip("route", "add", "default", "via", "10.244.1.1")
            pod.popen([PY, "-c", POD, name], stdout=subprocess.DEVNULL)
        f.link(client, node, addr_a=f"{CLIENT_IP}/24", addr_b=f"{NODE_IP}/24")
        client.ip("route", "add", "10.96.0.0/12", "via", NODE_IP)
        client.ip("route", "add", "10.244.0.0/16", "via", NODE_IP)
        node.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        time.sleep(1.0)

        def measure(label: str, ip: str, bulk: bool) -> None:
            limit = str(int(seconds * 20000))
            r = client.run(
                [PY, "-c", CONNECT, ip, "80" if ip == VIP else "8080", str(seconds), limit],
                timeout=seconds + 60,
            )
            row: dict[str, Any] = json.loads(r.stdout)
            if bulk:
                port = "81" if ip == VIP else "5001"
                b = client.run([PY, "-c", BULK, ip, port, str(bulk_mib), "10"], timeout=90)
                row.update(json.loads(b.stdout))
            results[label] = row

        measure("direct", PODS["pod1"], True)
        modes = {
            "iptables": ["--proxy-mode", "iptables"],
            "userspace-socket": ["--proxy-mode", "userspace"],
            "userspace-nfqueue": ["--proxy-mode", "userspace", "--userspace-datapath", "nfqueue"],
        }
        for label, flags in modes.items():
            proc = node.popen(
                [str(KPROXY), "proxy", *flags, "--objects", str(objects),
                 "--hostname-override", "bench-node", "--masquerade-all",
                 "--healthz-bind-address", "", "--metrics-bind-address", "",
                 "--iptables-backend", "nft", "--iptables-min-sync-period", "0.1s"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    probe = client.run([PY, "-c", CONNECT, VIP, "80", "0.5", "3"], timeout=30)
                    if json.loads(probe.stdout)["failed"] == 0:
                        break
                    time.sleep(0.3)
                measure(label, VIP, label != "userspace-socket")
            finally:
                proc.terminate()
                proc.wait(timeout=15)
                subprocess.run(
                    [*node.argv([str(KPROXY), "proxy", "--cleanup", "--iptables-backend", "nft"])],
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
                node.run(["conntrack", "-F"], check=False)
    return results


def run(seconds: float, kernel: bool, bulk_mib: int, modes: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"decide_per_s": {}}
    n = 200_000
    for module in ("kproxy._fastpath", "kproxy._fastpath_py"):
        with contextlib.suppress(ImportError):
            out["decide_per_s"][module] = decide_rate(module, n if "py" not in module else n // 4)
    if not kernel or os.geteuid() != 0:
        return out
    variants = ["accept", "compiled", "twin", "twin-loop"]
    with contextlib.suppress(ImportError):
        importlib.import_module("kproxy._fastpath")
        variants.insert(1, "c-loop")
    out["handler"] = {v: handler_rate(v, seconds) for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        exe = c_sender(Path(tmp))
        if exe is not None:
            out["handler_c_sender"] = {v: handler_rate(v, seconds, exe) for v in variants}
    if modes:
        out["modes"] = modes_compare(seconds, bulk_mib)
    return out


def table(r: dict[str, Any]) -> str:
    lines = ["decision alone (Decider.decide, IPv4/TCP, 10 endpoints, Maglev):"]
    for k, v in r["decide_per_s"].items():
        lines.append(f"  {k:22s} {v / 1e3:8.0f} k/s")
    for key, sender in (("handler", "Python sender"), ("handler_c_sender", "C sendmmsg sender")):
        if key not in r:
            continue
        lines.append(
            f"handler behind a real NFQUEUE, consumer on one core, {sender} "
            "(accept/compiled/twin: python-netfilterqueue callback; *-loop: NfqLoop; target 150k):"
        )
        for k, v in r[key].items():
            lines.append(
                f"  {k:10s} {v['pps'] / 1e3:7.0f} k verdicts/s  marked={v['marked']}"
                f"  queue_dropped={v['queue_dropped']} user_dropped={v['user_dropped']}"
            )
    if "modes" in r:
        lines.append("real kproxy, ClusterIP, client → node → pod (one run):")
        base = r["modes"].get("iptables", {})
        for k, v in r["modes"].items():
            bulk = f"  bulk {v['gbit_s']:.2f} Gbit/s" if "gbit_s" in v else ""
            ratio = ""
            if "gbit_s" in v and base.get("gbit_s"):
                ratio = f" ({v['gbit_s'] / base['gbit_s']:.2f}× iptables)"
            lines.append(
                f"  {k:18s} {v['conn_s']:7.0f} conn/s  connect p50 {v['p50_us']:.0f} µs"
                f" p99 {v['p99_us']:.0f} µs  failed {v['failed']}{bulk}{ratio}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--bulk-mib", type=int, default=2048, help="bytes per bulk stream")
    ap.add_argument("--no-kernel", action="store_true", help="decision rate only")
    ap.add_argument("--no-modes", action="store_true", help="skip the real-proxy comparison")
    ap.add_argument("--quick", action="store_true", help="1 s measurements, 256 MiB bulk")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    # scripts/bench.sh passes every bench the same extra flags: ignore the others'.
    args, _ = ap.parse_known_args(argv)
    if args.quick:
        args.seconds, args.bulk_mib = 1.0, 256
    result = run(args.seconds, not args.no_kernel, args.bulk_mib, not args.no_modes)
    print(table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nfqueue_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
