"""Node IPAM: give every node ``spec.podCIDR(s)`` out of ``--cluster-cidr``.

Owns :class:`CidrSet` (one family's pool: ``--cluster-cidr`` cut into blocks of
``--node-cidr-mask-size``), :class:`CidrAllocator` (one pool per family of a
comma-separated, at most dual-stack, cluster CIDR) and :class:`NodeIpamController`.

Invariants:

- No two nodes share a block: before allocating anything the controller marks every
  block already held by an existing node (so a restart reuses, never re-deals), and a
  block is reserved before the write that claims it and released if that write fails.
- A node that has a podCIDR keeps it (the field is immutable upstream); one that
  leaves frees its blocks.
- Allocation walks from the block after the last one handed out (upstream's
  ``nextCandidate``), so a freed block is not reused at once.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
from collections.abc import Mapping
from typing import Any

from kproxy.client.errors import NotFound
from kproxy.client.informer import FuncHandler, wait_for_cache_sync
from kproxy.client.rest import NODES
from kproxy.controllers import ControllerContext, register
from kproxy.controllers.workqueue import WorkQueue, run_workers
from kproxy.errors import KProxyError

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class CidrError(KProxyError):
    """A bad cluster CIDR or mask size, or a full pool."""


class CidrSet:
    """Blocks of one size in one cluster CIDR, tracked by index."""

    def __init__(self, cluster_cidr: str, mask_size: int) -> None:
        try:
            self.network: Network = ipaddress.ip_network(cluster_cidr.strip(), strict=True)
        except ValueError as exc:
            raise CidrError(f"--cluster-cidr {cluster_cidr!r}: {exc}") from exc
        if not self.network.prefixlen <= mask_size <= self.network.max_prefixlen:
            raise CidrError(
                f"node CIDR mask size {mask_size} does not fit cluster CIDR {self.network}"
            )
        if mask_size - self.network.prefixlen > 24:
            # Upstream caps the difference at 16; 24 keeps the pool a sane size in memory.
            raise CidrError(f"cluster CIDR {self.network} is too big for /{mask_size} blocks")
        self.mask_size = mask_size
        self.size = 1 << (mask_size - self.network.prefixlen)
        self._step = 1 << (self.network.max_prefixlen - mask_size)
        self._used: set[int] = set()
        self._next = 0

    @property
    def family(self) -> int:
        return self.network.version

    def _index(self, cidr: str) -> int:
        try:
            block = ipaddress.ip_network(cidr, strict=False)
        except ValueError as exc:
            raise CidrError(f"bad podCIDR {cidr!r}: {exc}") from exc
        if block.version != self.family or not block.subnet_of(self.network):  # type: ignore[arg-type]
            raise CidrError(f"podCIDR {cidr} is outside cluster CIDR {self.network}")
        if block.prefixlen != self.mask_size:
            raise CidrError(f"podCIDR {cidr} is not a /{self.mask_size}")
        offset = int(block.network_address) - int(self.network.network_address)
        return offset // self._step

    def _block(self, index: int) -> str:
        base = int(self.network.network_address) + index * self._step
        return str(ipaddress.ip_network((base, self.mask_size)))

    def contains(self, cidr: str) -> bool:
        try:
            self._index(cidr)
        except CidrError:
            return False
        return True

    def occupy(self, cidr: str) -> None:
        self._used.add(self._index(cidr))

    def release(self, cidr: str) -> None:
        self._used.discard(self._index(cidr))

    def allocate(self) -> str:
        if len(self._used) >= self.size:
            raise CidrError(f"no free /{self.mask_size} left in {self.network}")
        for i in range(self.size):
            index = (self._next + i) % self.size
            if index not in self._used:
                self._used.add(index)
                self._next = (index + 1) % self.size
                return self._block(index)
        raise AssertionError("unreachable: a free block was counted")

    @property
    def used(self) -> int:
        return len(self._used)


class CidrAllocator:
    """One :class:`CidrSet` per family of ``--cluster-cidr`` (``v4``, ``v6`` or both)."""

    def __init__(self, cluster_cidr: str, mask_v4: int = 24, mask_v6: int = 64) -> None:
        parts = [p for p in cluster_cidr.split(",") if p.strip()]
        if not 1 <= len(parts) <= 2:
            raise CidrError(f"--cluster-cidr {cluster_cidr!r}: one CIDR per family, at most two")
        self.sets: list[CidrSet] = []
        for part in parts:
            probe = ipaddress.ip_network(part.strip(), strict=False)
            self.sets.append(CidrSet(part, mask_v4 if probe.version == 4 else mask_v6))
        if len({s.family for s in self.sets}) != len(self.sets):
            raise CidrError(f"--cluster-cidr {cluster_cidr!r}: two CIDRs of one family")

    def occupy(self, cidrs: list[str]) -> None:
        for cidr in cidrs:
            for s in self.sets:
                if s.contains(cidr):
                    s.occupy(cidr)
                    break
            else:
                log.warning("podCIDR %s is outside every cluster CIDR; not tracked", cidr)

    def release(self, cidrs: list[str]) -> None:
        for cidr in cidrs:
            for s in self.sets:
                if s.contains(cidr):
                    s.release(cidr)

    def allocate(self) -> list[str]:
        """One block per family, in ``--cluster-cidr`` order (all or nothing)."""
        out: list[str] = []
        try:
            for s in self.sets:
                out.append(s.allocate())
        except CidrError:
            self.release(out)
            raise
        return out


def node_cidrs(node: Mapping[str, Any]) -> list[str]:
    spec = node.get("spec") or {}
    cidrs = [str(c) for c in spec.get("podCIDRs") or ()]
    if not cidrs and spec.get("podCIDR"):
        cidrs = [str(spec["podCIDR"])]
    return cidrs


class NodeIpamController:
    name = "nodeipam"

    def __init__(self, ctx: ControllerContext, cluster_cidr: str) -> None:
        opts = ctx.options
        self.client = ctx.client
        self.allocator = CidrAllocator(
            cluster_cidr, opts.node_cidr_mask_size, opts.node_cidr_mask_size_ipv6
        )
        self.workers = 1  # allocation is a critical section; one worker keeps it simple
        self.nodes = ctx.informers.get(NODES)
        self.queue = WorkQueue("nodeipam")
        self._held: dict[str, list[str]] = {}  # node → blocks we account to it
        self.nodes.add_handler(
            FuncHandler(
                add=self._enqueue,
                update=lambda _o, n: self._enqueue(n),
                delete=self._enqueue,
            )
        )

    def _enqueue(self, node: Obj) -> None:
        self.queue.add(str((node.get("metadata") or {}).get("name")))

    async def run(self) -> None:
        await wait_for_cache_sync(self.nodes)
        # Everything already handed out is taken before anything new is dealt.
        for node in self.nodes.cache.list():
            cidrs = node_cidrs(node)
            if cidrs:
                self.allocator.occupy(cidrs)
                self._held[str(node["metadata"]["name"])] = cidrs
        await run_workers(self.queue, self.reconcile, workers=self.workers, name=self.name)

    async def reconcile(self, name: str) -> float | None:
        node = self.nodes.cache.get(name)
        if node is None:
            held = self._held.pop(name, None)
            if held:
                self.allocator.release(held)
                log.info("node %s gone; released %s", name, ",".join(held))
            return None
        have = node_cidrs(node)
        if have:
            if self._held.get(name) != have:
                if name in self._held:
                    self.allocator.release(self._held[name])
                self.allocator.occupy(have)
                self._held[name] = have
            return None
        if name in self._held:
            # We allocated and wrote, but the cache has not caught up yet.
            return None
        cidrs = self.allocator.allocate()
        body = copy.deepcopy(node)
        body.setdefault("spec", {})["podCIDR"] = cidrs[0]
        body["spec"]["podCIDRs"] = cidrs
        try:
            await self.client.update(NODES, body)
        except NotFound:
            self.allocator.release(cidrs)
            return None
        except Exception:
            self.allocator.release(cidrs)
            raise
        self._held[name] = cidrs
        log.info("node %s: podCIDRs %s", name, ",".join(cidrs))
        return None


@register("nodeipam")
def new_nodeipam_controller(ctx: ControllerContext) -> NodeIpamController | None:
    if not ctx.options.cluster_cidr:
        return None
    return NodeIpamController(ctx, ctx.options.cluster_cidr)
