"""Validation entry points: one call per kind, on create and on update.

Owns the dispatch from a kind to its validator (metadata first, then the kind's
own rules from :mod:`validation_networking`, :mod:`validation_pods`,
:mod:`validation_other`), the update rules (immutable metadata, Service cluster
IPs, workload selectors, EndpointSlice address type, Pod spec), and the raising of
one ``422 Invalid`` :class:`ApiError` whose causes carry upstream's field paths.

Invariants: validation never mutates the object and never raises anything but
:class:`ApiError`; run it on a defaulted object (``defaults.apply_defaults``), as
the apiserver does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from kproxy.api import fieldchecks as fc
from kproxy.api import kinds
from kproxy.api.errors import ApiError, FieldError
from kproxy.api.meta import validate_object_meta
from kproxy.api.validation_networking import (
    validate_endpoint_slice,
    validate_endpoints,
    validate_service,
)
from kproxy.api.validation_other import (
    validate_config_map,
    validate_deployment,
    validate_event,
    validate_lease,
    validate_namespace,
    validate_node,
    validate_replicaset,
)
from kproxy.api.validation_pods import validate_pod

Errs = list[FieldError]
Validator = Callable[[Mapping[str, Any]], Errs]


def _validate_scale(scale: Mapping[str, Any]) -> Errs:
    return fc.non_negative(fc.as_map(scale.get("spec")).get("replicas"), "spec.replicas")


def _validate_binding(binding: Mapping[str, Any]) -> Errs:
    target = fc.as_map(binding.get("target"))
    if not target.get("name"):
        return [FieldError.required("target.name")]
    return fc.dns_subdomain(target.get("name"), "target.name")


_VALIDATORS: dict[str, Validator] = {
    "Pod": validate_pod,
    "Endpoints": validate_endpoints,
    "EndpointSlice": validate_endpoint_slice,
    "Node": validate_node,
    "Namespace": validate_namespace,
    "Event": validate_event,
    "ConfigMap": validate_config_map,
    "Deployment": validate_deployment,
    "ReplicaSet": validate_replicaset,
    "Lease": validate_lease,
}


def errors_for(
    kind: str,
    obj: Any,
    *,
    node_port_range: tuple[int, int] | None = None,
    check_metadata: bool = True,
) -> Errs:
    """Every field error of ``obj`` (a ``kind``) as a create would see them."""
    if not isinstance(obj, Mapping):
        return [FieldError.invalid("", obj, "must be a JSON object")]
    errs: Errs = []
    if check_metadata:
        try:
            namespaced = kinds.by_kind(_group_of(kind), kind).namespaced
        except ApiError:
            namespaced = True
        errs.extend(validate_object_meta(obj.get("metadata"), kind=kind, namespaced=namespaced))
    if kind == "Service":
        errs.extend(validate_service(obj, node_port_range))
    elif kind == "Scale":
        errs.extend(_validate_scale(obj))
    elif kind == "Binding":
        errs.extend(_validate_binding(obj))
    else:
        validator = _VALIDATORS.get(kind)
        if validator is not None:
            errs.extend(validator(obj))
    return errs


def _group_of(kind: str) -> str:
    for k in kinds.KINDS:
        if k.kind == kind:
            return k.group
    return ""


def _name(obj: Any) -> str:
    meta = fc.as_map(fc.as_map(obj).get("metadata"))
    return str(meta.get("name") or meta.get("generateName") or "")


def validate(kind: str, obj: Any, *, node_port_range: tuple[int, int] | None = None) -> None:
    """Raise ``422 Invalid`` listing every problem of ``obj``; return when it is valid."""
    errs = errors_for(kind, obj, node_port_range=node_port_range)
    if errs:
        raise ApiError.invalid(kind, _name(obj), errs, _group_of(kind))


# ---------------------------------------------------------------- updates

_IMMUTABLE_META = ("name", "namespace", "uid", "creationTimestamp")


def _immutable(old: Any, new: Any, path: str) -> Errs:
    if old != new:
        return [FieldError.invalid(path, new, "field is immutable")]
    return []


def _update_rules(kind: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> Errs:
    errs: Errs = []
    old_meta, new_meta = fc.as_map(old.get("metadata")), fc.as_map(new.get("metadata"))
    for key in _IMMUTABLE_META:
        if old_meta.get(key):
            errs.extend(_immutable(old_meta.get(key), new_meta.get(key), f"metadata.{key}"))
    old_spec, new_spec = fc.as_map(old.get("spec")), fc.as_map(new.get("spec"))
    if kind == "Service":
        # Cluster IPs stay put unless the Service moves to or from ExternalName.
        changing_type = "ExternalName" in (old_spec.get("type"), new_spec.get("type"))
        if not changing_type and old_spec.get("clusterIP"):
            errs.extend(
                _immutable(old_spec.get("clusterIP"), new_spec.get("clusterIP"), "spec.clusterIP")
            )
    elif kind in ("Deployment", "ReplicaSet"):
        errs.extend(_immutable(old_spec.get("selector"), new_spec.get("selector"), "spec.selector"))
    elif kind == "EndpointSlice":
        errs.extend(_immutable(old.get("addressType"), new.get("addressType"), "addressType"))
    elif kind == "Pod":
        errs.extend(_pod_update_rules(old_spec, new_spec))
    return errs


# Fields of a pod spec an update may change (upstream ValidatePodUpdate).
_POD_MUTABLE = ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds")


def _pod_update_rules(old: Mapping[str, Any], new: Mapping[str, Any]) -> Errs:
    def stripped(spec: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in spec.items() if k not in _POD_MUTABLE}
        for key in ("containers", "initContainers"):
            out[key] = [
                {k: v for k, v in fc.as_map(c).items() if k != "image"}
                for c in fc.as_list(spec.get(key))
            ]
        # The binding sets nodeName once.
        if not old.get("nodeName"):
            out.pop("nodeName", None)
        return out

    if stripped(old) != stripped(new):
        return [
            FieldError.forbidden(
                "spec",
                "pod updates may not change fields other than `spec.containers[*].image`, "
                "`spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, "
                "`spec.tolerations` (only additions to existing tolerations) or "
                "`spec.terminationGracePeriodSeconds`",
            )
        ]
    return []


def validate_update(
    kind: str,
    old: Mapping[str, Any],
    new: Any,
    *,
    node_port_range: tuple[int, int] | None = None,
) -> None:
    """Raise ``422 Invalid`` if ``new`` is not valid or changes an immutable field."""
    errs = errors_for(kind, new, node_port_range=node_port_range)
    if isinstance(new, Mapping):
        errs.extend(_update_rules(kind, old, new))
    if errs:
        raise ApiError.invalid(kind, _name(new) or _name(old), errs, _group_of(kind))
