"""Pod phase, conditions and the status object, from container states (pure)."""

from __future__ import annotations

from typing import Any

from kproxy.kubelet.status import pod_conditions, pod_phase, pod_status


def running(ready: bool = True) -> dict[str, Any]:
    return {"name": "c", "ready": ready, "state": {"running": {"startedAt": "t"}}}


def terminated(code: int) -> dict[str, Any]:
    return {"name": "c", "ready": False, "state": {"terminated": {"exitCode": code}}}


def waiting(restarted: bool) -> dict[str, Any]:
    last = {"terminated": {"exitCode": 1}} if restarted else {}
    return {"name": "c", "ready": False, "state": {"waiting": {"reason": "X"}}, "lastState": last}


def test_phase_rules() -> None:
    assert pod_phase("Always", []) == "Pending"
    assert pod_phase("Always", [waiting(False)]) == "Pending"
    assert pod_phase("Always", [running(), waiting(False)]) == "Pending"
    assert pod_phase("Always", [waiting(True)]) == "Running"  # crash loop
    assert pod_phase("Always", [running(), terminated(0)]) == "Running"
    assert pod_phase("Always", [terminated(0)]) == "Running"  # will restart
    assert pod_phase("OnFailure", [terminated(1)]) == "Running"
    assert pod_phase("OnFailure", [terminated(0)]) == "Succeeded"
    assert pod_phase("Never", [terminated(0), terminated(0)]) == "Succeeded"
    assert pod_phase("Never", [terminated(0), terminated(2)]) == "Failed"


def test_conditions_and_transition_times() -> None:
    first = pod_conditions(sandbox_ready=True, statuses=[running(False)], phase="Running",
                           now="T1")  # fmt: skip
    by_type = {c["type"]: c for c in first}
    assert by_type["Ready"]["status"] == "False"
    assert by_type["Ready"]["reason"] == "ContainersNotReady"
    assert by_type["PodScheduled"]["status"] == "True"
    assert by_type["Initialized"]["status"] == "True"
    second = pod_conditions(sandbox_ready=True, statuses=[running(True)], phase="Running",
                            previous=first, now="T2")  # fmt: skip
    by_type = {c["type"]: c for c in second}
    assert by_type["Ready"] == {"type": "Ready", "status": "True", "lastProbeTime": None,
                                "lastTransitionTime": "T2"}  # fmt: skip
    assert by_type["PodScheduled"]["lastTransitionTime"] == "T1"  # unchanged status


def test_readiness_gates_hold_ready() -> None:
    conds = pod_conditions(sandbox_ready=True, statuses=[running()], phase="Running",
                           readiness_gates=["example.com/lb"], gate_status={}, now="T")  # fmt: skip
    ready = next(c for c in conds if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ReadinessGatesNotReady"
    assert next(c for c in conds if c["type"] == "ContainersReady")["status"] == "True"


def test_status_object() -> None:
    pod = {"metadata": {"name": "p"}, "spec": {"restartPolicy": "Always"}, "status": {}}
    st = pod_status(pod, statuses=[running()], sandbox_ready=True, pod_ip="10.250.0.2",
                    host_ip="192.0.2.1", start_time="T0", now="T1")  # fmt: skip
    assert st["phase"] == "Running"
    assert st["podIP"] == "10.250.0.2" and st["podIPs"] == [{"ip": "10.250.0.2"}]
    assert st["hostIP"] == "192.0.2.1" and st["startTime"] == "T0"
    assert st["containerStatuses"] == [running()]
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"


def test_terminal_pod_is_not_ready() -> None:
    conds = pod_conditions(sandbox_ready=True, statuses=[terminated(0)], phase="Succeeded",
                           now="T")  # fmt: skip
    ready = next(c for c in conds if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "PodCompleted"
