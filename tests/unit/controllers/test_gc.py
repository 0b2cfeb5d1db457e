"""The garbage collector: decisions (pure) and background/foreground/orphan deletion
against the fake apiserver (which keeps finalizers but collects nothing itself)."""

from __future__ import annotations

from typing import Any

import pytest

from kproxy.client.rest import NODES, REPLICASETS
from kproxy.controllers.gc import Decision, GarbageCollector, blocks, decide, without_finalizer
from tests.unit.controllers.workload_fake import Cluster, cluster, run, running, until

Obj = dict[str, Any]


# ------------------------------------------------------------------ pure


@pytest.mark.parametrize(
    ("solid", "dangling", "waiting", "deps", "fins", "want"),
    [
        (["a"], [], [], False, [], Decision()),
        (["a"], ["b"], ["c"], False, [], Decision(drop_refs=["b", "c"])),
        ([], ["b"], [], False, [], Decision(delete="Background")),
        ([], [], ["c"], False, [], Decision(delete="Background")),
        ([], [], ["c"], True, [], Decision(delete="Foreground")),
        ([], ["b"], [], True, ["orphan"], Decision(delete="Orphan")),
        ([], ["b"], [], False, ["foregroundDeletion"], Decision(delete="Foreground")),
    ],
)
def test_decide(
    solid: list[str],
    dangling: list[str],
    waiting: list[str],
    deps: bool,
    fins: list[str],
    want: Decision,
) -> None:
    obj = {"metadata": {"name": "x", "finalizers": fins}}
    assert decide(obj, solid, dangling, waiting, has_dependents=deps) == want


def test_blocks_and_finalizer_removal() -> None:
    dep = {"metadata": {"ownerReferences": [{"uid": "o", "blockOwnerDeletion": True},
                                            {"uid": "p"}]}}  # fmt: skip
    assert blocks(dep, "o") and not blocks(dep, "p") and not blocks(dep, "q")
    owner = {"metadata": {"finalizers": ["foregroundDeletion", "x"]}}
    assert without_finalizer(owner, "foregroundDeletion")["metadata"]["finalizers"] == ["x"]
    assert (
        "finalizers"
        not in without_finalizer(owner | {"metadata": {"finalizers": ["x"]}}, "x")["metadata"]
    )


# ------------------------------------------------------------------ loop


def ref(owner: Obj, *, block: bool = True) -> Obj:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": block,
    }


async def obj(c: Cluster, plural: str, name: str, *owners: Obj, ns: str = "default") -> Obj:
    meta: Obj = {"name": name}
    if ns:
        meta["namespace"] = ns
    if owners:
        meta["ownerReferences"] = [ref(o) for o in owners]
    return await c.server.create(plural, {"metadata": meta, "spec": {}})


def exists(c: Cluster, plural: str, name: str, ns: str = "default") -> bool:
    return (ns, name) in c.server.items[plural]


async def chain(c: Cluster) -> tuple[Obj, Obj, list[Obj]]:
    d = await obj(c, "deployments", "web")
    rs = await obj(c, "replicasets", "web-1", d)
    pods = [await obj(c, "pods", f"web-1-{i}", rs) for i in range(2)]
    return d, rs, pods


def test_background_deletion_follows_the_chain() -> None:
    async def body() -> None:
        async with cluster() as c, running(c, GarbageCollector(c.client, c.informers)):
            _, rs, _ = await chain(c)
            await c.server.remove("deployments", "default", "web")  # gone, no finalizers
            await until(lambda: not c.server.items["pods"], "pods collected")
            assert not exists(c, "replicasets", "web-1")
            rs_delete = next(opts for p, _, n, opts in c.server.deletes if n == "web-1")
            assert rs_delete["propagationPolicy"] == "Background"
            assert rs_delete["preconditions"] == {"uid": rs["metadata"]["uid"]}

    run(body)


def test_foreground_deletion_waits_for_blocking_dependents() -> None:
    async def body() -> None:
        async with cluster() as c, running(c, GarbageCollector(c.client, c.informers)):
            await chain(c)
            await c.client.delete(REPLICASETS, "web-1", "default", propagation_policy="Foreground")
            held = c.server.items["replicasets"][("default", "web-1")]
            assert held["metadata"]["finalizers"] == ["foregroundDeletion"]
            await until(lambda: not exists(c, "replicasets", "web-1"), "owner released")
            assert not c.server.items["pods"]
            assert exists(c, "deployments", "web")
            # The owner went only after its dependents.
            order = [(e.plural, e.obj["metadata"]["name"]) for e in c.server.history
                     if e.type == "DELETED"]  # fmt: skip
            assert order[-1] == ("replicasets", "web-1")

    run(body)


def test_orphan_deletion_keeps_dependents_without_the_reference() -> None:
    async def body() -> None:
        async with cluster() as c, running(c, GarbageCollector(c.client, c.informers)):
            _, _, pods = await chain(c)
            await c.client.delete(REPLICASETS, "web-1", "default", propagation_policy="Orphan")
            await until(lambda: not exists(c, "replicasets", "web-1"), "owner gone")
            for p in pods:
                live = c.server.items["pods"][("default", p["metadata"]["name"])]
                assert "ownerReferences" not in live["metadata"]

    run(body)


def test_dangling_reference_dropped_when_another_owner_exists() -> None:
    async def body() -> None:
        async with cluster() as c:
            keeper = await obj(c, "configmaps", "keeper")
            ghost = {"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": "ghost", "uid": "ghost-uid"}}  # fmt: skip
            pod = await c.server.create(
                "pods",
                {"metadata": {"name": "p", "namespace": "default",
                              "ownerReferences": [ref(keeper, block=False), ref(ghost)]}},
            )  # fmt: skip
            stranger = {"apiVersion": "example.com/v1", "kind": "Widget",
                        "metadata": {"name": "w", "uid": "w-uid"}}  # fmt: skip
            await c.server.create(
                "pods", {"metadata": {"name": "q", "namespace": "default",
                                      "ownerReferences": [ref(stranger)]}}
            )  # fmt: skip
            async with running(c, GarbageCollector(c.client, c.informers)):
                await until(
                    lambda: len(c.server.items["pods"][("default", "p")]["metadata"]
                                ["ownerReferences"]) == 1,
                    "ghost reference dropped",
                )  # fmt: skip
            live = c.server.items["pods"][("default", "p")]
            assert live["metadata"]["ownerReferences"][0]["uid"] == keeper["metadata"]["uid"]
            assert live["metadata"]["uid"] == pod["metadata"]["uid"]
            assert exists(c, "pods", "q")  # owner of a kind we do not watch: left alone

    run(body)


def test_cluster_scoped_owner_and_startup_orphans() -> None:
    async def body() -> None:
        async with cluster() as c:
            node = await obj(c, "nodes", "n1", ns="")
            await obj(c, "leases", "n1", node, ns="kube-node-lease")
            await c.server.remove("nodes", "", "n1")  # deleted while no GC ran
            async with running(c, GarbageCollector(c.client, c.informers)):
                await until(lambda: not c.server.items["leases"], "lease collected")
                node2 = await obj(c, "nodes", "n2", ns="")
                await obj(c, "leases", "n2", node2, ns="kube-node-lease")
                await c.client.delete(NODES, "n2")
                await until(lambda: not c.server.items["leases"], "second lease collected")

    run(body)
