"""Server-side printing: ``meta.k8s.io/v1 Table`` for ``Accept: ...;as=Table``.

Owns the column definitions and cells per kind, after upstream's
``pkg/printers/internalversion`` (pods: NAME READY STATUS RESTARTS AGE, plus IP and
NODE with ``-o wide`` as priority-1 columns; services; nodes; deployments; ...) and a
NAME/AGE default for the rest. Each row carries ``PartialObjectMetadata`` so ``-A``
and ``--show-labels`` work.

Invariants: pure functions of the objects and "now"; a malformed object prints
blanks rather than failing the request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from kproxy.api.kinds import Kind
from kproxy.api.meta import parse_time

TABLE_CONTENT_TYPE = "application/json;as=Table;v=v1;g=meta.k8s.io"

Obj = Mapping[str, Any]
Column = tuple[str, str, int, str]  # name, type, priority, format
Cells = Callable[[Obj, datetime], list[Any]]


def wants_table(accept: str) -> bool:
    """Whether the first acceptable type the client lists is a meta.k8s.io Table."""
    for part in accept.split(","):
        params = {p.strip() for p in part.split(";")[1:]}
        if "as=Table" in params and "g=meta.k8s.io" in params:
            return True
        media = part.split(";")[0].strip()
        if media in ("application/json", "*/*", "application/*") and not params:
            return False
    return False


def _get(obj: Any, *path: str) -> Any:
    for part in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(part)
    return obj


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def human_duration(seconds: float) -> str:
    """``duration.HumanDuration``, as kubectl's AGE column."""
    if seconds < -1:
        return "<invalid>"
    s = max(int(seconds), 0)
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y{days}d" if days else f"{hours // 24 // 365}y"
    return f"{hours // 24 // 365}y"


def age(obj: Obj, now: datetime) -> str:
    created = _get(obj, "metadata", "creationTimestamp")
    if not isinstance(created, str):
        return "<unknown>"
    try:
        return human_duration((now - parse_time(created)).total_seconds())
    except ValueError:
        return "<unknown>"


def _name(obj: Obj) -> str:
    return str(_get(obj, "metadata", "name") or "")


# ------------------------------------------------------------------ per kind


def _pod_cells(pod: Obj, now: datetime) -> list[Any]:
    statuses = [
        s for s in _list(_get(pod, "status", "containerStatuses")) if isinstance(s, Mapping)
    ]
    total = len(_list(_get(pod, "spec", "containers")))
    ready = sum(1 for s in statuses if s.get("ready"))
    restarts = sum(int(s.get("restartCount") or 0) for s in statuses)
    reason = str(_get(pod, "status", "reason") or _get(pod, "status", "phase") or "")
    for s in statuses:
        waiting = _get(s, "state", "waiting", "reason")
        terminated = _get(s, "state", "terminated", "reason")
        if waiting:
            reason = str(waiting)
        elif terminated:
            reason = str(terminated)
    if _get(pod, "metadata", "deletionTimestamp"):
        reason = "Terminating"
    return [
        _name(pod),
        f"{ready}/{total}",
        reason,
        restarts,
        age(pod, now),
        _get(pod, "status", "podIP") or "<none>",
        _get(pod, "spec", "nodeName") or "<none>",
        _get(pod, "status", "nominatedNodeName") or "<none>",
        "<none>",
    ]


def _ports(svc: Obj) -> str:
    out = []
    for p in _list(_get(svc, "spec", "ports")):
        if not isinstance(p, Mapping):
            continue
        text = f"{p.get('port')}"
        if p.get("nodePort"):
            text += f":{p['nodePort']}"
        out.append(f"{text}/{p.get('protocol') or 'TCP'}")
    return ",".join(out) or "<none>"


def _selector(value: Any) -> str:
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "<none>"
    return "<none>"


def _service_cells(svc: Obj, now: datetime) -> list[Any]:
    kind = _get(svc, "spec", "type") or "ClusterIP"
    external = [
        i.get("ip") or i.get("hostname")
        for i in _list(_get(svc, "status", "loadBalancer", "ingress"))
        if isinstance(i, Mapping)
    ]
    external += [str(x) for x in _list(_get(svc, "spec", "externalIPs"))]
    if kind == "ExternalName":
        external = [str(_get(svc, "spec", "externalName") or "")]
    ext = ",".join(str(e) for e in external if e) or (
        "<pending>" if kind == "LoadBalancer" else "<none>"
    )
    return [
        _name(svc),
        kind,
        _get(svc, "spec", "clusterIP") or "<none>",
        ext,
        _ports(svc),
        age(svc, now),
        _selector(_get(svc, "spec", "selector")),
    ]


def _node_cells(node: Obj, now: datetime) -> list[Any]:
    status = "Unknown"
    for c in _list(_get(node, "status", "conditions")):
        if isinstance(c, Mapping) and c.get("type") == "Ready":
            status = "Ready" if c.get("status") == "True" else "NotReady"
    if _get(node, "spec", "unschedulable"):
        status += ",SchedulingDisabled"
    labels = _get(node, "metadata", "labels") or {}
    roles = sorted(
        k.split("/", 1)[1] for k in labels if k.startswith("node-role.kubernetes.io/") and "/" in k
    )
    addresses = {
        a.get("type"): a.get("address")
        for a in _list(_get(node, "status", "addresses"))
        if isinstance(a, Mapping)
    }
    info = _get(node, "status", "nodeInfo") or {}
    return [
        _name(node),
        status,
        ",".join(roles) or "<none>",
        age(node, now),
        _get(info, "kubeletVersion") or "",
        addresses.get("InternalIP") or "<none>",
        addresses.get("ExternalIP") or "<none>",
        _get(info, "osImage") or "<unknown>",
        _get(info, "kernelVersion") or "<unknown>",
        _get(info, "containerRuntimeVersion") or "<unknown>",
    ]


def _containers(obj: Obj) -> tuple[str, str]:
    cs = [
        c
        for c in _list(_get(obj, "spec", "template", "spec", "containers"))
        if isinstance(c, Mapping)
    ]
    return ",".join(str(c.get("name")) for c in cs), ",".join(str(c.get("image")) for c in cs)


def _label_selector(obj: Obj) -> str:
    sel = _get(obj, "spec", "selector", "matchLabels")
    return _selector(sel)


def _deployment_cells(d: Obj, now: datetime) -> list[Any]:
    want = _get(d, "spec", "replicas")
    names, images = _containers(d)
    return [
        _name(d),
        f"{_get(d, 'status', 'readyReplicas') or 0}/{want if want is not None else 1}",
        _get(d, "status", "updatedReplicas") or 0,
        _get(d, "status", "availableReplicas") or 0,
        age(d, now),
        names,
        images,
        _label_selector(d),
    ]


def _replicaset_cells(rs: Obj, now: datetime) -> list[Any]:
    names, images = _containers(rs)
    return [
        _name(rs),
        _get(rs, "spec", "replicas") or 0,
        _get(rs, "status", "replicas") or 0,
        _get(rs, "status", "readyReplicas") or 0,
        age(rs, now),
        names,
        images,
        _label_selector(rs),
    ]


def _namespace_cells(ns: Obj, now: datetime) -> list[Any]:
    return [_name(ns), _get(ns, "status", "phase") or "", age(ns, now)]


def _default_cells(obj: Obj, now: datetime) -> list[Any]:
    return [_name(obj), age(obj, now)]


_NAME: Column = ("Name", "string", 0, "name")
_AGE: Column = ("Age", "string", 0, "")
_PRINTERS: dict[str, tuple[Sequence[Column], Cells]] = {
    "Pod": (
        (
            _NAME,
            ("Ready", "string", 0, ""),
            ("Status", "string", 0, ""),
            ("Restarts", "string", 0, ""),
            _AGE,
            ("IP", "string", 1, ""),
            ("Node", "string", 1, ""),
            ("Nominated Node", "string", 1, ""),
            ("Readiness Gates", "string", 1, ""),
        ),
        _pod_cells,
    ),
    "Service": (
        (
            _NAME,
            ("Type", "string", 0, ""),
            ("Cluster-IP", "string", 0, ""),
            ("External-IP", "string", 0, ""),
            ("Port(s)", "string", 0, ""),
            _AGE,
            ("Selector", "string", 1, ""),
        ),
        _service_cells,
    ),
    "Node": (
        (
            _NAME,
            ("Status", "string", 0, ""),
            ("Roles", "string", 0, ""),
            _AGE,
            ("Version", "string", 0, ""),
            ("Internal-IP", "string", 1, ""),
            ("External-IP", "string", 1, ""),
            ("OS-Image", "string", 1, ""),
            ("Kernel-Version", "string", 1, ""),
            ("Container-Runtime", "string", 1, ""),
        ),
        _node_cells,
    ),
    "Deployment": (
        (
            _NAME,
            ("Ready", "string", 0, ""),
            ("Up-to-date", "integer", 0, ""),
            ("Available", "integer", 0, ""),
            _AGE,
            ("Containers", "string", 1, ""),
            ("Images", "string", 1, ""),
            ("Selector", "string", 1, ""),
        ),
        _deployment_cells,
    ),
    "ReplicaSet": (
        (
            _NAME,
            ("Desired", "integer", 0, ""),
            ("Current", "integer", 0, ""),
            ("Ready", "integer", 0, ""),
            _AGE,
            ("Containers", "string", 1, ""),
            ("Images", "string", 1, ""),
            ("Selector", "string", 1, ""),
        ),
        _replicaset_cells,
    ),
    "Namespace": ((_NAME, ("Status", "string", 0, ""), _AGE), _namespace_cells),
}
_DEFAULT: tuple[Sequence[Column], Cells] = ((_NAME, _AGE), _default_cells)


def _column(col: Column) -> dict[str, Any]:
    name, typ, priority, fmt = col
    return {"name": name, "type": typ, "format": fmt, "description": name, "priority": priority}


def _partial(obj: Obj) -> dict[str, Any]:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), Mapping) else {}
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta}


def table(
    kind: Kind,
    objects: Sequence[Obj],
    *,
    resource_version: str = "",
    continue_token: str = "",
    columns: bool = True,
    now: datetime | None = None,
) -> dict[str, Any]:
    """A ``Table`` of ``objects`` of ``kind`` (``columns=False``: rows only, for watches)."""
    now = now or datetime.now(UTC)
    cols, cells = _PRINTERS.get(kind.kind, _DEFAULT)
    rows = []
    for obj in objects:
        try:
            row = cells(obj, now)
        except (TypeError, ValueError, AttributeError):
            row = [_name(obj)] + [""] * (len(cols) - 1)
        rows.append({"cells": row, "object": _partial(obj)})
    meta: dict[str, Any] = {}
    if resource_version:
        meta["resourceVersion"] = resource_version
    if continue_token:
        meta["continue"] = continue_token
    out: dict[str, Any] = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta}
    out["columnDefinitions"] = [_column(c) for c in cols] if columns else None
    out["rows"] = rows
    return out
