"""Pod networking by hand, CNI bridge + host-local style, over rtnetlink (pyroute2).

This module owns the node's pod bridge (default ``kproxy0``, holding the first IP of
the node's podCIDR), each pod's network namespace (a bind mount under
``/var/run/netns``, made and removed by ``ip netns add|del``), the veth pair between
them, the pod's ``eth0`` address and default route, and the argv that runs a program
inside a pod's namespace.

Invariants:

- Everything happens in the network namespace of the calling process (the kubelet
  runs inside its node's namespace); pod namespaces are created from there, so their
  host-side veth ends land beside the bridge. Nothing here ever names the root
  namespace.
- Every verb is idempotent: :meth:`PodNet.ensure_bridge` and :meth:`PodNet.setup_pod`
  converge an existing half-made state instead of failing on EEXIST (a kubelet that
  crashed mid-setup retries), and :meth:`PodNet.teardown_pod` of something already gone
  is a no-op.
- Each verb opens its own short-lived netlink sockets, so verbs may run on any thread
  (the kubelet calls them through ``asyncio.to_thread``).
- Nothing here forks without exec'ing: netlink sockets inside a pod's netns are opened
  after a per-thread ``setns(2)`` (see :func:`_ipr`), never through pyroute2's forked
  helpers, which can deadlock a threaded process.
- Bridge ports get hairpin mode, so a pod can reach itself through a Service IP.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any, Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from kproxy.errors import KProxyError

__all__ = [
    "DEFAULT_BRIDGE",
    "NETNS_DIR",
    "PodNet",
    "PodNetError",
    "enter_netns",
    "host_if_name",
    "list_netns",
    "netns_argv",
    "netns_exists",
    "netns_pids",
]

DEFAULT_BRIDGE: Final = "kproxy0"
NETNS_DIR: Final = Path("/var/run/netns")
POD_IFNAME: Final = "eth0"


class PodNetError(KProxyError):
    """A pod-network verb failed; keeps the verb, what it acted on and the errno."""

    def __init__(self, verb: str, subject: str, errno: int, reason: str = "") -> None:
        self.verb = verb
        self.subject = subject
        self.errno = errno
        self.reason = reason or errno_mod.errorcode.get(errno, "")
        super().__init__(f"podnet {verb} {subject}: {self.reason} (errno {errno})")


def host_if_name(key: str, stem: str = "veth") -> str:
    """A stable interface name for a pod (≤ 15 bytes, as IFNAMSIZ demands)."""
    return stem[:6] + hashlib.sha256(key.encode()).hexdigest()[:8]


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def list_netns(prefix: str = "") -> list[str]:
    """Named namespaces under ``/var/run/netns`` starting with ``prefix``."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def netns_pids(name: str) -> list[int]:
    """Pids of the processes whose network namespace is the named one (``ip netns pids``)."""
    try:
        want = os.stat(netns_path(name))
    except OSError:
        return []
    pids: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # gone meanwhile, or a kernel thread
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            pids.append(int(entry))
    return sorted(pids)


def netns_argv(name: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside the named netns (``nsenter`` execs it: the pid is the program's).

    ``nsenter`` keeps the caller's mount namespace (``ip netns exec`` makes a private one
    and remounts ``/sys``); falling back to ``ip netns exec`` only if it is missing.
    """
    if shutil.which("nsenter"):
        return ["nsenter", f"--net={netns_path(name)}", "--", *argv]
    return ["ip", "netns", "exec", name, *argv]


_CLONE_NEWNET: Final = 0x40000000
_libc: Any = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def enter_netns(name: str) -> None:
    """Move the *calling thread* into network namespace ``name`` (setns(2) is per thread)."""
    fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    except OSError as e:
        raise OSError(e.errno, f"setns({name}): {e.strerror}") from e
    finally:
        os.close(fd)


def _ipr(name: str | None = None) -> Any:
    """A netlink socket in the current netns, or in the named one.

    For a named netns the socket is opened after ``setns(2)`` on this thread only, which
    then returns to its own netns: a socket stays in the namespace it was created in.
    pyroute2's own ``IPRoute(netns=...)`` forks a helper instead, and a fork from a
    threaded asyncio process can deadlock on a lock another thread held.
    """
    if not name:
        return IPRoute()
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(netns_path(name), os.O_RDONLY)
        try:
            _setns(target)
            try:
                return IPRoute()
            finally:
                # Failing to return would leave this pool thread in the pod's netns.
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


def _ip_netns(verb: str, name: str) -> None:
    """``ip netns add|del NAME``: fork+exec (safe from threads), the bind mount iproute2's way."""
    proc = subprocess.run(
        ["ip", "netns", verb, name], capture_output=True, text=True, check=False, timeout=30
    )
    if proc.returncode != 0:
        reason = proc.stderr.strip()
        code = errno_mod.EEXIST if "exists" in reason else errno_mod.EIO
        raise PodNetError(f"netns-{verb}", name, code, reason)


class PodNet:
    """The verbs on one node's bridge and its pods' namespaces."""

    def __init__(self, bridge: str = DEFAULT_BRIDGE) -> None:
        if not bridge or len(bridge) > 15:
            raise PodNetError("init", bridge, errno_mod.EINVAL, "bridge name must be 1-15 bytes")
        self.bridge = bridge

    # ------------------------------------------------------------------ bridge

    def ensure_bridge(self, gateway: IPv4Interface) -> bool:
        """The bridge exists, is up and holds ``gateway`` (e.g. 10.250.0.1/24); True if made."""
        created = False
        with _ipr() as ipr:
            idx = _lookup(ipr, self.bridge)
            if idx is None:
                _call("add-bridge", self.bridge, ipr.link, "add", ifname=self.bridge, kind="bridge")
                idx = _lookup(ipr, self.bridge)
                created = True
            if idx is None:
                raise PodNetError("add-bridge", self.bridge, errno_mod.ENODEV)
            have = {
                (m.get_attr("IFA_ADDRESS"), m["prefixlen"])
                for m in ipr.get_addr(index=idx, family=2)
            }
            if (str(gateway.ip), gateway.network.prefixlen) not in have:
                _call(
                    "bridge-address", f"{self.bridge} {gateway}", ipr.addr, "add",
                    index=idx, address=str(gateway.ip), prefixlen=gateway.network.prefixlen,
                    ok=(errno_mod.EEXIST,),
                )  # fmt: skip
            _call("bridge-up", self.bridge, ipr.link, "set", index=idx, state="up")
        return created

    def bridge_exists(self) -> bool:
        with _ipr() as ipr:
            return _lookup(ipr, self.bridge) is not None

    def delete_bridge(self) -> bool:
        with _ipr() as ipr:
            idx = _lookup(ipr, self.bridge)
            if idx is None:
                return False
            _call("delete-bridge", self.bridge, ipr.link, "del", index=idx, ok=(errno_mod.ENODEV,))
        return True

    # -------------------------------------------------------------------- pods

    def setup_pod(
        self, ns: str, host_if: str, address: IPv4Interface, gateway: IPv4Address
    ) -> None:
        """Namespace ``ns`` with ``eth0`` = ``address`` on the bridge, lo up, default route."""
        if not netns_exists(ns):
            try:
                _ip_netns("add", ns)
            except PodNetError as e:
                if e.errno != errno_mod.EEXIST:
                    raise
        peer_tmp = host_if_name(ns, "kptmp")
        with _ipr() as ipr:
            bridge_idx = _lookup(ipr, self.bridge)
            if bridge_idx is None:
                raise PodNetError("setup-pod", f"{ns}: bridge {self.bridge}", errno_mod.ENODEV)
            idx = _lookup(ipr, host_if)
            in_pod = self._pod_has_eth0(ns)
            if idx is not None and not in_pod:
                # A half-made pair from an interrupted setup: start it over.
                _call("delete-veth", host_if, ipr.link, "del", index=idx, ok=(errno_mod.ENODEV,))
                idx = None
            if idx is None:
                if in_pod:
                    # eth0 lost its host end; only re-creating the namespace fixes that.
                    raise PodNetError("setup-pod", ns, errno_mod.EEXIST, "eth0 without a host end")
                stale = _lookup(ipr, peer_tmp)
                if stale is not None:
                    _call("delete-veth", peer_tmp, ipr.link, "del", index=stale)
                _call(
                    "add-veth", host_if, ipr.link, "add",
                    ifname=host_if, kind="veth", peer={"ifname": peer_tmp},
                )  # fmt: skip
                idx = _lookup(ipr, host_if)
                peer_idx = _lookup(ipr, peer_tmp)
                if idx is None or peer_idx is None:
                    raise PodNetError("add-veth", host_if, errno_mod.ENODEV)
                nsfd = os.open(netns_path(ns), os.O_RDONLY)
                try:
                    _call("move-veth", f"{peer_tmp} -> {ns}", ipr.link, "set",
                          index=peer_idx, net_ns_fd=nsfd)  # fmt: skip
                finally:
                    os.close(nsfd)
            _call("attach-veth", host_if, ipr.link, "set", index=idx, master=bridge_idx)
            _call("veth-up", host_if, ipr.link, "set", index=idx, state="up")
            _call("hairpin", host_if, ipr.brport, "set", index=idx, mode=1)
        with _ipr(ns) as pr:
            lo = _lookup(pr, "lo")
            if lo is not None:
                _call("lo-up", ns, pr.link, "set", index=lo, state="up")
            eth = _lookup(pr, POD_IFNAME)
            if eth is None:
                tmp = _lookup(pr, peer_tmp)
                if tmp is None:
                    raise PodNetError("setup-pod", f"{ns}: {peer_tmp}", errno_mod.ENODEV)
                _call("rename", f"{ns}: {peer_tmp}", pr.link, "set", index=tmp, ifname=POD_IFNAME)
                eth = tmp
            have = {
                (m.get_attr("IFA_ADDRESS"), m["prefixlen"])
                for m in pr.get_addr(index=eth, family=2)
            }
            if (str(address.ip), address.network.prefixlen) not in have:
                _call(
                    "pod-address", f"{ns} {address}", pr.addr, "add", index=eth,
                    address=str(address.ip), prefixlen=address.network.prefixlen,
                    ok=(errno_mod.EEXIST,),
                )  # fmt: skip
            _call("eth0-up", ns, pr.link, "set", index=eth, state="up")
            _call(
                "default-route", f"{ns} via {gateway}", pr.route, "replace",
                dst="0.0.0.0/0", gateway=str(gateway), oif=eth,
            )  # fmt: skip

    def _pod_has_eth0(self, ns: str) -> bool:
        with _ipr(ns) as pr:
            return _lookup(pr, POD_IFNAME) is not None

    def pod_address(self, ns: str) -> IPv4Interface | None:
        """The IPv4 address on the pod's ``eth0``, None if the namespace or address is gone."""
        if not netns_exists(ns):
            return None
        with _ipr(ns) as pr:
            idx = _lookup(pr, POD_IFNAME)
            if idx is None:
                return None
            for m in pr.get_addr(index=idx, family=2):
                return IPv4Interface(f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}")
        return None

    def teardown_pod(self, ns: str, host_if: str) -> None:
        """Delete the pod's veth and namespace; a no-op for whatever is already gone."""
        with _ipr() as ipr:
            idx = _lookup(ipr, host_if)
            if idx is not None:
                _call("delete-veth", host_if, ipr.link, "del", index=idx, ok=(errno_mod.ENODEV,))
        if netns_exists(ns):
            _ip_netns("del", ns)


def _lookup(ipr: Any, ifname: str) -> int | None:
    found = list(ipr.link_lookup(ifname=ifname) or ())
    return int(found[0]) if found else None


def _call(verb: str, subject: str, fn: Any, *a: Any, ok: tuple[int, ...] = (), **kw: Any) -> Any:
    try:
        return fn(*a, **kw)
    except NetlinkError as e:
        if e.code in ok:
            return None
        raise PodNetError(verb, subject, e.code) from e
    except OSError as e:
        if e.errno in ok:
            return None
        raise PodNetError(verb, subject, e.errno or 0, str(e)) from e
