"""Desired EndpointSlices and Endpoints, pure: conditions, named ports, chunking, churn."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from kproxy.controllers.endpointslice_plan import (
    CONTROLLER_NAME,
    MANAGED_BY_LABEL,
    SERVICE_NAME_LABEL,
    TRIGGER_TIME_ANNOTATION,
    desired_endpoints,
    find_port,
    plan_slices,
)

Obj = dict[str, Any]


def service(name: str = "web", ns: str = "default", **spec: Any) -> Obj:
    base: Obj = {
        "selector": {"app": name},
        "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}],
        "clusterIP": "10.96.0.10",
    }
    base.update(spec)
    return {"metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}"}, "spec": base}


def pod(
    name: str,
    ip: str | None = "10.0.0.1",
    *,
    app: str = "web",
    ready: bool = True,
    node: str = "n1",
    deleting: bool = False,
    phase: str = "Running",
    ports: list[Obj] | None = None,
    ns: str = "default",
) -> Obj:
    status: Obj = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    meta: Obj = {"name": name, "namespace": ns, "uid": f"uid-{name}", "labels": {"app": app}}
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:00Z"
    return {
        "metadata": meta,
        "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports or []}]},
        "status": status,
    }


NODES = {"n1": {"metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}}}}
names = itertools.count()


def gen() -> str:
    return f"web-{next(names)}"


def test_slice_shape_labels_owner_and_endpoint() -> None:
    plan = plan_slices(service(), [pod("a")], NODES, [], trigger_time="2024-05-01T00:00:00Z",
                       new_name=gen)  # fmt: skip
    assert len(plan.create) == 1 and not plan.update and not plan.delete
    s = plan.create[0]
    assert s["addressType"] == "IPv4"
    assert s["metadata"]["labels"][SERVICE_NAME_LABEL] == "web"
    assert s["metadata"]["labels"][MANAGED_BY_LABEL] == CONTROLLER_NAME
    assert s["metadata"]["annotations"][TRIGGER_TIME_ANNOTATION] == "2024-05-01T00:00:00Z"
    owner = s["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "Service", "web", "uid-web", True)  # fmt: skip
    assert s["ports"] == [{"name": "", "port": 8080, "protocol": "TCP"}]
    assert s["endpoints"] == [
        {
            "addresses": ["10.0.0.1"],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": "n1",
            "zone": "z1",
            "targetRef": {"kind": "Pod", "namespace": "default", "name": "a", "uid": "uid-a"},
        }
    ]


@pytest.mark.parametrize(
    ("ready", "deleting", "publish", "want"),
    [
        (True, False, False, (True, True, False)),
        (False, False, False, (False, False, False)),
        (True, True, False, (False, True, True)),
        (False, True, False, (False, False, True)),
        (False, False, True, (True, False, False)),
        (True, True, True, (True, True, True)),
    ],
)
def test_conditions(
    ready: bool, deleting: bool, publish: bool, want: tuple[bool, bool, bool]
) -> None:
    svc = service(publishNotReadyAddresses=publish)
    plan = plan_slices(svc, [pod("a", ready=ready, deleting=deleting)], NODES, [], new_name=gen)
    cond = plan.create[0]["endpoints"][0]["conditions"]
    assert (cond["ready"], cond["serving"], cond["terminating"]) == want


def test_excluded_pods_terminal_no_ip_other_selector_other_namespace() -> None:
    pods = [
        pod("done", "10.0.0.2", phase="Succeeded"),
        pod("noip", None),
        pod("other", "10.0.0.3", app="db"),
        pod("elsewhere", "10.0.0.4", ns="kube-system"),
        pod("ok", "10.0.0.5"),
    ]
    plan = plan_slices(service(), pods, NODES, [], new_name=gen)
    assert [e["addresses"][0] for e in plan.create[0]["endpoints"]] == ["10.0.0.5"]


def test_named_target_port_resolved_per_pod() -> None:
    svc = service(ports=[{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"}])
    pods = [
        pod("a", "10.0.0.1", ports=[{"name": "web", "containerPort": 8080}]),
        pod("b", "10.0.0.2", ports=[{"name": "web", "containerPort": 9090}]),
        pod("c", "10.0.0.3", ports=[{"name": "web", "containerPort": 8080}]),
    ]
    plan = plan_slices(svc, pods, NODES, [], new_name=gen)
    by_port = {
        s["ports"][0]["port"]: [e["addresses"][0] for e in s["endpoints"]] for s in plan.create
    }
    assert by_port == {8080: ["10.0.0.1", "10.0.0.3"], 9090: ["10.0.0.2"]}
    assert all(s["ports"][0]["name"] == "http" for s in plan.create)


@pytest.mark.parametrize(
    ("target", "ports", "want"),
    [
        (8080, [], 8080),
        ("8081", [], 8081),
        ("web", [{"name": "web", "containerPort": 1234}], 1234),
        ("web", [{"name": "web", "containerPort": 1234, "protocol": "UDP"}], None),
        ("nope", [{"name": "web", "containerPort": 1234}], None),
    ],
)
def test_find_port(target: Any, ports: list[Obj], want: int | None) -> None:
    p = pod("a", ports=ports)
    assert find_port(p, {"port": 80, "targetPort": target, "protocol": "TCP"}) == want


def test_chunking_at_max_per_slice() -> None:
    pods = [pod(f"p{i:03}", f"10.0.{i // 250}.{i % 250 + 1}") for i in range(250)]
    plan = plan_slices(service(), pods, NODES, [], new_name=gen)
    assert sorted(len(s["endpoints"]) for s in plan.create) == [50, 100, 100]
    plan = plan_slices(service(), pods, NODES, [], max_per_slice=7, new_name=gen)
    assert len(plan.create) == 36 and max(len(s["endpoints"]) for s in plan.create) == 7


def _applied(plan: Any, existing: list[Obj]) -> list[Obj]:
    """What the server would hold after the plan (names are stable)."""
    gone = {s["metadata"]["name"] for s in plan.delete}
    updated = {s["metadata"]["name"]: s for s in plan.update}
    out: list[Obj] = [
        updated.get(s["metadata"]["name"], s) for s in existing if s["metadata"]["name"] not in gone
    ]
    return out + list(plan.create)


def test_minimal_churn_in_place_and_fill_before_create() -> None:
    pods = [pod(f"p{i:03}", f"10.0.1.{i + 1}") for i in range(150)]
    first = plan_slices(service(), pods, NODES, [], new_name=gen)
    state = _applied(first, [])
    # Nothing changed: nothing to write.
    again = plan_slices(service(), pods, NODES, state, new_name=gen)
    assert again.empty and len(again.unchanged) == 2
    # One pod leaves, one new pod arrives: one slice updated in place, nothing created.
    pods2 = [*pods[1:], pod("new", "10.0.2.1")]
    churn = plan_slices(service(), pods2, NODES, state, new_name=gen)
    assert not churn.create and not churn.delete and len(churn.update) <= 2
    state2 = _applied(churn, state)
    addrs = sorted(e["addresses"][0] for s in state2 for e in s["endpoints"])
    assert len(addrs) == 150 and "10.0.1.1" not in addrs and "10.0.2.1" in addrs
    # An endpoint keeps its slice.
    where = {e["addresses"][0]: s["metadata"]["name"] for s in state for e in s["endpoints"]}
    where2 = {e["addresses"][0]: s["metadata"]["name"] for s in state2 for e in s["endpoints"]}
    assert all(where2[a] == where[a] for a in where2 if a in where)


def test_readiness_flip_updates_one_slice() -> None:
    pods = [pod(f"p{i:03}", f"10.0.1.{i + 1}") for i in range(150)]
    state = _applied(plan_slices(service(), pods, NODES, [], new_name=gen), [])
    pods[0] = pod("p000", "10.0.1.1", ready=False)
    plan = plan_slices(service(), pods, NODES, state, new_name=gen)
    assert len(plan.update) == 1 and not plan.create and not plan.delete


def test_placeholder_and_stale_groups() -> None:
    plan = plan_slices(service(), [], NODES, [], new_name=gen)
    assert len(plan.create) == 1 and plan.create[0]["endpoints"] == []
    state = _applied(plan, [])
    assert plan_slices(service(), [], NODES, state, new_name=gen).empty
    # Endpoints arrive: the placeholder goes (different ports), a real slice comes.
    plan = plan_slices(service(), [pod("a")], NODES, state, new_name=gen)
    assert len(plan.create) == 1 and len(plan.delete) == 1


def test_dual_stack_one_slice_per_family() -> None:
    svc = service(ipFamilies=["IPv4", "IPv6"])
    p = pod("a", "10.0.0.1")
    p["status"]["podIPs"] = [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]
    plan = plan_slices(svc, [p], NODES, [], new_name=gen)
    assert sorted((s["addressType"], s["endpoints"][0]["addresses"][0]) for s in plan.create) == [
        ("IPv4", "10.0.0.1"), ("IPv6", "fd00::1")]  # fmt: skip


def test_legacy_endpoints_subsets() -> None:
    svc = service(ports=[{"port": 80, "targetPort": 8080, "protocol": "TCP"}])
    pods = [
        pod("b", "10.0.0.2", ready=False),
        pod("a", "10.0.0.1"),
        pod("t", "10.0.0.3", deleting=True),
    ]
    ep = desired_endpoints(svc, pods, None, trigger_time="2024-05-01T00:00:00Z")
    assert ep is not None
    assert ep["metadata"]["name"] == "web"
    assert ep["metadata"]["annotations"][TRIGGER_TIME_ANNOTATION] == "2024-05-01T00:00:00Z"
    [subset] = ep["subsets"]
    assert [a["ip"] for a in subset["addresses"]] == ["10.0.0.1"]
    assert [a["ip"] for a in subset["notReadyAddresses"]] == ["10.0.0.2"]
    assert subset["addresses"][0]["targetRef"]["name"] == "a"
    assert subset["ports"] == [{"port": 8080, "protocol": "TCP"}]
    # Applied as is: nothing to write.
    assert desired_endpoints(svc, pods, ep) is None


def test_written_objects_pass_the_apiservers_validation() -> None:
    from kproxy.api import validation

    http = {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}
    dns = {"name": "dns", "port": 53, "targetPort": 53, "protocol": "UDP"}
    svc = service(ports=[http, dns])
    pods = [pod("a"), pod("b", "10.0.0.2", ready=False)]
    for svc_, pods_ in ((svc, pods), (service(), pods), (service(), [])):
        for s in plan_slices(svc_, pods_, NODES, [], trigger_time="2024-01-01T00:00:00Z",
                             new_name=gen).create:  # fmt: skip
            validation.validate("EndpointSlice", s)
    ep = desired_endpoints(svc, pods, None, trigger_time="2024-01-01T00:00:00Z")
    validation.validate("Endpoints", ep)
