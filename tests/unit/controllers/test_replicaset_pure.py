"""ReplicaSet pure parts: claiming, scale-down order, pod template, status, expectations."""

from __future__ import annotations

from typing import Any

from kproxy.api.selectors import from_label_selector
from kproxy.controllers.ownership import (
    adopted,
    controller_ref,
    controller_ref_to,
    plan_claim,
    released,
)
from kproxy.controllers.replicaset import (
    Expectations,
    calculate_status,
    is_pod_available,
    pod_from_template,
    pods_to_delete,
)

Obj = dict[str, Any]
RS: Obj = {
    "apiVersion": "apps/v1",
    "kind": "ReplicaSet",
    "metadata": {"name": "web-abc", "namespace": "default", "uid": "rs-uid", "generation": 4},
    "spec": {
        "replicas": 3,
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web", "tier": "fe"}, "annotations": {"a": "b"}},
            "spec": {"containers": [{"name": "c", "image": "web:1"}]},
        },
    },
}


def pod(
    name: str,
    *,
    node: str = "",
    phase: str = "Running",
    ready_at: str | None = None,
    created: str = "2024-01-01T00:00:00Z",
    labels: dict[str, str] | None = None,
    owner: str | None = None,
    restarts: int = 0,
    cost: int | None = None,
) -> Obj:
    meta: Obj = {"name": name, "namespace": "default", "uid": f"uid-{name}",
                 "creationTimestamp": created, "labels": labels or {"app": "web"}}  # fmt: skip
    if owner:
        meta["ownerReferences"] = [{"uid": owner, "controller": True, "kind": "ReplicaSet"}]
    if cost is not None:
        meta["annotations"] = {"controller.kubernetes.io/pod-deletion-cost": str(cost)}
    status: Obj = {"phase": phase, "containerStatuses": [{"restartCount": restarts}]}
    if ready_at:
        status["conditions"] = [{"type": "Ready", "status": "True", "lastTransitionTime": ready_at}]
    return {"metadata": meta, "spec": {"nodeName": node} if node else {}, "status": status}


def names(pods: list[Obj]) -> list[str]:
    return [p["metadata"]["name"] for p in pods]


def test_claim_keeps_adopts_releases_and_ignores_others() -> None:
    sel = from_label_selector(RS["spec"]["selector"])
    mine = pod("mine", owner="rs-uid")
    strayed = pod("strayed", owner="rs-uid", labels={"app": "other"})
    orphan = pod("orphan")
    other = pod("other", owner="someone-else")
    dying = pod("dying")
    dying["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    claim = plan_claim(
        RS, sel, [mine, strayed, orphan, other, dying, pod("x", labels={"app": "other"})]
    )
    assert names(claim.owned) == ["mine"]
    assert names(claim.adopt) == ["orphan"]
    assert names(claim.release) == ["strayed"]
    deleting = {**RS, "metadata": {**RS["metadata"], "deletionTimestamp": "now"}}
    claim = plan_claim(deleting, sel, [mine, strayed, orphan])
    assert names(claim.owned) == ["mine"] and not claim.adopt and not claim.release


def test_adopt_and_release_edit_only_the_references() -> None:
    ref = controller_ref_to(RS)
    assert ref == {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-abc",
                   "uid": "rs-uid", "controller": True, "blockOwnerDeletion": True}  # fmt: skip
    p = pod("p")
    took = adopted(p, ref)
    assert controller_ref(took) == ref and "ownerReferences" not in p["metadata"]
    assert "ownerReferences" not in released(took, "rs-uid")["metadata"]


def test_scale_down_order() -> None:
    pods = [
        pod(
            "old-ready", node="n1", ready_at="2024-01-01T00:00:00Z", created="2024-01-01T00:00:00Z"
        ),
        pod(
            "new-ready", node="n2", ready_at="2024-01-01T01:00:00Z", created="2024-01-01T00:30:00Z"
        ),
        pod("unscheduled", phase="Pending"),
        pod("pending", node="n5", phase="Pending"),
        pod("not-ready", node="n3"),
        pod("cheap", node="n4", ready_at="2024-01-01T00:00:00Z", cost=-5),
    ]
    order = names(pods_to_delete(pods, 6))
    assert len(order) == 6
    ranked = names(pods_to_delete(pods, 5))
    assert ranked == ["unscheduled", "pending", "not-ready", "cheap", "new-ready"]
    assert names(pods_to_delete(pods, 1)) == ["unscheduled"]


def test_doubled_up_nodes_restarts_and_age_break_ties() -> None:
    t = "2024-01-01T00:00:00Z"
    a = pod("a", node="busy", ready_at=t)
    b = pod("b", node="busy", ready_at=t)
    c = pod("c", node="quiet", ready_at=t)
    assert names(pods_to_delete([c, a, b], 1)) == ["a"]  # two on "busy"
    flappy = pod("flappy", node="x", ready_at=t, restarts=4)
    calm = pod("calm", node="y", ready_at=t)
    assert names(pods_to_delete([calm, flappy], 1)) == ["flappy"]
    older = pod("older", node="x", ready_at=t, created="2024-01-01T00:00:00Z")
    newer = pod("newer", node="y", ready_at=t, created="2024-01-02T00:00:00Z")
    assert names(pods_to_delete([older, newer], 1)) == ["newer"]


def test_pod_from_template() -> None:
    p = pod_from_template(RS)
    assert p["metadata"]["generateName"] == "web-abc-"
    assert p["metadata"]["labels"] == {"app": "web", "tier": "fe"}
    assert p["metadata"]["annotations"] == {"a": "b"}
    assert controller_ref(p) == controller_ref_to(RS)
    assert p["spec"] == RS["spec"]["template"]["spec"]
    assert p["spec"] is not RS["spec"]["template"]["spec"]


def test_status_counts_and_min_ready_seconds() -> None:
    now = 1_704_067_200.0 + 100  # 2024-01-01T00:01:40Z
    pods = [
        pod("a", ready_at="2024-01-01T00:00:00Z", labels={"app": "web", "tier": "fe"}),
        pod("b", ready_at="2024-01-01T00:01:35Z"),
        pod("c"),
    ]
    st = calculate_status(RS, pods, now)
    assert st == {"replicas": 3, "fullyLabeledReplicas": 1, "readyReplicas": 2,
                  "availableReplicas": 2, "observedGeneration": 4}  # fmt: skip
    slow = {**RS, "spec": {**RS["spec"], "minReadySeconds": 10}}
    assert calculate_status(slow, pods, now)["availableReplicas"] == 1
    assert is_pod_available(pods[1], 10, now + 10)


def test_replica_failure_condition_comes_and_goes() -> None:
    st = calculate_status(RS, [], 0.0, ("FailedCreate", "quota"))
    [cond] = st["conditions"]
    assert (cond["type"], cond["reason"], cond["message"]) == (
        "ReplicaFailure",
        "FailedCreate",
        "quota",
    )
    healed = calculate_status({**RS, "status": st}, [], 0.0)
    assert "conditions" not in healed


def test_expectations() -> None:
    clock = [0.0]
    exp = Expectations(ttl=10, clock=lambda: clock[0])
    assert exp.satisfied("k")
    exp.expect("k", adds=2)
    exp.created("k")
    assert not exp.satisfied("k")
    exp.created("k")
    assert exp.satisfied("k")
    exp.expect("k", deletes=["default/a", "default/b"])
    exp.deleted("k", "default/a")
    exp.deleted("k", "default/a")  # seen twice (update with deletionTimestamp, then delete)
    assert not exp.satisfied("k")
    clock[0] = 11
    assert exp.satisfied("k")  # expired
    exp.forget("k")
    assert exp.satisfied("k")
