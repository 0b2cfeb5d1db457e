"""Service ClusterIP and NodePort allocation, shared through the store.

Owns :class:`RangeAllocator`: the set of values in use for one range (service IPs as
integers, node ports as port numbers), kept in one store key as JSON and changed only
by compare-and-swap on that key's mod_revision. Several apiservers sharing one etcd
therefore never hand out the same value: the loser of a race re-reads and retries.
:class:`ServiceAllocators` maps a Service spec onto the two ranges (what to allocate
on create, what changes on update, what to release on delete) and raises the 422
errors upstream gives for a value that is taken or out of range.

Invariants: every value recorded as used belongs to a stored Service, or to one
being written right now (allocate happens before the Service write and is rolled
back if that write fails); :meth:`RangeAllocator.repair` only adds values (the
Services found at start), so it can never free a value another apiserver has just
handed out.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
from collections.abc import Iterable, Mapping
from typing import Any

from kproxy.api.errors import ApiError, FieldError
from kproxy.store import AlreadyExists, Conflict, NotFound, Store

log = logging.getLogger(__name__)

RANGE_PREFIX = "/registry/ranges/"
MAX_CAS_ATTEMPTS = 64
NODE_PORT_TYPES = ("NodePort", "LoadBalancer")


class RangeAllocator:
    """Values ``lo..hi`` (inclusive); the used set lives in the store under ``key``."""

    def __init__(self, store: Store, key: str, lo: int, hi: int, describe: str) -> None:
        if lo > hi:
            raise ValueError(f"empty range {lo}-{hi}")
        self._store = store
        self.key = key
        self.lo, self.hi = lo, hi
        self.describe = describe
        self._rng = random.Random()

    def contains(self, value: int) -> bool:
        return self.lo <= value <= self.hi

    async def _read(self) -> tuple[set[int], int]:
        try:
            kv = await self._store.get(self.key)
        except NotFound:
            try:
                kv = await self._store.create(self.key, json.dumps({"used": []}).encode())
            except AlreadyExists as exc:
                if exc.current is None:
                    kv = await self._store.get(self.key)
                else:
                    kv = exc.current
        doc = json.loads(kv.value)
        return {int(v) for v in doc.get("used", ())}, kv.mod_revision

    async def _write(self, used: set[int], revision: int) -> bool:
        data = json.dumps({"range": self.describe, "used": sorted(used)}).encode()
        try:
            await self._store.update(self.key, data, revision)
        except Conflict:
            return False
        return True

    def _pick(self, used: set[int]) -> int | None:
        size = self.hi - self.lo + 1
        if len(used) >= size:
            return None
        # Random probes first (cheap when the range is sparse), then a scan.
        for _ in range(32):
            value = self._rng.randint(self.lo, self.hi)
            if value not in used:
                return value
        start = self._rng.randint(self.lo, self.hi)
        for i in range(size):
            value = self.lo + (start - self.lo + i) % size
            if value not in used:
                return value
        return None

    async def allocate(self, value: int | None = None) -> int:
        """Mark ``value`` (or a free one) used. :class:`ValueError` if taken, full, or out."""
        if value is not None and not self.contains(value):
            raise ValueError("out of range")
        for _ in range(MAX_CAS_ATTEMPTS):
            used, revision = await self._read()
            if value is not None:
                if value in used:
                    raise ValueError("already allocated")
                chosen: int | None = value
            else:
                chosen = self._pick(used)
                if chosen is None:
                    raise ValueError("range is full")
            assert chosen is not None
            used.add(chosen)
            if await self._write(used, revision):
                return chosen
        raise ApiError(503, "ServiceUnavailable", f"{self.describe}: allocation contended")

    async def release(self, values: Iterable[int]) -> None:
        drop = {v for v in values if self.contains(v)}
        if not drop:
            return
        for _ in range(MAX_CAS_ATTEMPTS):
            used, revision = await self._read()
            if not used & drop:
                return
            if await self._write(used - drop, revision):
                return
        log.error("%s: could not release %s (contended); repair will not free them", self, drop)

    async def repair(self, in_use: Iterable[int]) -> None:
        """Add ``in_use`` values (the stored Services') to the used set."""
        want = {v for v in in_use if self.contains(v)}
        for _ in range(MAX_CAS_ATTEMPTS):
            used, revision = await self._read()
            if want <= used:
                return
            if await self._write(used | want, revision):
                return

    async def used(self) -> set[int]:
        return (await self._read())[0]

    def __repr__(self) -> str:
        return f"RangeAllocator({self.describe})"


def _ip_int(value: Any) -> int | None:
    try:
        return int(ipaddress.ip_address(str(value)))
    except ValueError:
        return None


def _spec(svc: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = svc.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def cluster_ips_of(svc: Mapping[str, Any]) -> list[str]:
    spec = _spec(svc)
    if spec.get("type") == "ExternalName":
        return []
    ips = spec.get("clusterIPs")
    values = ips if isinstance(ips, list) else [spec.get("clusterIP")]
    return [str(v) for v in values if v and v != "None"]


def node_ports_of(svc: Mapping[str, Any]) -> list[int]:
    spec = _spec(svc)
    ports = spec.get("ports")
    out: list[int] = []
    for port in ports if isinstance(ports, list) else ():
        value = port.get("nodePort") if isinstance(port, Mapping) else None
        if isinstance(value, int) and value > 0:
            out.append(value)
    hc = spec.get("healthCheckNodePort")
    if isinstance(hc, int) and hc > 0:
        out.append(hc)
    return out


def _wants_node_ports(spec: Mapping[str, Any]) -> bool:
    kind = spec.get("type")
    if kind == "NodePort":
        return True
    return kind == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts") is not False


def carry_allocated(new: dict[str, Any], old: Mapping[str, Any]) -> None:
    """Upstream's ``patchAllocatedValues``: an update that leaves out the cluster IP or
    a port's nodePort keeps the old value (so a PUT of a hand-written manifest works)."""
    spec, old_spec = new.get("spec"), _spec(old)
    if not isinstance(spec, dict):
        return
    keeps_ip = spec.get("type") != "ExternalName" and old_spec.get("type") != "ExternalName"
    unset = not spec.get("clusterIP") and not spec.get("clusterIPs")
    if keeps_ip and unset and old_spec.get("clusterIP"):
        spec["clusterIP"] = old_spec["clusterIP"]
        if isinstance(old_spec.get("clusterIPs"), list):
            spec["clusterIPs"] = list(old_spec["clusterIPs"])
    if _wants_node_ports(spec) and _wants_node_ports(old_spec):
        before: dict[tuple[Any, Any], Any] = {}
        for port in old_spec.get("ports") or ():
            if isinstance(port, Mapping) and port.get("nodePort"):
                before[(port.get("port"), port.get("protocol") or "TCP")] = port["nodePort"]
        for port in spec.get("ports") or ():
            if isinstance(port, dict) and not port.get("nodePort"):
                kept = before.get((port.get("port"), port.get("protocol") or "TCP"))
                if kept:
                    port["nodePort"] = kept
        if not spec.get("healthCheckNodePort") and old_spec.get("healthCheckNodePort"):
            spec["healthCheckNodePort"] = old_spec["healthCheckNodePort"]


class ServiceAllocators:
    """Cluster IPs from ``--service-cluster-ip-range``, node ports from the port range."""

    def __init__(
        self,
        store: Store,
        cluster_ip_range: str = "10.96.0.0/12",
        node_port_range: tuple[int, int] = (30000, 32767),
    ) -> None:
        self.network = ipaddress.ip_network(cluster_ip_range, strict=False)
        first, last = int(self.network.network_address), int(self.network.broadcast_address)
        # The network address is never handed out (nor IPv4's broadcast address).
        lo, hi = first + 1, last - 1 if self.network.version == 4 else last
        if self.network.num_addresses <= 2:
            lo, hi = first, last
        self.ips = RangeAllocator(store, RANGE_PREFIX + "serviceips", lo, hi, str(self.network))
        self.node_port_range = node_port_range
        self.ports = RangeAllocator(
            store,
            RANGE_PREFIX + "servicenodeports",
            node_port_range[0],
            node_port_range[1],
            f"{node_port_range[0]}-{node_port_range[1]}",
        )

    @property
    def family(self) -> str:
        return "IPv4" if self.network.version == 4 else "IPv6"

    def first_ip(self) -> str:
        return str(ipaddress.ip_address(self.ips.lo))

    async def repair(self, services: Iterable[Mapping[str, Any]]) -> None:
        ips: set[int] = set()
        ports: set[int] = set()
        for svc in services:
            ips.update(v for v in map(_ip_int, cluster_ips_of(svc)) if v is not None)
            ports.update(node_ports_of(svc))
        await self.ips.repair(ips)
        await self.ports.repair(ports)

    # ---------------------------------------------------------------- per Service

    async def _allocate_ip(self, spec: dict[str, Any], name: str) -> list[int]:
        requested = spec.get("clusterIP") or ""
        if requested == "None":
            return []
        families = spec.get("ipFamilies")
        if isinstance(families, list) and families and families[0] != self.family:
            raise ApiError.invalid(
                "Service",
                name,
                [FieldError.invalid("spec.ipFamilies", families, "not configured on this cluster")],
            )
        value: int | None = None
        if requested:
            value = _ip_int(requested)
            if value is None:
                return []  # validation reports the bad address
        try:
            got = await self.ips.allocate(value)
        except ValueError as exc:
            if value is None:
                raise ApiError.internal(f"failed to allocate a serviceIP: {exc}") from None
            why = (
                "provided IP is already allocated"
                if str(exc) == "already allocated"
                else f"the provided IP ({requested}) is not in the valid range. "
                f"The range of valid IPs is {self.network}"
            )
            raise ApiError.invalid(
                "Service",
                name,
                [
                    FieldError.invalid(
                        "spec.clusterIPs", [requested], f"failed to allocate IP {requested}: {why}"
                    )
                ],
            ) from None
        ip = str(ipaddress.ip_address(got))
        spec["clusterIP"] = ip
        spec["clusterIPs"] = [ip]
        spec.setdefault("ipFamilies", [self.family])
        return [got]

    async def _allocate_ports(self, spec: dict[str, Any], name: str, held: set[int]) -> list[int]:
        got: list[int] = []
        ports = spec.get("ports")
        for i, port in enumerate(ports if isinstance(ports, list) else ()):
            if not isinstance(port, dict):
                continue
            wanted = port.get("nodePort")
            if wanted and (
                not isinstance(wanted, int)
                or wanted in held
                or wanted in got
                or not self.ports.contains(wanted)
            ):
                continue  # kept from before, a duplicate, or bad: validation's to report
            try:
                value = await self.ports.allocate(wanted or None)
            except ValueError as exc:
                await self.ports.release(got)
                if not wanted:
                    raise ApiError.internal(f"failed to allocate a nodePort: {exc}") from None
                raise ApiError.invalid(
                    "Service",
                    name,
                    [
                        FieldError.invalid(
                            f"spec.ports[{i}].nodePort",
                            wanted,
                            "provided port is already allocated",
                        )
                    ],
                ) from None
            port["nodePort"] = value
            got.append(value)
        return got

    async def allocate_for(
        self, svc: dict[str, Any], old: Mapping[str, Any] | None = None
    ) -> tuple[list[int], list[int]]:
        """Fill ``svc``'s missing clusterIP/nodePorts; returns what was newly taken.

        Run :func:`carry_allocated` first on an update. The caller releases the
        returned (ips, ports) with :meth:`rollback` if its write fails.
        """
        spec = svc.setdefault("spec", {})
        if not isinstance(spec, dict):
            return [], []
        name = str((svc.get("metadata") or {}).get("name") or "")
        new_ips: list[int] = []
        old_ips = cluster_ips_of(old) if old is not None else []
        if spec.get("type") != "ExternalName" and not (
            old_ips and spec.get("clusterIP") == old_ips[0]
        ):
            new_ips = await self._allocate_ip(spec, name)
        new_ports: list[int] = []
        if _wants_node_ports(spec):
            held = set(node_ports_of(old)) if old is not None else set()
            try:
                new_ports = await self._allocate_ports(spec, name, held)
            except BaseException:
                await self.ips.release(new_ips)
                raise
        return new_ips, new_ports

    async def rollback(self, taken: tuple[list[int], list[int]]) -> None:
        await self.ips.release(taken[0])
        await self.ports.release(taken[1])

    async def release_unused(
        self, old: Mapping[str, Any], new: Mapping[str, Any] | None = None
    ) -> None:
        """After a write: free what ``old`` held and ``new`` (None: deleted) does not."""
        old_ips = {v for v in map(_ip_int, cluster_ips_of(old)) if v is not None}
        new_ips = set()
        if new is not None:
            new_ips = {v for v in map(_ip_int, cluster_ips_of(new)) if v is not None}
        await self.ips.release(old_ips - new_ips)
        new_ports = set(node_ports_of(new)) if new is not None else set()
        await self.ports.release(set(node_ports_of(old)) - new_ports)
