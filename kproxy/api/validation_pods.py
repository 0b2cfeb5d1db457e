"""Validation of Pods and pod templates (containers, ports, env, probes, resources).

Owns the parts of upstream's ``ValidatePodSpec`` a kubelet and scheduler rely on:
containers (name, image, ports, env, volume mounts, probes, resources), restart
and DNS policies, volumes' names, tolerations, node selector, grace periods.
``validate_pod_spec`` takes the path prefix so Deployments and ReplicaSets reuse it
for ``spec.template.spec``.

Invariant: returns field errors for arbitrary JSON; never raises.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from kproxy.api import fieldchecks as fc
from kproxy.api.errors import FieldError
from kproxy.api.meta import validate_labels
from kproxy.api.quantity import is_quantity, parse_quantity

Errs = list[FieldError]

RESTART_POLICIES = ("Always", "OnFailure", "Never")
DNS_POLICIES = ("ClusterFirstWithHostNet", "ClusterFirst", "Default", "None")
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
TERMINATION_MESSAGE_POLICIES = ("File", "FallbackToLogsOnError")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
TOLERATION_OPERATORS = ("Exists", "Equal")
URI_SCHEMES = ("HTTP", "HTTPS")

_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_ENV_NAME_MESSAGE = (
    "a valid environment variable name must consist of alphabetic characters, digits, '_', "
    "'-', or '.', and must not start with a digit (e.g. 'my.env-name',  or 'MY_ENV.NAME',  or "
    "'MyEnvName1', regex used for validation is '[-._a-zA-Z][-._a-zA-Z0-9]*')"
)
_PROBE_HANDLERS = ("exec", "httpGet", "tcpSocket", "grpc")


def _validate_probe(probe: Any, path: str, *, must_succeed_once: bool) -> Errs:
    if probe is None:
        return []
    if not isinstance(probe, Mapping):
        return [FieldError.invalid(path, probe, "must be an object")]
    errs: Errs = []
    handlers = [h for h in _PROBE_HANDLERS if probe.get(h) is not None]
    if not handlers:
        errs.append(FieldError.required(path, "must specify a handler type"))
    elif len(handlers) > 1:
        errs.append(
            FieldError.forbidden(
                f"{path}.{handlers[1]}", "may not specify more than 1 handler type"
            )
        )
    for h in handlers[:1]:
        action = fc.as_map(probe.get(h))
        hp = f"{path}.{h}"
        if h == "exec":
            if not fc.as_list(action.get("command")):
                errs.append(FieldError.required(f"{hp}.command"))
        elif h == "grpc":
            errs.extend(fc.port_number(action.get("port"), f"{hp}.port"))
        else:
            errs.extend(fc.port_num_or_name(action.get("port"), f"{hp}.port"))
            if h == "httpGet":
                errs.extend(fc.enum(action.get("scheme"), f"{hp}.scheme", URI_SCHEMES))
    for key in ("initialDelaySeconds", "timeoutSeconds", "periodSeconds", "failureThreshold"):
        errs.extend(fc.non_negative(probe.get(key), f"{path}.{key}"))
    for key in ("periodSeconds", "timeoutSeconds", "failureThreshold", "successThreshold"):
        value = probe.get(key)
        if fc.is_int(value) and value < 1:
            errs.append(FieldError.invalid(f"{path}.{key}", value, "must be greater than 0"))
    success = probe.get("successThreshold")
    if must_succeed_once and success not in (None, 1):
        errs.append(FieldError.invalid(f"{path}.successThreshold", success, "must be 1"))
    return errs


def _validate_resources(resources: Any, path: str) -> Errs:
    if resources is None:
        return []
    res = fc.as_map(resources)
    errs = fc.quantity_map(res.get("limits"), f"{path}.limits")
    errs.extend(fc.quantity_map(res.get("requests"), f"{path}.requests"))
    if errs:
        return errs
    limits = fc.as_map(res.get("limits"))
    for name, request in fc.as_map(res.get("requests")).items():
        if name in limits and parse_quantity(request) > parse_quantity(limits[name]):
            errs.append(
                FieldError.invalid(
                    f"{path}.requests[{name}]",
                    request,
                    f"must be less than or equal to {name} limit of {limits[name]}",
                )
            )
    for section in ("limits", "requests"):
        for name, q in fc.as_map(res.get(section)).items():
            if is_quantity(q) and parse_quantity(q) < 0:
                errs.append(
                    FieldError.invalid(
                        f"{path}.{section}[{name}]", q, "must be greater than or equal to 0"
                    )
                )
    return errs


def _validate_container(c: Any, path: str, volumes: set[str], *, init: bool) -> Errs:
    if not isinstance(c, Mapping):
        return [FieldError.invalid(path, c, "must be an object")]
    errs: Errs = []
    name = c.get("name")
    if not name:
        errs.append(FieldError.required(f"{path}.name"))
    else:
        errs.extend(fc.dns_label(name, f"{path}.name"))
    if not c.get("image"):
        errs.append(FieldError.required(f"{path}.image"))
    errs.extend(fc.enum(c.get("imagePullPolicy"), f"{path}.imagePullPolicy", PULL_POLICIES))
    errs.extend(
        fc.enum(
            c.get("terminationMessagePolicy"),
            f"{path}.terminationMessagePolicy",
            TERMINATION_MESSAGE_POLICIES,
            required=False,
        )
    )
    port_names: set[Any] = set()
    for i, port in enumerate(fc.as_list(c.get("ports"))):
        p = f"{path}.ports[{i}]"
        port = fc.as_map(port)
        if port.get("containerPort") in (None, 0):
            errs.append(FieldError.required(f"{p}.containerPort"))
        else:
            errs.extend(fc.port_number(port.get("containerPort"), f"{p}.containerPort"))
        if port.get("hostPort") not in (None, 0):
            errs.extend(fc.port_number(port.get("hostPort"), f"{p}.hostPort"))
        if port.get("name"):
            errs.extend(fc.port_name(port.get("name"), f"{p}.name"))
            if port.get("name") in port_names:
                errs.append(FieldError.duplicate(f"{p}.name", port.get("name")))
            port_names.add(port.get("name"))
        errs.extend(fc.protocol(port.get("protocol"), f"{p}.protocol"))
    for i, env in enumerate(fc.as_list(c.get("env"))):
        p = f"{path}.env[{i}]"
        env_name = fc.as_map(env).get("name")
        if not env_name:
            errs.append(FieldError.required(f"{p}.name"))
        elif not isinstance(env_name, str) or not _ENV_NAME.fullmatch(env_name):
            errs.append(FieldError.invalid(f"{p}.name", env_name, _ENV_NAME_MESSAGE))
    mount_paths: set[Any] = set()
    for i, mount in enumerate(fc.as_list(c.get("volumeMounts"))):
        p = f"{path}.volumeMounts[{i}]"
        mount = fc.as_map(mount)
        if not mount.get("name"):
            errs.append(FieldError.required(f"{p}.name"))
        elif mount.get("name") not in volumes:
            errs.append(FieldError.not_found(f"{p}.name", mount.get("name")))
        if not mount.get("mountPath"):
            errs.append(FieldError.required(f"{p}.mountPath"))
        elif mount.get("mountPath") in mount_paths:
            errs.append(
                FieldError.invalid(f"{p}.mountPath", mount.get("mountPath"), "must be unique")
            )
        mount_paths.add(mount.get("mountPath"))
    errs.extend(_validate_resources(c.get("resources"), f"{path}.resources"))
    if init:
        # Regular init containers run to completion; probes make no sense on them.
        for key in ("livenessProbe", "readinessProbe", "startupProbe"):
            if c.get(key) is not None and c.get("restartPolicy") != "Always":
                errs.append(
                    FieldError.forbidden(f"{path}.{key}", "may not be set for init containers")
                )
    else:
        errs.extend(
            _validate_probe(c.get("livenessProbe"), f"{path}.livenessProbe", must_succeed_once=True)
        )
        errs.extend(
            _validate_probe(c.get("startupProbe"), f"{path}.startupProbe", must_succeed_once=True)
        )
        errs.extend(
            _validate_probe(
                c.get("readinessProbe"), f"{path}.readinessProbe", must_succeed_once=False
            )
        )
    return errs


def _validate_tolerations(tolerations: Any, path: str) -> Errs:
    errs: Errs = []
    for i, tol in enumerate(fc.as_list(tolerations)):
        p = f"{path}[{i}]"
        tol = fc.as_map(tol)
        key = tol.get("key") or ""
        if key:
            errs.extend(fc.qualified_name(key, f"{p}.key"))
        operator = tol.get("operator") or "Equal"
        if not key and operator != "Exists":
            errs.append(
                FieldError.invalid(
                    f"{p}.operator",
                    operator,
                    "operator must be Exists when `key` is empty, "
                    'which means "match all values and all keys"',
                )
            )
        if operator == "Exists" and tol.get("value"):
            errs.append(
                FieldError.invalid(
                    f"{p}.operator",
                    tol.get("value"),
                    "value must be empty when `operator` is 'Exists'",
                )
            )
        elif operator not in TOLERATION_OPERATORS:
            errs.append(FieldError.not_supported(f"{p}.operator", operator, TOLERATION_OPERATORS))
        elif tol.get("value"):
            errs.extend(fc.label_value(tol.get("value"), f"{p}.value"))
        effect = tol.get("effect")
        if effect:
            errs.extend(fc.enum(effect, f"{p}.effect", TAINT_EFFECTS))
        if tol.get("tolerationSeconds") is not None and effect != "NoExecute":
            errs.append(
                FieldError.invalid(
                    f"{p}.effect",
                    effect,
                    "effect must be 'NoExecute' when `tolerationSeconds` is set",
                )
            )
    return errs


def validate_pod_spec(spec: Any, path: str = "spec") -> Errs:
    if not isinstance(spec, Mapping):
        return [FieldError.required(path)]
    errs: Errs = []
    volumes: set[str] = set()
    for i, vol in enumerate(fc.as_list(spec.get("volumes"))):
        p = f"{path}.volumes[{i}]"
        name = fc.as_map(vol).get("name")
        if not name:
            errs.append(FieldError.required(f"{p}.name"))
            continue
        errs.extend(fc.dns_label(name, f"{p}.name"))
        if name in volumes:
            errs.append(FieldError.duplicate(f"{p}.name", name))
        volumes.add(str(name))
    containers = spec.get("containers")
    if not fc.as_list(containers):
        errs.append(FieldError.required(f"{path}.containers"))
    names: set[Any] = set()
    for key, init in (("initContainers", True), ("containers", False)):
        for i, c in enumerate(fc.as_list(spec.get(key))):
            p = f"{path}.{key}[{i}]"
            errs.extend(_validate_container(c, p, volumes, init=init))
            name = fc.as_map(c).get("name")
            # A non-string name is reported by _validate_container; only strings
            # can collide (and only they are hashable).
            if isinstance(name, str) and name:
                if name in names:
                    errs.append(FieldError.duplicate(f"{p}.name", name))
                names.add(name)
    errs.extend(fc.enum(spec.get("restartPolicy"), f"{path}.restartPolicy", RESTART_POLICIES))
    dns_policy = spec.get("dnsPolicy")
    errs.extend(fc.enum(dns_policy, f"{path}.dnsPolicy", DNS_POLICIES))
    if dns_policy == "None" and spec.get("dnsConfig") is None:
        errs.append(
            FieldError.required(
                f"{path}.dnsConfig", "must provide `dnsConfig` when `dnsPolicy` is None"
            )
        )
    errs.extend(
        fc.non_negative(
            spec.get("terminationGracePeriodSeconds"), f"{path}.terminationGracePeriodSeconds"
        )
    )
    errs.extend(fc.positive(spec.get("activeDeadlineSeconds"), f"{path}.activeDeadlineSeconds"))
    if spec.get("nodeName"):
        errs.extend(fc.dns_subdomain(spec.get("nodeName"), f"{path}.nodeName"))
    for key in ("hostname", "subdomain"):
        if spec.get(key):
            errs.extend(fc.dns_label(spec.get(key), f"{path}.{key}"))
    errs.extend(validate_labels(spec.get("nodeSelector"), f"{path}.nodeSelector"))
    errs.extend(_validate_tolerations(spec.get("tolerations"), f"{path}.tolerations"))
    if spec.get("serviceAccountName"):
        errs.extend(fc.dns_subdomain(spec.get("serviceAccountName"), f"{path}.serviceAccountName"))
    return errs


def validate_pod(pod: Mapping[str, Any]) -> Errs:
    return validate_pod_spec(pod.get("spec"), "spec")


def validate_pod_template(template: Any, path: str) -> Errs:
    """A workload's ``spec.template``: labels plus a pod spec that restarts Always."""
    if not isinstance(template, Mapping):
        return [FieldError.required(path)]
    errs = validate_labels(
        fc.as_map(template.get("metadata")).get("labels"), f"{path}.metadata.labels"
    )
    spec = template.get("spec")
    errs.extend(validate_pod_spec(spec, f"{path}.spec"))
    policy = fc.as_map(spec).get("restartPolicy")
    if policy not in (None, "", "Always") and policy in RESTART_POLICIES:
        errs.append(FieldError.not_supported(f"{path}.spec.restartPolicy", policy, ["Always"]))
    return errs
