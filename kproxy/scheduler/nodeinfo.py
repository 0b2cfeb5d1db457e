"""What each node holds and has left: the snapshot one scheduling cycle works on.

Owns pod resource requests (:func:`pod_requests`, upstream's
``max(sum(containers), max(initContainers)) + overhead``; :func:`non_zero_requests`
with the scoring defaults of 100m CPU and 200Mi for containers that request
nothing), :class:`NodeInfo` (a node, its pods and their summed requests) and
:class:`Snapshot` (every node, namespace labels).

Invariants: quantities are exact (:class:`~fractions.Fraction`: CPU in cores, memory
in bytes), so fit checks never round; terminal pods (Succeeded/Failed) hold nothing
and are left out; a snapshot is never mutated after it is built except by
:meth:`Snapshot.assume` during its own cycle.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from kproxy.api.quantity import QuantityError, parse_quantity

Obj = dict[str, Any]

DEFAULT_MILLI_CPU = 100  # upstream's DefaultMilliCPURequest (scoring only)
DEFAULT_MEMORY = 200 * 1024 * 1024  # DefaultMemoryRequest (scoring only)


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _quantities(raw: Any) -> dict[str, Fraction]:
    out: dict[str, Fraction] = {}
    if not isinstance(raw, Mapping):
        return out
    for name, value in raw.items():
        try:
            out[str(name)] = parse_quantity(value)
        except QuantityError:
            continue  # validation rejects these; a stray one must not crash a cycle
    return out


def _container_requests(container: Mapping[str, Any]) -> dict[str, Fraction]:
    resources = container.get("resources") or {}
    requests = _quantities(resources.get("requests"))
    # Upstream defaulting: a limit without a request requests the limit.
    for name, value in _quantities(resources.get("limits")).items():
        requests.setdefault(name, value)
    return requests


def pod_requests(pod: Mapping[str, Any]) -> dict[str, Fraction]:
    spec = pod.get("spec") or {}
    total: dict[str, Fraction] = {}
    for c in spec.get("containers") or ():
        for name, value in _container_requests(c).items():
            total[name] = total.get(name, Fraction(0)) + value
    for c in spec.get("initContainers") or ():
        for name, value in _container_requests(c).items():
            total[name] = max(total.get(name, Fraction(0)), value)
    for name, value in _quantities(spec.get("overhead")).items():
        total[name] = total.get(name, Fraction(0)) + value
    return total


def non_zero_requests(pod: Mapping[str, Any]) -> tuple[Fraction, Fraction]:
    """(CPU cores, memory bytes) for scoring, with defaults for empty requests."""
    cpu, mem = Fraction(0), Fraction(0)
    for c in (pod.get("spec") or {}).get("containers") or ():
        req = _container_requests(c)
        cpu += req.get("cpu") or Fraction(DEFAULT_MILLI_CPU, 1000)
        mem += req.get("memory") or Fraction(DEFAULT_MEMORY)
    overhead = _quantities((pod.get("spec") or {}).get("overhead"))
    return cpu + overhead.get("cpu", 0), mem + overhead.get("memory", 0)


def is_terminal(pod: Mapping[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


@dataclass
class NodeInfo:
    node: Mapping[str, Any]
    pods: list[Mapping[str, Any]] = field(default_factory=list)
    requested: dict[str, Fraction] = field(default_factory=dict)
    non_zero_cpu: Fraction = Fraction(0)
    non_zero_memory: Fraction = Fraction(0)

    @property
    def name(self) -> str:
        return str(_meta(self.node).get("name") or "")

    @property
    def labels(self) -> Mapping[str, str]:
        return _meta(self.node).get("labels") or {}

    @property
    def allocatable(self) -> dict[str, Fraction]:
        status = self.node.get("status") or {}
        return _quantities(status.get("allocatable") or status.get("capacity"))

    def add_pod(self, pod: Mapping[str, Any]) -> None:
        self.pods.append(pod)
        for name, value in pod_requests(pod).items():
            self.requested[name] = self.requested.get(name, Fraction(0)) + value
        cpu, mem = non_zero_requests(pod)
        self.non_zero_cpu += cpu
        self.non_zero_memory += mem


@dataclass
class Snapshot:
    nodes: list[NodeInfo]
    namespace_labels: dict[str, Mapping[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_name = {ni.name: ni for ni in self.nodes}

    def get(self, name: str) -> NodeInfo | None:
        return self._by_name.get(name)

    def pods(self) -> Iterator[tuple[Mapping[str, Any], NodeInfo]]:
        for ni in self.nodes:
            for pod in ni.pods:
                yield pod, ni

    def assume(self, pod: Mapping[str, Any], node: str) -> None:
        ni = self._by_name.get(node)
        if ni is not None:
            ni.add_pod(pod)


def build_snapshot(
    nodes: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    namespaces: Iterable[Mapping[str, Any]] = (),
) -> Snapshot:
    """Nodes sorted by name, each with its bound non-terminal pods."""
    infos = sorted((NodeInfo(n) for n in nodes), key=lambda ni: ni.name)
    by_name = {ni.name: ni for ni in infos}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        if node and node in by_name and not is_terminal(pod):
            by_name[node].add_pod(pod)
    ns_labels = {str(_meta(ns).get("name")): _meta(ns).get("labels") or {} for ns in namespaces}
    return Snapshot(infos, ns_labels)
