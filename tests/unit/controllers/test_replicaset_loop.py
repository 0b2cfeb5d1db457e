"""The ReplicaSet controller against the fake apiserver: create, scale, adopt, release."""

from __future__ import annotations

import copy
from typing import Any

from kproxy.client.rest import REPLICASETS
from kproxy.controllers.ownership import controller_ref
from kproxy.controllers.replicaset import ReplicaSetController
from tests.unit.controllers.workload_fake import Cluster, cluster, run, running, until

Obj = dict[str, Any]


def replicaset(name: str = "web", replicas: int = 3, **spec: Any) -> Obj:
    return {
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "img"}]},
            },
            **spec,
        },
    }


def pods(c: Cluster, owner_uid: str | None = None) -> list[Obj]:
    out = list(c.server.items["pods"].values())
    if owner_uid is not None:
        out = [p for p in out if (controller_ref(p) or {}).get("uid") == owner_uid]
    return sorted(out, key=lambda p: p["metadata"]["name"])


def rs_obj(c: Cluster, name: str = "web") -> Obj:
    return c.server.items["replicasets"][("default", name)]


async def mark_ready(c: Cluster, pod: Obj, when: str = "2024-01-01T00:00:00Z") -> None:
    pod = copy.deepcopy(pod)
    pod.setdefault("spec", {})["nodeName"] = "n1"
    pod["status"] = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": when}],
    }
    await c.server.put("pods", pod)


async def scale(c: Cluster, name: str, replicas: int) -> None:
    rs = copy.deepcopy(rs_obj(c, name))
    rs["spec"]["replicas"] = replicas
    await c.server.put("replicasets", rs)


def test_creates_pods_with_owner_and_generate_name_then_reports_status() -> None:
    async def body() -> None:
        async with cluster() as c:
            ctl = ReplicaSetController(c.client, c.informers, workers=2)
            await c.server.create("replicasets", replicaset(replicas=3))
            uid = rs_obj(c)["metadata"]["uid"]
            async with running(c, ctl):
                await until(lambda: len(pods(c)) == 3, "3 pods")
                for p in pods(c):
                    assert p["metadata"]["name"].startswith("web-")
                    assert p["metadata"]["labels"] == {"app": "web"}
                    ref = controller_ref(p)
                    assert ref is not None and ref["uid"] == uid
                    assert ref["blockOwnerDeletion"] is True and ref["kind"] == "ReplicaSet"
                posts = [r for r in c.server.requests if r.method == "POST"]
                assert all(b'"generateName": "web-"' in r.body for r in posts)
                await until(lambda: (rs_obj(c).get("status") or {}).get("replicas") == 3)
                for p in pods(c)[:2]:
                    await mark_ready(c, p)
                await until(
                    lambda: (rs_obj(c).get("status") or {}).get("availableReplicas") == 2,
                    "two available",
                )
                st = rs_obj(c)["status"]
                assert st["readyReplicas"] == 2 and st["fullyLabeledReplicas"] == 3
                assert st["observedGeneration"] == rs_obj(c)["metadata"]["generation"]
            # No more than asked for, ever (expectations held through cache lag).
            assert len([r for r in c.server.requests if r.method == "POST"]) == 3

    run(body)


def test_scale_down_prefers_not_ready_and_scale_up_again() -> None:
    async def body() -> None:
        async with cluster() as c:
            ctl = ReplicaSetController(c.client, c.informers)
            await c.server.create("replicasets", replicaset(replicas=3))
            async with running(c, ctl):
                await until(lambda: len(pods(c)) == 3, "3 pods")
                first = pods(c)
                await mark_ready(c, first[0])
                await mark_ready(c, first[1])
                await until(lambda: rs_obj(c).get("status", {}).get("readyReplicas") == 2)
                await scale(c, "web", 2)
                await until(lambda: len(pods(c)) == 2, "scaled to 2")
                left = {p["metadata"]["name"] for p in pods(c)}
                assert left == {first[0]["metadata"]["name"], first[1]["metadata"]["name"]}
                await scale(c, "web", 4)
                await until(lambda: len(pods(c)) == 4, "scaled to 4")
                await until(lambda: rs_obj(c).get("status", {}).get("replicas") == 4)

    run(body)


def test_adopts_matching_orphans_and_releases_pods_that_stop_matching() -> None:
    async def body() -> None:
        async with cluster() as c:
            ctl = ReplicaSetController(c.client, c.informers)
            orphan = {"metadata": {"name": "stray", "namespace": "default",
                                   "labels": {"app": "web"}}, "spec": {}}  # fmt: skip
            await c.server.create("pods", orphan)
            await c.server.create("replicasets", replicaset(replicas=2))
            uid = rs_obj(c)["metadata"]["uid"]
            async with running(c, ctl):
                await until(lambda: len(pods(c, uid)) == 2, "2 owned pods")
                assert len(pods(c)) == 2  # the orphan was adopted, one pod created
                stray = c.server.items["pods"][("default", "stray")]
                assert (controller_ref(stray) or {}).get("uid") == uid
                # Relabel it: released (reference removed) and replaced.
                relabeled = copy.deepcopy(stray)
                relabeled["metadata"]["labels"] = {"app": "debug"}
                await c.server.put("pods", relabeled)
                await until(lambda: len(pods(c, uid)) == 2 and len(pods(c)) == 3, "replaced")
                stray = c.server.items["pods"][("default", "stray")]
                assert controller_ref(stray) is None

    run(body)


def test_scale_subresource_style_write_is_followed() -> None:
    async def body() -> None:
        async with cluster() as c:
            ctl = ReplicaSetController(c.client, c.informers)
            await c.server.create("replicasets", replicaset(replicas=1))
            async with running(c, ctl):
                await until(lambda: len(pods(c)) == 1)
                await c.client.patch(
                    REPLICASETS, "web", {"spec": {"replicas": 0}}, "default", patch_type="merge"
                )
                await until(lambda: len(pods(c)) == 0, "scaled to 0")
                await until(lambda: rs_obj(c).get("status", {}).get("replicas") == 0)

    run(body)
