"""This node in the API: registration, the Lease heartbeat and NodeStatus updates.

Owns :class:`NodeConfig`, the pure builders (:func:`build_node`, :func:`node_conditions`,
:func:`machine_capacity`, :func:`node_info`, label and taint flag parsing) and
:class:`NodeAgent`, whose loops keep the Node and its Lease current.

As upstream's kubelet (reference control-plane.md §4):

- register: create the Node (labels incl. ``kubernetes.io/hostname``, ``kubernetes.io/os``,
  ``kubernetes.io/arch``; ``--register-with-taints``; addresses; capacity/allocatable;
  ``daemonEndpoints``; ``nodeInfo``; conditions); on AlreadyExists reconcile the labels
  and write the status. ``spec.podCIDR`` is never written here: the node-IPAM
  controller owns it;
- Lease ``kube-node-lease/<node>``: ``renewTime`` every ``leaseDurationSeconds / 4``;
- status: computed every ``--node-status-update-frequency``, written when it changed
  or when ``report_frequency`` passed (``lastHeartbeatTime`` moves only on writes,
  ``lastTransitionTime`` only when a condition flips).

Every loop survives API errors (logged, retried next period) and ends only by
cancellation.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import platform
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kproxy import __version__
from kproxy.client.errors import AlreadyExists, ClientError, Conflict, NotFound
from kproxy.client.rest import LEASES, NODES, RestClient
from kproxy.errors import KProxyError

log = logging.getLogger(__name__)
Obj = dict[str, Any]
LEASE_NAMESPACE = "kube-node-lease"
KUBELET_VERSION = "v1.32.0-kproxy"
MAX_PODS = 110
# Upstream's default hard eviction threshold: memory.available<100Mi.
MEMORY_PRESSURE_BYTES = 100 * 1024 * 1024

_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def parse_labels(text: str) -> dict[str, str]:
    """``--node-labels a=b,c=d``."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KProxyError(f"--node-labels: {item!r} is not key=value")
        out[key] = value
    return out


def parse_taints(text: str) -> list[Obj]:
    """``--register-with-taints key=value:Effect,key:Effect``."""
    out: list[Obj] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        kv, sep, effect = item.rpartition(":")
        if not sep or effect not in _EFFECTS or not kv:
            raise KProxyError(f"--register-with-taints: {item!r} is not key[=value]:Effect")
        key, _, value = kv.partition("=")
        taint: Obj = {"key": key, "effect": effect}
        if value:
            taint["value"] = value
        out.append(taint)
    return out


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return out


def machine_capacity() -> dict[str, str]:
    try:
        cpus = len(os.sched_getaffinity(0))
    except OSError:
        cpus = os.cpu_count() or 1
    mem = _meminfo().get("MemTotal", 0)
    return {"cpu": str(cpus), "memory": f"{mem // 1024}Ki", "pods": str(MAX_PODS)}


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def node_info() -> dict[str, str]:
    pretty = ""
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            pretty = line.partition("=")[2].strip('"')
    machine = platform.machine()
    return {
        "machineID": _read("/etc/machine-id"),
        "systemUUID": _read("/sys/class/dmi/id/product_uuid"),
        "bootID": _read("/proc/sys/kernel/random/boot_id"),
        "kernelVersion": os.uname().release,
        "osImage": pretty or "Linux",
        "containerRuntimeVersion": f"kproxy://{__version__}",
        "kubeletVersion": KUBELET_VERSION,
        "kubeProxyVersion": KUBELET_VERSION,
        "operatingSystem": "linux",
        "architecture": _ARCH.get(machine, machine),
    }


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def micro_time() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_CONDITIONS = (
    ("MemoryPressure", "KubeletHasSufficientMemory", "KubeletHasInsufficientMemory",
     "kubelet has sufficient memory available", "kubelet has insufficient memory available"),
    ("DiskPressure", "KubeletHasNoDiskPressure", "KubeletHasDiskPressure",
     "kubelet has no disk pressure", "kubelet has disk pressure"),
    ("PIDPressure", "KubeletHasSufficientPID", "KubeletHasInsufficientPID",
     "kubelet has sufficient PID available", "kubelet has insufficient PID available"),
)  # fmt: skip


def node_conditions(
    *,
    ready: bool,
    not_ready_message: str = "",
    memory_pressure: bool = False,
    previous: Sequence[Mapping[str, Any]] = (),
    now: str,
) -> list[Obj]:
    prev = {str(c.get("type")): c for c in previous if isinstance(c, Mapping)}

    def cond(ctype: str, status: bool, reason: str, message: str) -> Obj:
        text = "True" if status else "False"
        old = prev.get(ctype)
        since = now
        if old is not None and old.get("status") == text and old.get("lastTransitionTime"):
            since = str(old["lastTransitionTime"])
        return {
            "type": ctype,
            "status": text,
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": now,
            "lastTransitionTime": since,
        }

    out = []
    for ctype, ok_reason, bad_reason, ok_msg, bad_msg in _CONDITIONS:
        bad = memory_pressure if ctype == "MemoryPressure" else False
        out.append(cond(ctype, bad, bad_reason if bad else ok_reason, bad_msg if bad else ok_msg))
    if ready:
        out.append(cond("Ready", True, "KubeletReady", "kubelet is posting ready status"))
    else:
        out.append(cond("Ready", False, "KubeletNotReady", not_ready_message or "not ready"))
    return out


@dataclass
class NodeConfig:
    name: str
    node_ip: str
    labels: dict[str, str] = field(default_factory=dict)
    taints: list[Obj] = field(default_factory=list)
    port: int = 10250
    status_frequency: float = 10.0
    report_frequency: float = 300.0
    lease_duration: int = 40
    register: bool = True


def build_node(cfg: NodeConfig, conditions: list[Obj]) -> Obj:
    machine = platform.machine()
    labels = {
        "kubernetes.io/hostname": cfg.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": _ARCH.get(machine, machine),
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": _ARCH.get(machine, machine),
        **cfg.labels,
    }
    spec: Obj = {"taints": list(cfg.taints)} if cfg.taints else {}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": cfg.name, "labels": labels},
        "spec": spec,
        "status": node_status(cfg, conditions),
    }


def node_status(cfg: NodeConfig, conditions: list[Obj]) -> Obj:
    capacity = machine_capacity()
    addresses = [{"type": "Hostname", "address": cfg.name}]
    if cfg.node_ip:
        addresses.insert(0, {"type": "InternalIP", "address": cfg.node_ip})
    return {
        "capacity": capacity,
        "allocatable": dict(capacity),
        "addresses": addresses,
        "conditions": conditions,
        "daemonEndpoints": {"kubeletEndpoint": {"Port": cfg.port}},
        "nodeInfo": node_info(),
    }


class NodeAgent:
    """Registers the node and keeps its status and Lease fresh."""

    def __init__(self, client: RestClient, cfg: NodeConfig) -> None:
        self.client = client
        self.cfg = cfg
        self.node: Obj | None = None
        self.not_ready_message = ""  # set by the kubelet while it cannot run pods
        self._last_text = ""
        self._last_write = 0.0

    def _conditions(self, previous: Sequence[Mapping[str, Any]]) -> list[Obj]:
        mem = _meminfo()
        pressure = "MemAvailable" in mem and mem["MemAvailable"] < MEMORY_PRESSURE_BYTES
        return node_conditions(
            ready=not self.not_ready_message,
            not_ready_message=self.not_ready_message,
            memory_pressure=pressure,
            previous=previous,
            now=now_rfc3339(),
        )

    async def register(self) -> Obj:
        """Create (or reconcile) the Node; retries until the API answers."""
        delay = 0.5
        for _ in range(10**6):
            try:
                body = build_node(self.cfg, self._conditions(()))
                try:
                    self.node = await self.client.create(NODES, body)
                    log.info("node %s registered", self.cfg.name)
                except AlreadyExists:
                    current = await self.client.get(NODES, self.cfg.name)
                    labels = {**(current.get("metadata") or {}).get("labels", {}),
                              **body["metadata"]["labels"]}  # fmt: skip
                    patch: Obj = {"metadata": {"labels": labels}}
                    self.node = await self.client.patch(NODES, self.cfg.name, patch)
                    await self.write_status(force=True)
                    log.info("node %s already registered; reconciled", self.cfg.name)
                return self.node
            except ClientError as exc:
                log.warning("node %s: registration failed (%s); retry in %.1fs",
                            self.cfg.name, exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, 7.0)
        raise KProxyError("node registration never succeeded")

    async def write_status(self, *, force: bool = False) -> None:
        previous = ((self.node or {}).get("status") or {}).get("conditions") or ()
        status = node_status(self.cfg, self._conditions(previous))
        # Compare without heartbeat times, which change on every computation.
        comparable = json.loads(json.dumps(status))
        for c in comparable["conditions"]:
            c.pop("lastHeartbeatTime", None)
        text = json.dumps(comparable, sort_keys=True)
        stale = time.monotonic() - self._last_write >= self.cfg.report_frequency
        if not force and text == self._last_text and not stale:
            return
        self.node = await self.client.patch(
            NODES, self.cfg.name, {"status": status}, subresource="status"
        )
        self._last_text, self._last_write = text, time.monotonic()

    async def status_loop(self) -> None:
        for _ in range(10**9):
            try:
                await self.write_status()
            except ClientError as exc:
                log.warning("node %s: status update failed: %s", self.cfg.name, exc)
            await asyncio.sleep(self.cfg.status_frequency)

    async def renew_lease(self) -> None:
        body: Obj = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.cfg.name, "namespace": LEASE_NAMESPACE},
            "spec": {
                "holderIdentity": self.cfg.name,
                "leaseDurationSeconds": self.cfg.lease_duration,
                "renewTime": micro_time(),
            },
        }
        node_uid = ((self.node or {}).get("metadata") or {}).get("uid")
        if node_uid:
            body["metadata"]["ownerReferences"] = [
                {"apiVersion": "v1", "kind": "Node", "name": self.cfg.name, "uid": node_uid}
            ]
        try:
            current = await self.client.get(LEASES, self.cfg.name, LEASE_NAMESPACE)
        except NotFound:
            await self.client.create(LEASES, body, LEASE_NAMESPACE)
            return
        current = dict(current)
        current["spec"] = {**(current.get("spec") or {}), **body["spec"]}
        await self.client.update(LEASES, current, LEASE_NAMESPACE)

    async def lease_loop(self) -> None:
        interval = max(self.cfg.lease_duration / 4.0, 0.05)
        for _ in range(10**9):
            try:
                await self.renew_lease()
            except (Conflict, AlreadyExists):
                await asyncio.sleep(0.1)  # someone wrote meanwhile: read it again soon
                continue
            except ClientError as exc:
                log.warning("node %s: lease renewal failed: %s", self.cfg.name, exc)
            await asyncio.sleep(interval)

    async def pod_cidr(self, poll: float = 1.0) -> str:
        """``spec.podCIDR`` once the node-IPAM controller assigned it (waits for it)."""
        for attempt in range(10**9):
            try:
                node = await self.client.get(NODES, self.cfg.name)
                cidr = str((node.get("spec") or {}).get("podCIDR") or "")
                if cidr:
                    return cidr
            except ClientError as exc:
                log.warning("node %s: reading podCIDR failed: %s", self.cfg.name, exc)
            if attempt % 30 == 0:
                log.info("node %s: waiting for spec.podCIDR", self.cfg.name)
            await asyncio.sleep(poll)
        raise KProxyError("no podCIDR")


def default_node_ip() -> str:
    """The address the hostname resolves to, else empty (the caller may pass --node-ip)."""
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        return ""
    return "" if addr.startswith("127.") else addr
