"""The EndpointSlice controller: Services with selectors × Pods → EndpointSlices (+ Endpoints).

Owns :class:`EndpointSliceController`: informers on Services, Pods, Nodes, Endpoints
and the slices it manages; a Service key is queued when the service, one of its pods
(old or new labels) or a managed slice changes, or a node's zone label changes; the
reconcile computes the plan with :mod:`.endpointslice_plan` and applies it.

Invariants:

- Our own writes are remembered (name → resourceVersion, or deletion) until the slice
  cache shows them; until then the service is not reconciled again, so a lagging cache
  never makes a second slice for the same endpoints (upstream's slice tracker).
- The ``last-change-trigger-time`` annotation is the time of the latest event that
  queued the service; it is written only together with a real change.
- A deleted Service takes its managed slices and its Endpoints with it (without
  waiting for garbage collection); services without a selector are left alone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kproxy.api.meta import format_time
from kproxy.api.selectors import from_set
from kproxy.client.errors import NotFound
from kproxy.client.informer import FuncHandler, object_key, wait_for_cache_sync
from kproxy.client.rest import ENDPOINTS, ENDPOINTSLICES, NODES, PODS, SERVICES
from kproxy.controllers import Clock, ControllerContext, register
from kproxy.controllers.endpointslice_plan import (
    CONTROLLER_NAME,
    MANAGED_BY_LABEL,
    SERVICE_NAME_LABEL,
    ZONE_LABEL,
    desired_endpoints,
    is_pod_ready,
    plan_slices,
)
from kproxy.controllers.workqueue import WorkQueue, run_workers

log = logging.getLogger(__name__)

Obj = dict[str, Any]


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


# ------------------------------------------------------------------ controller


def _service_of_slice(obj: Obj) -> list[str]:
    name = (_meta(obj).get("labels") or {}).get(SERVICE_NAME_LABEL)
    return [f"{_meta(obj).get('namespace')}/{name}"] if name else []


def _rfc3339(clock: Clock) -> str:
    return format_time(datetime.fromtimestamp(clock(), UTC))


def _rv_at_least(have: str, want: str) -> bool:
    if have == want:
        return True
    try:
        return int(have) >= int(want)
    except ValueError:
        return True  # opaque versions: any different one is newer than what we wrote


class EndpointSliceController:
    """Reconciles one Service key (``ns/name``) at a time into slices and Endpoints."""

    name = "endpointslice"
    # How long to wait for our own writes to show up in the cache before acting anyway.
    EXPECTATION_TIMEOUT = 30.0

    def __init__(self, ctx: ControllerContext) -> None:
        self.client = ctx.client
        self.clock = ctx.options.clock
        self.max_per_slice = ctx.options.max_endpoints_per_slice
        self.workers = ctx.options.workers
        inf = ctx.informers
        self.services = inf.get(SERVICES)
        self.pods = inf.get(PODS)
        self.nodes = inf.get(NODES)
        self.endpoints = inf.get(ENDPOINTS)
        self.slices = inf.get(
            ENDPOINTSLICES,
            label_selector=f"{MANAGED_BY_LABEL}={CONTROLLER_NAME}",
            indexers={"service": _service_of_slice},
        )
        self.queue = WorkQueue("endpointslice")
        self._trigger: dict[str, str] = {}
        # service key → slice name → resourceVersion we wrote (None: we deleted it).
        self._expect: dict[str, tuple[float, dict[str, str | None]]] = {}
        self.services.add_handler(
            FuncHandler(
                add=self._service_changed,
                update=lambda _o, n: self._service_changed(n),
                delete=self._service_changed,
            )
        )
        self.pods.add_handler(
            FuncHandler(
                add=lambda p: self._pod_changed(None, p),
                update=self._pod_changed,
                delete=lambda p: self._pod_changed(p, None),
            )
        )
        self.nodes.add_handler(FuncHandler(update=self._node_changed))
        self.slices.add_handler(
            FuncHandler(
                add=self._slice_changed,
                update=lambda _o, n: self._slice_changed(n),
                delete=self._slice_changed,
            )
        )

    # ---------------------------------------------------------------- events

    def _enqueue(self, key: str, triggered: bool = True) -> None:
        if triggered:
            self._trigger[key] = _rfc3339(self.clock)
        self.queue.add(key)

    def _service_changed(self, svc: Obj) -> None:
        self._enqueue(object_key(svc))

    def _pod_changed(self, old: Obj | None, new: Obj | None) -> None:
        if old is not None and new is not None and _relevant(old) == _relevant(new):
            return
        for pod in (old, new):
            if pod is None:
                continue
            labels = _meta(pod).get("labels") or {}
            for svc in self.services.cache.by_index("namespace", str(_meta(pod).get("namespace"))):
                selector = (svc.get("spec") or {}).get("selector")
                if selector and from_set(selector).matches(labels):
                    self._enqueue(object_key(svc))

    def _node_changed(self, old: Obj, new: Obj) -> None:
        def zone(n: Obj) -> Any:
            return (_meta(n).get("labels") or {}).get(ZONE_LABEL)

        if zone(old) == zone(new):
            return
        name = _meta(new).get("name")
        for pod in self.pods.cache.list():
            if (pod.get("spec") or {}).get("nodeName") == name:
                self._pod_changed(None, pod)

    def _slice_changed(self, obj: Obj) -> None:
        for key in _service_of_slice(obj):
            self._enqueue(key, triggered=False)

    # ------------------------------------------------------------- reconcile

    async def run(self) -> None:
        await wait_for_cache_sync(self.services, self.pods, self.nodes, self.slices, self.endpoints)
        for svc in self.services.cache.list():
            self._enqueue(object_key(svc), triggered=False)
        await run_workers(self.queue, self.reconcile, workers=self.workers, name=self.name)

    def _cache_stale(self, key: str) -> bool:
        entry = self._expect.get(key)
        if entry is None:
            return False
        since, names = entry
        ns = key.partition("/")[0]
        for name, rv in list(names.items()):
            cached = self.slices.cache.get_by_name(ns, name)
            if (rv is None and cached is None) or (
                rv is not None
                and cached is not None
                and _rv_at_least(str(_meta(cached).get("resourceVersion") or ""), rv)
            ):
                del names[name]
        if not names or self.clock() - since > self.EXPECTATION_TIMEOUT:
            del self._expect[key]
            return False
        return True

    async def reconcile(self, key: str) -> float | None:
        if self._cache_stale(key):
            return 0.05  # our last writes are not in the cache yet: acting now would duplicate
        ns, _, name = key.partition("/")
        existing = self.slices.cache.by_index("service", key)
        service = self.services.cache.get(key)
        if service is None:
            await self._delete_all(key, ns, name, existing)
            return None
        spec = service.get("spec") or {}
        if not spec.get("selector") or spec.get("type") == "ExternalName":
            return None  # user-managed endpoints (or none at all)
        pods = self.pods.cache.by_index("namespace", ns)
        nodes = {str(_meta(n).get("name")): n for n in self.nodes.cache.list()}
        trigger = self._trigger.get(key) or _rfc3339(self.clock)
        plan = plan_slices(
            service,
            pods,
            nodes,
            existing,
            max_per_slice=self.max_per_slice,
            trigger_time=trigger,
        )
        written: dict[str, str | None] = {}
        try:
            for body in plan.delete:
                await self._delete(ns, str(body["metadata"]["name"]))
                written[str(body["metadata"]["name"])] = None
            for body in plan.update:
                out = await self.client.update(ENDPOINTSLICES, body, ns)
                written[str(out["metadata"]["name"])] = str(out["metadata"]["resourceVersion"])
            for body in plan.create:
                out = await self.client.create(ENDPOINTSLICES, body, ns)
                written[str(out["metadata"]["name"])] = str(out["metadata"]["resourceVersion"])
        finally:
            if written:
                self._expect[key] = (self.clock(), written)
        await self._sync_endpoints(service, pods, trigger)
        if not plan.empty:
            log.info(
                "endpointslice %s: %d created, %d updated, %d deleted",
                key,
                len(plan.create),
                len(plan.update),
                len(plan.delete),
            )
        return None

    async def _sync_endpoints(self, service: Obj, pods: list[Obj], trigger: str) -> None:
        ns, name = _meta(service).get("namespace"), str(_meta(service).get("name"))
        existing = self.endpoints.cache.get_by_name(str(ns), name)
        body = desired_endpoints(service, pods, existing, trigger_time=trigger)
        if body is None:
            return
        if existing is None:
            # AlreadyExists (our cache lags) fails this round; the retry sees the object.
            await self.client.create(ENDPOINTS, body, str(ns))
        else:
            await self.client.update(ENDPOINTS, body, str(ns))

    async def _delete(self, ns: str, name: str) -> None:
        with contextlib.suppress(NotFound):
            await self.client.delete(ENDPOINTSLICES, name, ns)

    async def _delete_all(self, key: str, ns: str, name: str, slices: list[Obj]) -> None:
        for s in slices:
            await self._delete(ns, str(_meta(s).get("name")))
        if slices:
            self._expect[key] = (self.clock(), {str(_meta(s).get("name")): None for s in slices})
        if self.endpoints.cache.get_by_name(ns, name) is not None:
            with contextlib.suppress(NotFound):
                await self.client.delete(ENDPOINTS, name, ns)
        self._trigger.pop(key, None)


def _relevant(pod: Mapping[str, Any]) -> tuple[Any, ...]:
    """What of a pod can change its endpoints (status heartbeats etc. do not)."""
    meta, spec, status = _meta(pod), pod.get("spec") or {}, pod.get("status") or {}
    return (
        meta.get("labels"),
        meta.get("deletionTimestamp"),
        spec.get("nodeName"),
        spec.get("hostname"),
        spec.get("subdomain"),
        spec.get("containers"),
        status.get("phase"),
        status.get("podIP"),
        status.get("podIPs"),
        is_pod_ready(pod),
    )


@register("endpointslice")
def new_endpointslice_controller(ctx: ControllerContext) -> EndpointSliceController:
    return EndpointSliceController(ctx)
