"""Subresources that are not plain status writes: ``pods/binding``, ``*/scale``,
``namespaces/finalize``.

- ``pods/binding`` (POST a ``Binding``): sets ``spec.nodeName``, copies the binding's
  annotations and marks ``PodScheduled=True``, atomically; 409 if the pod is already
  bound, being deleted, or its uid differs from the binding's.
- ``deployments/scale``, ``replicasets/scale``: the ``autoscaling/v1 Scale`` view
  (``spec.replicas``; ``status.replicas`` and the selector as a string); PUT and PATCH
  change only the parent's ``spec.replicas``, guarded by the Scale's resourceVersion
  (the parent's).
- ``namespaces/finalize``: PUT writes only ``spec.finalizers``; a terminating
  namespace whose finalizers are all gone is removed.

Invariants: every write goes through :meth:`Registry.write` (CAS + retry).
"""

from __future__ import annotations

import copy
from typing import Any

from kproxy.api import patch as patches
from kproxy.api import selectors, validation
from kproxy.api.errors import ApiError
from kproxy.api.kinds import Kind
from kproxy.api.meta import format_time
from kproxy.apiserver import strategy
from kproxy.apiserver.registry import Obj, Registry

SCALE_KIND = "Scale"
SCALE_API_VERSION = "autoscaling/v1"


def _meta(obj: Obj) -> Obj:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _as_dict(value: Any) -> Obj:
    return value if isinstance(value, dict) else {}


async def bind(registry: Registry, kind: Kind, namespace: str, name: str, body: Obj) -> Obj:
    """Apply a Binding to pod ``namespace/name``; returns the Success Status."""
    if strategy.check_kind(kind, body, "Binding"):
        raise ApiError.bad_request(str(strategy.check_kind(kind, body, "Binding")))
    meta = _as_dict(body.get("metadata"))
    if meta.get("name") not in (None, "", name):
        raise ApiError.bad_request(
            f"the name of the object ({meta.get('name')}) does not match the name on the URL "
            f"({name})"
        )
    strategy.guarded(
        "validation",
        validation.validate,
        "Binding",
        {**body, "metadata": {**meta, "name": name, "namespace": namespace}},
    )
    target = _as_dict(body.get("target"))
    node = str(target.get("name"))

    async def mutate(pod: Obj) -> Obj:
        pmeta = _meta(pod)
        if meta.get("uid") and meta["uid"] != pmeta.get("uid"):
            raise ApiError.conflict(
                "pods",
                name,
                f"Precondition failed: UID in precondition: {meta['uid']}, "
                f"UID in object meta: {pmeta.get('uid')}",
            )
        if strategy.is_deleting(pod):
            raise ApiError.conflict(
                "pods", name, f"pod {name} is being deleted, cannot be assigned to a host"
            )
        spec = pod.setdefault("spec", {})
        if spec.get("nodeName"):
            raise ApiError.conflict(
                "pods", name, f'pod {name} is already assigned to node "{spec["nodeName"]}"'
            )
        spec["nodeName"] = node
        annotations = meta.get("annotations")
        if isinstance(annotations, dict) and annotations:
            pmeta.setdefault("annotations", {}).update(annotations)
        status = pod.setdefault("status", {})
        conditions = [
            c
            for c in status.get("conditions") or ()
            if isinstance(c, dict) and c.get("type") != "PodScheduled"
        ]
        conditions.append(
            {
                "type": "PodScheduled",
                "status": "True",
                "lastProbeTime": None,
                "lastTransitionTime": format_time(registry.clock()),
            }
        )
        status["conditions"] = conditions
        return pod

    await registry.write(kind, namespace, name, mutate)
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "code": 201,
    }


def scale_of(obj: Obj) -> Obj:
    """The ``autoscaling/v1 Scale`` view of a Deployment or ReplicaSet."""
    meta = _meta(obj)
    spec, status = _as_dict(obj.get("spec")), _as_dict(obj.get("status"))
    selector = ""
    if isinstance(spec.get("selector"), dict):
        try:
            selector = str(selectors.from_label_selector(spec["selector"]))
        except ApiError:
            selector = ""
    return {
        "kind": SCALE_KIND,
        "apiVersion": SCALE_API_VERSION,
        "metadata": {
            k: meta[k]
            for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
            if k in meta
        },
        "spec": {"replicas": spec.get("replicas", 1)},
        "status": {"replicas": status.get("replicas", 0), "selector": selector},
    }


def _apply_scale(kind: Kind, current: Obj, scale: Obj) -> Obj:
    name = str(_meta(current).get("name"))
    if not isinstance(scale, dict):
        raise ApiError.bad_request("the body of a scale request must be a Scale object")
    if strategy.check_kind(kind, scale, SCALE_KIND):
        raise ApiError.bad_request(str(strategy.check_kind(kind, scale, SCALE_KIND)))
    rv = _meta(scale).get("resourceVersion")
    if rv and str(rv) != _meta(current).get("resourceVersion"):
        raise ApiError.conflict(kind.resource, name, group=kind.group)
    scope = {"name": name, "namespace": _meta(current).get("namespace") or "default"}
    strategy.guarded("validation", validation.validate, SCALE_KIND, {**scale, "metadata": scope})
    replicas = _as_dict(scale.get("spec")).get("replicas", 0)
    if not isinstance(replicas, int) or isinstance(replicas, bool):
        raise ApiError.bad_request("spec.replicas must be an integer")
    new = copy.deepcopy(current)
    new.setdefault("spec", {})["replicas"] = replicas
    if new != current:
        meta = new.setdefault("metadata", {})
        meta["generation"] = int(meta.get("generation") or 1) + 1
    return new


async def update_scale(
    registry: Registry, kind: Kind, namespace: str, name: str, body: Obj, *, dry_run: bool = False
) -> Obj:
    async def mutate(current: Obj) -> Obj:
        return _apply_scale(kind, current, body)

    obj, _ = await registry.write(kind, namespace, name, mutate, dry_run=dry_run)
    return scale_of(obj)


async def patch_scale(
    registry: Registry,
    kind: Kind,
    namespace: str,
    name: str,
    content_type: str,
    body: Any,
    *,
    dry_run: bool = False,
) -> Obj:
    async def mutate(current: Obj) -> Obj:
        view = scale_of(current)
        patched = strategy.guarded(
            "patch", patches.apply_patch, content_type, view, body, SCALE_KIND
        )
        return _apply_scale(kind, current, patched)

    obj, _ = await registry.write(kind, namespace, name, mutate, dry_run=dry_run)
    return scale_of(obj)


async def finalize_namespace(registry: Registry, kind: Kind, name: str, body: Obj) -> Obj:
    spec = _as_dict(body.get("spec"))
    fins = spec.get("finalizers") or []
    if not isinstance(fins, list) or not all(isinstance(f, str) for f in fins):
        raise ApiError.bad_request("spec.finalizers must be a list of strings")

    async def mutate(current: Obj) -> Obj:
        rv = _meta(body).get("resourceVersion")
        if rv and str(rv) != _meta(current).get("resourceVersion"):
            raise ApiError.conflict("namespaces", name)
        current.setdefault("spec", {})["finalizers"] = list(fins)
        return current

    obj, _ = await registry.write(kind, "", name, mutate)
    return obj
