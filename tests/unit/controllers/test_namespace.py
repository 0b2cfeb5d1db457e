"""The namespace controller against the fake apiserver: empty, wait, finalize."""

from __future__ import annotations

import copy

from kproxy.client.rest import NAMESPACES, Resource
from kproxy.controllers.namespace import NAMESPACED_RESOURCES, NamespaceController
from tests.unit.controllers.workload_fake import Cluster, cluster, run, running, until

CONTENT = ["pods", "services", "configmaps", "deployments", "replicasets", "leases",
           "endpoints", "endpointslices", "events"]  # fmt: skip


async def fill(c: Cluster, ns: str) -> None:
    await c.server.create("namespaces", {"metadata": {"name": ns}})
    for plural in CONTENT:
        for i in range(2):
            await c.server.create(plural, {"metadata": {"name": f"{plural}-{i}", "namespace": ns}})
    await c.server.create("pods", {"metadata": {"name": "elsewhere", "namespace": "other"}})


def count(c: Cluster, ns: str) -> int:
    return sum(1 for p in CONTENT for (ons, _) in c.server.items[p] if ons == ns)


def test_every_served_kind_is_covered() -> None:
    assert {r.plural for r in NAMESPACED_RESOURCES} == set(CONTENT)


def test_terminating_namespace_is_emptied_then_finalized() -> None:
    async def body() -> None:
        async with cluster() as c, running(c, NamespaceController(c.client, c.informers)):
            await fill(c, "team")
            await c.client.delete(NAMESPACES, "team")
            ns = c.server.items["namespaces"][("", "team")]
            assert ns["status"]["phase"] == "Terminating"
            await until(lambda: ("", "team") not in c.server.items["namespaces"], "ns gone")
            assert count(c, "team") == 0
            assert ("other", "elsewhere") in c.server.items["pods"]
            finalize = [r for r in c.server.requests if r.path.endswith("/team/finalize")]
            assert finalize and finalize[0].method == "PUT"
            policies = {opts.get("propagationPolicy") for p, ns_, _, opts in c.server.deletes
                        if ns_ == "team"}  # fmt: skip
            assert policies == {"Background"}

    run(body)


def test_waits_for_objects_held_by_finalizers_and_keeps_other_finalizers() -> None:
    async def body() -> None:
        async with (
            cluster(serve_finalize=False) as c,
            running(c, NamespaceController(c.client, c.informers, recheck=0.05)),
        ):
            await c.server.create(
                "namespaces", {"metadata": {"name": "t"}, "spec": {"finalizers": ["kubernetes"]}}
            )
            held = {"metadata": {"name": "held", "namespace": "t", "finalizers": ["x/hold"]}}
            await c.server.create("configmaps", held)
            await c.client.delete(NAMESPACES, "t")
            await until(
                lambda: bool(
                    c.server.items["configmaps"][("t", "held")]["metadata"].get("deletionTimestamp")
                ),
                "content being deleted",
            )
            assert ("", "t") in c.server.items["namespaces"]  # still waiting
            cm = copy.deepcopy(c.server.items["configmaps"][("t", "held")])
            cm["metadata"]["finalizers"] = []
            await c.server.put("configmaps", cm)
            # No /finalize here: the controller falls back to an update.
            await until(lambda: ("", "t") not in c.server.items["namespaces"], "ns gone")

    run(body)


def test_active_namespaces_and_unserved_resources_are_left_alone() -> None:
    async def body() -> None:
        async with cluster() as c:
            widgets = Resource("example.com", "v1", "widgets", "Widget")
            ctl = NamespaceController(
                c.client, c.informers, resources=(*NAMESPACED_RESOURCES, widgets)
            )
            async with running(c, ctl):
                await fill(c, "live")
                assert await ctl.reconcile("live") is None
                assert count(c, "live") == len(CONTENT) * 2
                await c.client.delete(NAMESPACES, "live")
                await until(lambda: ("", "live") not in c.server.items["namespaces"])
                assert widgets in ctl._unserved

    run(body)
