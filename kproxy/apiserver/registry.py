"""The object registry: Kubernetes semantics for every served kind over one store.

Owns the key layout (``/registry/<resource[.group]>/<namespace>/<name>``, or without
the namespace for cluster-scoped kinds), the codec (JSON without resourceVersion; the
store's mod_revision *is* the resourceVersion), and the verbs: get, list (selectors,
limit/continue, resourceVersion semantics), create, update (optimistic concurrency),
patch, delete (grace periods, finalizers, propagation policy) and deletecollection,
plus the status writes. Service allocation runs around Service writes.

Invariants:

- Every write is a compare-and-swap on the mod_revision read just before it; a lost
  race retries with fresh state unless the client gave a resourceVersion (then 409).
- Every failure leaves as :class:`ApiError` (404, 409, 410, 422, 400, ...); store
  errors are translated here.
- Objects handed out carry ``metadata.resourceVersion`` and never alias stored state.
"""

from __future__ import annotations

import copy
import json
import random
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from kproxy.api import defaults, validation
from kproxy.api.errors import ApiError
from kproxy.api.kinds import Kind
from kproxy.api.meta import format_time, stamp_create
from kproxy.apiserver import strategy
from kproxy.apiserver.allocators import ServiceAllocators, carry_allocated
from kproxy.apiserver.listing import ListQuery, list_objects
from kproxy.store import AlreadyExists, Conflict, KeyValue, NotFound, Store

Obj = dict[str, Any]
Mutate = Callable[[Obj], Awaitable[Obj]]

MAX_RETRIES = 16
IMMORTAL_NAMESPACES = frozenset({"default", "kube-system", "kube-public"})


def registry_prefix(kind: Kind, namespace: str | None = None) -> str:
    base = f"/registry/{kind.group_resource}/"
    if kind.namespaced and namespace:
        return f"{base}{namespace}/"
    return base


def object_key(kind: Kind, namespace: str, name: str) -> str:
    return registry_prefix(kind, namespace if kind.namespaced else None) + name


def encode(obj: Mapping[str, Any]) -> bytes:
    meta = obj.get("metadata")
    if isinstance(meta, Mapping) and "resourceVersion" in meta:
        obj = {**obj, "metadata": {k: v for k, v in meta.items() if k != "resourceVersion"}}
    return json.dumps(obj, separators=(",", ":")).encode()


def decode(value: bytes, revision: int) -> Obj:
    obj: Obj = json.loads(value)
    obj.setdefault("metadata", {})["resourceVersion"] = str(revision)
    return obj


def _meta(obj: Obj) -> Obj:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = obj["metadata"] = {}
    return meta


def _now() -> datetime:
    return datetime.now(UTC)


class Registry:
    """Kubernetes verbs on the objects of every kind, stored in ``store``."""

    def __init__(
        self,
        store: Store,
        allocators: ServiceAllocators,
        *,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.store = store
        self.allocators = allocators
        self.clock = clock
        self._rng = random.Random()

    # ------------------------------------------------------------------ reads

    async def _get_kv(self, kind: Kind, namespace: str, name: str) -> KeyValue:
        try:
            return await self.store.get(object_key(kind, namespace, name))
        except NotFound:
            raise ApiError.not_found(kind.resource, name, kind.group) from None

    async def get(self, kind: Kind, namespace: str, name: str) -> Obj:
        kv = await self._get_kv(kind, namespace, name)
        return decode(kv.value, kv.mod_revision)

    async def list(self, kind: Kind, namespace: str | None, query: ListQuery) -> Obj:
        return await list_objects(self.store, kind, registry_prefix(kind, namespace), query)

    async def _check_namespace(self, kind: Kind, namespace: str) -> None:
        if not kind.namespaced:
            return
        try:
            kv = await self.store.get(f"/registry/namespaces/{namespace}")
        except NotFound:
            raise ApiError.not_found("namespaces", namespace) from None
        if strategy.is_deleting(json.loads(kv.value)):
            raise ApiError.forbidden(
                kind.resource,
                "",
                f"unable to create new content in namespace {namespace} because it is "
                "being terminated",
                kind.group,
            )

    # ------------------------------------------------------------------ create

    def _validate(self, kind: Kind, obj: Obj, old: Obj | None = None) -> None:
        rng = self.allocators.node_port_range
        if old is None:
            strategy.guarded("validation", validation.validate, kind.kind, obj, node_port_range=rng)
        else:
            strategy.guarded(
                "validation", validation.validate_update, kind.kind, old, obj, node_port_range=rng
            )

    async def create(self, kind: Kind, namespace: str, body: Obj, *, dry_run: bool = False) -> Obj:
        obj = copy.deepcopy(body)
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        meta = _meta(obj)
        if kind.namespaced:
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if meta.get("name") and not isinstance(meta["name"], str):
            raise ApiError.bad_request("metadata.name must be a string")
        await self._check_namespace(kind, namespace)
        generated = not meta.get("name") and bool(meta.get("generateName"))
        stamp_create(
            obj,
            now=self.clock(),
            new_uid=lambda: str(uuid.uuid4()),
            choose=self._rng.choice,
        )
        strategy.prepare_create(kind, obj)
        strategy.guarded("defaulting", defaults.apply_defaults, kind.kind, obj)
        self._validate(kind, obj)
        if dry_run:
            return obj
        taken: tuple[list[int], list[int]] = ([], [])
        if kind.kind == "Service":
            taken = await self.allocators.allocate_for(obj)
        try:
            for attempt in range(8 if generated else 1):
                if attempt:
                    meta["name"] = meta["generateName"][:58] + "".join(
                        self._rng.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5)
                    )
                key = object_key(kind, namespace, meta["name"])
                try:
                    kv = await self.store.create(key, encode(obj))
                except AlreadyExists:
                    continue
                return decode(kv.value, kv.mod_revision)
        except BaseException:
            await self.allocators.rollback(taken)
            raise
        await self.allocators.rollback(taken)
        raise ApiError.already_exists(kind.resource, str(meta.get("name")), kind.group)

    # ------------------------------------------------------------------ update

    async def write(
        self,
        kind: Kind,
        namespace: str,
        name: str,
        mutate: Mutate,
        *,
        dry_run: bool = False,
    ) -> tuple[Obj, bool]:
        """Read, ``mutate`` (returns the next state; may raise), CAS write; retried.

        Returns the stored object and whether it was removed (finalizers done).
        """
        key = object_key(kind, namespace, name)
        for _ in range(MAX_RETRIES):
            kv = await self._get_kv(kind, namespace, name)
            current = decode(kv.value, kv.mod_revision)
            new = await mutate(copy.deepcopy(current))
            if dry_run:
                return new, False
            if new == current and not strategy.ready_to_remove(kind, new):
                return current, False
            if strategy.ready_to_remove(kind, new):
                try:
                    await self.store.delete(key, kv.mod_revision)
                except (Conflict, NotFound):
                    continue
                if kind.kind == "Service":
                    await self.allocators.release_unused(current)
                return new, True
            taken: tuple[list[int], list[int]] = ([], [])
            if kind.kind == "Service":
                taken = await self.allocators.allocate_for(new, current)
            try:
                stored = await self.store.update(key, encode(new), kv.mod_revision)
            except (Conflict, NotFound):
                await self.allocators.rollback(taken)
                continue
            except BaseException:
                await self.allocators.rollback(taken)
                raise
            if kind.kind == "Service":
                await self.allocators.release_unused(current, new)
            return decode(stored.value, stored.mod_revision), False
        raise ApiError.conflict(kind.resource, name, "too many concurrent writes", kind.group)

    def _precondition(self, kind: Kind, name: str, current: Obj, rv: Any) -> None:
        if rv and str(rv) != _meta(current).get("resourceVersion"):
            raise ApiError.conflict(kind.resource, name, group=kind.group)

    def updated(self, kind: Kind, current: Obj, body: Obj, subresource: str = "") -> Obj:
        """The object a PUT of ``body`` turns ``current`` into (validated)."""
        name = str(_meta(current).get("name"))
        self._precondition(kind, name, current, _meta(body).get("resourceVersion"))
        if subresource == "status":
            new = strategy.prepare_status_update(current, body)
        else:
            new = copy.deepcopy(body)
            new["apiVersion"], new["kind"] = kind.api_version, kind.kind
            strategy.prepare_update(kind, current, new)
        meta = _meta(new)
        meta["resourceVersion"] = _meta(current).get("resourceVersion")
        if kind.namespaced:
            meta.setdefault("namespace", _meta(current).get("namespace"))
        strategy.guarded("defaulting", defaults.apply_defaults, kind.kind, new)
        if kind.kind == "Service":
            carry_allocated(new, current)
        self._validate(kind, new, current)
        return new

    async def update(
        self,
        kind: Kind,
        namespace: str,
        name: str,
        body: Obj,
        *,
        subresource: str = "",
        dry_run: bool = False,
    ) -> tuple[Obj, bool]:
        """PUT; returns (object, created)."""

        async def mutate(current: Obj) -> Obj:
            return self.updated(kind, current, body, subresource)

        try:
            obj, _ = await self.write(kind, namespace, name, mutate, dry_run=dry_run)
        except ApiError as exc:
            if exc.code != 404 or subresource or kind.kind not in strategy.CREATE_ON_UPDATE:
                raise
            if _meta(body).get("resourceVersion"):
                raise
            return await self.create(kind, namespace, body, dry_run=dry_run), True
        return obj, False

    # ------------------------------------------------------------------ delete

    def _deleting(self, kind: Kind, current: Obj, options: Mapping[str, Any]) -> Obj:
        """The next state of ``current`` under a DELETE with ``options``."""
        name = str(_meta(current).get("name"))
        pre = options.get("preconditions")
        if isinstance(pre, Mapping):
            meta = _meta(current)
            if pre.get("uid") and pre["uid"] != meta.get("uid"):
                raise ApiError.conflict(
                    kind.resource,
                    name,
                    f"Precondition failed: UID in precondition: {pre['uid']}, "
                    f"UID in object meta: {meta.get('uid')}",
                    kind.group,
                )
            if pre.get("resourceVersion") and pre["resourceVersion"] != meta.get("resourceVersion"):
                raise ApiError.conflict(
                    kind.resource,
                    name,
                    f"Precondition failed: ResourceVersion in precondition: "
                    f"{pre['resourceVersion']}, ResourceVersion in object meta: "
                    f"{meta.get('resourceVersion')}",
                    kind.group,
                )
        new = copy.deepcopy(current)
        meta = _meta(new)
        now = self.clock()
        fins = strategy.finalizers(new)
        policy = options.get("propagationPolicy")
        if policy is None and options.get("orphanDependents") is True:
            policy = "Orphan"
        if policy == "Foreground" and strategy.FOREGROUND_FINALIZER not in fins:
            fins.append(strategy.FOREGROUND_FINALIZER)
        elif policy == "Orphan" and strategy.ORPHAN_FINALIZER not in fins:
            fins.append(strategy.ORPHAN_FINALIZER)
        if fins:
            meta["finalizers"] = fins
        if kind.kind == "Namespace":
            new.setdefault("status", {})["phase"] = "Terminating"
        grace = 0
        if kind.kind == "Pod":
            grace = self._pod_grace(new, options)
        if meta.get("deletionTimestamp"):
            old_grace = meta.get("deletionGracePeriodSeconds")
            if isinstance(old_grace, int) and grace < old_grace:
                # A shorter grace period wins (kubelet's final delete uses 0).
                meta["deletionGracePeriodSeconds"] = grace
                meta["deletionTimestamp"] = format_time(now + timedelta(seconds=grace))
            return new
        meta["deletionTimestamp"] = format_time(now + timedelta(seconds=grace))
        meta["deletionGracePeriodSeconds"] = grace
        return new

    @staticmethod
    def _pod_grace(pod: Obj, options: Mapping[str, Any]) -> int:
        spec = pod.get("spec") if isinstance(pod.get("spec"), dict) else {}
        status = pod.get("status") if isinstance(pod.get("status"), dict) else {}
        assert isinstance(spec, dict) and isinstance(status, dict)
        if not spec.get("nodeName") or status.get("phase") in ("Succeeded", "Failed"):
            return 0  # nothing runs it: upstream deletes unscheduled pods at once
        grace = options.get("gracePeriodSeconds")
        if not isinstance(grace, int) or isinstance(grace, bool):
            grace = spec.get("terminationGracePeriodSeconds")
        if not isinstance(grace, int) or isinstance(grace, bool):
            grace = 30
        return max(grace, 0)

    async def delete(
        self,
        kind: Kind,
        namespace: str,
        name: str,
        options: Mapping[str, Any],
        *,
        dry_run: bool = False,
    ) -> tuple[Obj, bool]:
        """DELETE; returns (last state, removed now). Not removed: pending grace/finalizers."""
        if kind.kind == "Namespace" and name in IMMORTAL_NAMESPACES:
            # Upstream's NamespaceLifecycle admission: the system namespaces stay.
            raise ApiError.forbidden(kind.resource, name, "this namespace may not be deleted")

        async def mutate(current: Obj) -> Obj:
            return self._deleting(kind, current, options)

        return await self.write(kind, namespace, name, mutate, dry_run=dry_run)
