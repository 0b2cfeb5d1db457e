"""Filter plugins: can this pod run on this node? With upstream's failure reasons.

Owns node selector matching (:func:`match_requirement`, :func:`match_node_selector_terms`),
tolerations (:func:`tolerates`), pod affinity terms (:class:`AffinityTerm`) and the
filters, run in upstream's default order by :data:`FILTERS`:

1. ``NodeUnschedulable`` — ``spec.unschedulable`` unless the pod tolerates
   ``node.kubernetes.io/unschedulable:NoSchedule``;
2. ``TaintToleration`` — NoSchedule/NoExecute taints the pod does not tolerate; a node
   whose Ready condition is not True carries an implied not-ready (False, missing) or
   unreachable (Unknown) NoSchedule taint, as upstream's TaintNodesByCondition adds;
3. ``NodeAffinity`` — ``nodeSelector`` AND required node affinity (terms ORed,
   expressions ANDed; ``matchFields`` on ``metadata.name``);
4. ``NodeResourcesFit`` — pod count, then each requested resource against
   ``status.allocatable`` minus what bound pods request;
5. ``InterPodAffinity`` — required affinity (the first pod of a self-affine group may
   go anywhere its topology keys exist), required anti-affinity, and existing pods'
   anti-affinity against the incoming pod (symmetry).

Invariant: a filter returns the reasons a node fails (empty: it passes); reasons are
upstream's strings so the aggregated ``FailedScheduling`` message reads the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from kproxy.api.errors import ApiError
from kproxy.api.selectors import NOTHING, Selector, from_label_selector
from kproxy.api.tolerations import tolerates
from kproxy.scheduler.nodeinfo import NodeInfo, Snapshot, pod_requests

ERR_UNSCHEDULABLE = "node(s) were unschedulable"
ERR_NODE_AFFINITY = "node(s) didn't match Pod's node affinity/selector"
ERR_AFFINITY = "node(s) didn't match pod affinity rules"
ERR_ANTI_AFFINITY = "node(s) didn't match pod anti-affinity rules"
ERR_EXISTING_ANTI_AFFINITY = "node(s) didn't satisfy existing pods anti-affinity rules"
ERR_TOO_MANY_PODS = "Too many pods"

UNSCHEDULABLE_TAINT = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
NOT_READY_KEY = "node.kubernetes.io/not-ready"
UNREACHABLE_KEY = "node.kubernetes.io/unreachable"


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _spec(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = obj.get("spec")
    return spec if isinstance(spec, Mapping) else {}


# ------------------------------------------------------------ node selectors


def match_requirement(req: Mapping[str, Any], values_of: Mapping[str, str]) -> bool:
    """One ``NodeSelectorRequirement`` against labels (or fields)."""
    key, op = str(req.get("key") or ""), req.get("operator")
    values = [str(v) for v in req.get("values") or ()]
    present = key in values_of
    have = values_of.get(key)
    if op == "In":
        return present and have in values
    if op == "NotIn":
        return not present or have not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt"):
        if not present or len(values) != 1:
            return False
        try:
            left, right = int(str(have)), int(values[0])
        except ValueError:
            return False
        return left > right if op == "Gt" else left < right
    return False


def match_node_selector_term(term: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """Expressions and fields ANDed; a term with neither matches nothing (upstream)."""
    exprs = term.get("matchExpressions") or ()
    fields = term.get("matchFields") or ()
    if not exprs and not fields:
        return False
    labels = _meta(node).get("labels") or {}
    node_fields = {"metadata.name": str(_meta(node).get("name") or "")}
    return all(match_requirement(e, labels) for e in exprs) and all(
        match_requirement(f, node_fields) for f in fields
    )


def match_node_selector_terms(terms: Iterable[Mapping[str, Any]], node: Mapping[str, Any]) -> bool:
    """Terms ORed; no terms matches nothing."""
    return any(match_node_selector_term(t, node) for t in terms)


def _node_affinity(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return (_spec(pod).get("affinity") or {}).get("nodeAffinity") or {}


def node_affinity_matches(pod: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    labels = _meta(node).get("labels") or {}
    for key, value in (_spec(pod).get("nodeSelector") or {}).items():
        if labels.get(key) != value:
            return False
    required = _node_affinity(pod).get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is None:
        return True
    return match_node_selector_terms(required.get("nodeSelectorTerms") or (), node)


# ------------------------------------------------------------------- taints


def tolerated(pod: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    return any(tolerates(t, taint) for t in _spec(pod).get("tolerations") or ())


def node_ready_status(node: Mapping[str, Any]) -> str:
    for cond in (node.get("status") or {}).get("conditions") or ():
        if cond.get("type") == "Ready":
            return str(cond.get("status") or "Unknown")
    return "False"


def effective_taints(node: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The node's taints plus the one its Ready condition implies."""
    taints: list[Mapping[str, Any]] = list(_spec(node).get("taints") or ())
    status = node_ready_status(node)
    if status != "True":
        key = UNREACHABLE_KEY if status == "Unknown" else NOT_READY_KEY
        if not any(t.get("key") == key and t.get("effect") == "NoSchedule" for t in taints):
            taints.append({"key": key, "effect": "NoSchedule"})
    return taints


# ------------------------------------------------------------ pod affinity


@dataclass(frozen=True)
class AffinityTerm:
    """A ``PodAffinityTerm`` resolved against its owner's namespace."""

    selector: Selector
    namespaces: frozenset[str]
    namespace_selector: Selector | None
    topology_key: str
    weight: int = 1

    @classmethod
    def parse(cls, raw: Mapping[str, Any], owner_ns: str, weight: int = 1) -> AffinityTerm:
        try:
            selector = from_label_selector(raw.get("labelSelector"))
        except ApiError:
            selector = NOTHING
        namespaces = frozenset(str(n) for n in raw.get("namespaces") or ())
        ns_raw = raw.get("namespaceSelector")
        ns_selector: Selector | None = None
        if ns_raw is not None:
            try:
                ns_selector = from_label_selector(ns_raw)
            except ApiError:
                ns_selector = NOTHING
        if not namespaces and ns_selector is None:
            namespaces = frozenset({owner_ns})
        return cls(selector, namespaces, ns_selector, str(raw.get("topologyKey") or ""), weight)

    def matches(self, pod: Mapping[str, Any], ns_labels: Mapping[str, Mapping[str, str]]) -> bool:
        ns = str(_meta(pod).get("namespace") or "")
        in_ns = ns in self.namespaces or (
            self.namespace_selector is not None
            and self.namespace_selector.matches(ns_labels.get(ns, {}))
        )
        return in_ns and self.selector.matches(_meta(pod).get("labels"))


def affinity_terms(pod: Mapping[str, Any], kind: str, required: bool) -> list[AffinityTerm]:
    """``kind`` is ``podAffinity`` or ``podAntiAffinity``."""
    section = (_spec(pod).get("affinity") or {}).get(kind) or {}
    ns = str(_meta(pod).get("namespace") or "")
    if required:
        raw = section.get("requiredDuringSchedulingIgnoredDuringExecution") or ()
        return [AffinityTerm.parse(t, ns) for t in raw]
    out = []
    for weighted in section.get("preferredDuringSchedulingIgnoredDuringExecution") or ():
        term = weighted.get("podAffinityTerm") or {}
        out.append(AffinityTerm.parse(term, ns, int(weighted.get("weight") or 0)))
    return out


def same_domain(a: NodeInfo, b: NodeInfo, key: str) -> bool:
    return key in a.labels and key in b.labels and a.labels[key] == b.labels[key]


class CycleState:
    """What one pod's cycle computes once and every node's check reuses."""

    def __init__(self, pod: Mapping[str, Any], snapshot: Snapshot) -> None:
        self.pod = pod
        self.snapshot = snapshot

    @cached_property
    def requests(self) -> dict[str, Any]:
        return dict(pod_requests(self.pod))

    @cached_property
    def required_affinity(self) -> list[AffinityTerm]:
        return affinity_terms(self.pod, "podAffinity", required=True)

    @cached_property
    def required_anti_affinity(self) -> list[AffinityTerm]:
        return affinity_terms(self.pod, "podAntiAffinity", required=True)

    @cached_property
    def affinity_pod_nodes(self) -> list[NodeInfo]:
        """Nodes of existing pods matching *all* required affinity terms."""
        terms, ns = self.required_affinity, self.snapshot.namespace_labels
        return [ni for p, ni in self.snapshot.pods() if all(t.matches(p, ns) for t in terms)]

    @cached_property
    def anti_affinity_pod_nodes(self) -> list[tuple[AffinityTerm, NodeInfo]]:
        ns = self.snapshot.namespace_labels
        return [
            (t, ni)
            for p, ni in self.snapshot.pods()
            for t in self.required_anti_affinity
            if t.matches(p, ns)
        ]

    @cached_property
    def existing_anti_affinity(self) -> list[tuple[AffinityTerm, NodeInfo]]:
        """Existing pods' required anti-affinity terms that match the incoming pod."""
        ns = self.snapshot.namespace_labels
        out = []
        for p, ni in self.snapshot.pods():
            for t in affinity_terms(p, "podAntiAffinity", required=True):
                if t.matches(self.pod, ns):
                    out.append((t, ni))
        return out


# ------------------------------------------------------------------ filters

Filter = Callable[[CycleState, NodeInfo], list[str]]


def node_unschedulable(state: CycleState, ni: NodeInfo) -> list[str]:
    if _spec(ni.node).get("unschedulable") and not tolerated(state.pod, UNSCHEDULABLE_TAINT):
        return [ERR_UNSCHEDULABLE]
    return []


def taint_toleration(state: CycleState, ni: NodeInfo) -> list[str]:
    for taint in effective_taints(ni.node):
        if taint.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if not tolerated(state.pod, taint):
            return [
                f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value') or ''}}}"
            ]
    return []


def node_affinity(state: CycleState, ni: NodeInfo) -> list[str]:
    return [] if node_affinity_matches(state.pod, ni.node) else [ERR_NODE_AFFINITY]


def resources_fit(state: CycleState, ni: NodeInfo) -> list[str]:
    allocatable = ni.allocatable
    reasons = []
    if "pods" in allocatable and len(ni.pods) + 1 > allocatable["pods"]:
        reasons.append(ERR_TOO_MANY_PODS)
    for name, amount in sorted(state.requests.items(), key=lambda kv: _resource_order(kv[0])):
        if not amount:
            continue
        if ni.requested.get(name, 0) + amount > allocatable.get(name, 0):
            reasons.append(f"Insufficient {name}")
    return reasons


def _resource_order(name: str) -> tuple[int, str]:
    order = {"cpu": 0, "memory": 1, "ephemeral-storage": 2}
    return order.get(name, 3), name


def inter_pod_affinity(state: CycleState, ni: NodeInfo) -> list[str]:
    terms = state.required_affinity
    if terms:
        if any(t.topology_key not in ni.labels for t in terms):
            return [ERR_AFFINITY]
        matched = state.affinity_pod_nodes
        satisfied = all(
            any(same_domain(ni, other, t.topology_key) for other in matched) for t in terms
        )
        if not satisfied:
            # The first pod of a group that selects itself may start the group.
            ns = state.snapshot.namespace_labels
            if matched or not all(t.matches(state.pod, ns) for t in terms):
                return [ERR_AFFINITY]
    for term, other in state.anti_affinity_pod_nodes:
        if same_domain(ni, other, term.topology_key):
            return [ERR_ANTI_AFFINITY]
    for term, other in state.existing_anti_affinity:
        if same_domain(ni, other, term.topology_key):
            return [ERR_EXISTING_ANTI_AFFINITY]
    return []


FILTERS: list[tuple[str, Filter]] = [
    ("NodeUnschedulable", node_unschedulable),
    ("TaintToleration", taint_toleration),
    ("NodeAffinity", node_affinity),
    ("NodeResourcesFit", resources_fit),
    ("InterPodAffinity", inter_pod_affinity),
]


def run_filters(state: CycleState, ni: NodeInfo) -> list[str]:
    """The first failing filter's reasons (upstream stops at the first failure)."""
    for _name, check in FILTERS:
        reasons = check(state, ni)
        if reasons:
            return reasons
    return []
