"""A one-node cluster in network namespaces, run by the real ``kproxy proxy`` process.

Owns the topology the proxy acceptance tests send traffic through, built only
from namespaces of a :class:`~tests.support.netns.NetnsFactory`:

- a node namespace with a pod bridge ``cbr0`` (``10.244.1.1/24``) and an uplink
  bridge ``up0`` (``NODE_IP``/24); the real ``kproxy proxy --objects FILE``
  runs here (``ip netns exec NODE .venv/bin/kproxy proxy ...``), health and
  metrics servers bound on ``NODE_IP``; or, with ``kubeconfig=``, ``kproxy proxy
  --kubeconfig FILE`` following an apiserver the test runs (``start_proxy=False``
  lets it start that apiserver in the node namespace first);
- N pod namespaces on ``cbr0`` running ``scripts/echo_server.py`` (TCP and UDP
  on ``ECHO_PORT``, answering ``"<pod> saw <ip>:<port>"``);
- one or two client namespaces on ``up0``, routed to the node for the Service
  CIDR and for ``EXTERNAL_CIDR`` (external IPs: routed to the node, assigned
  nowhere).

Each client (and the node) runs a small request agent: a Python process that
reads one JSON request per line and answers with one JSON line, so that a
batch of 30 connections costs one round trip instead of 30 process starts.
Every request carries short socket timeouts and every wait here is bounded.

Invariants: nothing is created in the root namespace; the proxy is sent
SIGTERM (then killed) and every namespace deleted when the context exits,
even after a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from tests.support.netns import Netns, NetnsFactory
from tests.support.tiers import require, require_commands, require_root

__all__ = [
    "CLIENT_IPS",
    "ECHO_PORT",
    "EXTERNAL_CIDR",
    "HEALTHZ_PORT",
    "METRICS_PORT",
    "NODE_IP",
    "NODE_NAME",
    "POD_GATEWAY",
    "Answer",
    "Client",
    "Cluster",
    "Http",
    "UdpFlow",
    "cluster_topology",
    "endpoint_slice",
    "metric",
    "node_object",
    "pod_ip",
    "service",
]

REPO: Final = Path(__file__).resolve().parents[2]
ECHO_SERVER: Final = REPO / "scripts" / "echo_server.py"
KPROXY: Final = Path(sys.executable).with_name("kproxy")

NODE_NAME: Final = "node-a"
NODE_IP: Final = "10.77.0.1"
CLIENT_IPS: Final = ("10.77.0.2", "10.77.0.3")
POD_GATEWAY: Final = "10.244.1.1"
CLUSTER_CIDR: Final = "10.244.0.0/16"
SERVICE_CIDR: Final = "10.96.0.0/12"
EXTERNAL_CIDR: Final = "203.0.113.0/24"  # TEST-NET-3: routed to the node, on no interface
ECHO_PORT: Final = 8080
HEALTHZ_PORT: Final = 10256
METRICS_PORT: Final = 10249

_REQUEST_SLACK_S: Final = 5.0


def pod_ip(i: int) -> str:
    """The address of pod ``i`` (1-based) on the node's pod bridge."""
    return f"10.244.1.{i + 1}"


# -- objects -------------------------------------------------------------------


def node_object(name: str = NODE_NAME, ip: str = NODE_IP) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    }


def service(
    name: str, cluster_ip: str, ports: Sequence[Mapping[str, Any]], **spec: Any
) -> dict[str, Any]:
    """A Service in ``default``; ``spec`` adds fields (``type``, ``externalIPs``, ...)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"namespace": "default", "name": name},
        "spec": {"clusterIP": cluster_ip, "ports": [dict(p) for p in ports], **spec},
    }


def endpoint_slice(
    service_name: str,
    endpoints: Sequence[tuple[str, str]],
    ports: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The one EndpointSlice of ``service_name``: ready endpoints as (ip, nodeName)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": "default",
            "name": f"{service_name}-abcde",
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "ports": [dict(p) for p in ports],
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": True}, "nodeName": node}
            for ip, node in endpoints
        ],
    }


def metric(exposition: str, name: str, **labels: str) -> float | None:
    """The value of sample ``name`` whose labels include ``labels`` (None if absent)."""
    for line in exposition.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, label_text = head.partition("{")
        if sample != name:
            continue
        found = dict(
            part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part
        )
        if all(found.get(k, "").strip('"') == v for k, v in labels.items()):
            return float(value)
    return None


# -- the request agent ---------------------------------------------------------

AGENT: Final = r"""
import http.client, json, socket, sys, time

def tcp(ip, port, timeout):
    t = time.monotonic()
    try:
        with socket.create_connection((ip, port), timeout=timeout) as s:
            s.settimeout(timeout)
            reply = s.recv(200).decode(errors="replace").strip()
        return ["ok", reply, time.monotonic() - t]
    except ConnectionRefusedError:
        return ["refused", "", time.monotonic() - t]
    except TimeoutError:
        return ["timeout", "", time.monotonic() - t]
    except OSError as e:
        return ["error", repr(e), time.monotonic() - t]

def udp(ip, port, timeout):
    t = time.monotonic()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.connect((ip, port))
            s.send(b"hello")
            reply = s.recv(200).decode(errors="replace").strip()
        return ["ok", reply, time.monotonic() - t]
    except ConnectionRefusedError:
        return ["refused", "", time.monotonic() - t]
    except TimeoutError:
        return ["timeout", "", time.monotonic() - t]
    except OSError as e:
        return ["error", repr(e), time.monotonic() - t]

def http_get(ip, port, path, timeout):
    try:
        c = http.client.HTTPConnection(ip, port, timeout=timeout)
        c.request("GET", path)
        r = c.getresponse()
        body = r.read().decode(errors="replace")
        c.close()
        return {"status": r.status, "headers": dict(r.getheaders()), "body": body}
    except OSError as e:
        return {"status": 0, "headers": {}, "body": repr(e)}

for line in sys.stdin:
    req = json.loads(line)
    op = req["op"]
    if op == "http":
        out = http_get(req["ip"], req["port"], req["path"], req["timeout"])
    else:
        fn = tcp if op == "tcp" else udp
        out = []
        for _ in range(req["count"]):
            out.append(fn(req["ip"], req["port"], req["timeout"]))
            # A broken path should fail a test in seconds, not count x timeout.
            if sum(r[0] != "ok" for r in out) >= req["max_failures"]:
                break
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"""


@dataclass(frozen=True, slots=True)
class Answer:
    """One connection's outcome: ``ok`` (with the pod and the source it saw),
    ``refused``, ``timeout`` or ``error``."""

    outcome: str
    pod: str
    seen: str
    elapsed: float
    detail: str = ""

    @classmethod
    def parse(cls, raw: Sequence[Any]) -> Answer:
        outcome, text, elapsed = str(raw[0]), str(raw[1]), float(raw[2])
        if outcome != "ok":
            return cls(outcome, "", "", elapsed, text)
        # "<pod> saw <ip>:<port>"
        parts = text.split()
        if len(parts) != 3 or parts[1] != "saw":
            return cls("error", "", "", elapsed, f"unexpected reply {text!r}")
        return cls("ok", parts[0], parts[2].rpartition(":")[0], elapsed, text)


@dataclass(frozen=True, slots=True)
class Http:
    status: int
    headers: Mapping[str, str]
    body: str


class Agent:
    """A request agent inside one namespace (see the module docstring)."""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns
        self.proc = ns.popen(
            [sys.executable, "-c", AGENT], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL
        )

    def call(self, request: Mapping[str, Any], budget: float) -> Any:
        """Send one request, wait at most ``budget`` seconds for its one-line answer."""
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        # One request, one answer line: nothing is ever left buffered between calls,
        # so waiting on the file descriptor is exact.
        ready, _, _ = select.select([stdout], [], [], budget)
        if not ready:
            # A late answer would be read as the next request's: this agent is done.
            self.proc.kill()
            raise AssertionError(f"agent in {self.ns.name} gave no answer in {budget:.1f}s")
        line = stdout.readline()
        if not line:
            raise AssertionError(f"agent in {self.ns.name} died (exit {self.proc.poll()})")
        return json.loads(line)

    def connect(
        self, op: str, ip: str, port: int, count: int, timeout: float, max_failures: int = 3
    ) -> list[Answer]:
        """``count`` connections (fewer: the batch stops after ``max_failures`` failures)."""
        req = {
            "op": op,
            "ip": ip,
            "port": port,
            "count": count,
            "timeout": timeout,
            "max_failures": max_failures,
        }
        raw = self.call(req, count * (timeout + 0.5) + _REQUEST_SLACK_S)
        return [Answer.parse(r) for r in raw]

    def get(self, ip: str, port: int, path: str, timeout: float = 2.0) -> Http:
        req = {"op": "http", "ip": ip, "port": port, "path": path, "timeout": timeout}
        raw = self.call(req, timeout + _REQUEST_SLACK_S)
        return Http(int(raw["status"]), dict(raw["headers"]), str(raw["body"]))


# -- a long-running UDP flow ---------------------------------------------------

FLOW: Final = r"""
import json, socket, sys, time

ip, port, sport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
interval, duration = float(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", sport))
s.connect((ip, port))
deadline = time.monotonic() + duration
seq = 0
while time.monotonic() < deadline:
    seq += 1
    start = time.monotonic()
    s.settimeout(interval)
    try:
        s.send(b"%d" % seq)
        out = ["ok", s.recv(200).decode(errors="replace").strip(), start]
    except ConnectionRefusedError:
        out = ["refused", "", start]
    except TimeoutError:
        out = ["timeout", "", start]
    except OSError as e:
        out = ["error", repr(e), start]
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    time.sleep(max(0.0, interval - (time.monotonic() - start)))
"""


class UdpFlow:
    """One UDP 5-tuple kept alive: a datagram every ``interval`` from a fixed source port.

    Every datagram waits at most ``interval`` for its answer, so the flow never pauses
    long enough for its conntrack entry to expire (30 s for unreplied UDP); the
    process ends by itself after ``duration`` seconds, and :meth:`stop` kills it
    earlier. Answers are read as they come; each is an :class:`Answer` whose
    ``elapsed`` is the send time (the flow's monotonic clock).
    """

    def __init__(
        self,
        ns: Netns,
        ip: str,
        port: int,
        sport: int,
        *,
        interval: float = 0.1,
        duration: float = 60.0,
    ) -> None:
        self.ns = ns
        self.sport = sport
        self.interval = interval
        self.answers: list[Answer] = []
        self.proc = ns.popen(
            [sys.executable, "-c", FLOW, ip, str(port), str(sport), str(interval), str(duration)],
            stderr=subprocess.DEVNULL,
        )

    def _read(self, budget: float) -> Answer | None:
        """The next answer within ``budget`` seconds (None on timeout or when the flow ended)."""
        stdout = self.proc.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], max(0.0, budget))
        if not ready:
            return None
        line = stdout.readline()
        if not line:
            return None
        answer = Answer.parse(json.loads(line))
        self.answers.append(answer)
        return answer

    def wait_for(
        self, what: str, cond: Callable[[Answer], bool], timeout: float, *, in_a_row: int = 1
    ) -> list[Answer]:
        """Read answers until ``in_a_row`` consecutive ones satisfy ``cond``; the ones read.

        Raises AssertionError after ``timeout`` seconds, with the last answers seen.
        """
        deadline = time.monotonic() + timeout
        read: list[Answer] = []
        streak = 0
        while streak < in_a_row:
            answer = self._read(deadline - time.monotonic())
            if answer is None:
                tail = [f"{a.outcome}:{a.pod}" for a in read[-10:]]
                alive = self.proc.poll() is None
                raise AssertionError(
                    f"timed out after {timeout:.1f}s waiting for {what} "
                    f"(flow from port {self.sport} alive={alive}; last answers {tail})"
                )
            read.append(answer)
            streak = streak + 1 if cond(answer) else 0
        return read

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Client:
    ns: Netns
    ip: str
    agent: Agent


def _wait(what: str, cond: Callable[[], object], timeout: float, interval: float = 0.1) -> None:
    """Poll ``cond()`` until truthy, or raise AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


# -- the cluster ---------------------------------------------------------------


@dataclass(repr=False)
class Cluster:
    """The built topology and the proxy running in its node namespace."""

    factory: NetnsFactory
    workdir: Path
    backend: str
    node: Netns = field(init=False)
    node_agent: Agent = field(init=False)
    pods: dict[str, Netns] = field(default_factory=dict)
    clients: list[Client] = field(default_factory=list)
    proxy: subprocess.Popen[str] | None = None
    objects_path: Path = field(init=False)
    log_path: Path = field(init=False)
    kubeconfig: Path | None = None  # set: the proxy follows an apiserver, not the file
    _objects: list[dict[str, Any]] | None = None
    _changed_at: float | None = None
    _logs: list[IO[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.objects_path = self.workdir / "objects.json"
        self.log_path = self.workdir / "proxy.log"

    def __repr__(self) -> str:
        # Short, for pytest's failure reports: the backend and where the logs are.
        return f"Cluster(backend={self.backend!r}, workdir={str(self.workdir)!r})"

    # -- building ----------------------------------------------------------
    def build(self, n_pods: int, n_clients: int) -> None:
        f = self.factory
        self.node = node = f()
        f.bridge(node, "cbr0", addr=f"{POD_GATEWAY}/24")
        f.bridge(node, "up0", addr=f"{NODE_IP}/24")
        for i in range(1, n_pods + 1):
            pod, name = f(), f"pod{i}"
            f.attach(pod, node, "cbr0", addr=f"{pod_ip(i)}/24", ifname="eth0")
            pod.ip("route", "add", "default", "via", POD_GATEWAY)
            log = self._log(f"{name}.log")
            pod.popen(
                [sys.executable, str(ECHO_SERVER), name, str(ECHO_PORT)],
                stdout=log,
                stderr=log,
            )
            self.pods[name] = pod
        for ip in CLIENT_IPS[:n_clients]:
            ns = f()
            f.attach(ns, node, "up0", addr=f"{ip}/24", ifname="eth0")
            for cidr in (SERVICE_CIDR, EXTERNAL_CIDR):
                ns.ip("route", "add", cidr, "via", NODE_IP)
            self.clients.append(Client(ns, ip, Agent(ns)))
        # A real node routes what it does not know to the outside world; without a
        # route, a packet to a ClusterIP without endpoints dies in routing before
        # the filter REJECT can answer it.
        node.ip("route", "add", "default", "via", CLIENT_IPS[0])
        # That route leaves by the bridge the packet came in on, so the kernel would
        # send ICMP redirects, and their rate limit swallows the REJECT's ICMP error
        # (send_redirects is OR-ed over "all" and the interface: clear both).
        for conf in ("all", "default", "up0", "cbr0"):
            node.run(["sysctl", "-qw", f"net.ipv4.conf.{conf}.send_redirects=0"])
        node.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        self.node_agent = Agent(node)
        for i in range(1, n_pods + 1):
            for op in ("tcp", "udp"):

                def answers(op: str = op, ip: str = pod_ip(i)) -> bool:
                    return self.node_agent.connect(op, ip, ECHO_PORT, 1, 0.5)[0].outcome == "ok"

                _wait(f"echo server pod{i} ({op})", answers, timeout=15)

    def _log(self, name: str) -> IO[bytes]:
        out = open(self.workdir / name, "wb")  # noqa: SIM115 - closed by close_logs()
        self._logs.append(out)
        return out

    # -- the proxy ---------------------------------------------------------
    def start_proxy(self, *extra: str, sync_period: str = "1s") -> None:
        assert self.proxy is None, "the proxy is already running"
        if self.kubeconfig is not None:
            source = ["--kubeconfig", str(self.kubeconfig)]
        else:
            assert self._objects is not None, "set_objects() before start_proxy()"
            source = ["--objects", str(self.objects_path)]
        self._changed_at = time.time()
        log = self._log("proxy.log")
        self.proxy = self.node.popen(
            [
                str(KPROXY),
                "-v",
                "proxy",
                "--proxy-mode",
                "iptables",
                *source,
                "--hostname-override",
                NODE_NAME,
                "--cluster-cidr",
                CLUSTER_CIDR,
                "--healthz-bind-address",
                f"{NODE_IP}:{HEALTHZ_PORT}",
                "--metrics-bind-address",
                f"{NODE_IP}:{METRICS_PORT}",
                "--iptables-backend",
                self.backend,
                "--iptables-min-sync-period",
                "0.1s",
                "--iptables-sync-period",
                sync_period,
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.wait_synced(timeout=20)

    def stop_proxy(self) -> int | None:
        """SIGTERM, then SIGKILL after 5 s; the exit status (None if never started)."""
        proc, self.proxy = self.proxy, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        return proc.returncode

    def proxy_log(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "<no proxy log>"

    def assert_proxy_alive(self) -> None:
        assert self.proxy is not None and self.proxy.poll() is None, (
            f"kproxy proxy exited ({None if self.proxy is None else self.proxy.returncode}):\n"
            + self.proxy_log()
        )

    def set_objects(self, objects: Sequence[Mapping[str, Any]]) -> bool:
        """Write the objects file (atomically); True if it changed."""
        new = [json.loads(json.dumps(o)) for o in objects]
        if new == self._objects:
            return False
        tmp = self.objects_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": new}, indent=1))
        # Taken before the file appears, so the proxy's "queued" time is later.
        self._changed_at = time.time()
        # A rename, so the proxy's poll never reads half a file.
        os.replace(tmp, self.objects_path)
        self._objects = new
        return True

    def expect_change(self) -> None:
        """Note that the objects are about to change elsewhere (through an apiserver),
        so that :meth:`wait_synced` waits for a sync that includes the change."""
        self._changed_at = time.time()

    def metrics(self) -> str:
        """``/metrics`` from the first client (the server is bound on the node IP)."""
        res = self.clients[0].agent.get(NODE_IP, METRICS_PORT, "/metrics")
        return res.body if res.status == 200 else ""

    def wait_synced(self, timeout: float = 10.0) -> None:
        """Wait until a sync that includes the last :meth:`set_objects` change succeeded.

        Read from the proxy's gauges: the change was queued (last queued time at or
        after the write), a sync succeeded after it (last sync time at or after the
        last queued time), and no change is pending.
        """
        self.assert_proxy_alive()
        since = self._changed_at
        if since is None:
            return

        def synced() -> bool:
            self.assert_proxy_alive()
            text = self.metrics()
            queued = metric(text, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds")
            done = metric(text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds")
            pending = sum(
                metric(text, f"kubeproxy_sync_proxy_rules_{kind}_changes_pending") or 0.0
                for kind in ("service", "endpoint")
            )
            return (
                queued is not None
                and done is not None
                and queued >= since
                and done >= queued
                and pending == 0
            )

        try:
            _wait("the proxy to sync the objects file", synced, timeout)
        except AssertionError as e:
            raise AssertionError(f"{e}; proxy log:\n{self.proxy_log()}") from None
        self._changed_at = None

    # -- the node's rules --------------------------------------------------
    def save(self, table: str | None = None) -> str:
        """``iptables-<backend>-save [-t table]`` in the node namespace."""
        argv = [f"iptables-{self.backend}-save", *(["-t", table] if table else [])]
        return self.node.run(argv).stdout

    def iptables(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``iptables-<backend> -w ARGS`` in the node namespace (raises on failure)."""
        return self.node.run([f"iptables-{self.backend}", "-w", *args])

    # -- traffic -----------------------------------------------------------
    def ask_tcp_many(
        self, client: int, ip: str, port: int, count: int, timeout: float = 1.0
    ) -> list[Answer]:
        """``count`` TCP connections from client ``client``, each a new source port."""
        return self.clients[client].agent.connect("tcp", ip, port, count, timeout)

    def ask_tcp(self, client: int, ip: str, port: int, timeout: float = 1.0) -> Answer:
        return self.ask_tcp_many(client, ip, port, 1, timeout)[0]

    def ask_udp_many(
        self, client: int, ip: str, port: int, count: int, timeout: float = 1.0
    ) -> list[Answer]:
        """``count`` UDP requests, each from a new socket (so a new conntrack flow)."""
        return self.clients[client].agent.connect("udp", ip, port, count, timeout)

    def ask_udp(self, client: int, ip: str, port: int, timeout: float = 1.0) -> Answer:
        return self.ask_udp_many(client, ip, port, 1, timeout)[0]

    def get(self, client: int, port: int, path: str) -> Http:
        """HTTP GET ``NODE_IP:port/path`` from client ``client``."""
        return self.clients[client].agent.get(NODE_IP, port, path)

    def udp_flow(
        self, client: int, ip: str, port: int, sport: int, *, duration: float = 60.0
    ) -> UdpFlow:
        """Start a :class:`UdpFlow` from client ``client`` (the caller stops it)."""
        return UdpFlow(self.clients[client].ns, ip, port, sport, duration=duration)

    def conntrack_udp(self, vip: str) -> str:
        """``conntrack -L -p udp --orig-dst VIP`` in the node namespace (for diagnostics)."""
        res = self.node.run(["conntrack", "-L", "-p", "udp", "--orig-dst", vip], check=False)
        return res.stdout

    def close_logs(self) -> None:
        for out in self._logs:
            out.close()
        self._logs.clear()


@contextlib.contextmanager
def cluster_topology(
    workdir: Path,
    *,
    backend: str,
    objects: Sequence[Mapping[str, Any]],
    n_pods: int = 3,
    n_clients: int = 2,
    sync_period: str = "1s",
    extra_flags: Sequence[str] = (),
    kubeconfig: Path | None = None,
    start_proxy: bool = True,
) -> Iterator[Cluster]:
    """Build the topology, start ``kproxy proxy`` on ``objects``, wait for its first
    sync; on exit stop the proxy and delete every namespace.

    With ``kubeconfig`` the proxy follows that apiserver instead (``objects`` unused);
    with ``start_proxy=False`` the caller calls :meth:`Cluster.start_proxy` itself,
    e.g. once the apiserver it starts in the node namespace is up."""
    require_root()
    require_commands("ip", "sysctl", f"iptables-{backend}", f"iptables-{backend}-save")
    require(KPROXY.exists(), f"no kproxy entry point next to {sys.executable}")
    with NetnsFactory() as factory:
        cluster = Cluster(factory, workdir, backend, kubeconfig=kubeconfig)
        try:
            cluster.build(n_pods, n_clients)
            if kubeconfig is None:
                cluster.set_objects(objects)
            if start_proxy:
                cluster.start_proxy(*extra_flags, sync_period=sync_period)
            yield cluster
        finally:
            try:
                cluster.stop_proxy()
            finally:
                cluster.close_logs()
