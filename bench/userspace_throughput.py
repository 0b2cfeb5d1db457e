"""Userspace mode data path: kproxy vs a direct connection, HAProxy and socat, in one run.

One topology, built here in throwaway network namespaces (``kpbench-<pid>-c/n/b``)
and deleted in a ``finally``::

    client ns 10.10.1.2 ──veth── 10.10.1.1 node ns 10.10.2.1 ──veth── 10.10.2.2 backend ns

The backend namespace runs three small servers: a sink (reads until EOF, answers
the byte count), an echo server (1-byte ping/pong) and a request/response
server (answers one byte and closes: one short request per connection). The
node namespace forwards (``direct``) or runs one proxy at a time in front of the
same servers:

- ``haproxy``: Debian's HAProxy, ``mode tcp`` with ``option splice-auto``;
- ``socat``: ``socat TCP-LISTEN:P,fork,reuseaddr TCP:backend`` (copy relay, a
  process per connection);
- ``kproxy-splice`` / ``kproxy-asyncio``: the real ``kproxy proxy --proxy-mode
  userspace --objects FILE`` process with ``--userspace-relay`` splice or asyncio;
  the client talks to a ClusterIP and the portal rules REDIRECT it to the proxy
  port (so kproxy also pays for the nat table and conntrack, as the mode does).

The machine may be shared, so targets are measured in interleaved rounds
(``--rounds``; medians reported): phase A runs direct, HAProxy, socat and
kproxy with the splice relay (the default) side by side; phase B direct,
HAProxy and kproxy with the asyncio relay (one kproxy owns the portal chains at
a time). kproxy's nat rules stay loaded during a phase, so every target of the
phase pays for conntrack alike; ratios compare targets of the same phase.

Per target and round: one single-stream transfer of ``--bulk-mib`` MiB (bounded
by ``--bulk-seconds``) → throughput and proxy CPU seconds per GiB relayed
(utime+stime of the proxy process, plus its reaped children's for socat);
a burst of short requests, one connection each, from ``--conn-procs`` client
processes (bounded by ``--conn-count`` and ``--conn-seconds``) → connections per
second and proxy CPU µs per connection; ``--pings`` 1-byte request/responses on
one persistent connection (bounded in time) → p50/p99 round trip, and what it
adds over ``direct``. It then runs the fast-path comparison of
:mod:`bench.userspace_fastpath` (selection, parsing, relay loop) inside the
client namespace and reports compiled / twin speed-ups.

Targets (ratios, one run; reported, never asserted): kproxy bulk ≥ 0.9× HAProxy
and ≥ 0.5× direct; CPU/GiB ≤ 1.2× HAProxy's; connection rate ≥ 0.5× HAProxy;
fast path ≥ 10× twin on selection and parsing. The machine is small (the
client, the proxy and the backend share its CPUs), so absolute numbers are
noisy: read the ratios.

Output: a table on stdout, ``userspace_throughput.csv`` / ``.json`` / ``.png`` in
``--out``. Needs root, ``ip``, ``iptables-nft``; HAProxy and socat are skipped
(and reported as such) when not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
MiB = 1024 * 1024
GiB = 1024 * MiB
CLIENT_IP, NODE_C, NODE_B, BACKEND_IP = "10.10.1.2", "10.10.1.1", "10.10.2.1", "10.10.2.2"
VIP = "172.31.0.10"
SINK, ECHO, RR = 8080, 8081, 8082  # backend ports
TICK = os.sysconf("SC_CLK_TCK")
TARGETS = {"bulk_vs_haproxy": 0.9, "bulk_vs_direct": 0.5, "cpu_vs_haproxy": 1.2}
TARGETS |= {"conn_vs_haproxy": 0.5, "fastpath_speedup": 10.0}


# -- roles: the processes started inside the namespaces ---------------------------
def role_sink(port: int) -> None:
    """Per connection: read until EOF, answer the byte count (8 bytes)."""

    def serve(conn: socket.socket) -> None:
        buf = bytearray(MiB)
        n = 0
        with conn:
            while r := conn.recv_into(buf):
                n += r
            conn.sendall(n.to_bytes(8, "big"))

    lst = socket.create_server((BACKEND_IP, port), backlog=128, reuse_port=True)
    while True:
        conn, _ = lst.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def role_echo(port: int) -> None:
    """Per connection: echo every chunk back (ping/pong)."""

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    lst = socket.create_server((BACKEND_IP, port), backlog=128, reuse_port=True)
    while True:
        conn, _ = lst.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


class _OneShot(asyncio.Protocol):
    """Answer the first request with one byte and close (the server closes first)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"k")
        self.transport.close()


def role_rr(port: int) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_OneShot, BACKEND_IP, port, backlog=4096)
        await server.serve_forever()

    asyncio.run(main())


def role_bulk(host: str, port: int, total: int, seconds: float) -> None:
    """Send up to ``total`` bytes (time-bounded), wait for the count; print JSON."""
    block = memoryview(os.urandom(MiB))
    t0 = time.perf_counter()
    with socket.create_connection((host, port), timeout=seconds + 30) as s:
        sent = 0
        deadline = t0 + seconds
        while sent < total and time.perf_counter() < deadline:
            s.sendall(block)
            sent += MiB
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while len(reply) < 8 and (chunk := s.recv(8 - len(reply))):
            reply += chunk
    elapsed = time.perf_counter() - t0
    got = int.from_bytes(reply, "big") if len(reply) == 8 else -1
    print(json.dumps({"sent": sent, "received": got, "seconds": elapsed}))


def role_ping(host: str, port: int, count: int, seconds: float) -> None:
    """``count`` 1-byte round trips on one connection (time-bounded); print the RTTs (µs)."""
    rtts: list[float] = []
    with socket.create_connection((host, port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(50):  # warm-up: caches, the proxy's first-use paths
            s.sendall(b"p")
            s.recv(1)
        deadline = time.perf_counter() + seconds
        clock = time.perf_counter_ns
        while len(rtts) < count and time.perf_counter() < deadline:
            t = clock()
            s.sendall(b"p")
            if not s.recv(1):
                break
            rtts.append((clock() - t) / 1000)
    print(json.dumps(rtts))


def role_conn(host: str, port: int, count: int, seconds: float) -> None:
    """Short requests, one connection each, back to back (bounded); print JSON."""
    ok = errors = 0
    addr = (host, port)
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while ok + errors < count and time.perf_counter() < deadline:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(5)
            s.connect(addr)
            s.sendall(b"q")
            # Read to EOF: the server closes first, so TIME_WAIT stays on its side.
            got = s.recv(16)
            while s.recv(16):
                pass
            ok += got == b"k"
            errors += got != b"k"
        except OSError:
            errors += 1
        finally:
            s.close()
    print(json.dumps({"ok": ok, "errors": errors, "seconds": time.perf_counter() - t0}))


def role_fastpath(quick: bool, relay_mib: int, relay_seconds: float) -> None:
    """bench.userspace_fastpath's comparison (its relay part uses loopback: run in a netns)."""
    from bench import userspace_fastpath

    print(json.dumps(userspace_fastpath.run(quick, relay_mib, relay_seconds)))


ROLES: dict[str, Callable[..., None]] = {
    "sink": role_sink,
    "echo": role_echo,
    "rr": role_rr,
    "bulk": role_bulk,
    "ping": role_ping,
    "conn": role_conn,
    "fastpath": role_fastpath,
}


def run_role(argv: Sequence[str]) -> None:
    name, *args = argv
    fn = ROLES[name]
    conv: list[Any] = []
    for a in args:
        if a in ("True", "False"):
            conv.append(a == "True")
        else:
            try:
                conv.append(int(a))
            except ValueError:
                try:
                    conv.append(float(a))
                except ValueError:
                    conv.append(a)
    fn(*conv)


# -- topology -----------------------------------------------------------------------
def _run(argv: Sequence[str], timeout: float = 30, check: bool = True) -> str:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


@dataclass
class Topology:
    """Three namespaces joined by veth pairs; every process started here dies with it."""

    tag: str = field(default_factory=lambda: f"kpbench-{os.getpid()}")
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def client(self) -> str:
        return f"{self.tag}-c"

    @property
    def node(self) -> str:
        return f"{self.tag}-n"

    @property
    def backend(self) -> str:
        return f"{self.tag}-b"

    def create(self) -> None:
        for ns in (self.client, self.node, self.backend):
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        # Both ends of each pair are born inside our namespaces (never the root one).
        _run(["ip", "-n", self.client, "link", "add", "eth0", "type", "veth",
              "peer", "name", "vc", "netns", self.node])  # fmt: skip
        _run(["ip", "-n", self.backend, "link", "add", "eth0", "type", "veth",
              "peer", "name", "vb", "netns", self.node])  # fmt: skip
        for ns, dev, cidr in (
            (self.client, "eth0", f"{CLIENT_IP}/24"),
            (self.node, "vc", f"{NODE_C}/24"),
            (self.node, "vb", f"{NODE_B}/24"),
            (self.backend, "eth0", f"{BACKEND_IP}/24"),
        ):
            _run(["ip", "-n", ns, "addr", "add", cidr, "dev", dev])
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
        _run(["ip", "-n", self.client, "route", "add", "default", "via", NODE_C])
        _run(["ip", "-n", self.backend, "route", "add", "default", "via", NODE_B])
        # Per-namespace sysctls: forwarding for "direct", room for many short connections.
        for ns, key, value in (
            (self.node, "net.ipv4.ip_forward", "1"),
            (self.client, "net.ipv4.ip_local_port_range", "10000 65000"),
            (self.node, "net.ipv4.ip_local_port_range", "10000 65000"),
            (self.client, "net.ipv4.tcp_tw_reuse", "1"),
            (self.node, "net.ipv4.tcp_tw_reuse", "1"),
            (self.backend, "net.core.somaxconn", "4096"),
            (self.node, "net.core.somaxconn", "4096"),
        ):
            _run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"])

    def popen(
        self, ns: str, argv: Sequence[str], log: Path | None = None
    ) -> subprocess.Popen[bytes]:
        out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            p = subprocess.Popen(
                ["ip", "netns", "exec", ns, *argv],
                stdout=out,
                stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
                start_new_session=True,  # its own group: killed with everything it spawned
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        finally:
            if log is not None and not isinstance(out, int):
                out.close()
        self.procs.append(p)
        return p

    def role(self, ns: str, *args: object, timeout: float = 120) -> Any:
        argv = [sys.executable, "-m", "bench.userspace_throughput", "--role", *map(str, args)]
        p = subprocess.run(
            ["ip", "netns", "exec", ns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        if p.returncode != 0:
            raise RuntimeError(f"role {args[0]} failed: {p.stderr.strip()[-2000:]}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    def role_popen(self, ns: str, *args: object) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "bench.userspace_throughput", "--role", *map(str, args)]
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    @staticmethod
    def stop(p: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)

    def destroy(self) -> None:
        for p in self.procs:
            self.stop(p, signal.SIGKILL)
        for ns in (self.client, self.node, self.backend):
            out = _run(["ip", "netns", "pids", ns], check=False)
            for pid in out.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _run(["ip", "netns", "del", ns], check=False)


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    topo = Topology()
    try:
        topo.create()
        yield topo
    finally:
        topo.destroy()


def cpu_seconds(pids: Sequence[int], children: bool = False) -> float:
    """utime+stime (and reaped children's, for forking proxies) of ``pids``."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            # Fields after the parenthesised command: state is [0], utime is [11].
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            if children:
                total += int(fields[13]) + int(fields[14])
    return total / TICK


# -- targets ------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    host: str
    ports: tuple[int, int, int]  # sink, echo, rr
    pids: list[int] = field(default_factory=list)
    children: bool = False
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    note: str = ""


def wait_ready(topo: Topology, target: Target, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    last = ""
    while time.monotonic() < deadline:
        for p in target.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{target.name} exited with {p.returncode}")
        try:
            topo.role(topo.client, "ping", target.host, target.ports[1], 1, 2.0, timeout=10)
            return
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            last = str(e)
            time.sleep(0.2)
    raise RuntimeError(f"{target.name} never answered: {last[-300:]}")


HAPROXY_CFG = """global
    maxconn 4000
defaults
    mode tcp
    option splice-auto
    timeout connect 5s
    timeout client 120s
    timeout server 120s
"""


def start_haproxy(topo: Topology, work: Path) -> Target:
    ports = (9080, 9081, 9082)
    cfg = HAPROXY_CFG + "".join(
        f"listen p{lp}\n    bind {NODE_C}:{lp}\n    server b {BACKEND_IP}:{bp}\n"
        for lp, bp in zip(ports, (SINK, ECHO, RR), strict=True)
    )
    path = work / "haproxy.cfg"
    path.write_text(cfg)
    p = topo.popen(topo.node, ["haproxy", "-db", "-f", str(path)], log=work / "haproxy.log")
    return Target("haproxy", NODE_C, ports, [p.pid], procs=[p])


def start_socat(topo: Topology, work: Path) -> Target:
    ports = (7080, 7081, 7082)
    procs = [
        topo.popen(
            topo.node,
            [
                "socat",
                f"TCP-LISTEN:{lp},bind={NODE_C},fork,reuseaddr,backlog=4096",
                f"TCP:{BACKEND_IP}:{bp}",
            ],
            log=work / "socat.log",
        )
        for lp, bp in zip(ports, (SINK, ECHO, RR), strict=True)
    ]
    return Target("socat", NODE_C, ports, [p.pid for p in procs], children=True, procs=procs)


def objects_file(path: Path) -> Path:
    names = ("sink", "echo", "rr")
    ports = [
        {"name": n, "port": 80 + i, "protocol": "TCP", "targetPort": bp}
        for i, (n, bp) in enumerate(zip(names, (SINK, ECHO, RR), strict=True))
    ]
    docs = [
        {
            "kind": "Service",
            "metadata": {"namespace": "default", "name": "bench"},
            "spec": {"clusterIP": VIP, "ports": ports},
        },
        {
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": "default",
                "name": "bench-1",
                "labels": {"kubernetes.io/service-name": "bench"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [BACKEND_IP], "conditions": {"ready": True}}],
            "ports": [
                {"name": n, "port": bp, "protocol": "TCP"}
                for n, bp in zip(names, (SINK, ECHO, RR), strict=True)
            ],
        },
    ]
    path.write_text(json.dumps({"kind": "List", "items": docs}))
    return path


def start_kproxy(topo: Topology, work: Path, relay: str) -> Target:
    argv = [
        str(REPO / ".venv" / "bin" / "kproxy"),
        "-v",  # INFO: the log says which accept path the proxy sockets took
        "proxy",
        "--proxy-mode=userspace",
        f"--objects={objects_file(work / 'objects.json')}",
        f"--node-ip={NODE_C}",
        "--hostname-override=bench-node",
        "--iptables-backend=nft",
        "--healthz-bind-address=",
        "--metrics-bind-address=",
        f"--userspace-relay={relay}",
    ]
    p = topo.popen(topo.node, argv, log=work / f"kproxy-{relay}.log")
    return Target(f"kproxy-{relay}", VIP, (80, 81, 82), [p.pid], procs=[p])


# -- measurements -------------------------------------------------------------------
@dataclass
class Options:
    bulk_mib: int = 1024
    bulk_seconds: float = 8.0
    rounds: int = 3
    conn_procs: int = 2
    conn_count: int = 6000
    conn_seconds: float = 3.0
    pings: int = 3000
    ping_seconds: float = 3.0
    quick_fastpath: bool = False


@dataclass
class Tally:
    """One target's samples over the rounds of its phase."""

    rates: list[float] = field(default_factory=list)
    moved: int = 0
    bulk_cpu: float = 0.0
    conn_rates: list[float] = field(default_factory=list)
    conns: int = 0
    conn_errors: int = 0
    conn_cpu: float = 0.0
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    pings: int = 0

    def row(self, t: Target) -> dict[str, Any]:
        gib = self.moved / GiB
        return {
            "target": t.name,
            "bulk_gbit_s": statistics.median(self.rates) * 8 / 1e9,
            "bulk_runs_gbit_s": [x * 8 / 1e9 for x in self.rates],
            "gib_relayed": gib,
            "cpu_s_per_gib": self.bulk_cpu / gib if t.pids and gib else None,
            "conn_per_s": statistics.median(self.conn_rates),
            "conn_ok": self.conns,
            "conn_errors": self.conn_errors,
            "cpu_us_per_conn": self.conn_cpu / self.conns * 1e6 if t.pids and self.conns else None,
            "rtt_p50_us": statistics.median(self.p50),
            "rtt_p99_us": statistics.median(self.p99),
            "pings": self.pings,
            "note": t.note,
        }


def measure_once(topo: Topology, t: Target, o: Options, tally: Tally) -> None:
    """One round for one target: a bulk transfer, a connection burst, the pings."""
    cpu0 = cpu_seconds(t.pids, t.children)
    r = topo.role(
        topo.client, "bulk", t.host, t.ports[0], o.bulk_mib * MiB, o.bulk_seconds,
        timeout=o.bulk_seconds + 60,
    )  # fmt: skip
    if r["received"] != r["sent"]:
        raise RuntimeError(f"{t.name}: sent {r['sent']} bytes, the sink got {r['received']}")
    time.sleep(0.3)  # socat's children exit and are reaped after the transfer
    tally.bulk_cpu += cpu_seconds(t.pids, t.children) - cpu0
    tally.rates.append(r["received"] / r["seconds"])
    tally.moved += r["received"]
    # Connection rate: several client processes at once.
    cpu0 = cpu_seconds(t.pids, t.children)
    procs = [
        topo.role_popen(topo.client, "conn", t.host, t.ports[2], o.conn_count, o.conn_seconds)
        for _ in range(o.conn_procs)
    ]
    ok = errors = 0
    longest = 0.0
    for p in procs:
        out, err = p.communicate(timeout=o.conn_seconds + 60)
        if p.returncode != 0:
            raise RuntimeError(f"{t.name}: conn client failed: {err.decode()[-500:]}")
        res = json.loads(out.decode().strip().splitlines()[-1])
        ok += res["ok"]
        errors += res["errors"]
        longest = max(longest, res["seconds"])
    time.sleep(0.3)
    tally.conn_cpu += cpu_seconds(t.pids, t.children) - cpu0
    tally.conn_rates.append(ok / longest if longest else 0.0)
    tally.conns += ok
    tally.conn_errors += errors
    # Latency: one persistent connection, 1-byte ping/pong.
    rtts = topo.role(
        topo.client, "ping", t.host, t.ports[1], o.pings, o.ping_seconds,
        timeout=o.ping_seconds + 60,
    )  # fmt: skip
    qs = statistics.quantiles(rtts, n=100)
    tally.p50.append(qs[49])
    tally.p99.append(qs[98])
    tally.pings += len(rtts)


def phase(
    topo: Topology, name: str, targets: list[Target], o: Options, skipped: dict[str, str]
) -> list[dict[str, Any]]:
    """Rounds over ``targets`` (interleaved, so load changes on a shared machine hit all)."""
    live: list[Target] = []
    for t in targets:
        try:
            wait_ready(topo, t)
            live.append(t)
        except RuntimeError as e:
            skipped[f"{t.name} ({name})"] = str(e)
    tallies = {t.name: Tally() for t in live}
    for rnd in range(o.rounds):
        for t in list(live):
            print(f"  {name} round {rnd + 1}/{o.rounds}: {t.name}", file=sys.stderr, flush=True)
            try:
                measure_once(topo, t, o, tallies[t.name])
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:
                skipped[f"{t.name} ({name})"] = str(e)[-500:]
                live.remove(t)
    rows = [tallies[t.name].row(t) for t in live]
    for r in rows:
        r["phase"] = name
    return rows


# Logged by TcpProxySocket when the relay loop accepts and dials for a port.
IN_LOOP_MARKER = "accepting and dialling in the relay loop"


def accept_path(log: Path) -> str:
    """Which accept path a kproxy run used, from its log."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "unknown"
    return "relay loop (accept+dial without Python)" if IN_LOOP_MARKER in text else "python"


def run(o: Options, work: Path) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    accept_paths: dict[str, str] = {}
    with topology() as topo:
        for role, port in (("sink", SINK), ("echo", ECHO), ("rr", RR)):
            argv = [sys.executable, "-m", "bench.userspace_throughput", "--role", role, str(port)]
            topo.popen(topo.backend, argv, log=work / f"backend-{role}.log")
        direct = Target("direct", BACKEND_IP, (SINK, ECHO, RR), note="routed by the node ns")
        wait_ready(topo, direct)
        baselines = [direct]
        if shutil.which("haproxy"):
            baselines.append(start_haproxy(topo, work))
        else:
            skipped["haproxy"] = "not installed"
        if shutil.which("socat"):
            baselines.append(start_socat(topo, work))
        else:
            skipped["socat"] = "not installed"
        # Phase A: the default kproxy with every baseline; phase B: the asyncio relay
        # with the baselines it is compared to (only one kproxy owns the portal chains
        # at a time). kproxy's nat rules stay in the node namespace during a phase, so
        # every target pays for conntrack alike.
        for name, relay, others in (
            ("A", "splice", baselines),
            ("B", "asyncio", [t for t in baselines if t.name != "socat"]),
        ):
            kp = start_kproxy(topo, work, relay)
            try:
                rows += phase(topo, name, [*others, kp], o, skipped)
            finally:
                for p in kp.procs:
                    topo.stop(p)
            accept_paths[kp.name] = accept_path(work / f"kproxy-{relay}.log")
        for t in baselines:
            for p in t.procs:
                topo.stop(p)
        print("  measuring the fast path (compiled vs twin)", file=sys.stderr, flush=True)
        fast = topo.role(topo.client, "fastpath", o.quick_fastpath, 512, 3.0, timeout=600)
    return {"rows": rows, "skipped": skipped, "fastpath": fast, "accept_paths": accept_paths}


# -- report -------------------------------------------------------------------------
# Fast-path operations held to the ≥ 10× target, each on its own (no averaging away).
SELECTION_KEYS = ("maglev_select_s", "maglev_lookup_packet_s", "affinity_miss_then_maglev_s",
                  "maglev_lookup_s", "affinity_get_s", "affinity_set_s")  # fmt: skip
PARSING_KEYS = ("parse_into_v4_s", "parse_packet_v4_s", "parse_packet_v6ext_s")


def ratios(result: dict[str, Any]) -> dict[str, Any]:
    by = {(r["phase"], r["target"]): r for r in result["rows"]}
    out: dict[str, Any] = {}

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    for ph, k in (("A", "kproxy-splice"), ("B", "kproxy-asyncio")):
        if (ph, k) not in by:
            continue
        # Against the baselines measured in the same phase (interleaved rounds).
        r, h, d = by[(ph, k)], by.get((ph, "haproxy")), by.get((ph, "direct"))
        out[k] = {
            "bulk_vs_haproxy": ratio(r["bulk_gbit_s"], h and h["bulk_gbit_s"]),
            "bulk_vs_direct": ratio(r["bulk_gbit_s"], d and d["bulk_gbit_s"]),
            "cpu_vs_haproxy": ratio(r["cpu_s_per_gib"], h and h["cpu_s_per_gib"]),
            "conn_vs_haproxy": ratio(r["conn_per_s"], h and h["conn_per_s"]),
            "added_p50_us": r["rtt_p50_us"] - d["rtt_p50_us"] if d else None,
            "added_p50_us_haproxy": h["rtt_p50_us"] - d["rtt_p50_us"] if d and h else None,
        }
    fast = result.get("fastpath", {})
    sp = fast.get("speedup", {})
    if sp:
        out["fastpath"] = {
            "selection": {k: sp[k] for k in SELECTION_KEYS if k in sp},
            "parsing": {k: sp[k] for k in PARSING_KEYS if k in sp},
            "maglev_build_1000": sp.get("maglev_build_1000_s"),
            "relay_splice": ratio(
                fast["relay_gbit_s"].get("compiled_splice"), fast["relay_gbit_s"].get("twin_splice")
            ),
            "relay_copy": ratio(
                fast["relay_gbit_s"].get("compiled_copy"), fast["relay_gbit_s"].get("twin_copy")
            ),
        }
    return out


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def table(result: dict[str, Any], rat: dict[str, Any]) -> str:
    lines = [
        f"{'phase':6}{'target':16}{'bulk Gbit/s':>12}{'CPU s/GiB':>11}{'conn/s':>9}"
        f"{'CPU µs/conn':>13}{'errors':>8}{'p50 µs':>9}{'p99 µs':>9}"
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['phase']:6}{r['target']:16}{r['bulk_gbit_s']:>12.2f}"
            f"{_f(r['cpu_s_per_gib'], '.3f'):>11}{r['conn_per_s']:>9.0f}"
            f"{_f(r['cpu_us_per_conn'], '.0f'):>13}{r['conn_errors']:>8}"
            f"{r['rtt_p50_us']:>9.0f}{r['rtt_p99_us']:>9.0f}"
        )
    for name, why in result["skipped"].items():
        lines.append(f"{name:16}skipped: {why.splitlines()[-1] if why else ''}")
    for name, path in result.get("accept_paths", {}).items():
        lines.append(f"{name:16}accept path: {path}")
    lines.append("")
    lines.append(f"{'ratio':38}{'value':>9}  {'target':>9}  verdict")

    def verdict(label: str, v: float | None, target: float, higher: bool) -> None:
        ok = v is not None and (v >= target if higher else v <= target)
        sign = "≥" if higher else "≤"
        lines.append(f"{label:38}{_f(v):>9}  {sign}{target:>8}  {'met' if ok else 'NOT met'}")

    for k in ("kproxy-splice", "kproxy-asyncio"):
        if k not in rat:
            continue
        r = rat[k]
        verdict(f"{k} bulk / haproxy", r["bulk_vs_haproxy"], TARGETS["bulk_vs_haproxy"], True)
        verdict(f"{k} bulk / direct", r["bulk_vs_direct"], TARGETS["bulk_vs_direct"], True)
        verdict(f"{k} CPU/GiB / haproxy", r["cpu_vs_haproxy"], TARGETS["cpu_vs_haproxy"], False)
        verdict(f"{k} conn/s / haproxy", r["conn_vs_haproxy"], TARGETS["conn_vs_haproxy"], True)
        lines.append(
            f"{k + ' added p50 µs (haproxy)':38}{_f(r['added_p50_us'], '.0f'):>9}"
            f"  ({_f(r['added_p50_us_haproxy'], '.0f')})"
        )
    if "fastpath" in rat:
        fp = rat["fastpath"]
        target = TARGETS["fastpath_speedup"]
        for group in ("selection", "parsing"):
            for key, v in fp[group].items():
                verdict(f"fast path {key.removesuffix('_s')} ×twin", v, target, True)
        lines.append(
            f"{'fast path Maglev build N=1000':38}{_f(fp['maglev_build_1000'], '.1f'):>9}x"
        )
        lines.append(
            f"{'fast path relay, splice (loopback)':38}{_f(fp['relay_splice'], '.2f'):>9}x"
        )
        lines.append(f"{'fast path relay, copy (loopback)':38}{_f(fp['relay_copy'], '.2f'):>9}x")
        sp = result["fastpath"].get("speedup", {})
        lines.append(
            "  speed-ups: " + ", ".join(f"{k.removesuffix('_s')} {v:.1f}x" for k, v in sp.items())
        )
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], rat: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out / "userspace_throughput.csv", out / "userspace_throughput.json"
    cols = ["phase", "target", "bulk_gbit_s", "cpu_s_per_gib", "conn_per_s",
            "cpu_us_per_conn", "conn_ok", "conn_errors", "rtt_p50_us", "rtt_p99_us",
            "pings", "gib_relayed"]  # fmt: skip
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(result["rows"])
    json_path.write_text(json.dumps({**result, "ratios": rat, "targets": TARGETS}, indent=2) + "\n")
    paths = [csv_path, json_path]
    png = plot(result, out / "userspace_throughput.png")
    if png is not None:
        paths.append(png)
    return paths


def plot(result: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install .[bench]); no plot", file=sys.stderr)
        return None
    rows = result["rows"]
    if not rows:
        return None
    names = [f"{r['target']} ({r['phase']})" for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.5))
    panels = [
        ("bulk_gbit_s", "bulk throughput (Gbit/s)"),
        ("cpu_s_per_gib", "proxy CPU s per GiB"),
        ("conn_per_s", "short connections / s"),
        ("rtt_p50_us", "1-byte RTT p50 / p99 (µs)"),
    ]
    colors = ["grey" if n == "direct" else "tab:green" if n.startswith("kproxy") else "tab:blue"
              for n in names]  # fmt: skip
    for ax, (key, title) in zip(axes, panels, strict=True):
        vals = [r[key] or 0.0 for r in rows]
        ax.bar(names, vals, color=colors)
        if key == "rtt_p50_us":
            ax.plot(names, [r["rtt_p99_us"] for r in rows], "k^", label="p99")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=35, labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("userspace data path: client ns → node ns → backend ns (veth), one run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--role", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.add_argument("--bulk-mib", type=int, default=1024, help="MiB per bulk transfer")
    p.add_argument("--bulk-seconds", type=float, default=8.0, help="time bound per transfer")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per phase (median)")
    p.add_argument("--conn-procs", type=int, default=2, help="connection-rate client processes")
    p.add_argument("--conn-count", type=int, default=6000, help="connections per process")
    p.add_argument("--conn-seconds", type=float, default=3.0, help="time bound per process")
    p.add_argument("--pings", type=int, default=3000, help="1-byte round trips per round")
    p.add_argument("--ping-seconds", type=float, default=3.0, help="time bound for the pings")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--out", type=Path, default=OUT, help="output directory")
    # scripts/bench.sh passes its extra arguments to every bench; ignore the others'.
    args, _unknown = p.parse_known_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role:
        run_role(args.role)
        return 0
    if os.geteuid() != 0 or not shutil.which("ip"):
        print("userspace_throughput needs root and iproute2 (network namespaces); skipped")
        return 0
    o = Options(
        args.bulk_mib, args.bulk_seconds, args.rounds, args.conn_procs, args.conn_count,
        args.conn_seconds, args.pings, args.ping_seconds,
    )  # fmt: skip
    if args.quick:
        o = Options(128, 3.0, 1, 2, 500, 2.0, 500, 2.0, quick_fastpath=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kpbench-us-") as tmp:
        result = run(o, Path(tmp))
        logs = {p.name: p.read_text()[-3000:] for p in Path(tmp).glob("*.log")}
    result["meta"] = {
        "bench": "userspace_throughput",
        "cpus": os.cpu_count(),
        "options": vars(o),
        "seconds": round(time.monotonic() - started, 1),
    }
    if result["skipped"]:
        result["logs"] = logs
    rat = ratios(result)
    print(table(result, rat))
    for path in write_outputs(result, rat, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
