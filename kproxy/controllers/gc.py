"""The garbage collector: follow ownerReferences so dependents die with their owners.

Owns :class:`GarbageCollector` (registered as ``garbagecollector``) and the pure
:func:`decide`, upstream's ``attemptToDeleteItem`` as a decision over an object
whose owners have been classified as *solid* (exist, not being deleted in the
foreground), *dangling* (gone, or replaced by an object with another UID) or
*waiting* (being deleted with the ``foregroundDeletion`` finalizer):

- some solid owner: keep the object; drop its references to dangling and waiting
  owners (a waiting owner would otherwise wait on it forever);
- no solid owner, some waiting, and the object has dependents of its own: delete
  it in the foreground too, so the chain unwinds bottom-up;
- otherwise delete it, with the policy its own finalizers ask for (orphan,
  foreground, else background).

Owners being deleted are handled by their finalizers: ``orphan`` — remove the
references to the owner from every dependent, then the finalizer;
``foregroundDeletion`` — make sure every dependent is being deleted and remove
the finalizer once none with ``blockOwnerDeletion`` is left.

Invariants:

- The graph is the informer caches (one informer per resource in
  :data:`GC_RESOURCES`, indexed by owner UID); an owner missing from the cache is
  confirmed absent with a live GET before anything is deleted, since caches lag.
- Owners of kinds the collector does not watch are treated as existing: nothing is
  deleted on a guess.
- Deletes carry a UID precondition, and reference/finalizer edits are PUTs guarded
  by resourceVersion, so a re-created object with the same name is never hit.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kproxy.client.errors import Conflict, NotFound
from kproxy.client.informer import Informer, wait_for_cache_sync
from kproxy.client.rest import (
    CONFIGMAPS,
    DEPLOYMENTS,
    ENDPOINTS,
    ENDPOINTSLICES,
    LEASES,
    NODES,
    PODS,
    REPLICASETS,
    SERVICES,
    Resource,
    RestClient,
)
from kproxy.controllers import Controller, ControllerContext, SharedInformers, register
from kproxy.controllers.ownership import (
    FOREGROUND_FINALIZER,
    ORPHAN_FINALIZER,
    OWNER_UID_INDEX,
    finalizers_of,
    is_deleting,
    meta,
    name_of,
    namespace_of,
    owner_refs,
    owner_uid_index,
    uid_of,
    with_owner_refs,
)
from kproxy.controllers.workqueue import WorkQueue, run_workers

log = logging.getLogger(__name__)

Obj = dict[str, Any]

# Kinds that own or are owned in this cluster: Deployment → ReplicaSet → Pod,
# Service → EndpointSlice/Endpoints, Node → Lease; ConfigMaps may carry references.
GC_RESOURCES: tuple[Resource, ...] = (
    DEPLOYMENTS,
    REPLICASETS,
    PODS,
    SERVICES,
    ENDPOINTS,
    ENDPOINTSLICES,
    CONFIGMAPS,
    LEASES,
    NODES,
)


# --------------------------------------------------------------- decisions


@dataclass
class Decision:
    """What to do with one dependent (at most one of the three)."""

    drop_refs: list[str] = field(default_factory=list)  # owner UIDs to unlink
    delete: str | None = None  # propagation policy of the delete


def decide(
    obj: Mapping[str, Any],
    solid: Iterable[str],
    dangling: Iterable[str],
    waiting: Iterable[str],
    *,
    has_dependents: bool,
) -> Decision:
    """``attemptToDeleteItem`` for an object whose owner UIDs were classified."""
    solid, dangling, waiting = list(solid), list(dangling), list(waiting)
    if solid:
        return Decision(drop_refs=[*dangling, *waiting])
    if waiting and has_dependents:
        return Decision(delete="Foreground")
    fins = finalizers_of(obj)
    if ORPHAN_FINALIZER in fins:
        return Decision(delete="Orphan")
    if FOREGROUND_FINALIZER in fins:
        return Decision(delete="Foreground")
    return Decision(delete="Background")


def blocks(dependent: Mapping[str, Any], owner_uid: str) -> bool:
    return any(
        r.get("uid") == owner_uid and r.get("blockOwnerDeletion") is True
        for r in owner_refs(dependent)
    )


def without_finalizer(obj: Mapping[str, Any], finalizer: str) -> Obj:
    out: Obj = copy.deepcopy(dict(obj))
    fins = [f for f in finalizers_of(obj) if f != finalizer]
    m = out.setdefault("metadata", {})
    if fins:
        m["finalizers"] = fins
    else:
        m.pop("finalizers", None)
    return out


# -------------------------------------------------------------- controller


class GarbageCollector:
    name = "garbagecollector"

    def __init__(
        self,
        client: RestClient,
        informers: SharedInformers,
        *,
        workers: int = 5,
        resources: Iterable[Resource] = GC_RESOURCES,
    ) -> None:
        self.client = client
        self.workers = workers
        self.resources = tuple(resources)
        self._by_id = {_rid(r): r for r in self.resources}
        self._by_kind = {(r.api_version, r.kind): r for r in self.resources}
        self.informers: dict[Resource, Informer] = {
            r: informers.get(r, indexers={OWNER_UID_INDEX: owner_uid_index}) for r in self.resources
        }
        self.queue = WorkQueue(self.name)
        for r, informer in self.informers.items():
            informer.add_handler(_Handler(self, r))

    async def run(self) -> None:
        await wait_for_cache_sync(*self.informers.values())
        try:
            await run_workers(self.queue, self.reconcile, workers=self.workers, name=self.name)
        finally:
            self.queue.shutdown()

    # ----------------------------------------------------------------- graph

    def key(self, resource: Resource, namespace: str, name: str) -> str:
        return f"{_rid(resource)}/{namespace}/{name}"

    def key_of(self, resource: Resource, obj: Mapping[str, Any]) -> str:
        return self.key(resource, namespace_of(obj), name_of(obj))

    def dependents(self, owner_uid: str) -> list[tuple[Resource, Obj]]:
        return [
            (r, obj)
            for r, informer in self.informers.items()
            for obj in informer.cache.by_index(OWNER_UID_INDEX, owner_uid)
        ]

    def owner_keys(self, obj: Mapping[str, Any]) -> list[str]:
        out = []
        for ref in owner_refs(obj):
            r = self._by_kind.get((str(ref.get("apiVersion")), str(ref.get("kind"))))
            if r is not None:
                ns = namespace_of(obj) if r.namespaced else ""
                out.append(self.key(r, ns, str(ref.get("name") or "")))
        return out

    # ------------------------------------------------------------- reconcile

    async def reconcile(self, key: str) -> float | None:
        rid, ns, name = key.split("/", 2)
        resource = self._by_id.get(rid)
        if resource is None:
            return None
        obj = self.informers[resource].cache.get_by_name(ns, name)
        if obj is None:
            return None
        if is_deleting(obj):
            fins = finalizers_of(obj)
            if ORPHAN_FINALIZER in fins:
                await self._orphan_dependents(resource, obj)
            elif FOREGROUND_FINALIZER in fins:
                await self._delete_dependents(resource, obj)
            return None  # otherwise it is on its way out: nothing to decide
        if not owner_refs(obj):
            return None
        solid, dangling, waiting = await self._classify(obj)
        decision = decide(
            obj, solid, dangling, waiting, has_dependents=bool(self.dependents(uid_of(obj)))
        )
        if decision.drop_refs:
            drop = set(decision.drop_refs)
            kept = [r for r in owner_refs(obj) if r.get("uid") not in drop]
            log.info("gc: %s: removing references to owners %s", key, sorted(drop))
            await self._put(resource, with_owner_refs(obj, kept))
        elif decision.delete is not None:
            log.info("gc: deleting %s (%s; owners gone or deleting)", key, decision.delete)
            try:
                await self.client.delete(
                    resource,
                    name,
                    ns or None,
                    propagation_policy=decision.delete,
                    preconditions={"uid": uid_of(obj)},
                )
            except (NotFound, Conflict):
                log.debug("gc: %s already gone or replaced", key)
        return None

    async def _classify(self, obj: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
        solid: list[str] = []
        dangling: list[str] = []
        waiting: list[str] = []
        for ref in owner_refs(obj):
            uid = str(ref.get("uid") or "")
            resource = self._by_kind.get((str(ref.get("apiVersion")), str(ref.get("kind"))))
            if resource is None:
                solid.append(uid)  # a kind we do not watch: assume it exists
                continue
            owner = await self._owner(resource, namespace_of(obj), ref)
            if owner is None:
                dangling.append(uid)
            elif is_deleting(owner) and FOREGROUND_FINALIZER in finalizers_of(owner):
                waiting.append(uid)
            else:
                solid.append(uid)
        return solid, dangling, waiting

    async def _owner(
        self, resource: Resource, namespace: str, ref: Mapping[str, Any]
    ) -> Obj | None:
        """The owner a reference names, by cache then live GET; None if absent."""
        ns = namespace if resource.namespaced else ""
        name = str(ref.get("name") or "")
        cached = self.informers[resource].cache.get_by_name(ns, name)
        if cached is not None and uid_of(cached) == ref.get("uid"):
            return cached
        try:
            live = await self.client.get(resource, name, ns or None)
        except NotFound:
            return None
        return live if uid_of(live) == ref.get("uid") else None

    async def _orphan_dependents(self, resource: Resource, owner: Obj) -> None:
        uid = uid_of(owner)
        for r, dep in self.dependents(uid):
            kept = [ref for ref in owner_refs(dep) if ref.get("uid") != uid]
            log.info("gc: orphaning %s", self.key_of(r, dep))
            await self._put(r, with_owner_refs(dep, kept))
        await self._put(resource, without_finalizer(owner, ORPHAN_FINALIZER))

    async def _delete_dependents(self, resource: Resource, owner: Obj) -> None:
        uid = uid_of(owner)
        deps = self.dependents(uid)
        if not any(blocks(dep, uid) for _, dep in deps):
            log.info("gc: %s: no blocking dependents left", self.key_of(resource, owner))
            await self._put(resource, without_finalizer(owner, FOREGROUND_FINALIZER))
            return
        for r, dep in deps:
            if not is_deleting(dep):
                self.queue.add(self.key_of(r, dep))

    async def _put(self, resource: Resource, obj: Obj) -> None:
        with contextlib.suppress(NotFound):
            await self.client.update(resource, obj, namespace_of(obj) or None)


def _rid(resource: Resource) -> str:
    return f"{resource.plural}.{resource.group}"


class _Handler:
    """Queue what may need collecting when the graph changes around it."""

    def __init__(self, gc: GarbageCollector, resource: Resource) -> None:
        self.gc = gc
        self.resource = resource

    def _interesting(self, obj: Obj) -> bool:
        gc_fins = {ORPHAN_FINALIZER, FOREGROUND_FINALIZER} & set(finalizers_of(obj))
        return bool(owner_refs(obj)) or (is_deleting(obj) and bool(gc_fins))

    def on_add(self, obj: Obj) -> None:
        if self._interesting(obj):
            self.gc.queue.add(self.gc.key_of(self.resource, obj))

    def on_update(self, old: Obj, new: Obj) -> None:
        if meta(old).get("resourceVersion") == meta(new).get("resourceVersion"):
            return
        if self._interesting(new):
            self.gc.queue.add(self.gc.key_of(self.resource, new))
        changed = (
            is_deleting(old) != is_deleting(new)
            or finalizers_of(old) != finalizers_of(new)
            or owner_refs(old) != owner_refs(new)
        )
        if changed:
            # Its dependents may now be orphaned or waited for; its owners may be unblocked.
            for r, dep in self.gc.dependents(uid_of(new)):
                self.gc.queue.add(self.gc.key_of(r, dep))
            for key in self.gc.owner_keys(old):
                self.gc.queue.add(key)

    def on_delete(self, obj: Obj) -> None:
        for r, dep in self.gc.dependents(uid_of(obj)):
            self.gc.queue.add(self.gc.key_of(r, dep))
        for key in self.gc.owner_keys(obj):
            self.gc.queue.add(key)


@register("garbagecollector")
def _factory(ctx: ControllerContext) -> Controller:
    return GarbageCollector(ctx.client, ctx.informers, workers=ctx.options.workers)
