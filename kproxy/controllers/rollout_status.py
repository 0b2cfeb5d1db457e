"""Deployment status and conditions (pure): what ``status`` a sync writes.

Owns upstream's ``calculateStatus`` (replica counts summed over the ReplicaSets),
the Available condition (MinimumReplicasAvailable / MinimumReplicasUnavailable
against ``replicas - maxUnavailable``), ``syncRolloutStatus``'s Progressing
condition (ReplicaSetUpdated while progressing, NewReplicaSetAvailable when
complete, ProgressDeadlineExceeded past ``progressDeadlineSeconds``) and the
paused/resumed Progressing states; NewReplicaSetCreated and FoundNewReplicaSet are
set by :mod:`.deployment` when it creates or first finds the new ReplicaSet.

Invariants (``SetDeploymentCondition``): setting a condition with the same status
and reason changes nothing; a condition that keeps its status keeps its
``lastTransitionTime``; times are ``metav1.Time`` text from the injected clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from kproxy.api.meta import format_time
from kproxy.controllers.rollout import (
    MIN_AVAILABLE,
    MIN_UNAVAILABLE,
    NEW_RS_AVAILABLE,
    PAUSED,
    RESUMED,
    RS_UPDATED,
    TIMED_OUT,
    DeploymentView,
    RSView,
    deployment_complete,
    int_field,
    max_unavailable,
    time_field,
)

Obj = dict[str, Any]


def now_text(now: float) -> str:
    return format_time(datetime.fromtimestamp(now, UTC))


def get_condition(conditions: Iterable[Mapping[str, Any]], ctype: str) -> Mapping[str, Any] | None:
    for cond in conditions:
        if cond.get("type") == ctype:
            return cond
    return None


def set_condition(
    conditions: list[Obj], ctype: str, status: str, reason: str, message: str, now: float
) -> list[Obj]:
    """Upstream ``SetDeploymentCondition``: same status+reason is a no-op; the
    transition time survives while the status stays the same."""
    current = get_condition(conditions, ctype)
    if current is not None and current.get("status") == status and current.get("reason") == reason:
        return conditions
    stamp = now_text(now)
    cond: Obj = {
        "type": ctype,
        "status": status,
        "lastUpdateTime": stamp,
        "lastTransitionTime": stamp,
        "reason": reason,
        "message": message,
    }
    if current is not None and current.get("status") == status:
        cond["lastTransitionTime"] = current.get("lastTransitionTime", stamp)
    return [c for c in conditions if c.get("type") != ctype] + [cond]


def paused_conditions(d: DeploymentView, conditions: list[Obj], now: float) -> list[Obj]:
    """``checkPausedConditions``: Progressing Unknown while paused / once resumed."""
    if d.progress_deadline is None:
        return conditions
    cond = get_condition(conditions, "Progressing")
    reason = cond.get("reason") if cond is not None else None
    if reason == TIMED_OUT:
        return conditions
    if d.paused and reason != PAUSED:
        return set_condition(
            conditions, "Progressing", "Unknown", PAUSED, "Deployment is paused", now
        )
    if not d.paused and reason == PAUSED:
        msg = "Deployment is resumed"
        return set_condition(conditions, "Progressing", "Unknown", RESUMED, msg, now)
    return conditions


def _progressing(d: DeploymentView, new: Mapping[str, Any]) -> bool:
    old = d.status
    old_olds = int_field(old.get("replicas")) - int_field(old.get("updatedReplicas"))
    new_olds = int_field(new.get("replicas")) - int_field(new.get("updatedReplicas"))
    return (
        int_field(new.get("updatedReplicas")) > int_field(old.get("updatedReplicas"))
        or new_olds < old_olds
        or int_field(new.get("readyReplicas")) > int_field(old.get("readyReplicas"))
        or int_field(new.get("availableReplicas")) > int_field(old.get("availableReplicas"))
    )


def timed_out(d: DeploymentView, conditions: Iterable[Mapping[str, Any]], now: float) -> bool:
    if d.progress_deadline is None:
        return False
    cond = get_condition(conditions, "Progressing")
    if cond is None or cond.get("reason") == NEW_RS_AVAILABLE:
        return False
    if cond.get("reason") == TIMED_OUT:
        return True
    return time_field(cond.get("lastUpdateTime")) + d.progress_deadline < now


def calculate_status(
    d: DeploymentView,
    rss: Iterable[RSView],
    new: RSView | None,
    conditions: list[Obj],
    now: float,
    *,
    rollout: bool,
) -> Obj:
    """The Deployment's next status (``calculateStatus``, plus ``syncRolloutStatus``'s
    Progressing condition when ``rollout``)."""
    all_rss = list(rss)
    available = sum(rs.available for rs in all_rss)
    status: Obj = {
        "observedGeneration": d.generation,
        "replicas": sum(rs.status_replicas for rs in all_rss),
        "updatedReplicas": new.status_replicas if new is not None else 0,
        "readyReplicas": sum(rs.ready for rs in all_rss),
        "availableReplicas": available,
        "unavailableReplicas": max(sum(rs.replicas for rs in all_rss) - available, 0),
    }
    if d.collision_count is not None:
        status["collisionCount"] = d.collision_count
    if available >= d.replicas - max_unavailable(d):
        msg = "Deployment has minimum availability."
        conditions = set_condition(conditions, "Available", "True", MIN_AVAILABLE, msg, now)
    else:
        msg = "Deployment does not have minimum availability."
        conditions = set_condition(conditions, "Available", "False", MIN_UNAVAILABLE, msg, now)
    if rollout:
        conditions = _rollout_condition(d, status, new, conditions, now)
    status["conditions"] = conditions
    return status


def _rollout_condition(
    d: DeploymentView, status: Obj, new: RSView | None, conditions: list[Obj], now: float
) -> list[Obj]:
    if d.progress_deadline is None:
        return [c for c in conditions if c.get("type") != "Progressing"]
    cond = get_condition(conditions, "Progressing")
    complete = (
        status["replicas"] == status["updatedReplicas"]
        and cond is not None
        and cond.get("reason") == NEW_RS_AVAILABLE
    )
    if complete:
        return conditions
    name = new.name if new is not None else ""
    if deployment_complete(d, status):
        msg = f'ReplicaSet "{name}" has successfully progressed.'
        return set_condition(conditions, "Progressing", "True", NEW_RS_AVAILABLE, msg, now)
    if _progressing(d, status):
        stamp = now_text(now)
        fresh: Obj = {
            "type": "Progressing",
            "status": "True",
            "lastUpdateTime": stamp,
            "lastTransitionTime": stamp,
            "reason": RS_UPDATED,
            "message": f'ReplicaSet "{name}" is progressing.',
        }
        if cond is not None and cond.get("status") == "True":
            fresh["lastTransitionTime"] = cond.get("lastTransitionTime", stamp)
        return [c for c in conditions if c.get("type") != "Progressing"] + [fresh]
    if timed_out(d, conditions, now):
        msg = f'ReplicaSet "{name}" has timed out progressing.'
        return set_condition(conditions, "Progressing", "False", TIMED_OUT, msg, now)
    return conditions
