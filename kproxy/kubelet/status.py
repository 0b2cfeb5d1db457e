"""Pod status from container states: phase, conditions, the ``status`` object (pure).

Owns :func:`pod_phase`, :func:`pod_conditions` and :func:`pod_status`. Inputs are plain
data (container statuses as the API shapes them, the previous conditions, "now"), so
every rule is unit-tested without processes.

Rules (upstream ``getPhase`` and ``generateAPIPodStatus``):

- Pending until every container has started at least once (waiting ones that never
  ran — pulling, backing off before a first start — keep the pod Pending);
- Running while any container runs or will be restarted;
- Succeeded when all terminated with 0 and none will restart; Failed when all
  terminated, some non-zero, and the restart policy will not restart them
  (``Never``; ``OnFailure`` restarts non-zero exits, ``Always`` everything);
- conditions ``PodScheduled`` (True: the pod reached this node), ``PodReadyToStartContainers``
  (the sandbox exists), ``Initialized`` (no init containers here: True), ``ContainersReady``
  (all containers ready) and ``Ready`` (ContainersReady and every readiness gate);
  ``lastTransitionTime`` moves only when a condition's status changes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Obj = dict[str, Any]


def now_rfc3339(when: dt.datetime | None = None) -> str:
    return (when or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_phase(restart_policy: str, statuses: Sequence[Mapping[str, Any]]) -> str:
    if not statuses:
        return "Pending"
    running = waiting = succeeded = failed = 0
    never_started = 0
    for st in statuses:
        state = st.get("state") or {}
        if "running" in state:
            running += 1
        elif "terminated" in state:
            code = int((state["terminated"] or {}).get("exitCode") or 0)
            if code == 0:
                succeeded += 1
            else:
                failed += 1
        else:
            waiting += 1
            if not st.get("lastState", {}).get("terminated"):
                never_started += 1
    if never_started:
        return "Pending"
    if running or waiting:
        return "Running"
    # All terminated: will anything restart?
    if restart_policy == "Always":
        return "Running"
    if restart_policy == "OnFailure" and failed:
        return "Running"
    return "Failed" if failed else "Succeeded"


def _condition(
    ctype: str, ok: bool, previous: Mapping[str, Mapping[str, Any]], now: str, reason: str = ""
) -> Obj:
    status = "True" if ok else "False"
    prev = previous.get(ctype)
    since = now
    if prev is not None and prev.get("status") == status and prev.get("lastTransitionTime"):
        since = str(prev["lastTransitionTime"])
    cond: Obj = {
        "type": ctype,
        "status": status,
        "lastProbeTime": None,
        "lastTransitionTime": since,
    }
    if reason and not ok:
        cond["reason"] = reason
    return cond


def pod_conditions(
    *,
    sandbox_ready: bool,
    statuses: Sequence[Mapping[str, Any]],
    phase: str,
    readiness_gates: Iterable[str] = (),
    gate_status: Mapping[str, str] | None = None,
    previous: Sequence[Mapping[str, Any]] = (),
    now: str,
) -> list[Obj]:
    prev = {str(c.get("type")): c for c in previous if isinstance(c, Mapping)}
    terminal = phase in ("Succeeded", "Failed")
    containers_ready = bool(statuses) and all(bool(s.get("ready")) for s in statuses)
    if terminal:
        containers_ready = False
    gates = gate_status or {}
    gates_ok = all(gates.get(g) == "True" for g in readiness_gates)
    not_ready = "PodCompleted" if terminal else "ContainersNotReady"
    return [
        _condition("PodReadyToStartContainers", sandbox_ready, prev, now),
        _condition("Initialized", True, prev, now),
        _condition("Ready", containers_ready and gates_ok, prev, now,
                   not_ready if not containers_ready else "ReadinessGatesNotReady"),
        _condition("ContainersReady", containers_ready, prev, now, not_ready),
        _condition("PodScheduled", True, prev, now),
    ]  # fmt: skip


def pod_status(
    pod: Mapping[str, Any],
    *,
    statuses: Sequence[Mapping[str, Any]],
    sandbox_ready: bool,
    pod_ip: str | None,
    host_ip: str | None,
    start_time: str | None,
    now: str,
) -> Obj:
    """The ``status`` the kubelet writes for ``pod`` (containers in spec order)."""
    spec = pod.get("spec") or {}
    old = pod.get("status") or {}
    phase = pod_phase(str(spec.get("restartPolicy") or "Always"), statuses)
    gates = [
        str(g.get("conditionType"))
        for g in spec.get("readinessGates") or ()
        if isinstance(g, Mapping) and g.get("conditionType")
    ]
    gate_status = {
        str(c.get("type")): str(c.get("status"))
        for c in old.get("conditions") or ()
        if isinstance(c, Mapping) and c.get("type") in gates
    }
    out: Obj = {
        "phase": phase,
        "conditions": pod_conditions(
            sandbox_ready=sandbox_ready,
            statuses=statuses,
            phase=phase,
            readiness_gates=gates,
            gate_status=gate_status,
            previous=old.get("conditions") or (),
            now=now,
        ),
        "containerStatuses": [dict(s) for s in statuses],
        "qosClass": str(old.get("qosClass") or "BestEffort"),
    }
    # Readiness gates are owned by others: carry their conditions over untouched.
    out["conditions"] += [
        c for c in old.get("conditions") or () if isinstance(c, Mapping) and c.get("type") in gates
    ]
    if host_ip:
        out["hostIP"] = host_ip
        out["hostIPs"] = [{"ip": host_ip}]
    if pod_ip:
        out["podIP"] = pod_ip
        out["podIPs"] = [{"ip": pod_ip}]
    if start_time:
        out["startTime"] = start_time
    return out
