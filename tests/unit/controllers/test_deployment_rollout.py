"""Pure rollout planning: hash, fenceposts, rolling/recreate/scaling tables, status."""

from __future__ import annotations

from typing import Any

import pytest

from kproxy.controllers.rollout import (
    DeploymentView,
    RSView,
    cleanup_candidates,
    compute_hash,
    equal_ignore_hash,
    fnv32a,
    max_surge,
    max_unavailable,
    plan_rollout,
    resolve_fenceposts,
    safe_encode,
    scaled_value,
)
from kproxy.controllers.rollout_status import (
    calculate_status,
    paused_conditions,
    set_condition,
)
from kproxy.errors import KProxyError

V1 = {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"image": "web:1"}]}}
V2 = {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"image": "web:2"}]}}


def dep(replicas: int = 4, surge: Any = "25%", unavail: Any = "25%", **kw: Any) -> DeploymentView:
    return DeploymentView(
        "web", replicas, template=kw.pop("template", V2), max_surge=surge,
        max_unavailable=unavail, **kw,
    )  # fmt: skip


def rs(name: str, replicas: int, available: int = 0, *, created: float, **kw: Any) -> RSView:
    kw.setdefault("template", V1)
    kw.setdefault("status_replicas", replicas)
    kw.setdefault("ready", available)
    return RSView(name, replicas, available=available, created=created, **kw)


# ------------------------------------------------------------------ hash


def test_fnv32a_and_safe_encode_match_the_reference_vectors() -> None:
    assert fnv32a(b"") == 0x811C9DC5
    assert fnv32a(b"a") == 0xE40C292C
    assert fnv32a(b"foobar") == 0xBF9CF968
    # rand.SafeEncodeString maps each rune onto "bcdfghjklmnpqrstvwxz2456789" mod 27.
    assert safe_encode("123") == "567"
    assert safe_encode("0") == "4"


def test_hash_is_stable_safe_and_salted_by_collision_count() -> None:
    h = compute_hash(V1)
    assert h == compute_hash({"spec": V1["spec"], "metadata": V1["metadata"]})  # key order
    assert set(h) <= set("bcdfghjklmnpqrstvwxz2456789") and 1 <= len(h) <= 10
    assert compute_hash(V2) != h
    assert compute_hash(V1, 0) != h  # a collision count (even 0) changes the hash
    assert compute_hash(V1, 1) != compute_hash(V1, 0)


def test_templates_compare_ignoring_the_hash_label() -> None:
    hashed = {
        "metadata": {"labels": {"app": "web", "pod-template-hash": "abc"}},
        "spec": V1["spec"],
    }
    assert equal_ignore_hash(hashed, V1)
    assert not equal_ignore_hash(hashed, V2)
    bare = {"metadata": {"labels": {"pod-template-hash": "x"}}, "spec": {}}
    assert equal_ignore_hash(bare, {"spec": {}})


# ------------------------------------------------------------- fenceposts


@pytest.mark.parametrize(
    ("surge", "unavail", "desired", "want"),
    [
        ("25%", "25%", 10, (3, 2)),  # surge rounds up, unavailable rounds down
        ("25%", "25%", 4, (1, 1)),
        ("25%", "25%", 1, (1, 0)),
        ("10%", "10%", 5, (1, 0)),
        ("0%", "0%", 10, (0, 1)),  # both zero: one unavailable allowed
        (0, 0, 3, (0, 1)),
        (2, "50%", 3, (2, 1)),
        ("100%", 0, 3, (3, 0)),
        (None, None, 3, (0, 1)),
    ],
)
def test_fenceposts(surge: Any, unavail: Any, desired: int, want: tuple[int, int]) -> None:
    assert resolve_fenceposts(surge, unavail, desired) == want


def test_scaled_value_rejects_garbage_and_clamps_unavailable() -> None:
    for bad in ("5", "x%", True, 1.5):
        with pytest.raises(KProxyError):
            scaled_value(bad, 10, True)
    assert max_unavailable(dep(3, 0, 5)) == 3  # never more than replicas
    assert max_unavailable(dep(0)) == 0
    assert max_surge(dep(4, recreate=True)) == 0 == max_unavailable(dep(4, recreate=True))


# -------------------------------------------------------------- rolling


def test_first_sync_creates_the_new_replicaset_at_full_size() -> None:
    plan = plan_rollout(dep(3), [])
    assert plan.create is not None
    assert (plan.create.replicas, plan.create.revision) == (3, 1)
    assert plan.create.name == f"web-{compute_hash(V2)}" and plan.scale == {}


def test_template_change_creates_by_surge_and_scales_old_down_by_unavailable() -> None:
    old = rs("web-old", 4, 4, created=1, revision=1)
    plan = plan_rollout(dep(4), [old])  # surge 1, unavailable 1
    assert plan.create is not None and plan.create.replicas == 1
    assert plan.create.revision == 2
    assert plan.scale == {"web-old": 3}


@pytest.mark.parametrize(
    ("olds", "new", "want"),
    [
        # room under replicas+surge: only the new one grows (one step per sync)
        ([(3, 3)], (1, 0), {"web-new": 2}),
        # at the surge limit, new pods not available yet: nothing may go down
        ([(3, 3)], (2, 0), {}),
        # new pods available: old ones go down as far as minAvailable allows
        ([(3, 3)], (2, 2), {"web-old0": 1}),
        # done scaling up; the old one goes away entirely
        ([(1, 1)], (4, 4), {"web-old0": 0}),
    ],
)
def test_rolling_steps(
    olds: list[tuple[int, int]], new: tuple[int, int], want: dict[str, int]
) -> None:
    rss = [rs(f"web-old{i}", n, a, created=i, revision=i + 1) for i, (n, a) in enumerate(olds)]
    rss.append(rs("web-new", new[0], new[1], created=10, template=V2, revision=9))
    plan = plan_rollout(dep(4), rss)  # 25%/25% of 4: surge 1, unavailable 1
    assert plan.create is None and plan.new_rs == "web-new"
    assert plan.scale == want


def test_unhealthy_old_replicas_go_first_oldest_first() -> None:
    rss = [
        rs("a", 2, 0, created=1, revision=1),  # not available at all
        rs("b", 2, 2, created=2, revision=2),
        rs("new", 0, 0, created=3, template=V2, revision=3),
    ]
    plan = plan_rollout(dep(4, 0, 1), rss)
    assert plan.scale == {"a": 1}


def test_percentages_round_surge_up_and_unavailable_down() -> None:
    # 10 replicas at 25%/25%: up to 13 pods, at least 8 available.
    old = rs("old", 10, 10, created=1, revision=1)
    plan = plan_rollout(dep(10), [old])
    assert plan.create is not None and plan.create.replicas == 3
    assert plan.scale == {"old": 8}


def test_max_unavailable_zero_keeps_everything_available() -> None:
    old = rs("old", 3, 3, created=1, revision=1)
    new = rs("new", 1, 0, created=2, template=V2, revision=2)
    plan = plan_rollout(dep(3, 1, 0), [old, new])
    assert plan.scale == {}  # at 3+1 pods, nothing available to spare


# ------------------------------------------------------------- recreate


def test_recreate_scales_old_down_waits_then_creates() -> None:
    d = dep(3, recreate=True)
    old = rs("old", 3, 3, created=1, revision=1)
    assert plan_rollout(d, [old]).scale == {"old": 0}
    drained = rs("old", 0, 0, created=1, revision=1, status_replicas=0)
    waiting = plan_rollout(d, [drained], old_pods_running=True)
    assert waiting.waiting and waiting.create is None and waiting.scale == {}
    plan = plan_rollout(d, [drained])
    assert plan.create is not None and plan.create.replicas == 3 and plan.step == "recreate"


# --------------------------------------------------------------- scaling


def test_proportional_scaling_matches_the_upstream_docs_example() -> None:
    # 10 replicas, maxSurge 3, maxUnavailable 2, mid-rollout: old 8, new 5; scaled to 15.
    ann = {"desired": 10, "max_replicas": 13}
    old = rs("old", 8, 8, created=1, revision=1, **ann)
    new = rs("new", 5, 0, created=2, template=V2, revision=2, **ann)
    plan = plan_rollout(dep(15, 3, 2), [old, new])
    assert plan.step == "sync"
    assert plan.scale == {"old": 11, "new": 7}  # "3 to the old, 2 to the new"


def test_proportional_scale_down_and_to_zero() -> None:
    ann = {"desired": 10, "max_replicas": 13}
    old = rs("old", 8, 8, created=1, revision=1, **ann)
    new = rs("new", 5, 0, created=2, template=V2, revision=2, **ann)
    down = plan_rollout(dep(5, 3, 2), [old, new])
    assert sum(down.scale.values()) == 8 and down.scale["old"] > down.scale["new"]
    zero = plan_rollout(dep(0, 3, 2), [old, new])
    assert zero.scale == {"old": 0, "new": 0}


def test_single_active_replicaset_takes_the_whole_count() -> None:
    only = rs("only", 3, 3, created=1, template=V2, revision=1, desired=3, max_replicas=4)
    plan = plan_rollout(dep(5), [only])
    assert plan.step == "sync" and plan.scale == {"only": 5}


def test_paused_deployment_scales_but_does_not_roll() -> None:
    old = rs("old", 3, 3, created=1, revision=1, desired=3, max_replicas=4)
    plan = plan_rollout(dep(3, paused=True), [old])  # template differs: would roll
    assert plan.create is None and plan.step == "sync" and plan.scale == {}
    assert plan_rollout(dep(4, paused=True), [old]).scale == {"old": 4}


# ------------------------------------------------------- revisions, cleanup


def test_rollback_to_an_old_template_gets_a_new_revision() -> None:
    back = rs("v2", 0, 0, created=1, template=V2, revision=1, status_replicas=0)
    cur = rs("v1", 3, 3, created=2, revision=2)
    plan = plan_rollout(dep(3), [back, cur])
    assert plan.new_rs == "v2" and plan.revision == 3 and plan.create is None


def test_cleanup_keeps_revision_history_limit_and_only_idle_observed_ones() -> None:
    olds = [
        rs("r1", 0, 0, created=1, revision=1, status_replicas=0),
        rs("r2", 0, 0, created=2, revision=2, status_replicas=1),  # still has a pod
        rs("r3", 0, 0, created=3, revision=3, status_replicas=0, generation=2),  # unobserved
        rs("r4", 0, 0, created=4, revision=4, status_replicas=0),
        rs("r5", 0, 0, created=5, revision=5, status_replicas=0, deleting=True),
    ]
    assert cleanup_candidates(dep(3, revision_history_limit=1), olds) == ["r1"]
    assert cleanup_candidates(dep(3, revision_history_limit=0), olds) == ["r1", "r4"]
    assert cleanup_candidates(dep(3, revision_history_limit=None), olds) == []


def test_complete_rollout_cleans_up() -> None:
    done = {"observedGeneration": 1, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3}
    d = dep(3, revision_history_limit=0, generation=1, status=done)
    olds = [rs("r1", 0, 0, created=1, revision=1, status_replicas=0)]
    new = rs("new", 3, 3, created=2, template=V2, revision=2, desired=3, max_replicas=4)
    assert plan_rollout(d, [*olds, new]).cleanup == ["r1"]


# ---------------------------------------------------------------- status

NOW = 1_700_000_000.0


def test_status_counts_and_available_condition() -> None:
    old = rs("old", 1, 1, created=1)
    new = rs("new", 3, 2, created=2, template=V2)
    st = calculate_status(dep(4, generation=7), [old, new], new, [], NOW, rollout=False)
    assert {k: v for k, v in st.items() if k != "conditions"} == {
        "observedGeneration": 7,
        "replicas": 4,
        "updatedReplicas": 3,
        "readyReplicas": 3,
        "availableReplicas": 3,
        "unavailableReplicas": 1,
    }
    [avail] = st["conditions"]
    assert (avail["type"], avail["status"], avail["reason"]) == (
        "Available",
        "True",
        "MinimumReplicasAvailable",
    )
    low = calculate_status(dep(4), [rs("new", 4, 1, created=1)], None, [], NOW, rollout=False)
    assert low["conditions"][0]["reason"] == "MinimumReplicasUnavailable"


def _progressing(st: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in st["conditions"] if c["type"] == "Progressing")


def test_progressing_condition_through_a_rollout() -> None:
    d0 = dep(2, generation=1, status={"replicas": 2, "updatedReplicas": 0})
    new = rs("new", 2, 0, created=1, template=V2, status_replicas=1, ready=0)
    old = rs("old", 1, 1, created=0, status_replicas=1)
    st = calculate_status(d0, [old, new], new, [], NOW, rollout=True)
    cond = _progressing(st)
    assert (cond["status"], cond["reason"]) == ("True", "ReplicaSetUpdated")
    assert cond["message"] == 'ReplicaSet "new" is progressing.'

    d1 = dep(2, generation=1, status=st)
    done = rs("new", 2, 2, created=1, template=V2)
    st2 = calculate_status(d1, [done], done, st["conditions"], NOW + 5, rollout=True)
    cond2 = _progressing(st2)
    assert cond2["reason"] == "NewReplicaSetAvailable"
    assert cond2["message"] == 'ReplicaSet "new" has successfully progressed.'
    assert cond2["lastTransitionTime"] == cond["lastTransitionTime"]  # still True


def test_progress_deadline_exceeded() -> None:
    started = set_condition([], "Progressing", "True", "ReplicaSetUpdated", "x", NOW)
    stuck = rs("new", 2, 0, created=1, template=V2, status_replicas=2)
    status = {"replicas": 2, "updatedReplicas": 2, "readyReplicas": 0, "availableReplicas": 0}
    d = dep(2, progress_deadline=60, status=status)
    early = calculate_status(d, [stuck], stuck, started, NOW + 30, rollout=True)
    assert _progressing(early)["reason"] == "ReplicaSetUpdated"
    late = calculate_status(d, [stuck], stuck, started, NOW + 61, rollout=True)
    cond = _progressing(late)
    assert (cond["status"], cond["reason"]) == ("False", "ProgressDeadlineExceeded")
    no_deadline = calculate_status(
        dep(2, progress_deadline=None), [stuck], stuck, started, NOW, rollout=True
    )
    assert [c["type"] for c in no_deadline["conditions"]] == ["Available"]


def test_set_condition_same_reason_is_a_no_op_and_pause_conditions() -> None:
    conds = set_condition([], "Available", "True", "MinimumReplicasAvailable", "m", NOW)
    assert (
        set_condition(conds, "Available", "True", "MinimumReplicasAvailable", "m", NOW + 9) == conds
    )
    paused = paused_conditions(dep(1, paused=True), [], NOW)
    assert (paused[0]["status"], paused[0]["reason"]) == ("Unknown", "DeploymentPaused")
    resumed = paused_conditions(dep(1), paused, NOW)
    assert resumed[0]["reason"] == "DeploymentResumed"
    assert paused_conditions(dep(1, paused=True, progress_deadline=None), [], NOW) == []


def test_views_read_objects() -> None:
    d = DeploymentView.of(
        {
            "metadata": {"name": "web", "generation": 3},
            "spec": {
                "replicas": 5,
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 2}},
                "template": V1,
                "progressDeadlineSeconds": 2147483647,
            },
            "status": {"collisionCount": 1},
        }
    )
    assert (d.replicas, d.max_surge, d.max_unavailable, d.progress_deadline) == (5, 2, "25%", None)
    assert d.collision_count == 1 and d.generation == 3 and d.revision_history_limit is None
    r = RSView.of(
        {
            "metadata": {
                "name": "web-x",
                "creationTimestamp": "2024-01-01T00:00:10Z",
                "annotations": {
                    "deployment.kubernetes.io/revision": "4",
                    "deployment.kubernetes.io/desired-replicas": "5",
                },
            },
            "spec": {"replicas": 2, "template": V1},
            "status": {"replicas": 2, "availableReplicas": 1, "readyReplicas": 2},
        }
    )
    assert (r.revision, r.desired, r.max_replicas, r.available, r.ready) == (4, 5, None, 1, 2)
    assert r.created > 0
