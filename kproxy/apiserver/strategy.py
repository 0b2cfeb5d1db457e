"""Per-kind write rules: what the server owns on create, update and status writes.

Owns upstream's ``PrepareForCreate``/``PrepareForUpdate`` behaviour for the served
kinds, as pure functions of plain dicts:

- kinds with a ``status`` subresource (pods, services, nodes, deployments,
  replicasets) ignore ``status`` on main-resource writes, and status writes change
  nothing but ``status``; namespaces behave the same (their status belongs to the
  server and the namespace controller);
- create resets the status a client may not claim (Pod → Pending with a QoS class,
  Service/Deployment/ReplicaSet → empty; Nodes keep theirs: the kubelet registers
  with it) and gives Namespaces phase Active and the ``kubernetes`` finalizer;
- updates keep the system metadata (uid, creationTimestamp, deletion fields) and
  bump ``generation`` when the spec changes.

Invariants: nothing here does I/O; inputs are not mutated unless a docstring says so.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from kproxy.api import kinds
from kproxy.api.errors import ApiError
from kproxy.api.kinds import Kind
from kproxy.api.quantity import QuantityError, parse_quantity

log = logging.getLogger(__name__)

Obj = dict[str, Any]
T = TypeVar("T")
API_CRASH = "kproxy.api crashed on malformed input"

NAMESPACE_FINALIZER = "kubernetes"
FOREGROUND_FINALIZER = "foregroundDeletion"
ORPHAN_FINALIZER = "orphan"

# Upstream's AllowCreateOnUpdate: a PUT of a missing object creates it.
CREATE_ON_UPDATE = frozenset({"Endpoints", "Event", "Lease", "Service", "EndpointSlice"})

_SYSTEM_META = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds")


def guarded(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a :mod:`kproxy.api` function that must only raise ApiError on bad input.

    If it crashes on malformed input anyway, that is its bug: log it loudly (with the
    traceback) and answer 422 rather than 500, since the input *is* what is wrong.
    """
    try:
        return fn(*args, **kwargs)
    except ApiError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError) as exc:
        log.error("%s (%s): %r", API_CRASH, what, exc, exc_info=True)
        raise ApiError.unprocessable(f"{what}: the object is malformed: {exc}") from None


def owns_status(kind: Kind) -> bool:
    """Whether main-resource writes must leave ``status`` alone."""
    return kind.kind == "Namespace" or any(s.name == "status" for s in kind.subresources)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _body(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Everything but metadata and status: what a generation counts changes of."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "kind", "apiVersion")}


def _requests(container: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    res = container.get("resources")
    if not isinstance(res, Mapping):
        return {}
    value = res.get(key)
    return value if isinstance(value, Mapping) else {}


def pod_qos_class(pod: Mapping[str, Any]) -> str:
    """``v1qos.GetPodQOS`` for cpu and memory."""
    spec = pod.get("spec")
    if not isinstance(spec, Mapping):
        return "BestEffort"
    containers: list[Mapping[str, Any]] = []
    for key in ("containers", "initContainers"):
        value = spec.get(key)
        if isinstance(value, list):
            containers.extend(c for c in value if isinstance(c, Mapping))
    any_set = False
    guaranteed = bool(containers)
    for c in containers:
        requests, limits = _requests(c, "requests"), _requests(c, "limits")
        for res in ("cpu", "memory"):
            req, lim = requests.get(res), limits.get(res)
            if req is not None or lim is not None:
                any_set = True
            if lim is None:
                guaranteed = False
                continue
            try:
                if req is not None and parse_quantity(req) != parse_quantity(lim):
                    guaranteed = False
            except QuantityError:
                guaranteed = False
    if not any_set:
        return "BestEffort"
    return "Guaranteed" if guaranteed else "Burstable"


def prepare_create(kind: Kind, obj: Obj) -> None:
    """Reset what a create may not set (in place)."""
    name = kind.kind
    if name == "Pod":
        obj["status"] = {"phase": "Pending", "qosClass": pod_qos_class(obj)}
    elif name == "Service":
        obj["status"] = {"loadBalancer": {}}
    elif name == "Deployment":
        obj["status"] = {}
    elif name == "ReplicaSet":
        obj["status"] = {"replicas": 0}  # required (not omitempty) in ReplicaSetStatus
    elif name == "Namespace":
        obj["status"] = {"phase": "Active"}
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            spec = obj["spec"] = {}
        if not spec.get("finalizers"):
            spec["finalizers"] = [NAMESPACE_FINALIZER]


def prepare_update(kind: Kind, old: Mapping[str, Any], new: Obj) -> None:
    """Carry what the server owns from ``old`` into ``new`` (in place)."""
    meta = new.get("metadata")
    if not isinstance(meta, dict):
        meta = new["metadata"] = {}
    old_meta = _meta(old)
    for key in _SYSTEM_META:
        if key == "uid" and meta.get("uid"):
            continue  # a different uid is an immutable-field error, reported by validation
        if key in old_meta:
            meta[key] = old_meta[key]
        else:
            meta.pop(key, None)
    if owns_status(kind):
        if "status" in old:
            new["status"] = copy.deepcopy(old["status"])
        else:
            new.pop("status", None)
    if kind.kind == "Namespace":
        old_spec = old.get("spec")
        if isinstance(old_spec, Mapping):
            new["spec"] = copy.deepcopy(dict(old_spec))
    if kind.kind == "Service":
        drop_type_dependent_fields(old, new)
    generation = old_meta.get("generation")
    generation = generation if isinstance(generation, int) else 1
    if _body(old) != _body(new):
        generation += 1
    meta["generation"] = generation


def drop_type_dependent_fields(old: Mapping[str, Any], new: Obj) -> None:
    """Upstream's ``dropTypeDependentFields``: when a Service changes type, fields that
    only the old type allowed go, unless the update set them to something new."""
    spec, old_spec = new.get("spec"), old.get("spec")
    if not isinstance(spec, dict) or not isinstance(old_spec, Mapping):
        return
    new_type, old_type = spec.get("type"), old_spec.get("type")
    if new_type == old_type:
        return

    def drop_if_same(key: str) -> None:
        if key in spec and spec.get(key) == old_spec.get(key):
            spec.pop(key)

    node_port_types = ("NodePort", "LoadBalancer")
    if new_type not in node_port_types and old_type in node_port_types:
        drop_if_same("externalTrafficPolicy")
        drop_if_same("healthCheckNodePort")
        old_ports = {
            (p.get("port"), p.get("protocol")): p.get("nodePort")
            for p in old_spec.get("ports") or ()
            if isinstance(p, Mapping)
        }
        for port in spec.get("ports") or ():
            if isinstance(port, dict) and port.get("nodePort") == old_ports.get(
                (port.get("port"), port.get("protocol"))
            ):
                port.pop("nodePort", None)
    if new_type != "LoadBalancer" and old_type == "LoadBalancer":
        drop_if_same("allocateLoadBalancerNodePorts")
        drop_if_same("loadBalancerClass")
    if new_type == "ExternalName" and old_type != "ExternalName":
        for key in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"):
            drop_if_same(key)
        drop_if_same("internalTrafficPolicy")


def prepare_status_update(old: Mapping[str, Any], body: Mapping[str, Any]) -> Obj:
    """``old`` with only its ``status`` taken from ``body`` (a new dict)."""
    new = copy.deepcopy(dict(old))
    if "status" in body:
        new["status"] = copy.deepcopy(body["status"])
    else:
        new.pop("status", None)
    return new


def is_deleting(obj: Mapping[str, Any]) -> bool:
    return bool(_meta(obj).get("deletionTimestamp"))


def finalizers(obj: Mapping[str, Any]) -> list[str]:
    value = _meta(obj).get("finalizers")
    return [str(f) for f in value] if isinstance(value, list) else []


def ready_to_remove(kind: Kind, obj: Mapping[str, Any]) -> bool:
    """A deleting object with no finalizers left and no grace period still running."""
    if not is_deleting(obj) or finalizers(obj):
        return False
    if kind.kind == "Namespace":
        spec = obj.get("spec")
        if isinstance(spec, Mapping) and spec.get("finalizers"):
            return False
    grace = _meta(obj).get("deletionGracePeriodSeconds")
    return not (kind.kind == "Pod" and isinstance(grace, int) and grace > 0)


def check_kind(kind: Kind, obj: Mapping[str, Any], expect: str = "") -> str | None:
    """An error message if ``obj`` names another kind/apiVersion than the endpoint's."""
    want_kind = expect or kind.kind
    got_kind, got_version = obj.get("kind"), obj.get("apiVersion")
    if got_kind not in (None, "") and got_kind != want_kind:
        return f'the kind of the body ("{got_kind}") does not match the endpoint ("{want_kind}")'
    if want_kind == kind.kind and got_version not in (None, "", kind.api_version):
        return (
            f"the API version in the data ({got_version}) does not match the expected API "
            f"version ({kind.api_version})"
        )
    return None


def kind_of(group: str, resource: str) -> Kind:
    return kinds.by_resource(group, resource)
