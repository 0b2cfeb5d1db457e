"""Defaulting per kind, as upstream's ``SetDefaults_*`` for core/v1, apps/v1, discovery/v1.

Owns the values a field takes when a client leaves it out: Service type, protocol,
targetPort, session affinity, traffic policies and IP family fields; Pod restart
policy, DNS policy, grace period, scheduler, container pull policy, probe timings;
Deployment/ReplicaSet replicas, strategy, history and deadline; Namespace's
``kubernetes.io/metadata.name`` label; EndpointSlice/Endpoints port protocols.

Invariants: :func:`apply_defaults` changes its argument in place (and returns it),
is idempotent, and never raises on a malformed object: fields of the wrong type
are left for validation to report. Cluster IP and node port allocation are not
defaults; the apiserver's allocators own them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from typing import Any

Obj = dict[str, Any]

MAX_CLIENT_IP_AFFINITY_SECONDS = 86400
DEFAULT_CLIENT_IP_AFFINITY_SECONDS = 10800
DEFAULT_SCHEDULER = "default-scheduler"


def _map(parent: Obj, key: str) -> Obj:
    """``parent[key]`` as a dict, created when absent; a throwaway if it is not a dict."""
    value = parent.get(key)
    if value is None:
        value = parent[key] = {}
    return value if isinstance(value, dict) else {}


def _items(parent: Obj, key: str) -> Iterator[Obj]:
    value = parent.get(key)
    if isinstance(value, list):
        yield from (item for item in value if isinstance(item, dict))


def _default(obj: Obj, key: str, value: Any) -> None:
    if obj.get(key) in (None, ""):
        obj[key] = value


# ------------------------------------------------------------------ Service


def _ip_family(ip: Any) -> str | None:
    try:
        addr = ipaddress.ip_address(str(ip))
    except ValueError:
        return None
    return "IPv4" if addr.version == 4 else "IPv6"


def default_service(svc: Obj, primary_family: str = "IPv4") -> Obj:
    spec = _map(svc, "spec")
    _default(spec, "type", "ClusterIP")
    _default(spec, "sessionAffinity", "None")
    if spec.get("sessionAffinity") == "ClientIP":
        client_ip = _map(_map(spec, "sessionAffinityConfig"), "clientIP")
        _default(client_ip, "timeoutSeconds", DEFAULT_CLIENT_IP_AFFINITY_SECONDS)
    for port in _items(spec, "ports"):
        _default(port, "protocol", "TCP")
        if port.get("targetPort") in (None, 0, ""):
            port["targetPort"] = port.get("port")
    kind = spec.get("type")
    if kind in ("NodePort", "LoadBalancer"):
        _default(spec, "externalTrafficPolicy", "Cluster")
    if kind == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts") is None:
        spec["allocateLoadBalancerNodePorts"] = True
    if kind != "ExternalName":
        _default(spec, "internalTrafficPolicy", "Cluster")
        # The registry's normalisation: clusterIPs mirrors clusterIP.
        cluster_ip = spec.get("clusterIP")
        if cluster_ip and not spec.get("clusterIPs"):
            spec["clusterIPs"] = [cluster_ip]
        elif spec.get("clusterIPs") and not cluster_ip and isinstance(spec["clusterIPs"], list):
            spec["clusterIP"] = spec["clusterIPs"][0]
        _default(spec, "ipFamilyPolicy", "SingleStack")
        if not spec.get("ipFamilies"):
            ips = spec.get("clusterIPs")
            found = map(_ip_family, ips if isinstance(ips, list) else [])
            families = list(dict.fromkeys(f for f in found if f))
            if not families:
                families = [primary_family]
                if spec.get("ipFamilyPolicy") in ("PreferDualStack", "RequireDualStack"):
                    families.append("IPv6" if primary_family == "IPv4" else "IPv4")
            spec["ipFamilies"] = families
    return svc


# ------------------------------------------------------------------ Pod


def _default_probe(probe: Any) -> None:
    if not isinstance(probe, dict):
        return
    _default(probe, "timeoutSeconds", 1)
    _default(probe, "periodSeconds", 10)
    _default(probe, "successThreshold", 1)
    _default(probe, "failureThreshold", 3)
    http = probe.get("httpGet")
    if isinstance(http, dict):
        _default(http, "path", "/")
        _default(http, "scheme", "HTTP")


def _pull_policy(image: Any) -> str:
    # SetDefaults_Container: ":latest" or no tag pulls always (a digest counts as a tag).
    if not isinstance(image, str):
        return "IfNotPresent"
    if "@" in image:
        return "IfNotPresent"
    last = image.rsplit("/", 1)[-1]
    if ":" not in last or last.endswith(":latest"):
        return "Always"
    return "IfNotPresent"


def _default_container(c: Obj) -> None:
    _default(c, "terminationMessagePath", "/dev/termination-log")
    _default(c, "terminationMessagePolicy", "File")
    _default(c, "imagePullPolicy", _pull_policy(c.get("image")))
    for port in _items(c, "ports"):
        _default(port, "protocol", "TCP")
    for key in ("livenessProbe", "readinessProbe", "startupProbe"):
        _default_probe(c.get(key))
    resources = c.get("resources")
    if isinstance(resources, dict):
        limits = resources.get("limits")
        if isinstance(limits, dict) and limits:
            # SetDefaults_Pod: a limit without a request requests the limit.
            requests = _map(resources, "requests")
            for name, quantity in limits.items():
                requests.setdefault(name, quantity)


def default_pod_spec(spec: Obj) -> Obj:
    _default(spec, "restartPolicy", "Always")
    _default(spec, "dnsPolicy", "ClusterFirst")
    if spec.get("terminationGracePeriodSeconds") is None:
        spec["terminationGracePeriodSeconds"] = 30
    _default(spec, "schedulerName", DEFAULT_SCHEDULER)
    if spec.get("securityContext") is None:
        spec["securityContext"] = {}
    if spec.get("enableServiceLinks") is None:
        spec["enableServiceLinks"] = True
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in _items(spec, key):
            _default_container(c)
    return spec


def default_pod(pod: Obj) -> Obj:
    default_pod_spec(_map(pod, "spec"))
    return pod


# ------------------------------------------------------------ workloads


def _default_template(spec: Obj) -> None:
    template = _map(spec, "template")
    default_pod_spec(_map(template, "spec"))


def default_deployment(deploy: Obj) -> Obj:
    spec = _map(deploy, "spec")
    if spec.get("replicas") is None:
        spec["replicas"] = 1
    strategy = _map(spec, "strategy")
    _default(strategy, "type", "RollingUpdate")
    if strategy.get("type") == "RollingUpdate":
        rolling = _map(strategy, "rollingUpdate")
        _default(rolling, "maxUnavailable", "25%")
        _default(rolling, "maxSurge", "25%")
    if spec.get("revisionHistoryLimit") is None:
        spec["revisionHistoryLimit"] = 10
    if spec.get("progressDeadlineSeconds") is None:
        spec["progressDeadlineSeconds"] = 600
    _default_template(spec)
    return deploy


def default_replicaset(rs: Obj) -> Obj:
    spec = _map(rs, "spec")
    if spec.get("replicas") is None:
        spec["replicas"] = 1
    _default_template(spec)
    return rs


# ---------------------------------------------------------------- others


def default_endpoint_slice(eps: Obj) -> Obj:
    for port in _items(eps, "ports"):
        _default(port, "protocol", "TCP")
        if port.get("name") is None:
            port["name"] = ""
    return eps


def default_endpoints(ep: Obj) -> Obj:
    for subset in _items(ep, "subsets"):
        for port in _items(subset, "ports"):
            _default(port, "protocol", "TCP")
    return ep


def default_namespace(ns: Obj) -> Obj:
    meta = _map(ns, "metadata")
    name = meta.get("name")
    if isinstance(name, str) and name:
        _map(meta, "labels")["kubernetes.io/metadata.name"] = name
    return ns


def default_node(node: Obj) -> Obj:
    status = node.get("status")
    if isinstance(status, dict) and status.get("allocatable") is None:
        capacity = status.get("capacity")
        if isinstance(capacity, dict):
            status["allocatable"] = dict(capacity)
    return node


_DEFAULTERS: dict[str, Callable[[Obj], Obj]] = {
    "Service": default_service,
    "Pod": default_pod,
    "Deployment": default_deployment,
    "ReplicaSet": default_replicaset,
    "EndpointSlice": default_endpoint_slice,
    "Endpoints": default_endpoints,
    "Namespace": default_namespace,
    "Node": default_node,
}


def apply_defaults(kind: str, obj: Obj) -> Obj:
    """Default ``obj`` of ``kind`` in place; kinds without defaults pass unchanged."""
    if not isinstance(obj, dict):
        return obj
    defaulter = _DEFAULTERS.get(kind)
    return defaulter(obj) if defaulter is not None else obj
