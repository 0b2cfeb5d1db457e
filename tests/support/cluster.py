"""A whole kproxy cluster on one machine, in network namespaces: the cluster tier's fixture.

Owns :class:`Cluster` (and :func:`running_cluster`, its context manager). The topology,
built only from namespaces this module creates (``<prefix>hub``, ``<prefix>node-N``):

- a **hub** namespace holding the node network's bridge ``nbr0`` (``10.99.0.1/24``) and
  the control plane: ``kproxy apiserver`` (SQLite, TLS on ``10.99.0.1:6443``, its PKI and
  ``admin.kubeconfig`` under ``<workdir>/apiserver``), ``kproxy controller-manager``
  (``--cluster-cidr 10.244.0.0/16``, a short ``--node-monitor-grace-period``) and
  ``kproxy scheduler``;
- per node a namespace with ``eth0`` on the hub's bridge (``10.99.0.(10+N)``), running
  ``kproxy kubelet`` (its own client certificate, ``system:node:<name>``) and
  ``kproxy proxy`` (same credentials, iptables nft backend). The kubelet makes its pod
  namespaces (``<prefix><node>-<pod uid>``) from inside the node's namespace;
- "host-gw" routing: once the controller-manager has given a node its podCIDR, every
  other node (and the hub) routes that CIDR via the node's IP.

Every component is a subprocess started with ``nsenter --net=/run/netns/<ns>`` (the
mount namespace stays the host's, so pod namespaces the kubelet creates are visible
here for cleanup), logging to ``<workdir>/<component>.log``.

The test process itself never joins the node network from its main thread: the API
client (:class:`ApiThread`) runs an asyncio loop on a thread that has ``setns(2)``-ed into
the hub namespace (a network namespace is per thread), and traffic is sent by small
agents (:class:`Agent`) started inside node or pod namespaces.

Invariants:

- Nothing is created in, or changed in, the root network namespace: veth pairs are
  born inside the hub and moved straight into node namespaces, sysctls are set inside
  node namespaces, and every address traffic goes to lives inside these namespaces.
- :meth:`Cluster.close` (run by :func:`running_cluster` on any exit, KeyboardInterrupt
  included) stops every process it started, kills whatever is still inside any of the
  cluster's namespaces (pods included), deletes them all, and raises afterwards if one
  survived. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from kproxy.apiserver.certs import ensure_node_credentials, ensure_pki
from kproxy.client.errors import NotFound
from kproxy.client.kubeconfig import load_kubeconfig
from kproxy.client.rest import NODES, Resource, RestClient, WatchEvent
from kproxy.kernel.podnet import list_netns, netns_pids

__all__ = [
    "CLUSTER_CIDR",
    "ECHO_PORT",
    "HUB_IP",
    "Agent",
    "ApiThread",
    "Cluster",
    "ClusterError",
    "Proc",
    "Reply",
    "running_cluster",
    "wait_for",
]

REPO: Final = Path(__file__).resolve().parents[2]
KPROXY: Final = str(Path(sys.executable).with_name("kproxy"))
HUB_IP: Final = "10.99.0.1"
NODE_NET_PREFIX: Final = 24
CLUSTER_CIDR: Final = "10.244.0.0/16"
SERVICE_CIDR: Final = "10.96.0.0/12"
APISERVER_PORT: Final = 6443
ECHO_PORT: Final = 8080
HEALTHZ_PORT: Final = 10256
METRICS_PORT: Final = 10249
_CMD_TIMEOUT_S: Final = 30.0
_CLONE_NEWNET: Final = 0x40000000

T = TypeVar("T")
Obj = dict[str, Any]


class ClusterError(RuntimeError):
    """The cluster could not be brought up, or left something behind."""


def wait_for(
    what: str, fn: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.2
) -> T:
    """Poll ``fn`` until it returns something truthy (exceptions count as "not yet")."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = fn()
        except Exception as exc:  # keep polling; the last failure goes in the report
            last = exc
        else:
            if last:
                return last  # type: ignore[no-any-return]  # fn's truthy result, a T
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}"
            )
        time.sleep(interval)


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = _CMD_TIMEOUT_S) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def in_ns(ns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside network namespace ``ns`` (and only its network namespace)."""
    return ["nsenter", f"--net=/run/netns/{ns}", "--", *argv]


def _enter_netns(name: str) -> None:
    """Move the *calling thread* into network namespace ``name`` (setns(2) is per thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


# -- processes -------------------------------------------------------------------------


@dataclass
class Proc:
    """One component: ``argv`` inside namespace ``ns``, restartable, logging to a file."""

    name: str
    ns: str
    argv: list[str]
    logdir: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log_path(self) -> Path:
        return self.logdir / f"{self.name}.log"

    def start(self) -> None:
        assert not self.alive, f"{self.name} is already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts}: {' '.join(self.argv)}\n".encode())
            log.flush()
            # Its own session, so stop() can signal everything it spawned (but the
            # kubelet's containers run in sessions of their own and outlive it, as pods do).
            self.popen = subprocess.Popen(
                in_ns(self.ns, self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=str(REPO),
            )

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the process group, SIGKILL it after ``timeout``; the exit status."""
        proc, self.popen = self.popen, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        return proc.returncode

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return f"<no log for {self.name}>"


# -- the API client, on a thread inside the hub namespace --------------------------------


class ApiThread:
    """kproxy's REST client on an event loop whose thread lives in the hub namespace."""

    def __init__(self, hub_ns: str, kubeconfig: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._main, args=(hub_ns,), name="cluster-api", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise ClusterError(f"API client thread did not start: {self._error!r}")
        self.client = RestClient(load_kubeconfig(str(kubeconfig)), request_timeout=15)

    def _main(self, hub_ns: str) -> None:
        try:
            _enter_netns(hub_ns)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def run(self, coro: Awaitable[T], timeout: float = 30.0) -> T:
        async def wrapped() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout)

    # Plain verbs; ``namespace`` defaults to "default" for namespaced resources.
    def get(self, res: Resource, name: str, namespace: str = "default") -> Obj | None:
        try:
            return self.run(self.client.get(res, name, namespace))
        except NotFound:
            return None

    def list(
        self, res: Resource, namespace: str | None = "default", label_selector: str | None = None
    ) -> list[Obj]:
        out = self.run(self.client.list_all(res, namespace, label_selector=label_selector))
        return list(out.get("items") or [])

    def create(self, res: Resource, body: Mapping[str, Any], namespace: str = "default") -> Obj:
        return self.run(self.client.create(res, body, namespace))

    def patch(
        self, res: Resource, name: str, patch: Mapping[str, Any], namespace: str = "default"
    ) -> Obj:
        return self.run(self.client.patch(res, name, patch, namespace, patch_type="merge"))

    def delete(self, res: Resource, name: str, namespace: str = "default") -> None:
        with contextlib.suppress(NotFound):
            self.run(self.client.delete(res, name, namespace))

    def watch(
        self,
        res: Resource,
        on_event: Callable[[WatchEvent], None],
        namespace: str | None = "default",
        label_selector: str | None = None,
    ) -> Watch:
        """Call ``on_event`` (on the loop thread) for every event after a fresh list; the
        list's items arrive first as synthetic ADDED events."""
        return Watch(self, res, on_event, namespace, label_selector)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self.client.close(), timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


class Watch:
    """A running watch (see :meth:`ApiThread.watch`); :meth:`stop` ends it."""

    def __init__(
        self,
        api: ApiThread,
        res: Resource,
        on_event: Callable[[WatchEvent], None],
        namespace: str | None,
        label_selector: str | None,
    ) -> None:
        self.errors: list[BaseException] = []
        self._started = threading.Event()

        async def main() -> None:
            try:
                listed = await api.client.list_all(res, namespace, label_selector=label_selector)
                for item in listed.get("items") or ():
                    on_event(WatchEvent("ADDED", item))
                rv = str((listed.get("metadata") or {}).get("resourceVersion") or "")
                self._started.set()
                while True:  # the server ends a watch now and then; resume where it was
                    async for ev in api.client.watch(
                        res, namespace, resource_version=rv, label_selector=label_selector
                    ):
                        rv = ev.resource_version or rv
                        if ev.type != "BOOKMARK":
                            on_event(ev)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # reported to the test through .errors
                self.errors.append(exc)
                self._started.set()

        self._future = asyncio.run_coroutine_threadsafe(main(), api.loop)
        if not self._started.wait(15):
            self.stop()
            raise ClusterError("the watch did not start")
        if self.errors:
            raise ClusterError(f"the watch failed: {self.errors[0]!r}")

    def stop(self) -> None:
        self._future.cancel()


# -- agents: requests from inside a namespace -------------------------------------------

AGENT: Final = r"""
import json, socket, sys, time, urllib.error, urllib.request

def http(url, timeout):
    t = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return [r.status, r.read().decode(errors="replace"), time.monotonic() - t]
    except urllib.error.HTTPError as e:
        return [e.code, e.read().decode(errors="replace"), time.monotonic() - t]
    except Exception as e:
        return [0, repr(e), time.monotonic() - t]

for line in sys.stdin:
    req = json.loads(line)
    out, failures = [], 0
    for _ in range(req["count"]):
        out.append(http(req["url"], req["timeout"]))
        failures += out[-1][0] != 200
        # A broken path should fail a test in seconds, not count x timeout.
        if failures >= req["max_failures"]:
            break
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"""


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP request's outcome (status 0: no HTTP answer; ``body`` then says why)."""

    status: int
    body: str
    elapsed: float

    @property
    def pod(self) -> str:
        """The answering echo pod's name (``"<pod> saw <ip>:<port>"``), else ``""``."""
        parts = self.body.split()
        return parts[0] if self.status == 200 and len(parts) == 3 and parts[1] == "saw" else ""


class Agent:
    """A long-lived request agent inside one namespace: one JSON line in, one out."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.proc = subprocess.Popen(
            in_ns(ns, [sys.executable, "-c", AGENT]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )

    def get(
        self,
        ip: str,
        port: int,
        path: str = "/",
        *,
        count: int = 1,
        timeout: float = 2.0,
        max_failures: int = 3,
    ) -> list[Reply]:
        """``count`` GETs of ``http://ip:port/path`` (fewer once ``max_failures`` failed)."""
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        req = {
            "url": f"http://{ip}:{port}{path}",
            "count": count,
            "timeout": timeout,
            "max_failures": max_failures,
        }
        stdin.write(json.dumps(req) + "\n")
        stdin.flush()
        budget = count * (timeout + 0.5) + 5
        ready, _, _ = select.select([stdout], [], [], budget)
        if not ready:
            # A late answer would be read as the next request's: this agent is done.
            self.close()
            raise AssertionError(f"agent in {self.ns} gave no answer in {budget:.0f}s")
        line = stdout.readline()
        if not line:
            raise AssertionError(f"agent in {self.ns} died (exit {self.proc.poll()})")
        return [Reply(int(s), str(b), float(e)) for s, b, e in json.loads(line)]

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


# -- the cluster -------------------------------------------------------------------------


@dataclass
class Node:
    """One node: its namespace, address, podCIDR (once allocated) and processes."""

    name: str
    index: int
    ns: str
    ip: str
    pod_ns_prefix: str
    kubeconfig: Path
    kubelet: Proc
    proxy: Proc | None = None
    pod_cidr: str = ""
    agent: Agent | None = None


@dataclass
class Cluster:
    """See the module docstring. Build it with :func:`running_cluster`."""

    workdir: Path
    prefix: str
    proxy_mode: str = "iptables"
    iptables_backend: str = "nft"
    node_monitor_grace_period: str = "8s"
    nodes: dict[str, Node] = field(default_factory=dict)
    control_plane: list[Proc] = field(default_factory=list)
    api: ApiThread | None = None
    _namespaces: list[str] = field(default_factory=list)
    _pki: Any = None

    # -- namespaces and links ---------------------------------------------------------
    @property
    def hub(self) -> str:
        return f"{self.prefix}hub"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "apiserver" / "admin.kubeconfig"

    def _add_ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._namespaces.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _sysctl(self, ns: str, *settings: str) -> None:
        _run(in_ns(ns, ["sysctl", "-qw", *settings]))

    def build_hub(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._add_ns(self.hub)
        _run(["ip", "-n", self.hub, "link", "add", "nbr0", "type", "bridge"])
        _run(["ip", "-n", self.hub, "addr", "add", f"{HUB_IP}/{NODE_NET_PREFIX}", "dev", "nbr0"])
        _run(["ip", "-n", self.hub, "link", "set", "nbr0", "up"])

    def _node_ip(self, index: int) -> str:
        return f"10.99.0.{10 + index}"

    # -- control plane ----------------------------------------------------------------
    def start_control_plane(self) -> None:
        data = self.workdir / "apiserver"
        # The same call the apiserver makes on start: creating the PKI first lets us
        # issue node credentials before any component runs (the CA is reused, never replaced).
        self._pki = ensure_pki(data, bind_address=HUB_IP, port=APISERVER_PORT)
        apiserver = Proc(
            "apiserver",
            self.hub,
            [
                KPROXY, "-v", "apiserver",
                "--storage-backend", "sqlite",
                "--data-dir", str(data),
                "--bind-address", HUB_IP,
                "--secure-port", str(APISERVER_PORT),
                "--watch-bookmark-interval", "5s",
            ],
            self.workdir,
        )  # fmt: skip
        self.control_plane.append(apiserver)
        apiserver.start()
        self.api = ApiThread(self.hub, self.admin_kubeconfig)

        def healthy() -> bool:
            assert apiserver.alive, f"apiserver exited:\n{apiserver.tail()}"
            assert self.api is not None
            self.api.run(self.api.client.request("GET", "/version"), timeout=5)
            return True

        wait_for("the apiserver", healthy, timeout=30)
        admin = str(self.admin_kubeconfig)
        for proc in (
            Proc(
                "controller-manager",
                self.hub,
                [
                    KPROXY, "-v", "controller-manager",
                    "--kubeconfig", admin,
                    "--cluster-cidr", CLUSTER_CIDR,
                    "--node-monitor-grace-period", self.node_monitor_grace_period,
                    "--node-monitor-period", "1s",
                ],
                self.workdir,
            ),
            Proc("scheduler", self.hub, [KPROXY, "-v", "scheduler", "--kubeconfig", admin],
                 self.workdir),
        ):  # fmt: skip
            self.control_plane.append(proc)
            proc.start()

    # -- nodes ------------------------------------------------------------------------
    def add_node(
        self,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        proxy: bool = True,
        timeout: float = 40.0,
    ) -> Node:
        """A new node namespace on the hub, its kubelet (and proxy); returns once the Node
        has registered, got its podCIDR, is Ready, and routes to it are in place."""
        index = len(self.nodes) + 1
        ns = f"{self.prefix}{name}"
        ip = self._node_ip(index)
        self._add_ns(ns)
        port = f"n{index}"
        _run(["ip", "-n", self.hub, "link", "add", port, "type", "veth",
              "peer", "name", "eth0", "netns", ns])  # fmt: skip
        _run(["ip", "-n", self.hub, "link", "set", port, "master", "nbr0", "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{ip}/{NODE_NET_PREFIX}", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        # A real node has a default route; without one, a ClusterIP dies in routing
        # before the proxy's OUTPUT rules see it. The hub forwards nothing further.
        _run(["ip", "-n", ns, "route", "add", "default", "via", HUB_IP])
        self._sysctl(
            ns,
            "net.ipv4.ip_forward=1",
            # Packets routed back out of the interface they came in on (via the hub)
            # would draw ICMP redirects; a real node's uplink is elsewhere.
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.default.send_redirects=0",
        )
        assert self._pki is not None, "start_control_plane() first"
        creds = ensure_node_credentials(self._pki, name)
        label_arg = ",".join(f"{k}={v}" for k, v in (labels or {}).items())
        kubelet = Proc(
            f"kubelet-{name}",
            ns,
            [
                KPROXY, "-v", "kubelet",
                "--kubeconfig", str(creds.kubeconfig),
                "--hostname-override", name,
                "--node-ip", ip,
                "--root-dir", str(self.workdir / f"kubelet-{name}"),
                "--netns-prefix", f"{self.prefix}{name}-",
                "--bridge", "kpbr0",
                "--address", ip,
                "--port", "10250",
                "--node-labels", label_arg,
                "--crash-backoff-initial", "0.5",
                "--crash-backoff-max", "2",
                "--sync-tick", "0.1",
                "--node-status-update-frequency", "1",
                "--node-lease-duration-seconds", "4",
            ],
            self.workdir,
        )  # fmt: skip
        node = Node(name, index, ns, ip, f"{self.prefix}{name}-", creds.kubeconfig, kubelet)
        self.nodes[name] = node
        kubelet.start()
        api = self._api()

        def has_cidr() -> str:
            assert kubelet.alive, f"kubelet {name} exited:\n{kubelet.tail()}"
            obj = api.get(NODES, name, "") or {}
            return str((obj.get("spec") or {}).get("podCIDR") or "")

        node.pod_cidr = wait_for(f"{name} registered with a podCIDR", has_cidr, timeout)
        self._route_all()
        wait_for(f"{name} Ready", lambda: self.node_ready(name) == "True", timeout)
        node.agent = Agent(ns)
        if proxy:
            self.start_proxy(name)
        return node

    def _route_all(self) -> None:
        """host-gw: every namespace routes each other node's podCIDR via that node."""
        for node in self.nodes.values():
            if not node.pod_cidr:
                continue
            _run(["ip", "-n", self.hub, "route", "replace", node.pod_cidr, "via", node.ip])
            for other in self.nodes.values():
                if other is not node:
                    _run(["ip", "-n", other.ns, "route", "replace", node.pod_cidr,
                          "via", node.ip])  # fmt: skip

    def node_ready(self, name: str) -> str:
        """The Node's Ready condition status (``True``/``False``/``Unknown``, ``""``)."""
        obj = self._api().get(NODES, name, "") or {}
        for cond in (obj.get("status") or {}).get("conditions") or ():
            if cond.get("type") == "Ready":
                return str(cond.get("status"))
        return ""

    # -- proxies ----------------------------------------------------------------------
    def start_proxy(self, name: str, mode: str | None = None) -> None:
        node = self.nodes[name]
        mode = mode or self.proxy_mode
        argv = [
            KPROXY, "-v", "proxy",
            "--kubeconfig", str(node.kubeconfig),
            "--proxy-mode", mode,
            "--hostname-override", name,
            "--node-ip", node.ip,
            "--cluster-cidr", CLUSTER_CIDR,
            "--iptables-backend", self.iptables_backend,
            "--iptables-min-sync-period", "0.1s",
            "--iptables-sync-period", "5s",
            "--healthz-bind-address", f"{node.ip}:{HEALTHZ_PORT}",
            "--metrics-bind-address", f"{node.ip}:{METRICS_PORT}",
        ]  # fmt: skip
        node.proxy = Proc(f"proxy-{name}", node.ns, argv, self.workdir)
        node.proxy.start()
        proc = node.proxy

        def healthy() -> bool:
            assert proc.alive, f"proxy on {name} exited:\n{proc.tail()}"
            return self.from_node(name, node.ip, HEALTHZ_PORT, "/healthz")[0].status == 200

        wait_for(f"the {mode} proxy on {name}", healthy, timeout=30)

    def stop_proxy(self, name: str) -> int | None:
        node = self.nodes[name]
        status = node.proxy.stop() if node.proxy is not None else None
        node.proxy = None
        return status

    def switch_proxy_mode(self, mode: str) -> None:
        """Every node's proxy restarted in ``mode``, the old mode's rules removed first."""
        for name, node in self.nodes.items():
            if node.proxy is None:
                continue
            self.stop_proxy(name)
            _run(in_ns(node.ns, [KPROXY, "proxy", "--cleanup", "--proxy-mode", self.proxy_mode,
                                 "--iptables-backend", self.iptables_backend]))  # fmt: skip
            self.start_proxy(name, mode)
        self.proxy_mode = mode

    def save(self, name: str, table: str = "nat") -> str:
        """``iptables-save -t TABLE`` inside the node (the backend the proxies use)."""
        tool = f"iptables-{self.iptables_backend}-save"
        return _run(in_ns(self.nodes[name].ns, [tool, "-t", table]))

    # -- kubelets ---------------------------------------------------------------------
    def stop_kubelet(self, name: str) -> None:
        """SIGTERM: the kubelet goes away, its pods keep running (as upstream's)."""
        self.nodes[name].kubelet.stop()

    def start_kubelet(self, name: str) -> None:
        self.nodes[name].kubelet.start()

    # -- traffic and pods -------------------------------------------------------------
    def from_node(self, name: str, ip: str, port: int, path: str = "/", **kw: Any) -> list[Reply]:
        agent = self.nodes[name].agent
        assert agent is not None
        return agent.get(ip, port, path, **kw)

    def pod_netns(self, pod: Mapping[str, Any]) -> str:
        node = self.nodes[str(pod["spec"]["nodeName"])]
        return node.pod_ns_prefix + str(pod["metadata"]["uid"])

    def pod_pids(self, pod: Mapping[str, Any]) -> list[int]:
        """The processes inside the pod's network namespace (its containers)."""
        return netns_pids(self.pod_netns(pod))

    def exec_in_pod(
        self, pod: Mapping[str, Any], argv: Sequence[str], timeout: float = 20.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the pod's network namespace (the kubelet's containers are
        host processes in that namespace, so this is what ``kubectl exec`` would do)."""
        return subprocess.run(
            in_ns(self.pod_netns(pod), argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def kubectl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """``kubectl --kubeconfig admin ARGS`` from inside the hub namespace."""
        argv = ["kubectl", "--kubeconfig", str(self.admin_kubeconfig), *args]
        return subprocess.run(
            in_ns(self.hub, argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def _api(self) -> ApiThread:
        assert self.api is not None, "start_control_plane() first"
        return self.api

    def logs(self, lines: int = 30) -> str:
        procs = [*self.control_plane]
        for node in self.nodes.values():
            procs.append(node.kubelet)
            if node.proxy is not None:
                procs.append(node.proxy)
        return "\n".join(f"--- {p.name} ---\n{p.tail(lines)}" for p in procs)

    # -- teardown ---------------------------------------------------------------------
    def close(self) -> None:
        """Stop everything and delete every namespace; raise afterwards if any survived."""
        problems: list[str] = []
        for node in self.nodes.values():
            if node.agent is not None:
                node.agent.close()
            for proc in (node.proxy, node.kubelet):
                if proc is not None:
                    try:
                        proc.stop(signal.SIGKILL if proc is node.kubelet else signal.SIGTERM, 5)
                    except Exception as exc:  # keep going: the namespaces must still go
                        problems.append(f"{proc.name}: {exc!r}")
        if self.api is not None:
            self.api.close()
            self.api = None
        for proc in reversed(self.control_plane):
            try:
                proc.stop(signal.SIGTERM, 5)
            except Exception as exc:
                problems.append(f"{proc.name}: {exc!r}")
        # Pod namespaces first (their veths end in the node namespaces), then the rest.
        names = [n for n in list_netns(self.prefix) if n not in self._namespaces]
        names += list(reversed(self._namespaces))
        for name in names:
            for _ in range(3):  # a dying process may fork once more; bounded
                pids = netns_pids(name)
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.2)
            deleted = subprocess.run(
                ["ip", "netns", "del", name], capture_output=True, text=True, check=False
            )
            if deleted.returncode != 0:
                problems.append(f"ip netns del {name}: {deleted.stderr.strip()}")
        left = list_netns(self.prefix)
        if left:
            problems.append(f"namespaces still present: {left}")
        self._namespaces.clear()
        if problems:
            raise ClusterError("; ".join(problems))


def _bring_up(cluster: Cluster, nodes: Mapping[str, Mapping[str, str]]) -> None:
    cluster.build_hub()
    cluster.start_control_plane()
    for name, labels in nodes.items():
        cluster.add_node(name, labels=labels)


@contextlib.contextmanager
def running_cluster(
    workdir: Path,
    prefix: str,
    *,
    nodes: Mapping[str, Mapping[str, str]] | None = None,
    proxy_mode: str = "iptables",
    iptables_backend: str = "nft",
    node_monitor_grace_period: str = "8s",
) -> Iterator[Cluster]:
    """A running cluster of ``nodes`` (name → labels; default node-1, node-2), torn
    down on exit whatever happened. ``prefix`` names every namespace it creates."""
    for tool in ("ip", "nsenter", f"iptables-{iptables_backend}-save"):
        if not any((Path(d) / tool).exists() for d in os.environ.get("PATH", "").split(":")):
            raise ClusterError(f"{tool} is not installed")
    cluster = Cluster(
        workdir=workdir,
        prefix=prefix,
        proxy_mode=proxy_mode,
        iptables_backend=iptables_backend,
        node_monitor_grace_period=node_monitor_grace_period,
    )
    try:
        _bring_up(cluster, nodes if nodes is not None else {"node-1": {}, "node-2": {}})
        yield cluster
    except Exception:
        print(cluster.logs(), file=sys.stderr)
        raise
    finally:
        cluster.close()
