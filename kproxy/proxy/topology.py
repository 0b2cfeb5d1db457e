"""Which endpoints of a service port this node may use (upstream's CategorizeEndpoints).

Owns the traffic-policy and topology decisions shared by all proxy modes:

- Cluster policy uses Ready endpoints, narrowed by topology hints when every
  ready endpoint carries hints and one matches this node (PreferSameNode, if
  enabled) or this node's zone (PreferSameZone); with no Ready endpoint at all it
  falls back to Serving+Terminating ones;
- Local policy uses this node's Ready endpoints, else its Serving+Terminating ones;
- ``has_any`` tells whether the service has a usable endpoint anywhere in the
  cluster (true even if none is reachable from here).

Invariant: every returned tuple keeps the input order (sorted by ``IP:port``);
``all_reachable`` is the union of ``cluster`` and ``local``, sorted the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from kproxy.proxy.types import EndpointInfo, ServicePortInfo

__all__ = ["Categorized", "categorize_endpoints"]

ZONE_LABEL = "topology.kubernetes.io/zone"


@dataclass(frozen=True, slots=True)
class Categorized:
    cluster: tuple[EndpointInfo, ...] = ()
    local: tuple[EndpointInfo, ...] = ()
    all_reachable: tuple[EndpointInfo, ...] = ()
    has_any: bool = False


def _filter(
    endpoints: Sequence[EndpointInfo], keep: Callable[[EndpointInfo], bool]
) -> tuple[EndpointInfo, ...]:
    return tuple(ep for ep in endpoints if keep(ep))


def _topology_mode(
    endpoints: Sequence[EndpointInfo], node_name: str, zone: str, prefer_same_node: bool
) -> str:
    has_ready = False
    all_node_hints = all_zone_hints = True
    for_node = for_zone = False
    for ep in endpoints:
        if not ep.ready:
            continue
        has_ready = True
        if not ep.node_hints:
            all_node_hints = False
        elif node_name in ep.node_hints:
            for_node = True
        if not ep.zone_hints:
            all_zone_hints = False
        elif zone in ep.zone_hints:
            for_zone = True
    if not has_ready:
        return ""
    if prefer_same_node and all_node_hints and for_node:
        return "PreferSameNode"
    if all_zone_hints and for_zone:
        return "PreferSameZone"
    return ""


def _available(ep: EndpointInfo, mode: str, node_name: str, zone: str) -> bool:
    if mode == "":
        return True
    if mode == "PreferSameNode":
        return node_name in ep.node_hints
    if mode == "PreferSameZone":
        return zone in ep.zone_hints
    return False


def categorize_endpoints(
    endpoints: Sequence[EndpointInfo],
    svc: ServicePortInfo,
    node_name: str,
    topology_labels: Mapping[str, str] | None = None,
    *,
    prefer_same_node: bool = True,
) -> Categorized:
    """Split ``endpoints`` into the Cluster-policy, Local-policy and reachable sets."""
    if not endpoints:
        return Categorized()
    cluster: tuple[EndpointInfo, ...] = ()
    local: tuple[EndpointInfo, ...] = ()
    has_any = False
    mode = ""
    if svc.uses_cluster_endpoints:
        zone = (topology_labels or {}).get(ZONE_LABEL, "")
        mode = _topology_mode(endpoints, node_name, zone, prefer_same_node)
        if mode:
            cluster = _filter(
                endpoints, lambda ep: ep.ready and _available(ep, mode, node_name, zone)
            )
        else:  # no topology: every ready endpoint (the common case, kept cheap)
            cluster = tuple(ep for ep in endpoints if ep.ready)
        if not cluster:
            # No ready endpoint anywhere (topology was already ignored if it
            # selected none), so fall back to endpoints that are still serving.
            cluster = _filter(endpoints, lambda ep: ep.serving and ep.terminating)
        has_any = bool(cluster)

    if not svc.uses_local_endpoints:
        return Categorized(cluster, (), cluster, has_any)

    local_ready = local_terminating = False
    for ep in endpoints:
        if ep.ready:
            has_any = True
            local_ready = local_ready or ep.is_local
        elif ep.serving and ep.terminating:
            has_any = True
            local_terminating = local_terminating or ep.is_local
    use_terminating = False
    if local_ready:
        local = _filter(endpoints, lambda ep: ep.is_local and ep.ready)
    elif local_terminating:
        use_terminating = True
        local = _filter(endpoints, lambda ep: ep.is_local and ep.serving and ep.terminating)

    if not svc.uses_cluster_endpoints:
        return Categorized((), local, local, has_any)
    if mode == "" and not use_terminating:
        # cluster then holds every ready endpoint, a superset of local.
        return Categorized(cluster, local, cluster, has_any)
    merged = {ep.endpoint: ep for ep in cluster}
    merged.update((ep.endpoint, ep) for ep in local)
    return Categorized(cluster, local, tuple(merged[k] for k in sorted(merged)), has_any)
