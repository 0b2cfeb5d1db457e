"""Scheduler filters, pure: tables of cases per operator and plugin, and the fit message."""

from __future__ import annotations

from typing import Any

import pytest

from kproxy.scheduler.filters import (
    ERR_AFFINITY,
    ERR_ANTI_AFFINITY,
    ERR_EXISTING_ANTI_AFFINITY,
    ERR_NODE_AFFINITY,
    ERR_TOO_MANY_PODS,
    ERR_UNSCHEDULABLE,
    CycleState,
    match_requirement,
    node_affinity_matches,
    run_filters,
)
from kproxy.scheduler.framework import schedule
from kproxy.scheduler.nodeinfo import build_snapshot, pod_requests

Obj = dict[str, Any]
HOST = "kubernetes.io/hostname"
ZONE = "topology.kubernetes.io/zone"


def node(
    name: str,
    cpu: str = "4",
    memory: str = "8Gi",
    pods: int = 110,
    ready: str = "True",
    taints: list[Obj] | None = None,
    unschedulable: bool = False,
    zone: str | None = None,
    **labels: str,
) -> Obj:
    if zone:
        labels[ZONE] = zone
    return {
        "metadata": {"name": name, "labels": {HOST: name, **labels}},
        "spec": {"taints": taints or [], "unschedulable": unschedulable},
        "status": {
            "allocatable": {"cpu": cpu, "memory": memory, "pods": str(pods)},
            "conditions": [{"type": "Ready", "status": ready}],
        },
    }


def pod(name: str = "p", node_name: str = "", cpu: str | None = None, memory: str | None = None,
        labels: dict[str, str] | None = None, ns: str = "default", **spec: Any) -> Obj:  # fmt: skip
    requests = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v}
    body: Obj = {"containers": [{"name": "c", "resources": {"requests": requests}}], **spec}
    if node_name:
        body["nodeName"] = node_name
    return {"metadata": {"name": name, "namespace": ns, "labels": labels or {}}, "spec": body}


def reasons(p: Obj, nodes: list[Obj], pods: list[Obj] = ()) -> dict[str, list[str]]:  # type: ignore[assignment]
    snap = build_snapshot(nodes, pods)
    state = CycleState(p, snap)
    return {ni.name: run_filters(state, ni) for ni in snap.nodes}


@pytest.mark.parametrize(
    ("op", "values", "labels", "want"),
    [
        ("In", ["a", "b"], {"k": "a"}, True),
        ("In", ["a"], {"k": "c"}, False),
        ("In", ["a"], {}, False),
        ("NotIn", ["a"], {"k": "b"}, True),
        ("NotIn", ["a"], {}, True),
        ("NotIn", ["a"], {"k": "a"}, False),
        ("Exists", [], {"k": ""}, True),
        ("Exists", [], {}, False),
        ("DoesNotExist", [], {}, True),
        ("DoesNotExist", [], {"k": "x"}, False),
        ("Gt", ["5"], {"k": "6"}, True),
        ("Gt", ["5"], {"k": "5"}, False),
        ("Gt", ["5"], {"k": "x"}, False),
        ("Gt", ["5"], {}, False),
        ("Lt", ["5"], {"k": "4"}, True),
        ("Lt", ["5"], {"k": "5"}, False),
        ("Lt", ["5", "6"], {"k": "4"}, False),
        ("Bogus", ["5"], {"k": "4"}, False),
    ],
)
def test_node_selector_operators(
    op: str, values: list[str], labels: dict[str, str], want: bool
) -> None:
    assert match_requirement({"key": "k", "operator": op, "values": values}, labels) is want


def _affinity(*terms: Obj) -> Obj:
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": list(terms)}}}  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ({}, True),
        ({"nodeSelector": {"disk": "ssd"}}, True),
        ({"nodeSelector": {"disk": "hdd"}}, False),
        # terms ORed
        ({"affinity": _affinity(
            {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["hdd"]}]},
            {"matchExpressions": [{"key": "rack", "operator": "In", "values": ["a"]}]})}, True),
        # expressions ANDed
        ({"affinity": _affinity({"matchExpressions": [
            {"key": "disk", "operator": "In", "values": ["ssd"]},
            {"key": "rack", "operator": "NotIn", "values": ["a"]}]})}, False),
        # matchFields on metadata.name
        ({"affinity": _affinity({"matchFields": [
            {"key": "metadata.name", "operator": "In", "values": ["n1"]}]})}, True),
        ({"affinity": _affinity({"matchFields": [
            {"key": "metadata.name", "operator": "NotIn", "values": ["n1"]}]})}, False),
        # an empty term and no terms match nothing
        ({"affinity": _affinity({})}, False),
        ({"affinity": _affinity()}, False),
        # nodeSelector is ANDed with affinity
        ({"nodeSelector": {"disk": "hdd"}, "affinity": _affinity({"matchExpressions": [
            {"key": "rack", "operator": "Exists"}]})}, False),
    ],
)  # fmt: skip
def test_node_affinity(spec: Obj, want: bool) -> None:
    n = node("n1", disk="ssd", rack="a")
    assert node_affinity_matches({"spec": spec}, n) is want


@pytest.mark.parametrize(
    ("taints", "tolerations", "ready", "want"),
    [
        ([{"key": "k", "value": "v", "effect": "NoSchedule"}], [], "True",
         ["node(s) had untolerated taint {k: v}"]),
        ([{"key": "k", "value": "v", "effect": "NoSchedule"}],
         [{"key": "k", "operator": "Equal", "value": "v", "effect": "NoSchedule"}], "True", []),
        ([{"key": "k", "effect": "NoExecute"}], [{"key": "k", "operator": "Exists"}], "True", []),
        ([{"key": "k", "effect": "NoExecute"}], [{"operator": "Exists", "effect": "NoSchedule"}],
         "True", ["node(s) had untolerated taint {k: }"]),
        ([{"key": "k", "effect": "PreferNoSchedule"}], [], "True", []),
        ([], [], "False", ["node(s) had untolerated taint {node.kubernetes.io/not-ready: }"]),
        ([], [], "Unknown", ["node(s) had untolerated taint {node.kubernetes.io/unreachable: }"]),
        ([], [{"key": "node.kubernetes.io/not-ready", "operator": "Exists"}], "False", []),
    ],
)  # fmt: skip
def test_taints_and_readiness(taints: list[Obj], tolerations: list[Obj], ready: str,
                              want: list[str]) -> None:  # fmt: skip
    got = reasons(pod(tolerations=tolerations), [node("n1", taints=taints, ready=ready)])
    assert got["n1"] == want


def test_unschedulable_node_unless_tolerated() -> None:
    n = node("n1", unschedulable=True)
    assert reasons(pod(), [n])["n1"] == [ERR_UNSCHEDULABLE]
    tol = [
        {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert reasons(pod(tolerations=tol), [n])["n1"] == []


def test_requests_max_of_init_and_sum_plus_overhead() -> None:
    p = pod(cpu="500m", memory="1Gi")
    p["spec"]["containers"].append({"name": "d", "resources": {"requests": {"cpu": "250m"}}})
    p["spec"]["initContainers"] = [
        {"name": "i", "resources": {"requests": {"cpu": "1", "memory": "100Mi"}}}
    ]
    p["spec"]["overhead"] = {"cpu": "100m"}
    req = pod_requests(p)
    assert req["cpu"] == pytest.approx(1.1) and req["memory"] == 2**30


@pytest.mark.parametrize(
    ("cpu", "memory", "bound", "max_pods", "want"),
    [
        ("1", "1Gi", [], 110, []),
        ("4", "8Gi", [], 110, []),
        ("4100m", "1Gi", [], 110, ["Insufficient cpu"]),
        ("3", "7Gi", [("1", "1Gi")], 110, []),
        ("3", "7Gi", [("1500m", "2Gi")], 110, ["Insufficient cpu", "Insufficient memory"]),
        ("100m", None, [("100m", None)], 1, [ERR_TOO_MANY_PODS]),
        (None, None, [], 110, []),
    ],
)
def test_resources_fit(cpu: str | None, memory: str | None, bound: list[tuple[str, str | None]],
                       max_pods: int, want: list[str]) -> None:  # fmt: skip
    existing = [pod(f"b{i}", "n1", c, m) for i, (c, m) in enumerate(bound)]
    # Terminal pods hold nothing.
    done = pod("done", "n1", "4", "8Gi")
    done["status"] = {"phase": "Succeeded"}
    got = reasons(pod(cpu=cpu, memory=memory), [node("n1", pods=max_pods)], [*existing, done])
    assert got["n1"] == want


def _term(labels: dict[str, str], key: str = HOST, **extra: Any) -> Obj:
    return {"labelSelector": {"matchLabels": labels}, "topologyKey": key, **extra}


def _pod_affinity(kind: str, *terms: Obj) -> Obj:
    return {kind: {"requiredDuringSchedulingIgnoredDuringExecution": list(terms)}}


NODES3 = [node("n1", zone="a"), node("n2", zone="a"), node("n3", zone="b")]


def test_pod_affinity_same_host_and_zone() -> None:
    db = pod("db", "n1", labels={"app": "db"})
    p = pod(affinity=_pod_affinity("podAffinity", _term({"app": "db"})))
    assert reasons(p, NODES3, [db]) == {"n1": [], "n2": [ERR_AFFINITY], "n3": [ERR_AFFINITY]}
    pz = pod(affinity=_pod_affinity("podAffinity", _term({"app": "db"}, ZONE)))
    assert reasons(pz, NODES3, [db]) == {"n1": [], "n2": [], "n3": [ERR_AFFINITY]}


def test_pod_affinity_first_of_self_affine_group() -> None:
    aff = _pod_affinity("podAffinity", _term({"app": "web"}))
    first = pod(labels={"app": "web"}, affinity=aff)
    assert all(r == [] for r in reasons(first, NODES3).values())
    # Not self-affine: nothing matches anywhere, so no node fits.
    other = pod(labels={"app": "other"}, affinity=aff)
    assert all(r == [ERR_AFFINITY] for r in reasons(other, NODES3).values())


def test_pod_affinity_namespaces() -> None:
    db = pod("db", "n1", labels={"app": "db"}, ns="data")
    p = pod(affinity=_pod_affinity("podAffinity", _term({"app": "db"})))
    assert reasons(p, NODES3, [db])["n1"] == [ERR_AFFINITY]  # default: own namespace only
    p = pod(affinity=_pod_affinity("podAffinity", _term({"app": "db"}, namespaces=["data"])))
    assert reasons(p, NODES3, [db])["n1"] == []
    p = pod(affinity=_pod_affinity("podAffinity", _term({"app": "db"}, namespaceSelector={})))
    assert reasons(p, NODES3, [db])["n1"] == []


def test_pod_anti_affinity_and_symmetry() -> None:
    web = pod("web-1", "n1", labels={"app": "web"})
    p = pod(
        labels={"app": "web"},
        affinity=_pod_affinity("podAntiAffinity", _term({"app": "web"}, ZONE)),
    )
    assert reasons(p, NODES3, [web]) == {
        "n1": [ERR_ANTI_AFFINITY],
        "n2": [ERR_ANTI_AFFINITY],
        "n3": [],
    }
    # The existing pod's anti-affinity keeps the incoming pod away too.
    guard = pod("guard", "n3", labels={"app": "guard"},
                affinity=_pod_affinity("podAntiAffinity", _term({"app": "web"})))  # fmt: skip
    plain = pod(labels={"app": "web"})
    assert reasons(plain, NODES3, [guard])["n3"] == [ERR_EXISTING_ANTI_AFFINITY]
    assert reasons(plain, NODES3, [guard])["n1"] == []


def test_failure_message_like_upstream() -> None:
    nodes = [node("n1", disk="hdd"), node("n2", disk="ssd", cpu="1")]
    p = pod(cpu="2", nodeSelector={"disk": "ssd"})
    d = schedule(p, build_snapshot(nodes, []))
    assert d.node is None
    assert d.message == (
        "0/2 nodes are available: 1 Insufficient cpu, "
        "1 node(s) didn't match Pod's node affinity/selector."
    )
    assert ERR_NODE_AFFINITY in d.reasons["n1"]
    assert schedule(p, build_snapshot([], [])).message == "no nodes available to schedule pods"
