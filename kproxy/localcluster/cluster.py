"""A whole kproxy cluster on one machine: :class:`Cluster` and :func:`running_cluster`.

Owns the bring-up order and the teardown of a local cluster, on the namespaces of a
:class:`~kproxy.kernel.clusternet.Topology`:

1. the hub namespace, then its PKI (the same call the apiserver makes on start, so
   node credentials can be issued before any component runs), ``kproxy apiserver``
   (SQLite, TLS on ``HUB_IP:6443``, PKI and ``admin.kubeconfig`` under
   ``<workdir>/apiserver``), then ``kproxy controller-manager`` and ``kproxy scheduler``;
2. per node: its namespace, ``kproxy kubelet`` with its own client certificate
   (``system:node:<name>``); once the Node has its podCIDR the host-gw routes; once it
   is Ready, ``kproxy proxy`` (same credentials), and the wait for its ``/healthz``.

Every component is a :class:`~kproxy.localcluster.processes.Proc` logging to
``<workdir>/<component>.log``. The API is read through an
:class:`~kproxy.localcluster.api.ApiThread` living in the hub; traffic is sent by
:class:`~kproxy.localcluster.agent.Agent` processes inside the namespaces.

Invariants:

- Nothing happens in the root network namespace (see :mod:`kproxy.kernel.clusternet`).
- :meth:`Cluster.close` (run by :func:`running_cluster` on any exit, KeyboardInterrupt
  included) stops every process it started, kills whatever is still inside any of the
  cluster's namespaces (pods included), deletes them all, and raises afterwards if
  anything survived. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kproxy.apiserver.certs import Pki, ensure_node_credentials, ensure_pki
from kproxy.client.rest import NODES
from kproxy.kernel.clusternet import (
    APISERVER_PORT,
    HEALTHZ_PORT,
    HUB_IP,
    Topology,
    check_prerequisites,
    in_ns,
    run,
)
from kproxy.kernel.podnet import netns_pids
from kproxy.localcluster import processes
from kproxy.localcluster.agent import Agent, Reply
from kproxy.localcluster.api import ApiThread
from kproxy.localcluster.errors import ClusterError
from kproxy.localcluster.processes import Proc
from kproxy.localcluster.waits import wait_for

__all__ = ["Cluster", "Node", "running_cluster"]

log = logging.getLogger(__name__)


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
    topology: Topology = field(init=False)
    _pki: Pki | None = None

    def __post_init__(self) -> None:
        self.topology = Topology(self.prefix)

    @property
    def hub(self) -> str:
        return self.topology.hub

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "apiserver" / "admin.kubeconfig"

    @property
    def apiserver_url(self) -> str:
        return f"https://{HUB_IP}:{APISERVER_PORT}"

    def build_hub(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.topology.claim()
        self.topology.build_hub()

    # -- control plane ----------------------------------------------------------------
    def start_control_plane(self) -> None:
        data = self.workdir / "apiserver"
        # The CA is reused by the apiserver, never replaced.
        self._pki = ensure_pki(data, bind_address=HUB_IP, port=APISERVER_PORT)
        apiserver = Proc("apiserver", self.hub, processes.apiserver_argv(data), self.workdir)
        self.control_plane.append(apiserver)
        log.info("starting the apiserver in %s", self.hub)
        apiserver.start()
        self.api = ApiThread(self.hub, self.admin_kubeconfig)

        def healthy() -> bool:
            apiserver.check_alive()
            api = self._api()
            api.run(api.client.request("GET", "/version"), timeout=5)
            return True

        wait_for("the apiserver", healthy, timeout=30)
        admin = self.admin_kubeconfig
        for proc in (
            Proc(
                "controller-manager",
                self.hub,
                processes.controller_manager_argv(admin, self.node_monitor_grace_period),
                self.workdir,
            ),
            Proc("scheduler", self.hub, processes.scheduler_argv(admin), self.workdir),
        ):
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
        if self._pki is None:
            raise ClusterError("start_control_plane() first")
        index = len(self.nodes) + 1
        log.info("adding %s", name)
        ns, ip = self.topology.add_node(name, index)
        creds = ensure_node_credentials(self._pki, name)
        pod_ns_prefix = self.topology.pod_ns_prefix(name)
        argv = processes.kubelet_argv(
            name,
            ip,
            creds.kubeconfig,
            self.workdir / f"kubelet-{name}",
            pod_ns_prefix,
            ",".join(f"{k}={v}" for k, v in (labels or {}).items()),
        )
        kubelet = Proc(f"kubelet-{name}", ns, argv, self.workdir)
        node = Node(name, index, ns, ip, pod_ns_prefix, creds.kubeconfig, kubelet)
        self.nodes[name] = node
        kubelet.start()
        api = self._api()

        def has_cidr() -> str:
            kubelet.check_alive()
            obj = api.get(NODES, name, "") or {}
            return str((obj.get("spec") or {}).get("podCIDR") or "")

        node.pod_cidr = wait_for(f"{name} registered with a podCIDR", has_cidr, timeout)
        self.topology.route_pod_cidrs([(n.ns, n.ip, n.pod_cidr) for n in self.nodes.values()])
        wait_for(f"{name} Ready", lambda: self.node_ready(name) == "True", timeout)
        node.agent = Agent(ns)
        if proxy:
            self.start_proxy(name)
        return node

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
        argv = processes.proxy_argv(name, node.ip, node.kubeconfig, mode, self.iptables_backend)
        proc = node.proxy = Proc(f"proxy-{name}", node.ns, argv, self.workdir)
        log.info("starting the %s proxy on %s", mode, name)
        proc.start()

        def healthy() -> bool:
            proc.check_alive()
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
            cleanup = [*processes.kproxy_argv(), "proxy", "--cleanup",
                       "--proxy-mode", self.proxy_mode,
                       "--iptables-backend", self.iptables_backend]  # fmt: skip
            run(in_ns(node.ns, cleanup))
            self.start_proxy(name, mode)
        self.proxy_mode = mode

    def save(self, name: str, table: str = "nat") -> str:
        """``iptables-save -t TABLE`` inside the node (the backend the proxies use)."""
        tool = f"iptables-{self.iptables_backend}-save"
        return run(in_ns(self.nodes[name].ns, [tool, "-t", table]))

    # -- kubelets ---------------------------------------------------------------------
    def stop_kubelet(self, name: str) -> None:
        """SIGTERM: the kubelet goes away, its pods keep running (as upstream's)."""
        self.nodes[name].kubelet.stop()

    def start_kubelet(self, name: str) -> None:
        self.nodes[name].kubelet.start()

    # -- traffic and pods -------------------------------------------------------------
    def from_node(self, name: str, ip: str, port: int, path: str = "/", **kw: Any) -> list[Reply]:
        agent = self.nodes[name].agent
        if agent is None:
            raise ClusterError(f"{name} has no agent yet")
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
        if self.api is None:
            raise ClusterError("start_control_plane() first")
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
        problems += self.topology.destroy()
        if problems:
            raise ClusterError("; ".join(problems))


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
    down on exit whatever happened. ``prefix`` names every namespace it creates; it
    must not be in use (:class:`ClusterError`). Raises
    :class:`~kproxy.localcluster.errors.PrerequisiteMissing` before making anything
    when this machine cannot run it."""
    check_prerequisites(iptables_backend)
    cluster = Cluster(
        workdir=workdir,
        prefix=prefix,
        proxy_mode=proxy_mode,
        iptables_backend=iptables_backend,
        node_monitor_grace_period=node_monitor_grace_period,
    )
    try:
        cluster.build_hub()
        cluster.start_control_plane()
        for name, labels in (nodes if nodes is not None else {"node-1": {}, "node-2": {}}).items():
            cluster.add_node(name, labels=labels)
        yield cluster
    except Exception:
        print(cluster.logs(), file=sys.stderr)
        raise
    finally:
        cluster.close()
