"""Deployment + ReplicaSet controllers against the fake apiserver: rollouts end to end."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator
from typing import Any

from kproxy.controllers.deployment import DeploymentController
from kproxy.controllers.ownership import controller_ref
from kproxy.controllers.replicaset import ReplicaSetController
from kproxy.controllers.rollout import HASH_LABEL, REVISION_ANNOTATION, compute_hash
from tests.unit.controllers.workload_fake import Cluster, cluster, run, running, until

Obj = dict[str, Any]


def deployment(replicas: int = 3, image: str = "web:1", **spec: Any) -> Obj:
    return {
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": image}]},
            },
            # What the apiserver's defaulting adds (the fake does not default).
            "revisionHistoryLimit": 10,
            "progressDeadlineSeconds": 600,
            **spec,
        },
    }


def d_obj(c: Cluster) -> Obj:
    return c.server.items["deployments"][("default", "web")]


def replicasets(c: Cluster) -> dict[str, Obj]:
    return {name: rs for (_, name), rs in c.server.items["replicasets"].items()}


def image_of(obj: Obj) -> str:
    spec = obj["spec"]["template"]["spec"] if obj.get("kind") != "Pod" else obj["spec"]
    return str(spec["containers"][0]["image"])


def live_pods(c: Cluster) -> list[Obj]:
    return list(c.server.items["pods"].values())


@contextlib.asynccontextmanager
async def kubelet(c: Cluster, *, ready: bool = True) -> AsyncIterator[None]:
    """Marks every new pod Running (and Ready) as a kubelet would."""

    async def loop() -> None:
        while True:
            for pod in list(c.server.items["pods"].values()):
                if (pod.get("status") or {}).get("phase") != "Running":
                    pod = copy.deepcopy(pod)
                    pod["spec"]["nodeName"] = "n1"
                    pod["status"] = {"phase": "Running"}
                    if ready:
                        pod["status"]["conditions"] = [
                            {"type": "Ready", "status": "True",
                             "lastTransitionTime": "2024-01-01T00:00:00Z"}
                        ]  # fmt: skip
                    await c.server.put("pods", pod)
            await asyncio.sleep(0.02)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def controllers(c: Cluster) -> tuple[DeploymentController, ReplicaSetController]:
    return DeploymentController(c.client, c.informers), ReplicaSetController(c.client, c.informers)


def cond(obj: Obj, ctype: str) -> Obj:
    for cnd in (obj.get("status") or {}).get("conditions") or ():
        if cnd["type"] == ctype:
            return dict(cnd)
    return {}


def complete(c: Cluster, replicas: int) -> bool:
    st = d_obj(c).get("status") or {}
    return (
        st.get("observedGeneration") == d_obj(c)["metadata"]["generation"]
        and st.get("updatedReplicas") == replicas
        and st.get("availableReplicas") == replicas
        and st.get("replicas") == replicas
        and cond(d_obj(c), "Progressing").get("reason") == "NewReplicaSetAvailable"
    )


def test_new_deployment_gets_a_hashed_replicaset_pods_and_status() -> None:
    async def body() -> None:
        async with cluster() as c, running(c, *controllers(c)), kubelet(c):
            await c.server.create("deployments", deployment(3))
            await until(lambda: complete(c, 3), "rollout complete", 15)
            [(name, rs)] = replicasets(c).items()
            template = deployment()["spec"]["template"]
            h = compute_hash(template)
            assert name == f"web-{h}"
            assert rs["metadata"]["labels"][HASH_LABEL] == h
            assert rs["spec"]["selector"]["matchLabels"] == {"app": "web", HASH_LABEL: h}
            assert rs["spec"]["template"]["metadata"]["labels"][HASH_LABEL] == h
            assert rs["metadata"]["annotations"][REVISION_ANNOTATION] == "1"
            assert (controller_ref(rs) or {}).get("uid") == d_obj(c)["metadata"]["uid"]
            assert d_obj(c)["metadata"]["annotations"][REVISION_ANNOTATION] == "1"
            assert len(live_pods(c)) == 3
            st = d_obj(c)["status"]
            assert st["observedGeneration"] == d_obj(c)["metadata"]["generation"]
            assert (st["readyReplicas"], st["unavailableReplicas"]) == (3, 0)
            assert cond(d_obj(c), "Available")["reason"] == "MinimumReplicasAvailable"

    run(body)


def test_rolling_update_respects_surge_and_keeps_history() -> None:
    async def body() -> None:
        async with cluster() as c, running(c, *controllers(c)), kubelet(c):
            await c.server.create("deployments", deployment(4))
            await until(lambda: complete(c, 4), "first rollout", 15)
            peak = [0]

            async def watch_pods() -> None:
                while True:
                    peak[0] = max(peak[0], len(live_pods(c)))
                    await asyncio.sleep(0.005)

            watcher = asyncio.create_task(watch_pods())
            d = copy.deepcopy(d_obj(c))
            d["spec"]["template"]["spec"]["containers"][0]["image"] = "web:2"
            await c.server.put("deployments", d)
            await until(
                lambda: complete(c, 4) and len(replicasets(c)) == 2 and len(live_pods(c)) == 4,
                "second rollout",
                20,
            )
            watcher.cancel()
            by_image = {image_of(rs): rs for rs in replicasets(c).values()}
            assert by_image["web:1"]["spec"]["replicas"] == 0
            assert by_image["web:2"]["spec"]["replicas"] == 4
            assert by_image["web:2"]["metadata"]["annotations"][REVISION_ANNOTATION] == "2"
            assert d_obj(c)["metadata"]["annotations"][REVISION_ANNOTATION] == "2"
            assert all(image_of(p) == "web:2" for p in live_pods(c))
            assert peak[0] <= 5  # 4 replicas + maxSurge 25% (rounded up: 1)

    run(body)


def test_recreate_scales_old_to_zero_before_creating_new() -> None:
    async def body() -> None:
        async with cluster() as c, running(c, *controllers(c)), kubelet(c):
            await c.server.create("deployments", deployment(2, strategy={"type": "Recreate"}))
            await until(lambda: complete(c, 2), "first rollout", 15)
            d = copy.deepcopy(d_obj(c))
            d["spec"]["template"]["spec"]["containers"][0]["image"] = "web:2"
            await c.server.put("deployments", d)
            await until(lambda: complete(c, 2) and len(live_pods(c)) == 2, "recreated", 20)
            # When the new ReplicaSet was created, no old pod was left.
            history = c.server.history
            created = next(
                e.rv for e in history
                if e.plural == "replicasets" and e.type == "ADDED" and image_of(e.obj) == "web:2"
            )  # fmt: skip
            alive: set[str] = set()
            for e in history:
                if e.rv >= created:
                    break
                if e.plural == "pods":
                    name = e.obj["metadata"]["name"]
                    (alive.discard if e.type == "DELETED" else alive.add)(name)
            assert alive == set()

    run(body)


def test_scaling_and_pausing() -> None:
    async def body() -> None:
        async with cluster() as c, running(c, *controllers(c)), kubelet(c):
            await c.server.create("deployments", deployment(2))
            await until(lambda: complete(c, 2), "first rollout", 15)
            d = copy.deepcopy(d_obj(c))
            d["spec"]["replicas"] = 5
            d["spec"]["paused"] = True
            d["spec"]["template"]["spec"]["containers"][0]["image"] = "web:2"
            await c.server.put("deployments", d)
            await until(lambda: len(live_pods(c)) == 5, "scaled while paused", 15)
            await until(lambda: cond(d_obj(c), "Progressing").get("reason") == "DeploymentPaused")
            assert len(replicasets(c)) == 1  # no rollout while paused
            d = copy.deepcopy(d_obj(c))
            d["spec"]["paused"] = False
            d["spec"]["replicas"] = 3
            await c.server.put("deployments", d)
            await until(lambda: complete(c, 3) and len(live_pods(c)) == 3, "resumed", 20)
            assert {image_of(p) for p in live_pods(c)} == {"web:2"}

    run(body)


def test_unready_pods_leave_the_deployment_unavailable() -> None:
    async def body() -> None:
        async with cluster() as c, running(c, *controllers(c)), kubelet(c, ready=False):
            await c.server.create("deployments", deployment(2))
            await until(lambda: cond(d_obj(c), "Available").get("status") == "False", "unavailable")
            assert cond(d_obj(c), "Available")["reason"] == "MinimumReplicasUnavailable"
            assert cond(d_obj(c), "Progressing")["reason"] in (
                "NewReplicaSetCreated",
                "ReplicaSetUpdated",
            )
            await until(lambda: (d_obj(c).get("status") or {}).get("unavailableReplicas") == 2)

    run(body)


def test_adopts_an_orphan_replicaset_with_the_same_template() -> None:
    async def body() -> None:
        async with cluster() as c:
            d = deployment(1)
            h = compute_hash(d["spec"]["template"])
            template = copy.deepcopy(d["spec"]["template"])
            template["metadata"]["labels"][HASH_LABEL] = h
            orphan = {
                "metadata": {"name": f"web-{h}", "namespace": "default",
                             "labels": {"app": "web", HASH_LABEL: h}},
                "spec": {"replicas": 1, "template": template,
                         "selector": {"matchLabels": {"app": "web", HASH_LABEL: h}}},
            }  # fmt: skip
            await c.server.create("replicasets", orphan)
            await c.server.create("deployments", d)
            async with running(c, *controllers(c)), kubelet(c):
                await until(lambda: complete(c, 1), "adopted and complete", 15)
            [rs] = replicasets(c).values()
            assert (controller_ref(rs) or {}).get("uid") == d_obj(c)["metadata"]["uid"]
            assert cond(d_obj(c), "Progressing")["reason"] == "NewReplicaSetAvailable"

    run(body)


def test_hash_collision_bumps_collision_count_and_uses_a_new_name() -> None:
    async def body() -> None:
        async with cluster() as c:
            d = deployment(1)
            h = compute_hash(d["spec"]["template"])
            squatter = {
                "metadata": {"name": f"web-{h}", "namespace": "default",
                             "labels": {"app": "other"}},
                "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "other"}},
                         "template": {"metadata": {"labels": {"app": "other"}}}},
            }  # fmt: skip
            await c.server.create("replicasets", squatter)
            await c.server.create("deployments", d)
            async with running(c, *controllers(c)), kubelet(c):
                await until(lambda: complete(c, 1), "complete despite the collision", 15)
            assert d_obj(c)["status"]["collisionCount"] == 1
            ours = [n for n, rs in replicasets(c).items() if controller_ref(rs)]
            assert ours == [f"web-{compute_hash(d['spec']['template'], 1)}"]

    run(body)
