"""Reading a Pod object the way the kubelet needs it (pure).

Owns the container environment (:func:`container_env`: ``env`` values and
``fieldRef`` lookups, plus the variables every container gets), named ports
(:func:`named_ports`), grace periods (:func:`grace_period`) and the small accessors
the worker uses. A reference the kubelet cannot resolve (a ConfigMap or Secret key,
an unknown field path) raises :class:`PodSpecError`, which the worker reports as
``CreateContainerConfigError`` rather than starting the container with a wrong env.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kproxy.errors import KProxyError

Obj = dict[str, Any]
DEFAULT_GRACE = 30.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Where the ``kproxy`` package lives, so ``python -m kproxy.images.*`` works from a checkout.
KPROXY_ROOT = str(Path(__file__).resolve().parents[2])

_LABEL_REF = re.compile(r"^metadata\.(labels|annotations)\['([^']+)'\]$")


class PodSpecError(KProxyError):
    """A container setting the kubelet cannot honour."""


def meta(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    m = pod.get("metadata")
    return m if isinstance(m, Mapping) else {}


def spec(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    s = pod.get("spec")
    return s if isinstance(s, Mapping) else {}


def pod_key(pod: Mapping[str, Any]) -> str:
    m = meta(pod)
    return f"{m.get('namespace') or 'default'}/{m.get('name')}"


def is_terminating(pod: Mapping[str, Any]) -> bool:
    return bool(meta(pod).get("deletionTimestamp"))


def grace_period(pod: Mapping[str, Any], *, deleting: bool) -> float:
    """Seconds between SIGTERM and SIGKILL: the deletion's grace, else the pod's."""
    if deleting:
        value = meta(pod).get("deletionGracePeriodSeconds")
        if isinstance(value, int | float) and value >= 0:
            return float(value)
    value = spec(pod).get("terminationGracePeriodSeconds")
    if isinstance(value, int | float) and value >= 0:
        return float(value)
    return DEFAULT_GRACE


def named_ports(container: Mapping[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for port in container.get("ports") or ():
        if isinstance(port, Mapping) and port.get("name") and port.get("containerPort"):
            out[str(port["name"])] = int(port["containerPort"])
    return out


def field_value(pod: Mapping[str, Any], path: str, pod_ip: str, host_ip: str) -> str:
    m, s = meta(pod), spec(pod)
    simple = {
        "metadata.name": m.get("name"),
        "metadata.namespace": m.get("namespace"),
        "metadata.uid": m.get("uid"),
        "spec.nodeName": s.get("nodeName"),
        "spec.serviceAccountName": s.get("serviceAccountName"),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in simple:
        return str(simple[path] or "")
    match = _LABEL_REF.match(path)
    if match:
        return str((m.get(match.group(1)) or {}).get(match.group(2)) or "")
    raise PodSpecError(f"unsupported fieldRef.fieldPath {path!r}")


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\$")


def expand(text: str, env: Mapping[str, str]) -> str:
    """``$(VAR)`` expansion as the kubelet does for env, command and args (``$$`` → ``$``)."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR.sub(sub, text)


def container_env(
    pod: Mapping[str, Any], container: Mapping[str, Any], *, pod_ip: str, host_ip: str
) -> dict[str, str]:
    env: dict[str, str] = {
        "PATH": DEFAULT_PATH,
        "HOSTNAME": str(meta(pod).get("name") or ""),
        "PYTHONPATH": KPROXY_ROOT,
        "PYTHONUNBUFFERED": "1",
    }
    for var in container.get("env") or ():
        if not isinstance(var, Mapping) or not var.get("name"):
            continue
        name = str(var["name"])
        if "value" in var:
            env[name] = expand(str(var.get("value") or ""), env)
            continue
        source = var.get("valueFrom") or {}
        if isinstance(source, Mapping) and isinstance(source.get("fieldRef"), Mapping):
            env[name] = field_value(pod, str(source["fieldRef"].get("fieldPath")), pod_ip, host_ip)
        elif source:
            kinds = ", ".join(sorted(source)) if isinstance(source, Mapping) else "?"
            raise PodSpecError(f"env {name}: valueFrom {kinds} is not supported by kproxy")
        else:
            env[name] = ""
    return env
