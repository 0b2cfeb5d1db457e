"""The node lifecycle controller: heartbeats → node health → taints, pod readiness, eviction.

Owns the pure decisions (:class:`HealthTracker`, :func:`desired_taints`,
:func:`unknown_conditions`, :func:`not_ready_conditions`, :func:`eviction_delay`,
:func:`tolerates`) and :class:`NodeLifecycleController`, which applies them.

Semantics (upstream ``node_lifecycle_controller.go`` and the taint-eviction manager):

- A heartbeat is a change of the node's Lease (``kube-node-lease/<node>``) renewTime
  or of its Ready condition's lastHeartbeatTime. Staleness is judged on *this*
  controller's clock — when it last *saw* a heartbeat change — never by comparing the
  kubelet's timestamps with ours, so clock skew cannot mark a node dead. A node seen
  for the first time gets a full grace period.
- No heartbeat for ``node_monitor_grace_period``: every node condition becomes Unknown
  (Ready with reason ``NodeStatusUnknown``), the node gets
  ``node.kubernetes.io/unreachable`` NoSchedule and NoExecute taints and its pods get
  ``Ready=False`` (so their endpoints turn not ready). A kubelet reporting Ready=False
  gets ``node.kubernetes.io/not-ready`` instead. Once heartbeats resume (and Ready is
  not False) those taints are removed; Ready itself is the kubelet's to restore.
- Pods on a node with NoExecute taints are deleted once the shortest
  ``tolerationSeconds`` of their matching tolerations has passed since the taint's
  ``timeAdded``; a matching toleration without ``tolerationSeconds`` keeps the pod
  forever; no matching toleration evicts at once, except for the unreachable and
  not-ready taints, which get ``default_toleration_seconds`` (what upstream's
  DefaultTolerationSeconds admission plugin adds to every pod).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from kproxy.api.meta import format_time, parse_time
from kproxy.api.tolerations import tolerates
from kproxy.client.errors import Conflict, NotFound
from kproxy.client.informer import FuncHandler, field_index, wait_for_cache_sync
from kproxy.client.rest import LEASES, NODES, PODS
from kproxy.controllers import Clock, ControllerContext, register
from kproxy.controllers.workqueue import WorkQueue, run_workers

log = logging.getLogger(__name__)

Obj = dict[str, Any]

LEASE_NAMESPACE = "kube-node-lease"
UNREACHABLE = "node.kubernetes.io/unreachable"
NOT_READY = "node.kubernetes.io/not-ready"
OUR_TAINT_KEYS = (UNREACHABLE, NOT_READY)
NODE_INDEX = "node"


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _time(clock_value: float) -> str:
    return format_time(datetime.fromtimestamp(clock_value, UTC))


def condition(obj: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or ():
        if cond.get("type") == ctype:
            return dict(cond)
    return None


# ------------------------------------------------------------------- health


class HealthTracker:
    """When this controller last saw each node's heartbeat change (its own clock)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[tuple[str, str], float]] = {}

    @staticmethod
    def probe(node: Mapping[str, Any], lease: Mapping[str, Any] | None) -> tuple[str, str]:
        renew = str(((lease or {}).get("spec") or {}).get("renewTime") or "")
        ready = condition(node, "Ready") or {}
        return renew, str(ready.get("lastHeartbeatTime") or "")

    def observe(self, name: str, probe: tuple[str, str], now: float) -> float:
        """Record ``probe``; the time its latest change was seen."""
        seen = self._seen.get(name)
        if seen is None or seen[0] != probe:
            self._seen[name] = (probe, now)
            return now
        return seen[1]

    def forget(self, name: str) -> None:
        self._seen.pop(name, None)


# ------------------------------------------------------------------- taints


def desired_taints(
    taints: Sequence[Mapping[str, Any]], ready_status: str | None, now: float
) -> list[Obj] | None:
    """The node's taints for this Ready status, or ``None`` if they are already right."""
    want_key = {"Unknown": UNREACHABLE, "False": NOT_READY}.get(ready_status or "")
    out = [dict(t) for t in taints if t.get("key") not in OUR_TAINT_KEYS or t["key"] == want_key]
    if want_key is not None:
        for effect in ("NoSchedule", "NoExecute"):
            if not any(t.get("key") == want_key and t.get("effect") == effect for t in out):
                taint: Obj = {"key": want_key, "effect": effect}
                if effect == "NoExecute":
                    taint["timeAdded"] = _time(now)
                out.append(taint)
    return None if out == [dict(t) for t in taints] else out


def unknown_conditions(node: Mapping[str, Any], now: float) -> list[Obj] | None:
    """Node conditions with every status Unknown, or ``None`` if Ready already is."""
    conds = [dict(c) for c in (node.get("status") or {}).get("conditions") or ()]
    ready = next((c for c in conds if c.get("type") == "Ready"), None)
    if ready is not None and ready.get("status") == "Unknown":
        return None
    if ready is None:
        conds.append({"type": "Ready"})
    stamp = _time(now)
    for c in conds:
        if c.get("status") != "Unknown":
            c["status"] = "Unknown"
            c["lastTransitionTime"] = stamp
        c["reason"] = "NodeStatusUnknown"
        c["message"] = "Kubelet stopped posting node status."
    return conds


def not_ready_conditions(pod: Mapping[str, Any], now: float) -> list[Obj] | None:
    """The pod's conditions with Ready=False, or ``None`` if nothing is to change."""
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return None
    conds = [dict(c) for c in status.get("conditions") or ()]
    for c in conds:
        if c.get("type") == "Ready":
            if c.get("status") == "False":
                return None
            c["status"] = "False"
            c["lastTransitionTime"] = _time(now)
            return conds
    return None


# ---------------------------------------------------------------- eviction


def eviction_delay(
    pod: Mapping[str, Any],
    taints: Iterable[Mapping[str, Any]],
    now: float,
    default_toleration_seconds: float,
) -> float | None:
    """Seconds until ``pod`` is to be evicted (≤ 0: now), or ``None`` for never."""
    tolerations = (pod.get("spec") or {}).get("tolerations") or ()
    soonest: float | None = None
    for taint in taints:
        if taint.get("effect") != "NoExecute":
            continue
        matching = [t for t in tolerations if tolerates(t, taint)]
        if not matching:
            if taint.get("key") not in OUR_TAINT_KEYS:
                return 0.0
            seconds = default_toleration_seconds
        elif any(t.get("tolerationSeconds") is None for t in matching):
            continue
        else:
            seconds = max(0.0, min(float(t["tolerationSeconds"]) for t in matching))
        added = taint.get("timeAdded")
        start = parse_time(str(added)).timestamp() if added else now
        left = start + seconds - now
        soonest = left if soonest is None else min(soonest, left)
    return soonest


# --------------------------------------------------------------- controller


class NodeLifecycleController:
    name = "nodelifecycle"

    def __init__(self, ctx: ControllerContext) -> None:
        opts = ctx.options
        self.client = ctx.client
        self.clock: Clock = opts.clock
        self.grace = opts.node_monitor_grace_period
        self.period = opts.node_monitor_period
        self.default_toleration = opts.default_toleration_seconds
        self.workers = opts.workers
        self.nodes = ctx.informers.get(NODES)
        self.pods = ctx.informers.get(PODS, indexers={NODE_INDEX: field_index("spec.nodeName")})
        self.leases = ctx.informers.get(LEASES, namespace=LEASE_NAMESPACE)
        self.health = HealthTracker()
        self.queue = WorkQueue("nodelifecycle")
        self.nodes.add_handler(
            FuncHandler(
                add=self._enqueue_node,
                update=lambda _o, n: self._enqueue_node(n),
                delete=self._enqueue_node,
            )
        )
        self.leases.add_handler(
            FuncHandler(add=self._enqueue_node, update=lambda _o, n: self._enqueue_node(n))
        )
        # A pod landing on a tainted node needs its eviction timer too.
        self.pods.add_handler(FuncHandler(add=self._pod_added))

    def _enqueue_node(self, obj: Obj) -> None:
        name = _meta(obj).get("name")
        if name:
            self.queue.add(str(name))

    def _pod_added(self, pod: Obj) -> None:
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            self.queue.add(str(node))

    async def run(self) -> None:
        await wait_for_cache_sync(self.nodes, self.pods, self.leases)
        monitor = asyncio.create_task(self._monitor(), name="nodelifecycle-monitor")
        try:
            await run_workers(self.queue, self.reconcile, workers=self.workers, name=self.name)
        finally:
            monitor.cancel()
            await asyncio.gather(monitor, return_exceptions=True)

    async def _monitor(self) -> None:
        # Staleness is the absence of events, so something must look again periodically.
        while True:
            for node in self.nodes.cache.list():
                self._enqueue_node(node)
            await asyncio.sleep(self.period)

    async def reconcile(self, name: str) -> float | None:
        node = self.nodes.cache.get(name)
        if node is None:
            self.health.forget(name)
            return None
        now = self.clock()
        lease = self.leases.cache.get_by_name(LEASE_NAMESPACE, name)
        seen = self.health.observe(name, HealthTracker.probe(node, lease), now)
        stale = now - seen > self.grace
        ready = condition(node, "Ready") or {}
        if stale:
            status: str | None = "Unknown"
        elif ready.get("status") == "False":
            status = "False"
        else:
            status = None
        if stale:
            conds = unknown_conditions(node, now)
            if conds is not None:
                log.warning("node %s: no heartbeat for %.1fs; marking Unknown", name, now - seen)
                body = copy.deepcopy(node)
                body.setdefault("status", {})["conditions"] = conds
                node = await self.client.update(NODES, body, subresource="status")
        taints = desired_taints((node.get("spec") or {}).get("taints") or (), status, now)
        if taints is not None:
            body = copy.deepcopy(node)
            body.setdefault("spec", {})["taints"] = taints
            if not taints:
                del body["spec"]["taints"]
            node = await self.client.update(NODES, body)
            log.info("node %s: taints now %s", name, [t.get("key") for t in taints])
        pods = self.pods.cache.by_index(NODE_INDEX, name)
        if stale:
            await self._mark_pods_not_ready(pods, now)
        wake = await self._evict(node, pods, now)
        if not stale:
            until_stale = self.grace - (now - seen) + 0.001
            wake = until_stale if wake is None else min(wake, until_stale)
        return wake

    async def _mark_pods_not_ready(self, pods: list[Obj], now: float) -> None:
        for pod in pods:
            conds = not_ready_conditions(pod, now)
            if conds is None:
                continue
            body = copy.deepcopy(pod)
            body["status"]["conditions"] = conds
            ns = str(_meta(pod).get("namespace"))
            try:
                await self.client.update(PODS, body, ns, subresource="status")
            except NotFound:
                continue
            except Conflict:
                self.queue.add_after(str(pod["spec"]["nodeName"]), 0.1)

    async def _evict(self, node: Obj, pods: list[Obj], now: float) -> float | None:
        taints = (node.get("spec") or {}).get("taints") or ()
        if not any(t.get("effect") == "NoExecute" for t in taints):
            return None
        wake: float | None = None
        for pod in pods:
            if _meta(pod).get("deletionTimestamp"):
                continue
            delay = eviction_delay(pod, taints, now, self.default_toleration)
            if delay is None:
                continue
            if delay > 0:
                wake = delay if wake is None else min(wake, delay)
                continue
            meta = _meta(pod)
            log.warning(
                "node %s: evicting pod %s/%s (NoExecute taint not tolerated any longer)",
                _meta(node).get("name"),
                meta.get("namespace"),
                meta.get("name"),
            )
            with contextlib.suppress(NotFound, Conflict):
                await self.client.delete(
                    PODS,
                    str(meta.get("name")),
                    str(meta.get("namespace")),
                    preconditions={"uid": str(meta.get("uid"))} if meta.get("uid") else None,
                )
        return wake


@register("nodelifecycle")
def new_nodelifecycle_controller(ctx: ControllerContext) -> NodeLifecycleController:
    return NodeLifecycleController(ctx)
