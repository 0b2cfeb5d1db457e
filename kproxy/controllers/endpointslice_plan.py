"""What a Service's EndpointSlices and legacy Endpoints should hold (pure, no I/O).

Owns the computation :mod:`.endpointslice` applies: :func:`desired_groups` (endpoints
per address type and resolved port set), :func:`plan_slices` (create/update/delete
against the existing slices) and :func:`desired_endpoints` (the mirrored ``Endpoints``).

Semantics (upstream ``endpointslice`` reconciler, ``podToEndpoint`` and
``ShouldPodBeInEndpoints``):

- a pod counts when it matches the selector, is not terminal and has an IP of the
  slice's family; terminating pods stay in slices (``terminating=true``);
- ``serving`` = pod Ready, ``terminating`` = deletionTimestamp set, ``ready`` =
  ``publishNotReadyAddresses or (serving and not terminating)``;
- each endpoint carries ``nodeName``, ``zone`` (the node's
  ``topology.kubernetes.io/zone``), ``targetRef`` (the Pod) and a hostname for pods of
  a headless service's subdomain; named targetPorts are resolved per pod, and pods
  whose ports resolve differently land in different slices;
- unnamed ports are ``"name": ""`` (what the proxy expects), never missing;
- at most ``max_endpoints_per_slice`` endpoints per slice; a service without any
  endpoint keeps one empty placeholder slice.

Invariant (minimal churn): existing slices are updated in place — an endpoint that is
still wanted stays in the slice that holds it, free room is filled before a new slice
is made, and a slice that would not change is not written.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kproxy.api.selectors import from_set
from kproxy.client.informer import object_key

log = logging.getLogger(__name__)

Obj = dict[str, Any]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
CONTROLLER_NAME = "endpointslice-controller.k8s.io"
HEADLESS_LABEL = "service.kubernetes.io/headless"
SKIP_MIRROR_LABEL = "endpointslice.kubernetes.io/skip-mirror"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
ZONE_LABEL = "topology.kubernetes.io/zone"
SLICE_API_VERSION = "discovery.k8s.io/v1"
_NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # upstream's generateName alphabet


# ----------------------------------------------------------------- pod facts


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def is_pod_ready(pod: Mapping[str, Any]) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or ():
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def is_terminating(obj: Mapping[str, Any]) -> bool:
    return bool(_meta(obj).get("deletionTimestamp"))


def pod_ips(pod: Mapping[str, Any]) -> list[str]:
    status = pod.get("status") or {}
    ips = [str(p.get("ip")) for p in status.get("podIPs") or () if p.get("ip")]
    if not ips and status.get("podIP"):
        ips = [str(status["podIP"])]
    return ips


def _family(ip: str) -> str | None:
    try:
        return "IPv6" if ipaddress.ip_address(ip).version == 6 else "IPv4"
    except ValueError:
        return None


def should_include(pod: Mapping[str, Any], include_terminating: bool) -> bool:
    """``ShouldPodBeInEndpoints``: not terminal, has an IP, terminating only on request."""
    phase = (pod.get("status") or {}).get("phase")
    if phase in ("Succeeded", "Failed"):
        return False
    if not pod_ips(pod):
        return False
    return include_terminating or not is_terminating(pod)


def address_types(service: Mapping[str, Any]) -> list[str]:
    """The families a service's slices are made for: ``ipFamilies``, else its clusterIP."""
    spec = service.get("spec") or {}
    fams = [str(f) for f in spec.get("ipFamilies") or () if f in ("IPv4", "IPv6")]
    if fams:
        return fams
    fam = _family(str(spec.get("clusterIP") or ""))
    return [fam] if fam else ["IPv4"]


def is_headless(service: Mapping[str, Any]) -> bool:
    return (service.get("spec") or {}).get("clusterIP") == "None"


def find_port(pod: Mapping[str, Any], service_port: Mapping[str, Any]) -> int | None:
    """``podutil.FindPort``: a numeric targetPort as is, a named one from the containers."""
    target = service_port.get("targetPort", service_port.get("port"))
    protocol = service_port.get("protocol") or "TCP"
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    for container in (pod.get("spec") or {}).get("containers") or ():
        for cport in container.get("ports") or ():
            if cport.get("name") == target and (cport.get("protocol") or "TCP") == protocol:
                value = cport.get("containerPort")
                return value if isinstance(value, int) else None
    return None


def endpoint_ports(service: Mapping[str, Any], pod: Mapping[str, Any]) -> list[Obj]:
    out: list[Obj] = []
    for sp in (service.get("spec") or {}).get("ports") or ():
        port = find_port(pod, sp)
        if port is None:
            log.debug("service port %s has no match in pod %s", sp.get("name"), object_key(pod))
            continue
        ep: Obj = {"name": str(sp.get("name") or ""), "port": port}
        ep["protocol"] = sp.get("protocol") or "TCP"
        if sp.get("appProtocol"):
            ep["appProtocol"] = sp["appProtocol"]
        out.append(ep)
    return out


def _ports_key(ports: Iterable[Mapping[str, Any]]) -> tuple[tuple[str, int, str, str], ...]:
    return tuple(
        sorted(
            (
                str(p.get("name") or ""),
                int(p.get("port") or 0),
                str(p.get("protocol") or "TCP"),
                str(p.get("appProtocol") or ""),
            )
            for p in ports
        )
    )


# ------------------------------------------------------------ desired slices

GroupKey = tuple[str, tuple[tuple[str, int, str, str], ...]]


@dataclass
class Group:
    """Endpoints of one address type and one resolved port set, by address."""

    address_type: str
    ports: list[Obj]
    endpoints: dict[str, Obj] = field(default_factory=dict)


def pod_endpoint(
    service: Mapping[str, Any],
    pod: Mapping[str, Any],
    address: str,
    nodes: Mapping[str, Mapping[str, Any]],
) -> Obj:
    serving = is_pod_ready(pod)
    terminating = is_terminating(pod)
    publish = bool((service.get("spec") or {}).get("publishNotReadyAddresses"))
    meta, spec = _meta(pod), pod.get("spec") or {}
    ep: Obj = {
        "addresses": [address],
        "conditions": {
            "ready": publish or (serving and not terminating),
            "serving": serving,
            "terminating": terminating,
        },
    }
    svc_name = _meta(service).get("name")
    if spec.get("hostname") and spec.get("subdomain") == svc_name and is_headless(service):
        ep["hostname"] = spec["hostname"]
    node_name = spec.get("nodeName")
    if node_name:
        ep["nodeName"] = node_name
        zone = (
            ((nodes.get(node_name) or {}).get("metadata") or {}).get("labels", {}).get(ZONE_LABEL)
        )
        if zone:
            ep["zone"] = zone
    ep["targetRef"] = {
        "kind": "Pod",
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "uid": meta.get("uid"),
    }
    return ep


def selected_pods(service: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> list[Obj]:
    """The service's pods (same namespace, selector match), sorted by name."""
    ns = _meta(service).get("namespace")
    selector = from_set((service.get("spec") or {}).get("selector"))
    out = [
        dict(p)
        for p in pods
        if _meta(p).get("namespace") == ns and selector.matches(_meta(p).get("labels"))
    ]
    return sorted(out, key=lambda p: str(_meta(p).get("name")))


def desired_groups(
    service: Mapping[str, Any],
    pods: Iterable[Mapping[str, Any]],
    nodes: Mapping[str, Mapping[str, Any]],
) -> dict[GroupKey, Group]:
    """Endpoints per (addressType, ports) for a service with a selector."""
    groups: dict[GroupKey, Group] = {}
    families = address_types(service)
    for pod in selected_pods(service, pods):
        if not should_include(pod, include_terminating=True):
            continue
        ports = endpoint_ports(service, pod)
        for fam in families:
            address = next((ip for ip in pod_ips(pod) if _family(ip) == fam), None)
            if address is None:
                continue
            key = (fam, _ports_key(ports))
            group = groups.setdefault(key, Group(fam, ports))
            group.endpoints[address] = pod_endpoint(service, pod, address, nodes)
    return groups


@dataclass
class SlicePlan:
    create: list[Obj] = field(default_factory=list)
    update: list[Obj] = field(default_factory=list)
    delete: list[Obj] = field(default_factory=list)
    unchanged: list[Obj] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.create or self.update or self.delete)


def slice_labels(service: Mapping[str, Any]) -> dict[str, str]:
    labels = dict(_meta(service).get("labels") or {})
    labels[SERVICE_NAME_LABEL] = str(_meta(service).get("name"))
    labels[MANAGED_BY_LABEL] = CONTROLLER_NAME
    if is_headless(service):
        labels[HEADLESS_LABEL] = ""
    return labels


def owner_reference(service: Mapping[str, Any]) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "name": _meta(service).get("name"),
        "uid": _meta(service).get("uid"),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def random_suffix(rng: random.Random | None = None) -> str:
    pick = (rng or random).choice
    return "".join(pick(_NAME_CHARS) for _ in range(5))


def plan_slices(
    service: Mapping[str, Any],
    pods: Iterable[Mapping[str, Any]],
    nodes: Mapping[str, Mapping[str, Any]],
    existing: Sequence[Mapping[str, Any]],
    *,
    max_per_slice: int = 100,
    trigger_time: str | None = None,
    new_name: Callable[[], str] | None = None,
) -> SlicePlan:
    """Which slices to create, update and delete so ``existing`` holds the desired ones."""
    svc_meta = _meta(service)
    svc_name, ns = str(svc_meta.get("name")), svc_meta.get("namespace")
    gen = new_name or (lambda: f"{svc_name[:57]}-{random_suffix()}")
    groups = desired_groups(service, pods, nodes)
    labels, owner = slice_labels(service), owner_reference(service)
    plan = SlicePlan()

    by_group: dict[GroupKey, list[Mapping[str, Any]]] = {}
    for s in sorted(existing, key=lambda s: str(_meta(s).get("name"))):
        key = (str(s.get("addressType")), _ports_key(s.get("ports") or ()))
        by_group.setdefault(key, []).append(s)

    def build(base: Mapping[str, Any] | None, group: Group, eps: list[Obj]) -> None:
        body: Obj = copy.deepcopy(dict(base)) if base is not None else {}
        meta = body.setdefault("metadata", {})
        if base is None:
            meta.update({"name": gen(), "namespace": ns})
        want = {
            "addressType": group.address_type,
            "ports": [dict(p) for p in group.ports],
            "endpoints": eps,
        }
        same = (
            base is not None
            and all(base.get(k) == v for k, v in want.items())
            and (_meta(base).get("labels") or {}) == labels
            and (_meta(base).get("ownerReferences") or []) == [owner]
        )
        if same:
            assert base is not None
            plan.unchanged.append(dict(base))
            return
        body.update(want)
        body["apiVersion"], body["kind"] = SLICE_API_VERSION, "EndpointSlice"
        meta["labels"] = dict(labels)
        meta["ownerReferences"] = [dict(owner)]
        if trigger_time:
            meta.setdefault("annotations", {})[TRIGGER_TIME_ANNOTATION] = trigger_time
        (plan.create if base is None else plan.update).append(body)

    if not groups:
        # No endpoints at all: keep (or make) one empty placeholder slice.
        fam = address_types(service)[0]
        keep = next((s for s in existing if s.get("addressType") == fam), None)
        build(keep, Group(fam, []), [])
        plan.delete.extend(dict(s) for s in existing if s is not keep)
        return plan

    for key, group in groups.items():
        remaining = dict(group.endpoints)
        kept: list[tuple[Mapping[str, Any], list[Obj]]] = []
        for s in by_group.pop(key, []):
            eps: list[Obj] = []
            for ep in s.get("endpoints") or ():
                addr = (ep.get("addresses") or [""])[0]
                if addr in remaining and len(eps) < max_per_slice:
                    eps.append(remaining.pop(addr))
            kept.append((s, eps))
        for _, eps in kept:  # fill free room before making new slices
            while remaining and len(eps) < max_per_slice:
                eps.append(remaining.pop(next(iter(remaining))))
        for s, eps in kept:
            if eps:
                build(s, group, eps)
            else:
                plan.delete.append(dict(s))
        while remaining:
            chunk = [
                remaining.pop(next(iter(remaining)))
                for _ in range(min(max_per_slice, len(remaining)))
            ]
            build(None, group, chunk)
    for stale in by_group.values():
        plan.delete.extend(dict(s) for s in stale)
    return plan


# --------------------------------------------------------- legacy Endpoints


def _endpoints_port(port: Mapping[str, Any]) -> Obj:
    out: Obj = {"port": port["port"], "protocol": port.get("protocol") or "TCP"}
    if port.get("name"):
        out["name"] = port["name"]
    if port.get("appProtocol"):
        out["appProtocol"] = port["appProtocol"]
    return out


def desired_subsets(service: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> list[Obj]:
    """``Endpoints.subsets`` as upstream's endpoints controller would write them."""
    spec = service.get("spec") or {}
    publish = bool(spec.get("publishNotReadyAddresses"))
    fam = address_types(service)[0]
    subsets: dict[tuple[Any, ...], tuple[list[Obj], list[Obj], list[Obj]]] = {}
    for pod in selected_pods(service, pods):
        if not should_include(pod, include_terminating=publish):
            continue
        ip = next((a for a in pod_ips(pod) if _family(a) == fam), None)
        if ip is None:
            continue
        ports = [_endpoints_port(p) for p in endpoint_ports(service, pod)]
        if not ports and (spec.get("ports") or not is_headless(service)):
            continue
        meta, pspec = _meta(pod), pod.get("spec") or {}
        addr: Obj = {"ip": ip}
        if pspec.get("hostname") and pspec.get("subdomain") == _meta(service).get("name"):
            addr["hostname"] = pspec["hostname"]
        if pspec.get("nodeName"):
            addr["nodeName"] = pspec["nodeName"]
        addr["targetRef"] = {
            "kind": "Pod",
            "namespace": meta.get("namespace"),
            "name": meta.get("name"),
            "uid": meta.get("uid"),
        }
        key = _ports_key(ports)
        ready, not_ready, _ = subsets.setdefault(key, ([], [], ports))
        (ready if publish or is_pod_ready(pod) else not_ready).append(addr)
    out: list[Obj] = []
    for key in sorted(subsets):
        ready, not_ready, ports = subsets[key]
        subset: Obj = {}
        if ready:
            subset["addresses"] = sorted(ready, key=lambda a: str(a["ip"]))
        if not_ready:
            subset["notReadyAddresses"] = sorted(not_ready, key=lambda a: str(a["ip"]))
        if ports:
            subset["ports"] = sorted(ports, key=lambda p: (str(p.get("name", "")), p["port"]))
        out.append(subset)
    return out


def desired_endpoints(
    service: Mapping[str, Any],
    pods: Iterable[Mapping[str, Any]],
    existing: Mapping[str, Any] | None,
    *,
    trigger_time: str | None = None,
) -> Obj | None:
    """The Endpoints object to write, or ``None`` when ``existing`` is already right."""
    meta = _meta(service)
    labels = dict(meta.get("labels") or {})
    labels[SKIP_MIRROR_LABEL] = "true"
    if is_headless(service):
        labels[HEADLESS_LABEL] = ""
    subsets = desired_subsets(service, pods)
    if existing is not None:
        if (existing.get("subsets") or []) == subsets and _meta(existing).get("labels") == labels:
            return None
        body: Obj = copy.deepcopy(dict(existing))
    else:
        body = {"metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")}}
    body["apiVersion"], body["kind"] = "v1", "Endpoints"
    body["metadata"]["labels"] = labels
    if trigger_time:
        body["metadata"].setdefault("annotations", {})[TRIGGER_TIME_ANNOTATION] = trigger_time
    body["subsets"] = subsets
    return body
