"""Validation of Node, Namespace, Event, ConfigMap, Lease, Deployment and ReplicaSet.

Owns the upstream rules for these kinds that the controllers, scheduler and
kubelet depend on: node pod CIDRs, taints and addresses; namespace finalizers and
phase; event/involvedObject consistency; config map keys and size; lease timings;
and workloads' replicas, selector (required, non-empty, matching the template's
labels), strategy and deadlines.

Invariant: returns field errors for arbitrary JSON; never raises.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from kproxy.api import fieldchecks as fc
from kproxy.api import selectors
from kproxy.api.errors import ApiError, FieldError
from kproxy.api.validation_pods import TAINT_EFFECTS, validate_pod_template

Errs = list[FieldError]

NODE_ADDRESS_TYPES = ("Hostname", "ExternalIP", "InternalIP", "ExternalDNS", "InternalDNS")
NAMESPACE_PHASES = ("Active", "Terminating")
EVENT_TYPES = ("Normal", "Warning")
CONFIG_MAP_MAX_BYTES = 1024 * 1024
_CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")


def validate_node(node: Mapping[str, Any]) -> Errs:
    errs: Errs = []
    spec = fc.as_map(node.get("spec"))
    cidrs = fc.as_list(spec.get("podCIDRs"))
    if spec.get("podCIDR") and cidrs and cidrs[0] != spec.get("podCIDR"):
        errs.append(FieldError.invalid("spec.podCIDRs", cidrs, "first value must match podCIDR"))
    if spec.get("podCIDR"):
        errs.extend(fc.cidr(spec.get("podCIDR"), "spec.podCIDR"))
    for i, value in enumerate(cidrs):
        errs.extend(fc.cidr(value, f"spec.podCIDRs[{i}]"))
    if len(cidrs) > 2:
        errs.append(FieldError.too_many("spec.podCIDRs", len(cidrs), 2))
    seen: set[tuple[Any, Any]] = set()
    for i, taint in enumerate(fc.as_list(spec.get("taints"))):
        p = f"spec.taints[{i}]"
        taint = fc.as_map(taint)
        if not taint.get("key"):
            errs.append(FieldError.required(f"{p}.key"))
        else:
            errs.extend(fc.qualified_name(taint.get("key"), f"{p}.key"))
        if taint.get("value"):
            errs.extend(fc.label_value(taint.get("value"), f"{p}.value"))
        errs.extend(fc.enum(taint.get("effect"), f"{p}.effect", TAINT_EFFECTS))
        key = (taint.get("key"), taint.get("effect"))
        if key in seen:
            errs.append(FieldError.duplicate(p, {"key": key[0], "effect": key[1]}))
        seen.add(key)
    status = fc.as_map(node.get("status"))
    for i, addr in enumerate(fc.as_list(status.get("addresses"))):
        errs.extend(
            fc.enum(fc.as_map(addr).get("type"), f"status.addresses[{i}].type", NODE_ADDRESS_TYPES)
        )
    errs.extend(fc.quantity_map(status.get("capacity"), "status.capacity"))
    errs.extend(fc.quantity_map(status.get("allocatable"), "status.allocatable"))
    return errs


def validate_namespace(ns: Mapping[str, Any]) -> Errs:
    errs: Errs = []
    for i, fin in enumerate(fc.as_list(fc.as_map(ns.get("spec")).get("finalizers"))):
        errs.extend(fc.qualified_name(fin, f"spec.finalizers[{i}]"))
    phase = fc.as_map(ns.get("status")).get("phase")
    errs.extend(fc.enum(phase, "status.phase", NAMESPACE_PHASES, required=False))
    return errs


def validate_event(event: Mapping[str, Any]) -> Errs:
    errs: Errs = []
    involved = event.get("involvedObject")
    if not isinstance(involved, Mapping):
        return [FieldError.required("involvedObject")]
    namespace = fc.as_map(event.get("metadata")).get("namespace") or ""
    involved_ns = involved.get("namespace") or ""
    if involved_ns and involved_ns != namespace:
        errs.append(
            FieldError.invalid(
                "involvedObject.namespace", involved_ns, "does not match event.namespace"
            )
        )
    errs.extend(fc.enum(event.get("type"), "type", EVENT_TYPES, required=False))
    count = event.get("count")
    if count is not None:
        errs.extend(fc.non_negative(count, "count"))
    return errs


def validate_config_map(cm: Mapping[str, Any]) -> Errs:
    errs: Errs = []
    total = 0
    data = cm.get("data")
    binary = cm.get("binaryData")
    for section, values in (("data", data), ("binaryData", binary)):
        if values is not None and not isinstance(values, Mapping):
            errs.append(FieldError.invalid(section, values, "must be a map"))
            continue
        for key, value in fc.as_map(values).items():
            if len(key) > 253 or not _CONFIG_KEY.fullmatch(key):
                errs.append(
                    FieldError.invalid(
                        section,
                        key,
                        "a valid config key must consist of alphanumeric characters, '-', '_' "
                        "or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used "
                        "for validation is '[-._a-zA-Z0-9]+')",
                    )
                )
            if not isinstance(value, str):
                errs.append(FieldError.invalid(f"{section}[{key}]", value, "must be a string"))
                continue
            total += len(value)
    for key in set(fc.as_map(data)) & set(fc.as_map(binary)):
        errs.append(FieldError.invalid("data", key, "duplicate of key present in binaryData"))
    if total > CONFIG_MAP_MAX_BYTES:
        errs.append(FieldError.too_long("", CONFIG_MAP_MAX_BYTES))
    return errs


def validate_lease(lease: Mapping[str, Any]) -> Errs:
    spec = fc.as_map(lease.get("spec"))
    errs = fc.positive(spec.get("leaseDurationSeconds"), "spec.leaseDurationSeconds")
    errs.extend(fc.non_negative(spec.get("leaseTransitions"), "spec.leaseTransitions"))
    return errs


# ------------------------------------------------------------------ workloads

_PERCENT = re.compile(r"[0-9]+%")


def _int_or_percent(value: Any, path: str) -> Errs:
    if fc.is_int(value):
        return fc.non_negative(value, path)
    if isinstance(value, str) and _PERCENT.fullmatch(value):
        if int(value[:-1]) > 100:
            return [FieldError.invalid(path, value, "must not be greater than 100%")]
        return []
    return [
        FieldError.invalid(
            path,
            value,
            "a valid percent string must be a numeric string followed by an ending '%' "
            "(e.g. '1%',  or '93%', regex used for validation is '[0-9]+%')",
        )
    ]


def _is_zero(value: Any) -> bool:
    return (fc.is_int(value) and value == 0) or value == "0%"


def _validate_selector_and_template(spec: Mapping[str, Any], kind: str) -> Errs:
    errs: Errs = []
    errs.extend(fc.non_negative(spec.get("replicas"), "spec.replicas"))
    errs.extend(fc.non_negative(spec.get("minReadySeconds"), "spec.minReadySeconds"))
    selector = spec.get("selector")
    template = spec.get("template")
    if selector is None:
        errs.append(FieldError.required("spec.selector"))
    else:
        sel_errs = selectors.validate_label_selector(selector, "spec.selector")
        errs.extend(sel_errs)
        if not sel_errs:
            try:
                parsed = selectors.from_label_selector(selector)
            except ApiError as err:
                errs.append(FieldError.invalid("spec.selector", selector, err.message))
            else:
                if parsed.empty:
                    errs.append(
                        FieldError.invalid(
                            "spec.selector", selector, f"empty selector is invalid for {kind}"
                        )
                    )
                labels = fc.as_map(fc.as_map(template).get("metadata")).get("labels")
                if not parsed.empty and not parsed.matches(fc.as_map(labels)):
                    errs.append(
                        FieldError.invalid(
                            "spec.template.metadata.labels",
                            labels,
                            "`selector` does not match template `labels`",
                        )
                    )
    errs.extend(validate_pod_template(template, "spec.template"))
    return errs


def validate_deployment(deploy: Mapping[str, Any]) -> Errs:
    spec = deploy.get("spec")
    if not isinstance(spec, Mapping):
        return [FieldError.required("spec")]
    errs = _validate_selector_and_template(spec, "deployment")
    strategy = fc.as_map(spec.get("strategy"))
    kind = strategy.get("type")
    errs.extend(fc.enum(kind, "spec.strategy.type", ("Recreate", "RollingUpdate")))
    rolling = strategy.get("rollingUpdate")
    if kind == "Recreate" and rolling is not None:
        errs.append(
            FieldError.forbidden(
                "spec.strategy.rollingUpdate",
                "may not be specified when strategy `type` is 'Recreate'",
            )
        )
    elif kind == "RollingUpdate":
        rolling = fc.as_map(rolling)
        surge, unavailable = rolling.get("maxSurge"), rolling.get("maxUnavailable")
        p = "spec.strategy.rollingUpdate"
        errs.extend(_int_or_percent(surge, f"{p}.maxSurge"))
        errs.extend(_int_or_percent(unavailable, f"{p}.maxUnavailable"))
        if _is_zero(surge) and _is_zero(unavailable):
            errs.append(
                FieldError.invalid(
                    f"{p}.maxUnavailable", unavailable, "may not be 0 when `maxSurge` is 0"
                )
            )
    errs.extend(fc.non_negative(spec.get("revisionHistoryLimit"), "spec.revisionHistoryLimit"))
    deadline = spec.get("progressDeadlineSeconds")
    errs.extend(fc.positive(deadline, "spec.progressDeadlineSeconds"))
    min_ready = spec.get("minReadySeconds") or 0
    if fc.is_int(deadline) and fc.is_int(min_ready) and deadline <= min_ready:
        errs.append(
            FieldError.invalid(
                "spec.progressDeadlineSeconds", deadline, "must be greater than minReadySeconds"
            )
        )
    return errs


def validate_replicaset(rs: Mapping[str, Any]) -> Errs:
    spec = rs.get("spec")
    if not isinstance(spec, Mapping):
        return [FieldError.required("spec")]
    return _validate_selector_and_template(spec, "replicaset")
