"""Node lifecycle decisions with a fake clock: staleness, taints, pod readiness, eviction."""

from __future__ import annotations

from typing import Any

import pytest

from kproxy.api.tolerations import tolerates
from kproxy.controllers.nodelifecycle import (
    NOT_READY,
    UNREACHABLE,
    HealthTracker,
    desired_taints,
    eviction_delay,
    not_ready_conditions,
    unknown_conditions,
)

Obj = dict[str, Any]
T0 = 1_700_000_000.0


def lease(renew: str) -> Obj:
    return {"spec": {"renewTime": renew}}


def node(ready: str = "True", taints: list[Obj] | None = None) -> Obj:
    return {
        "metadata": {"name": "n1"},
        "spec": {"taints": taints or []},
        "status": {
            "conditions": [
                {"type": "Ready", "status": ready, "lastHeartbeatTime": "t"},
                {"type": "MemoryPressure", "status": "False"},
            ]
        },
    }


def test_health_tracker_uses_local_observation_time() -> None:
    h = HealthTracker()
    n = node()
    # First sight gives a full grace period, whatever the lease's own timestamps say.
    assert h.observe("n1", h.probe(n, lease("2000-01-01T00:00:00Z")), T0) == T0
    assert h.observe("n1", h.probe(n, lease("2000-01-01T00:00:00Z")), T0 + 30) == T0
    assert h.observe("n1", h.probe(n, lease("2000-01-01T00:00:10Z")), T0 + 45) == T0 + 45
    h.forget("n1")
    assert h.observe("n1", h.probe(n, None), T0 + 100) == T0 + 100


def test_unknown_marks_every_condition() -> None:
    conds = unknown_conditions(node(), T0)
    assert conds is not None
    ready = next(c for c in conds if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("Unknown", "NodeStatusUnknown")
    assert all(c["status"] == "Unknown" for c in conds)
    assert unknown_conditions({"status": {"conditions": conds}}, T0 + 1) is None


@pytest.mark.parametrize(
    ("status", "before", "want"),
    [
        ("Unknown", [], {(UNREACHABLE, "NoSchedule"), (UNREACHABLE, "NoExecute")}),
        ("False", [], {(NOT_READY, "NoSchedule"), (NOT_READY, "NoExecute")}),
        (None, [{"key": UNREACHABLE, "effect": "NoSchedule"}], set()),
        (
            None,
            [{"key": "user", "effect": "NoSchedule"}, {"key": UNREACHABLE, "effect": "NoExecute"}],
            {("user", "NoSchedule")},
        ),
        (
            "Unknown",
            [{"key": NOT_READY, "effect": "NoSchedule"}],
            {(UNREACHABLE, "NoSchedule"), (UNREACHABLE, "NoExecute")},
        ),
    ],
)
def test_desired_taints(status: str | None, before: list[Obj], want: set[tuple[str, str]]) -> None:
    out = desired_taints(before, status, T0)
    assert out is not None
    assert {(t["key"], t["effect"]) for t in out} == want
    assert all("timeAdded" in t for t in out if t["effect"] == "NoExecute" and t["key"] != "user")
    assert desired_taints(out, status, T0 + 5) is None  # idempotent


def test_desired_taints_healthy_untainted_is_noop() -> None:
    assert desired_taints([], None, T0) is None
    assert desired_taints([], "True", T0) is None


def test_pod_not_ready() -> None:
    pod = {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
    conds = not_ready_conditions(pod, T0)
    assert conds is not None
    assert conds == [
        {"type": "Ready", "status": "False", "lastTransitionTime": conds[0]["lastTransitionTime"]}
    ]
    assert not_ready_conditions({"status": {"conditions": conds}}, T0) is None
    assert not_ready_conditions({"status": {"phase": "Succeeded", "conditions": [
        {"type": "Ready", "status": "True"}]}}, T0) is None  # fmt: skip


@pytest.mark.parametrize(
    ("toleration", "taint", "want"),
    [
        (
            {"key": "k", "operator": "Equal", "value": "v"},
            {"key": "k", "value": "v", "effect": "NoExecute"},
            True,
        ),
        ({"key": "k", "value": "x"}, {"key": "k", "value": "v", "effect": "NoExecute"}, False),
        (
            {"key": "k", "operator": "Exists"},
            {"key": "k", "value": "v", "effect": "NoSchedule"},
            True,
        ),
        ({"operator": "Exists"}, {"key": "any", "effect": "NoExecute"}, True),
        (
            {"operator": "Exists", "effect": "NoSchedule"},
            {"key": "any", "effect": "NoExecute"},
            False,
        ),
        ({"key": "", "operator": "Equal"}, {"key": "k", "effect": "NoExecute"}, False),
    ],
)
def test_tolerates(toleration: Obj, taint: Obj, want: bool) -> None:
    assert tolerates(toleration, taint) is want


UNREACH_AT_T0 = {"key": UNREACHABLE, "effect": "NoExecute", "timeAdded": "2023-11-14T22:13:20Z"}


def test_eviction_default_toleration() -> None:
    assert T0 == 1_700_000_000.0  # 2023-11-14T22:13:20Z
    pod: Obj = {"spec": {}}
    assert eviction_delay(pod, [UNREACH_AT_T0], T0 + 100, 300.0) == pytest.approx(200)
    assert eviction_delay(pod, [UNREACH_AT_T0], T0 + 301, 300.0) == pytest.approx(-1)


def test_eviction_toleration_seconds_and_forever() -> None:
    short = {
        "spec": {
            "tolerations": [
                {
                    "key": UNREACHABLE,
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 5,
                }
            ]
        }
    }
    forever = {"spec": {"tolerations": [{"operator": "Exists"}]}}  # fmt: skip
    assert eviction_delay(short, [UNREACH_AT_T0], T0 + 2, 300.0) == pytest.approx(3)
    assert eviction_delay(forever, [UNREACH_AT_T0], T0 + 10_000, 300.0) is None
    # A NoExecute taint nobody tolerates (and no default covers) evicts at once.
    assert eviction_delay({"spec": {}}, [{"key": "x", "effect": "NoExecute"}], T0, 300.0) == 0
    # NoSchedule taints never evict.
    assert eviction_delay({"spec": {}}, [{"key": "x", "effect": "NoSchedule"}], T0, 300.0) is None
