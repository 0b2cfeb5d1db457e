"""The namespace controller: empty a terminating Namespace, then let it go.

Owns :class:`NamespaceController` (registered as ``namespace``). A Namespace being
deleted (``deletionTimestamp`` set, phase Terminating) keeps the ``kubernetes``
finalizer in ``spec.finalizers`` until this controller has deleted every namespaced
object in it — all served namespaced kinds, :data:`NAMESPACED_RESOURCES` — and seen
them gone; it then removes that finalizer through the ``/finalize`` subresource
(or a plain update where the server does not serve it), and the apiserver removes
the Namespace.

Invariants:

- Content is deleted with ``propagationPolicy: Background`` and a UID precondition,
  so an object re-created under the same name meanwhile is not hit blindly; objects
  already being deleted (pods in their grace period, objects held by finalizers)
  are waited for, never forced.
- The finalizer goes only after a fresh list of every resource came back empty; until
  then the Namespace is looked at again every ``recheck`` seconds.
- A resource the server does not serve (404/405 on list) is skipped from then on.
- Other finalizers in ``spec.finalizers`` are left alone.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from kproxy.client.errors import Conflict, MethodNotAllowed, NotFound
from kproxy.client.informer import Informer, wait_for_cache_sync
from kproxy.client.rest import (
    CONFIGMAPS,
    DEPLOYMENTS,
    ENDPOINTS,
    ENDPOINTSLICES,
    EVENTS,
    LEASES,
    NAMESPACES,
    PODS,
    REPLICASETS,
    SERVICES,
    Resource,
    RestClient,
)
from kproxy.controllers import Controller, ControllerContext, SharedInformers, register
from kproxy.controllers.ownership import is_deleting, name_of, uid_of
from kproxy.controllers.workqueue import WorkQueue, run_workers

log = logging.getLogger(__name__)

Obj = dict[str, Any]

NAMESPACE_FINALIZER = "kubernetes"

# Workloads first so their dependents are not re-created while we delete them.
NAMESPACED_RESOURCES: tuple[Resource, ...] = (
    DEPLOYMENTS,
    REPLICASETS,
    PODS,
    SERVICES,
    ENDPOINTS,
    ENDPOINTSLICES,
    CONFIGMAPS,
    LEASES,
    EVENTS,
)


def is_terminating(ns: Mapping[str, Any]) -> bool:
    return is_deleting(ns) or (ns.get("status") or {}).get("phase") == "Terminating"


def spec_finalizers(ns: Mapping[str, Any]) -> list[str]:
    fins = (ns.get("spec") or {}).get("finalizers")
    return [str(f) for f in fins] if isinstance(fins, list) else []


class NamespaceController:
    name = "namespace"

    def __init__(
        self,
        client: RestClient,
        informers: SharedInformers,
        *,
        workers: int = 5,
        resources: Iterable[Resource] = NAMESPACED_RESOURCES,
        recheck: float = 1.0,
    ) -> None:
        self.client = client
        self.workers = workers
        self.resources = tuple(r for r in resources if r.namespaced)
        self.recheck = recheck
        self._unserved: set[Resource] = set()
        self.ns_informer: Informer = informers.get(NAMESPACES)
        self.queue = WorkQueue(self.name)
        self.ns_informer.add_handler(_Handler(self))

    async def run(self) -> None:
        await wait_for_cache_sync(self.ns_informer)
        try:
            await run_workers(self.queue, self.reconcile, workers=self.workers, name=self.name)
        finally:
            self.queue.shutdown()

    async def reconcile(self, name: str) -> float | None:
        try:
            ns = await self.client.get(NAMESPACES, name)
        except NotFound:
            return None
        if not is_deleting(ns) or NAMESPACE_FINALIZER not in spec_finalizers(ns):
            return None
        await self.delete_content(name)
        remaining = await self.remaining(name)
        if remaining:
            log.info("namespace %s: waiting for %s", name, _summary(remaining))
            return self.recheck
        await self.finalize(ns)
        log.info("namespace %s: empty; finalizer %r removed", name, NAMESPACE_FINALIZER)
        return None

    async def _list(self, resource: Resource, namespace: str) -> list[Obj] | None:
        if resource in self._unserved:
            return None
        try:
            listing = await self.client.list_all(resource, namespace)
        except (NotFound, MethodNotAllowed):
            log.info("namespace controller: %s not served; skipped", resource.plural)
            self._unserved.add(resource)
            return None
        return list(listing.get("items") or ())

    async def delete_content(self, namespace: str) -> None:
        for resource in self.resources:
            for obj in await self._list(resource, namespace) or ():
                if is_deleting(obj):
                    continue
                try:
                    await self.client.delete(
                        resource,
                        name_of(obj),
                        namespace,
                        propagation_policy="Background",
                        preconditions={"uid": uid_of(obj)} if uid_of(obj) else None,
                    )
                except (NotFound, Conflict):
                    continue  # gone already, or replaced: the next pass sees it

    async def remaining(self, namespace: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for resource in self.resources:
            items = await self._list(resource, namespace)
            if items:
                counts[resource.plural] = len(items)
        return counts

    async def finalize(self, ns: Obj) -> None:
        body = copy.deepcopy(ns)
        body.setdefault("spec", {})["finalizers"] = [
            f for f in spec_finalizers(ns) if f != NAMESPACE_FINALIZER
        ]
        try:
            await self.client.update(NAMESPACES, body, subresource="finalize")
            return
        except (NotFound, MethodNotAllowed) as exc:
            # Either the namespace is gone or /finalize is not served: tell which.
            try:
                await self.client.get(NAMESPACES, name_of(ns))
            except NotFound:
                return
            log.debug("namespace %s: /finalize unavailable (%s); updating", name_of(ns), exc)
        with contextlib.suppress(NotFound):
            await self.client.update(NAMESPACES, body)


def _summary(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {plural}" for plural, n in sorted(counts.items()))


class _Handler:
    def __init__(self, c: NamespaceController) -> None:
        self.c = c

    def _maybe(self, ns: Obj) -> None:
        if is_terminating(ns):
            self.c.queue.add(name_of(ns))

    def on_add(self, obj: Obj) -> None:
        self._maybe(obj)

    def on_update(self, old: Obj, new: Obj) -> None:
        self._maybe(new)

    def on_delete(self, obj: Obj) -> None:
        pass


@register("namespace")
def _factory(ctx: ControllerContext) -> Controller:
    return NamespaceController(ctx.client, ctx.informers, workers=ctx.options.workers)
