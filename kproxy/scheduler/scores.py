"""Score plugins: how good is each feasible node? Normalized 0–100, weighted, summed.

Owns the scoring plugins with upstream's default weights (:data:`SCORES`):

- ``TaintToleration`` (3): fewer intolerable PreferNoSchedule taints is better
  (normalized in reverse);
- ``NodeAffinity`` (2): the summed weights of matching preferred node-affinity terms
  (normalized to the best node);
- ``NodeResourcesFit`` (1): LeastAllocated, ``(allocatable − requested) × 100 /
  allocatable`` averaged over cpu and memory, requests including the incoming pod's,
  with upstream's non-zero defaults;
- ``NodeResourcesBalancedAllocation`` (1): ``(1 − std(cpu%, memory%)) × 100``;
- ``PodTopologySpread`` (2), here as upstream's older default spreading: fewer pods of
  the incoming pod's controller (its ``ownerReference`` with ``controller: true``) on a
  node scores higher, blended ⅓ node and ⅔ zone when nodes carry zone labels;
- ``InterPodAffinity`` (2): preferred (anti-)affinity of the incoming pod and of
  existing pods towards it, per topology domain (min–max normalized).

Invariant: every plugin's normalized score is an int in [0, 100] (``MAX_NODE_SCORE``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

from kproxy.api.tolerations import tolerates
from kproxy.scheduler.filters import (
    CycleState,
    affinity_terms,
    match_node_selector_term,
    same_domain,
)
from kproxy.scheduler.nodeinfo import NodeInfo, non_zero_requests

MAX_NODE_SCORE = 100
ZONE_LABEL = "topology.kubernetes.io/zone"
ZONE_WEIGHTING = Fraction(2, 3)

RawScore = Callable[[CycleState, NodeInfo], int]
Normalize = Callable[[CycleState, dict[str, int]], dict[str, int]]


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def default_normalize(scores: dict[str, int], reverse: bool = False) -> dict[str, int]:
    """Upstream ``DefaultNormalizeScore``: scale to the best; optionally reversed."""
    top = max(scores.values(), default=0)
    if top == 0:
        return {n: MAX_NODE_SCORE if reverse else 0 for n in scores}
    out = {n: s * MAX_NODE_SCORE // top for n, s in scores.items()}
    if reverse:
        out = {n: MAX_NODE_SCORE - s for n, s in out.items()}
    return out


def min_max_normalize(scores: dict[str, int]) -> dict[str, int]:
    if not scores:
        return {}
    low, high = min(scores.values()), max(scores.values())
    if high == low:
        return dict.fromkeys(scores, 0)
    return {n: (s - low) * MAX_NODE_SCORE // (high - low) for n, s in scores.items()}


# ------------------------------------------------------------------ plugins


def taint_toleration(state: CycleState, ni: NodeInfo) -> int:
    tolerations = [
        t
        for t in (state.pod.get("spec") or {}).get("tolerations") or ()
        if (t.get("effect") or "PreferNoSchedule") == "PreferNoSchedule"
    ]
    return sum(
        1
        for taint in (ni.node.get("spec") or {}).get("taints") or ()
        if taint.get("effect") == "PreferNoSchedule"
        and not any(tolerates(t, taint) for t in tolerations)
    )


def node_affinity(state: CycleState, ni: NodeInfo) -> int:
    affinity = ((state.pod.get("spec") or {}).get("affinity") or {}).get("nodeAffinity") or {}
    total = 0
    for weighted in affinity.get("preferredDuringSchedulingIgnoredDuringExecution") or ():
        if match_node_selector_term(weighted.get("preference") or {}, ni.node):
            total += int(weighted.get("weight") or 0)
    return total


def _fractions(state: CycleState, ni: NodeInfo) -> list[tuple[Fraction, Fraction]]:
    """(requested, allocatable) for cpu and memory, the incoming pod included."""
    cpu, mem = non_zero_requests(state.pod)
    alloc = ni.allocatable
    return [
        (ni.non_zero_cpu + cpu, Fraction(alloc.get("cpu", 0))),
        (ni.non_zero_memory + mem, Fraction(alloc.get("memory", 0))),
    ]


def least_allocated(state: CycleState, ni: NodeInfo) -> int:
    parts = []
    for requested, allocatable in _fractions(state, ni):
        if allocatable <= 0 or requested > allocatable:
            parts.append(Fraction(0))
        else:
            parts.append((allocatable - requested) * MAX_NODE_SCORE / allocatable)
    return int(sum(parts) / len(parts))


def balanced_allocation(state: CycleState, ni: NodeInfo) -> int:
    shares = [
        min(Fraction(1), requested / allocatable) if allocatable > 0 else Fraction(1)
        for requested, allocatable in _fractions(state, ni)
    ]
    std = abs(shares[0] - shares[1]) / 2
    return int((1 - std) * MAX_NODE_SCORE)


def controller_uid(pod: Mapping[str, Any]) -> str | None:
    for ref in _meta(pod).get("ownerReferences") or ():
        if ref.get("controller"):
            return str(ref.get("uid") or ref.get("name"))
    return None


def owner_spread(state: CycleState, ni: NodeInfo) -> int:
    owner = controller_uid(state.pod)
    if owner is None:
        return 0
    ns = _meta(state.pod).get("namespace")
    return sum(
        1
        for p in ni.pods
        if _meta(p).get("namespace") == ns
        and controller_uid(p) == owner
        and not _meta(p).get("deletionTimestamp")
    )


def owner_spread_normalize(state: CycleState, scores: dict[str, int]) -> dict[str, int]:
    """Upstream SelectorSpread's NormalizeScore: fewer is better, zones weigh ⅔."""
    by_zone: dict[str, int] = {}
    zone_of: dict[str, str] = {}
    for name, count in scores.items():
        ni = state.snapshot.get(name)
        zone = (ni.labels.get(ZONE_LABEL) if ni else None) or ""
        if zone:
            zone_of[name] = zone
            by_zone[zone] = by_zone.get(zone, 0) + count
    max_node = max(scores.values(), default=0)
    max_zone = max(by_zone.values(), default=0)
    out: dict[str, int] = {}
    for name, count in scores.items():
        score = Fraction(MAX_NODE_SCORE)
        if max_node > 0:
            score = Fraction(MAX_NODE_SCORE * (max_node - count), max_node)
        if by_zone and name in zone_of:
            zone_score = Fraction(MAX_NODE_SCORE)
            if max_zone > 0:
                zone_score = Fraction(
                    MAX_NODE_SCORE * (max_zone - by_zone[zone_of[name]]), max_zone
                )
            score = score * (1 - ZONE_WEIGHTING) + ZONE_WEIGHTING * zone_score
        out[name] = int(score)
    return out


def inter_pod_affinity(state: CycleState, ni: NodeInfo) -> int:
    ns = state.snapshot.namespace_labels
    pod = state.pod
    affinity = affinity_terms(pod, "podAffinity", required=False)
    anti = affinity_terms(pod, "podAntiAffinity", required=False)
    total = 0
    for existing, other in state.snapshot.pods():
        for t in affinity:
            if t.matches(existing, ns) and same_domain(ni, other, t.topology_key):
                total += t.weight
        for t in anti:
            if t.matches(existing, ns) and same_domain(ni, other, t.topology_key):
                total -= t.weight
        # Existing pods' preferences towards the incoming pod count as well (symmetry).
        for t in affinity_terms(existing, "podAffinity", required=False):
            if t.matches(pod, ns) and same_domain(ni, other, t.topology_key):
                total += t.weight
        for t in affinity_terms(existing, "podAntiAffinity", required=False):
            if t.matches(pod, ns) and same_domain(ni, other, t.topology_key):
                total -= t.weight
    return total


def _reverse(_state: CycleState, scores: dict[str, int]) -> dict[str, int]:
    return default_normalize(scores, reverse=True)


def _forward(_state: CycleState, scores: dict[str, int]) -> dict[str, int]:
    return default_normalize(scores)


def _min_max(_state: CycleState, scores: dict[str, int]) -> dict[str, int]:
    return min_max_normalize(scores)


def _as_is(_state: CycleState, scores: dict[str, int]) -> dict[str, int]:
    return dict(scores)


# (name, weight, raw score, normalize): upstream's default plugins and weights.
SCORES: list[tuple[str, int, RawScore, Normalize]] = [
    ("TaintToleration", 3, taint_toleration, _reverse),
    ("NodeAffinity", 2, node_affinity, _forward),
    ("NodeResourcesFit", 1, least_allocated, _as_is),
    ("PodTopologySpread", 2, owner_spread, owner_spread_normalize),
    ("InterPodAffinity", 2, inter_pod_affinity, _min_max),
    ("NodeResourcesBalancedAllocation", 1, balanced_allocation, _as_is),
]


def score_nodes(state: CycleState, nodes: list[NodeInfo]) -> dict[str, dict[str, int]]:
    """Per node: each plugin's normalized score and ``"total"`` (the weighted sum)."""
    out: dict[str, dict[str, int]] = {ni.name: {"total": 0} for ni in nodes}
    for name, weight, raw, normalize in SCORES:
        normalized = normalize(state, {ni.name: raw(state, ni) for ni in nodes})
        for node, score in normalized.items():
            out[node][name] = score
            out[node]["total"] += weight * score
    return out
