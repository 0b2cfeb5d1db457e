"""The local cluster's network: its namespaces, links, addresses and routes.

Owns every network namespace a local cluster (:mod:`kproxy.localcluster`) makes and
what is inside them, all named from one prefix:

- ``<prefix>hub`` holds the node network's bridge ``nbr0`` (``HUB_IP``/24); the
  control plane runs here;
- ``<prefix><node>`` per node: ``eth0`` (a veth whose peer ``nN`` is a port of the
  hub's bridge) with ``10.99.0.(10+N)``/24, a default route via the hub, forwarding
  on and ICMP redirects off;
- ``<prefix><node>-<pod uid>``: the pod namespaces, made by that node's kubelet;
- "host-gw" routing: every other node (and the hub) routes a node's podCIDR via the
  node's IP.

Invariants:

- Nothing is created in, or changed in, the root network namespace: every ``ip`` verb
  names a namespace (``ip -n``), veth pairs are born inside the hub with their peer
  moved straight into the node, and sysctls are set from inside the node's namespace.
  The addresses live only inside these namespaces.
- A prefix is claimed before anything is made (:meth:`Topology.claim`): it must be a
  plain name and no namespace may start with it yet, so :meth:`Topology.destroy`,
  which removes every namespace starting with the prefix, removes only what this
  cluster (and its kubelets) made; unclaimed, it removes nothing.
- :meth:`Topology.destroy` kills whatever still runs inside each namespace before
  deleting it, keeps going past failures and reports them all; every step is bounded.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from kproxy.errors import KProxyError
from kproxy.kernel.podnet import list_netns, netns_argv, netns_pids

__all__ = [
    "APISERVER_PORT",
    "CLUSTER_CIDR",
    "HEALTHZ_PORT",
    "HUB_IP",
    "METRICS_PORT",
    "NODE_NET_PREFIX",
    "SERVICE_CIDR",
    "ClusterNetError",
    "PrerequisiteMissing",
    "Topology",
    "check_prefix",
    "check_prerequisites",
    "in_ns",
    "node_ip",
    "run",
]


class ClusterNetError(KProxyError):
    """The local cluster's network could not be made or removed (the base of the
    local cluster's errors: :class:`kproxy.localcluster.ClusterNetError` is this class)."""


class PrerequisiteMissing(ClusterNetError):
    """This machine cannot run a local cluster: not root, or a tool is missing."""


HUB_IP: Final = "10.99.0.1"
NODE_NET_PREFIX: Final = 24
CLUSTER_CIDR: Final = "10.244.0.0/16"
SERVICE_CIDR: Final = "10.96.0.0/12"
APISERVER_PORT: Final = 6443
HEALTHZ_PORT: Final = 10256
METRICS_PORT: Final = 10249
MAX_NODES: Final = 200  # node IPs are 10.99.0.(10+N) on the hub's /24
_CMD_TIMEOUT_S: Final = 30.0
_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


def run(argv: Sequence[str], *, check: bool = True, timeout: float = _CMD_TIMEOUT_S) -> str:
    """Run ``argv`` (bounded); its stdout, or :class:`ClusterNetError` with its stderr."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        raise ClusterNetError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def in_ns(ns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside network namespace ``ns`` (only its network namespace: the
    mount namespace stays ours, so pod namespaces a kubelet makes are visible here)."""
    return netns_argv(ns, argv)


def node_ip(index: int) -> str:
    """The node network address of the ``index``-th node (1-based)."""
    if not 1 <= index <= MAX_NODES:
        raise ClusterNetError(f"node index {index} out of range 1..{MAX_NODES}")
    return f"10.99.0.{10 + index}"


def check_prerequisites(iptables_backend: str = "nft") -> None:
    """Raise :class:`PrerequisiteMissing` unless this process can run a local cluster."""
    if os.geteuid() != 0:
        raise PrerequisiteMissing("a local cluster needs root (it creates network namespaces)")
    tools = ("ip", "nsenter", "sysctl", f"iptables-{iptables_backend}-save")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise PrerequisiteMissing(f"a local cluster needs these commands: {', '.join(missing)}")


def check_prefix(prefix: str) -> None:
    """Raise :class:`ClusterNetError` unless ``prefix`` is a plain name (a file name under
    ``/run/netns`` with no path in it)."""
    if not _PREFIX_RE.match(prefix):
        raise ClusterNetError(f"namespace prefix {prefix!r}: use letters, digits, '.', '_' and '-'")


@dataclass
class Topology:
    """The namespaces of one local cluster (see the module docstring)."""

    prefix: str
    namespaces: list[str] = field(default_factory=list)  # made here, in creation order
    # May :meth:`destroy` remove every namespace starting with the prefix? Only after
    # :meth:`claim` (the prefix was free) or :meth:`adopt` (a cluster's leftovers).
    owned: bool = False

    @property
    def hub(self) -> str:
        return f"{self.prefix}hub"

    def node_ns(self, node: str) -> str:
        return f"{self.prefix}{node}"

    def pod_ns_prefix(self, node: str) -> str:
        return f"{self.prefix}{node}-"

    def claim(self) -> None:
        """Check that the prefix is a plain name no namespace uses yet."""
        check_prefix(self.prefix)
        taken = list_netns(self.prefix)
        if taken:
            raise ClusterNetError(f"namespace prefix {self.prefix!r} is already in use: {taken}")
        self.owned = True

    def adopt(self) -> None:
        """Take over what a local cluster with this prefix left behind (its hub must
        exist: a prefix that merely matches other namespaces is refused)."""
        check_prefix(self.prefix)
        if self.hub not in list_netns(self.hub):
            raise ClusterNetError(f"no local cluster with prefix {self.prefix!r} (no {self.hub})")
        self.owned = True

    def _add_ns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        run(["ip", "-n", name, "link", "set", "lo", "up"])

    def sysctl(self, ns: str, *settings: str) -> None:
        run(in_ns(ns, ["sysctl", "-qw", *settings]))

    def build_hub(self) -> None:
        """The hub namespace and its bridge, the node network's gateway."""
        self._add_ns(self.hub)
        run(["ip", "-n", self.hub, "link", "add", "nbr0", "type", "bridge"])
        run(["ip", "-n", self.hub, "addr", "add", f"{HUB_IP}/{NODE_NET_PREFIX}", "dev", "nbr0"])
        run(["ip", "-n", self.hub, "link", "set", "nbr0", "up"])

    def add_node(self, node: str, index: int) -> tuple[str, str]:
        """A node namespace wired to the hub's bridge; its name and IP."""
        ns, ip = self.node_ns(node), node_ip(index)
        self._add_ns(ns)
        port = f"n{index}"
        run(["ip", "-n", self.hub, "link", "add", port, "type", "veth",
             "peer", "name", "eth0", "netns", ns])  # fmt: skip
        run(["ip", "-n", self.hub, "link", "set", port, "master", "nbr0", "up"])
        run(["ip", "-n", ns, "addr", "add", f"{ip}/{NODE_NET_PREFIX}", "dev", "eth0"])
        run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        # A real node has a default route; without one, a ClusterIP dies in routing
        # before the proxy's OUTPUT rules see it. The hub forwards nothing further.
        run(["ip", "-n", ns, "route", "add", "default", "via", HUB_IP])
        self.sysctl(
            ns,
            "net.ipv4.ip_forward=1",
            # Packets routed back out of the interface they came in on (via the hub)
            # would draw ICMP redirects; a real node's uplink is elsewhere.
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.default.send_redirects=0",
        )
        return ns, ip

    def route_pod_cidrs(self, nodes: Sequence[tuple[str, str, str]]) -> None:
        """host-gw: for each node ``(namespace, ip, podCIDR)`` with a podCIDR, the hub
        and every other node route that podCIDR via the node's IP."""
        for ns, ip, cidr in nodes:
            if not cidr:
                continue
            run(["ip", "-n", self.hub, "route", "replace", cidr, "via", ip])
            for other, _, _ in nodes:
                if other != ns:
                    run(["ip", "-n", other, "route", "replace", cidr, "via", ip])

    def destroy(self) -> list[str]:
        """Kill what runs in each of the cluster's namespaces and delete them all: pod
        namespaces first (their veths end in the nodes), then the rest, newest first.
        Returns the problems met (empty: nothing with the prefix is left)."""
        problems: list[str] = []
        if not self.owned:
            return problems  # claim() failed or never ran: nothing was made
        ours = set(self.namespaces)
        # Longest names first: a pod's (<node>-<uid>) before its node's, for namespaces
        # this object did not make itself (found by prefix, e.g. by `kproxy cluster down`).
        others = sorted((n for n in list_netns(self.prefix) if n not in ours), reverse=True)
        for name in [*others, *reversed(self.namespaces)]:
            _kill_inside(name)
            deleted = subprocess.run(
                ["ip", "netns", "del", name], capture_output=True, text=True, check=False
            )
            if deleted.returncode != 0 and name in list_netns(name):
                problems.append(f"ip netns del {name}: {deleted.stderr.strip()}")
        self.namespaces.clear()
        left = list_netns(self.prefix)
        if left:
            problems.append(f"namespaces still present: {left}")
        return problems


def _kill_inside(ns: str) -> None:
    for _ in range(3):  # a dying process may fork once more; bounded
        pids = netns_pids(ns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
