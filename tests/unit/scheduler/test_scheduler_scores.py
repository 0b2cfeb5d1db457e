"""Scheduler scores, pure: each plugin, normalization, weights, seeded tie-breaking."""

from __future__ import annotations

import random
from typing import Any

import pytest

from kproxy.scheduler.filters import CycleState
from kproxy.scheduler.framework import schedule
from kproxy.scheduler.nodeinfo import build_snapshot
from kproxy.scheduler.scores import (
    SCORES,
    default_normalize,
    min_max_normalize,
    score_nodes,
)
from tests.unit.scheduler.test_scheduler_filters import node, pod

Obj = dict[str, Any]


def scores(p: Obj, nodes: list[Obj], pods: list[Obj] = ()) -> dict[str, dict[str, int]]:  # type: ignore[assignment]
    snap = build_snapshot(nodes, pods)
    return score_nodes(CycleState(p, snap), snap.nodes)


def owned(name: str, node_name: str, owner: str = "rs-1") -> Obj:
    p = pod(name, node_name, labels={"app": "web"})
    p["metadata"]["ownerReferences"] = [{"kind": "ReplicaSet", "name": owner, "uid": owner,
                                         "controller": True}]  # fmt: skip
    return p


def test_weights_are_upstreams_defaults() -> None:
    assert {name: w for name, w, _, _ in SCORES} == {
        "TaintToleration": 3,
        "NodeAffinity": 2,
        "NodeResourcesFit": 1,
        "PodTopologySpread": 2,
        "InterPodAffinity": 2,
        "NodeResourcesBalancedAllocation": 1,
    }


@pytest.mark.parametrize(
    ("raw", "reverse", "want"),
    [
        ({"a": 0, "b": 0}, False, {"a": 0, "b": 0}),
        ({"a": 0, "b": 0}, True, {"a": 100, "b": 100}),
        ({"a": 10, "b": 5}, False, {"a": 100, "b": 50}),
        ({"a": 2, "b": 1}, True, {"a": 0, "b": 50}),
    ],
)
def test_default_normalize(raw: dict[str, int], reverse: bool, want: dict[str, int]) -> None:
    assert default_normalize(raw, reverse) == want


def test_min_max_normalize() -> None:
    assert min_max_normalize({"a": -5, "b": 5, "c": 0}) == {"a": 0, "b": 100, "c": 50}
    assert min_max_normalize({"a": 3, "b": 3}) == {"a": 0, "b": 0}


def test_preferred_node_affinity() -> None:
    pref = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 80, "preference": {"matchExpressions": [
            {"key": "disk", "operator": "In", "values": ["ssd"]}]}},
        {"weight": 20, "preference": {"matchExpressions": [{"key": "fast", "operator": "Exists"}]}},
    ]}}  # fmt: skip
    s = scores(pod(affinity=pref), [node("a", disk="ssd"), node("b", fast="1"), node("c")])
    assert (s["a"]["NodeAffinity"], s["b"]["NodeAffinity"], s["c"]["NodeAffinity"]) == (100, 25, 0)


def test_prefer_no_schedule_taints() -> None:
    soft = [{"key": "k", "effect": "PreferNoSchedule"}]
    s = scores(pod(), [node("a", taints=soft), node("b")])
    assert (s["a"]["TaintToleration"], s["b"]["TaintToleration"]) == (0, 100)
    tol = [{"key": "k", "operator": "Exists", "effect": "PreferNoSchedule"}]
    s = scores(pod(tolerations=tol), [node("a", taints=soft), node("b")])
    assert s["a"]["TaintToleration"] == s["b"]["TaintToleration"] == 100


def test_least_allocated_prefers_emptier_node() -> None:
    busy = pod("busy", "a", "3", "6Gi")
    s = scores(pod(cpu="500m", memory="1Gi"), [node("a"), node("b")], [busy])
    assert s["b"]["NodeResourcesFit"] > s["a"]["NodeResourcesFit"]
    # (4 - 0.5)/4 = 87.5 and (8 - 1)/8 = 87.5 → 87
    assert s["b"]["NodeResourcesFit"] == 87


def test_spread_replicas_of_one_owner() -> None:
    existing = [owned("w1", "a"), owned("w2", "a"), owned("w3", "b"), owned("x", "c", "other")]
    s = scores(owned("new", ""), [node("a"), node("b"), node("c")], existing)
    assert (
        s["a"]["PodTopologySpread"],
        s["b"]["PodTopologySpread"],
        s["c"]["PodTopologySpread"],
    ) == (0, 50, 100)


def test_spread_weighs_zones() -> None:
    nodes = [node("a", zone="z1"), node("b", zone="z1"), node("c", zone="z2")]
    s = scores(owned("new", ""), nodes, [owned("w1", "a")])
    # b has no replica but shares z1 with a; c is alone in z2.
    assert s["c"]["PodTopologySpread"] == 100
    assert s["a"]["PodTopologySpread"] < s["b"]["PodTopologySpread"] < 100


def test_preferred_pod_affinity_and_anti_affinity() -> None:
    cache = pod("cache", "a", labels={"app": "cache"})
    aff = {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 50, "podAffinityTerm": {"labelSelector": {"matchLabels": {"app": "cache"}},
                                           "topologyKey": "kubernetes.io/hostname"}}]}}  # fmt: skip
    s = scores(pod(affinity=aff), [node("a"), node("b")], [cache])
    assert (s["a"]["InterPodAffinity"], s["b"]["InterPodAffinity"]) == (100, 0)
    anti = {"podAntiAffinity": aff["podAffinity"]}
    s = scores(pod(affinity=anti), [node("a"), node("b")], [cache])
    assert (s["a"]["InterPodAffinity"], s["b"]["InterPodAffinity"]) == (0, 100)


def test_best_node_wins_and_ties_are_seeded() -> None:
    nodes = [node("a"), node("b"), node("c")]
    busy = pod("busy", "a", "3", "6Gi")
    assert schedule(pod(cpu="100m"), build_snapshot(nodes, [busy]), random.Random(1)).node in {
        "b",
        "c",
    }
    picks = {
        schedule(pod(), build_snapshot(nodes, []), random.Random(seed)).node for seed in range(30)
    }
    assert picks == {"a", "b", "c"}
    again = [schedule(pod(), build_snapshot(nodes, []), random.Random(7)).node for _ in range(5)]
    assert len(set(again)) == 1
