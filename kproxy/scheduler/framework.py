"""One scheduling decision, pure: (pod, snapshot, rng) → a node, or why none fits.

Owns :func:`schedule` (filter every node, score the feasible ones, pick the best
with ties broken by the given :class:`random.Random`) and :func:`failure_message`
(upstream's ``FitError`` text: ``0/3 nodes are available: 1 Insufficient cpu, 2
node(s) didn't match Pod's node affinity/selector.``, reasons counted and sorted).

Invariant: the same pod, snapshot and rng state give the same answer.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kproxy.scheduler.filters import CycleState, run_filters
from kproxy.scheduler.nodeinfo import Snapshot
from kproxy.scheduler.scores import score_nodes


@dataclass
class Decision:
    node: str | None
    # node name → the reasons it was filtered out (only for infeasible nodes)
    reasons: dict[str, list[str]] = field(default_factory=dict)
    scores: dict[str, dict[str, int]] = field(default_factory=dict)
    total_nodes: int = 0

    @property
    def message(self) -> str:
        return failure_message(self.total_nodes, self.reasons)


def failure_message(total_nodes: int, reasons: Mapping[str, list[str]]) -> str:
    if total_nodes == 0:
        return "no nodes available to schedule pods"
    counts: dict[str, int] = {}
    for node_reasons in reasons.values():
        for reason in node_reasons:
            counts[reason] = counts.get(reason, 0) + 1
    parts = sorted(f"{n} {reason}" for reason, n in counts.items())
    return f"0/{total_nodes} nodes are available: {', '.join(parts)}."


def schedule(
    pod: Mapping[str, Any], snapshot: Snapshot, rng: random.Random | None = None
) -> Decision:
    state = CycleState(pod, snapshot)
    decision = Decision(None, total_nodes=len(snapshot.nodes))
    feasible = []
    for ni in snapshot.nodes:
        reasons = run_filters(state, ni)
        if reasons:
            decision.reasons[ni.name] = reasons
        else:
            feasible.append(ni)
    if not feasible:
        return decision
    if len(feasible) == 1:
        decision.node = feasible[0].name
        return decision
    decision.scores = score_nodes(state, feasible)
    best = max(s["total"] for s in decision.scores.values())
    ties = sorted(n for n, s in decision.scores.items() if s["total"] == best)
    decision.node = (rng or random.Random()).choice(ties)
    return decision
