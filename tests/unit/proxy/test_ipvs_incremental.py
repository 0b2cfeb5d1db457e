"""The incremental IPVS planner equals the full planner after any change sequence.

:class:`~kproxy.proxy.ipvs.plan.IpvsPlanner` replans only the Services in a
snapshot's change set and folds the pieces into reference-counted aggregates;
these property tests drive a real :class:`~kproxy.proxy.core.ProxyCore` through
random Service/EndpointSlice changes (shared VIPs, NodePorts, LB source ranges,
local endpoints, deletions) and check after every snapshot that its plan is
:func:`~kproxy.proxy.ipvs.plan.plan_ipvs`'s and that its delta is exactly the
difference between consecutive plans.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kproxy.proxy.core import ProxyCore
from kproxy.proxy.ipvs import IpvsOptions, IpvsPlan, plan_ipvs
from kproxy.proxy.ipvs.plan import IpvsPlanner, PlanDelta
from tests.unit.proxy.goldens import NODE_NAME, make_service, make_slice

ip = ipaddress.ip_address
NAMES = ("a", "b", "c", "d")
CLUSTER_IPS = ("10.96.0.1", "10.96.0.2", "10.96.0.3")  # few: services collide on purpose
EXTERNAL_IPS = ("192.168.0.2", "50.0.0.1", "50.0.0.2")  # the first is a node address
POD_IPS = ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4")


def _options(**kw: Any) -> IpvsOptions:
    base: dict[str, Any] = {
        "node_name": NODE_NAME,
        "masquerade_mark": "0x4000",
        "node_ips": (ip("192.168.0.2"),),
        "node_ip": ip("192.168.0.2"),
    }
    base.update(kw)
    return IpvsOptions(**base)


@st.composite
def services(draw: st.DrawFn, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    kind = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
    spec["type"] = kind
    if draw(st.booleans()):
        spec["externalIPs"] = draw(st.lists(st.sampled_from(EXTERNAL_IPS), max_size=2, unique=True))
    if kind != "ClusterIP" and draw(st.booleans()):
        spec["externalTrafficPolicy"] = "Local"
    if draw(st.booleans()):
        spec["internalTrafficPolicy"] = "Local"
    if draw(st.booleans()):
        spec["sessionAffinity"] = "ClientIP"
    ingress = None
    if kind == "LoadBalancer":
        ingress = [{"ip": draw(st.sampled_from(("60.0.0.1", "60.0.0.2")))}]
        if draw(st.booleans()):
            spec["loadBalancerSourceRanges"] = draw(
                st.lists(st.sampled_from(("192.168.0.0/24", "70.0.0.0/8")), min_size=1, unique=True)
            )
    node_port = draw(st.sampled_from((30001, 30002))) if kind != "ClusterIP" else 0
    protocol = draw(st.sampled_from(("TCP", "UDP", "SCTP")))
    return make_service(
        "ns",
        name,
        draw(st.sampled_from(CLUSTER_IPS)),
        protocol=protocol,
        nodePort=node_port,
        ingress=ingress,
        **spec,
    )


@st.composite
def slices(draw: st.DrawFn, name: str, protocol: str) -> dict[str, Any]:
    endpoints = [
        {
            "addresses": [addr],
            "conditions": {"ready": True, "serving": True, "terminating": draw(st.booleans())},
            "nodeName": draw(st.sampled_from((NODE_NAME, "other"))),
        }
        for addr in draw(st.lists(st.sampled_from(POD_IPS), max_size=3, unique=True))
    ]
    return make_slice("ns", name, 1, endpoints, protocol=protocol)


@st.composite
def change_sequences(draw: st.DrawFn) -> list[tuple[str, str, Any]]:
    steps: list[tuple[str, str, Any]] = []
    protocols: dict[str, str] = {}
    for _ in range(draw(st.integers(1, 12))):
        name = draw(st.sampled_from(NAMES))
        what = draw(st.sampled_from(["service", "slice", "delete-service", "delete-slice"]))
        if what == "service":
            svc = draw(services(name))
            protocols[name] = svc["spec"]["ports"][0]["protocol"]
            steps.append((what, name, svc))
        elif what == "slice":
            steps.append((what, name, draw(slices(name, protocols.get(name, "TCP")))))
        else:
            steps.append((what, name, None))
    return steps


def _sets(plan: IpvsPlan) -> dict[str, set[Any]]:
    return {s.base_name: set(s.entries) for s in plan.ipsets}


def _check_delta(before: IpvsPlan | None, after: IpvsPlan, delta: PlanDelta) -> None:
    old_servers = {p.server.key: p for p in before.servers} if before else {}
    new_servers = {p.server.key: p for p in after.servers}
    changed = {
        k
        for k in old_servers.keys() | new_servers.keys()
        if old_servers.get(k) != new_servers.get(k)
    }
    assert delta.servers == changed
    old_sets = _sets(before) if before else {}
    for name, now in _sets(after).items():
        was = old_sets.get(name, set())
        assert delta.entries_added.get(name, set()) == now - was, name
        assert delta.entries_removed.get(name, set()) == was - now, name
    old_bind = set(before.bind_addresses) if before else set()
    assert delta.bind_added == set(after.bind_addresses) - old_bind
    assert delta.bind_removed == old_bind - set(after.bind_addresses)


def _run(steps: list[tuple[str, str, Any]], options: IpvsOptions) -> None:
    core = ProxyCore(NODE_NAME)
    core.synced()
    incremental, compare_all = IpvsPlanner(), IpvsPlanner()
    current: dict[tuple[str, str], Any] = {}
    before: IpvsPlan | None = None
    for i, (what, name, obj) in enumerate(steps):
        kind = "slice" if "slice" in what else "service"
        old = current.get((kind, name))
        if obj is None:
            current.pop((kind, name), None)
            if old is None:
                continue
        else:
            current[(kind, name)] = obj
        handler = core.on_endpoint_slice if kind == "slice" else core.on_service
        handler(old, obj) if obj is not None else handler(old, None)
        snap = core.snapshot()
        want = plan_ipvs(snap.services, snap.endpoints, options)
        # The first update has no previous state: both planners start from scratch.
        delta = incremental.update(
            snap.services, snap.endpoints, options, None if i == 0 else snap.changed
        )
        assert incremental.plan() == want
        compare_all.update(snap.services, snap.endpoints, options)
        assert compare_all.plan() == want
        _check_delta(before, want, delta)
        before = want


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(change_sequences())
def test_incremental_plan_equals_full_plan(steps: list[tuple[str, str, Any]]) -> None:
    _run(steps, _options())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(change_sequences())
def test_incremental_plan_equals_full_plan_mh_without_node_ip(
    steps: list[tuple[str, str, Any]],
) -> None:
    _run(steps, _options(scheduler="mh", node_ip=None))


def test_new_options_replan_everything() -> None:
    core = ProxyCore(NODE_NAME)
    core.synced()
    core.on_service(None, make_service("ns", "a", "10.96.0.1", nodePort=30001, type="NodePort"))
    snap = core.snapshot()
    planner = IpvsPlanner()
    planner.update(snap.services, snap.endpoints, _options())
    other = _options(node_ips=(ip("192.168.0.3"),))
    delta = planner.update(snap.services, snap.endpoints, other, frozenset())
    assert delta.full and delta.replanned == 1
    assert planner.plan() == plan_ipvs(snap.services, snap.endpoints, other)


def test_an_unchanged_snapshot_replans_nothing() -> None:
    core = ProxyCore(NODE_NAME)
    core.synced()
    for n in NAMES:
        core.on_service(None, make_service("ns", n, "10.96.0.1"))
    snap = core.snapshot()
    planner = IpvsPlanner()
    planner.update(snap.services, snap.endpoints, _options())
    assert planner.update(snap.services, snap.endpoints, _options()).replanned == 0
    delta = planner.update(snap.services, snap.endpoints, _options(), frozenset())
    assert delta.replanned == 0 and not delta.servers
