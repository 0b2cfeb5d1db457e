"""The apiserver's REST verbs for every kind: discovery, CRUD, errors, subresources."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tests.unit.apiserver.harness import MANIFESTS, Harness, run

BACKENDS = ["memory", "sqlite"]


def test_discovery(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        version = await h.ok("GET", "/version")
        assert version["major"] == "1" and version["gitVersion"].startswith("v1.")
        assert (await h.ok("GET", "/api"))["versions"] == ["v1"]
        groups = {g["name"] for g in (await h.ok("GET", "/apis"))["groups"]}
        assert {"apps", "discovery.k8s.io", "coordination.k8s.io"} <= groups
        core = {r["name"]: r for r in (await h.ok("GET", "/api/v1"))["resources"]}
        assert {"pods", "pods/status", "pods/binding", "services", "nodes"} <= set(core)
        assert core["services"]["shortNames"] == ["svc"]
        apps = {r["name"]: r for r in (await h.ok("GET", "/apis/apps/v1"))["resources"]}
        scale = apps["deployments/scale"]
        assert (scale["group"], scale["version"], scale["kind"]) == ("autoscaling", "v1", "Scale")
        status, text = await h.call("GET", "/openapi/v2")
        assert status == 200 and not text
        assert (await h.call("GET", "/openapi/v3"))[0] == 404
        for path in ("/healthz", "/livez", "/readyz"):
            assert (await h.call("GET", path)) == (200, "ok")
        status, err = await h.call("GET", "/apis/nope/v1")
        assert status == 404 and err["kind"] == "Status"
        status, err = await h.call("GET", "/api/v1/namespaces/default/widgets")
        assert status == 404 and err["reason"] == "NotFound"

    run(body, tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("resource", sorted(MANIFESTS))
def test_crud_every_kind(tmp_path: Path, backend: str, resource: str) -> None:
    path, manifest = MANIFESTS[resource]

    async def body(h: Harness) -> None:
        created = await h.ok("POST", path, manifest)
        meta = created["metadata"]
        name = meta["name"]
        assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
        assert int(meta["resourceVersion"]) > 0 and created["kind"]
        status, err = await h.call("POST", path, manifest)
        assert status == 409 and err["reason"] == "AlreadyExists", err
        got = await h.ok("GET", f"{path}/{name}")
        assert got == created
        listed = await h.ok("GET", path)
        assert listed["kind"].endswith("List")
        assert name in [i["metadata"]["name"] for i in listed["items"]]
        assert int(listed["metadata"]["resourceVersion"]) >= int(meta["resourceVersion"])
        # update with the current RV; then a stale one is a 409 Conflict
        changed = copy.deepcopy(got)
        changed["metadata"].setdefault("labels", {})["touched"] = "yes"
        updated = await h.ok("PUT", f"{path}/{name}", changed)
        assert updated["metadata"]["labels"]["touched"] == "yes"
        assert int(updated["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
        status, err = await h.call("PUT", f"{path}/{name}", changed)
        assert status == 409 and err["reason"] == "Conflict", err
        # patches: merge, strategic, JSON
        await h.ok(
            "PATCH",
            f"{path}/{name}",
            {"metadata": {"labels": {"m": "1"}}},
            content_type="application/merge-patch+json",
        )
        await h.ok(
            "PATCH",
            f"{path}/{name}",
            {"metadata": {"labels": {"s": "2"}}},
            content_type="application/strategic-merge-patch+json",
        )
        patched = await h.ok(
            "PATCH",
            f"{path}/{name}",
            [{"op": "add", "path": "/metadata/labels/j", "value": "3"}],
            content_type="application/json-patch+json",
        )
        assert {"m": "1", "s": "2", "j": "3"}.items() <= patched["metadata"]["labels"].items()
        status, err = await h.call("PATCH", f"{path}/{name}", {"a": 1}, content_type="text/plain")
        assert status == 415 and err["reason"] == "UnsupportedMediaType"
        # label selector
        sel = await h.ok("GET", path, params={"labelSelector": "j=3"})
        assert [i["metadata"]["name"] for i in sel["items"]] == [name]
        assert (await h.ok("GET", path, params={"labelSelector": "j!=3"}))["items"] == [] or (
            name not in [i["metadata"]["name"] for i in sel["items"][1:]]
        )
        status, deleted = await h.call("DELETE", f"{path}/{name}")
        assert status in (200, 202), deleted
        if resource == "namespaces":
            assert deleted["status"]["phase"] == "Terminating"
            return
        status, err = await h.call("GET", f"{path}/{name}")
        assert status == 404 and err["reason"] == "NotFound"
        assert err["details"]["name"] == name

    run(body, tmp_path, backend)


def test_errors_are_status_objects(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        pods = "/api/v1/namespaces/default/pods"
        status, err = await h.call("POST", pods, raw=b"{not json")
        assert status == 400 and err["reason"] == "BadRequest"
        status, err = await h.call("POST", pods, {"metadata": {"name": "x"}, "spec": {}})
        assert status == 422 and err["reason"] == "Invalid"
        assert any(c["field"] == "spec.containers" for c in err["details"]["causes"])
        status, err = await h.call("POST", "/api/v1/namespaces/missing/pods", MANIFESTS["pods"][1])
        assert status == 404 and err["message"] == 'namespaces "missing" not found'
        status, err = await h.call("POST", pods, {**MANIFESTS["pods"][1], "kind": "Service"})
        assert status == 400
        status, err = await h.call("PUT", f"{pods}/nope", MANIFESTS["pods"][1])
        assert status == 400  # name mismatch
        status, err = await h.call("PUT", f"{pods}/p1", MANIFESTS["pods"][1])
        assert status == 404
        status, err = await h.call("DELETE", "/api/v1/namespaces")
        assert status == 405 and err["reason"] == "MethodNotAllowed"
        status, err = await h.call("GET", pods, params={"labelSelector": "a in (b"})
        assert status == 400
        status, err = await h.call("GET", pods, params={"fieldSelector": "spec.bogus=1"})
        assert status == 400 and "field label not supported" in err["message"]
        status, err = await h.call("GET", pods, params={"resourceVersion": "abc"})
        assert status == 400
        status, err = await h.call("GET", pods, params={"continue": "garbage!!"})
        assert status == 400

    run(body, tmp_path)


def test_generate_name_generation_and_status_rules(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        path, manifest = MANIFESTS["deployments"]
        gen = copy.deepcopy(manifest)
        gen["metadata"] = {"generateName": "web-"}
        gen["status"] = {"replicas": 9}
        created = await h.ok("POST", path, gen)
        name = created["metadata"]["name"]
        assert name.startswith("web-") and len(name) == 9
        assert created["metadata"]["generation"] == 1
        assert created["status"] == {}  # status is the controller's
        obj = copy.deepcopy(created)
        obj["spec"]["replicas"] = 4
        obj["status"] = {"replicas": 7}
        updated = await h.ok("PUT", f"{path}/{name}", obj)
        assert updated["metadata"]["generation"] == 2
        assert updated["status"] == {}
        # status subresource writes only status
        updated["status"] = {"replicas": 3, "observedGeneration": 2}
        updated["spec"]["replicas"] = 99
        st = await h.ok("PUT", f"{path}/{name}/status", updated)
        assert st["status"]["replicas"] == 3 and st["spec"]["replicas"] == 4
        st = await h.ok(
            "PATCH",
            f"{path}/{name}/status",
            {"status": {"readyReplicas": 2}},
            content_type="application/merge-patch+json",
        )
        assert st["status"]["readyReplicas"] == 2 and st["metadata"]["generation"] == 2
        # scale subresource
        scale = await h.ok("GET", f"{path}/{name}/scale")
        assert scale["kind"] == "Scale" and scale["apiVersion"] == "autoscaling/v1"
        assert scale["spec"]["replicas"] == 4 and scale["status"]["selector"] == "app=d1"
        scaled = await h.ok(
            "PATCH",
            f"{path}/{name}/scale",
            {"spec": {"replicas": 6}},
            content_type="application/merge-patch+json",
        )
        assert scaled["spec"]["replicas"] == 6
        scale["spec"]["replicas"] = 1
        status, _err = await h.call("PUT", f"{path}/{name}/scale", scale)
        assert status == 409  # stale resourceVersion
        assert (await h.ok("GET", f"{path}/{name}"))["spec"]["replicas"] == 6

    run(body, tmp_path)


def test_pod_binding_and_graceful_delete(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        path, manifest = MANIFESTS["pods"]
        pod = await h.ok("POST", path, manifest)
        assert pod["status"]["phase"] == "Pending" and pod["status"]["qosClass"] == "BestEffort"
        assert pod["spec"]["restartPolicy"] == "Always"  # defaulted
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": "p1"},
            "target": {"apiVersion": "v1", "kind": "Node", "name": "n1"},
        }
        status, result = await h.call("POST", f"{path}/p1/binding", binding)
        assert status == 201 and result["status"] == "Success"
        bound = await h.ok("GET", f"{path}/p1")
        assert bound["spec"]["nodeName"] == "n1"
        cond = {c["type"]: c["status"] for c in bound["status"]["conditions"]}
        assert cond["PodScheduled"] == "True"
        status, _err = await h.call("POST", f"{path}/p1/binding", binding)
        assert status == 409
        # a bound pod is deleted gracefully: deletionTimestamp, then the kubelet's grace 0
        status, deleting = await h.call("DELETE", f"{path}/p1")
        assert status == 202 and deleting["metadata"]["deletionTimestamp"]
        assert deleting["metadata"]["deletionGracePeriodSeconds"] == 30
        assert (await h.ok("GET", f"{path}/p1"))["metadata"]["deletionTimestamp"]
        status, _ = await h.call("DELETE", f"{path}/p1", {"gracePeriodSeconds": 0})
        assert status == 200
        assert (await h.call("GET", f"{path}/p1"))[0] == 404
        # an unbound pod goes at once
        await h.ok("POST", path, manifest)
        assert (await h.call("DELETE", f"{path}/p1"))[0] == 200
        assert (await h.call("GET", f"{path}/p1"))[0] == 404

    run(body, tmp_path)


def test_finalizers_propagation_and_namespaces(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        path, manifest = MANIFESTS["configmaps"]
        cm = copy.deepcopy(manifest)
        cm["metadata"]["finalizers"] = ["example.com/hold"]
        await h.ok("POST", path, cm)
        status, obj = await h.call("DELETE", f"{path}/cm1")
        assert status == 202 and obj["metadata"]["deletionTimestamp"]
        got = await h.ok("GET", f"{path}/cm1")
        got["metadata"]["finalizers"] = []
        await h.ok("PUT", f"{path}/cm1", got)
        assert (await h.call("GET", f"{path}/cm1"))[0] == 404
        # foreground deletion records the finalizer for the GC
        dpath, dep = MANIFESTS["deployments"]
        await h.ok("POST", dpath, dep)
        status, obj = await h.call("DELETE", f"{dpath}/d1", {"propagationPolicy": "Foreground"})
        assert status == 202 and obj["metadata"]["finalizers"] == ["foregroundDeletion"]
        status, err = await h.call("DELETE", f"{dpath}/d1", {"propagationPolicy": "Sideways"})
        assert status == 422
        # namespaces: Terminating, no new content, finalize removes it
        await h.ok("POST", "/api/v1/namespaces", {"metadata": {"name": "gone"}})
        ns = await h.ok("GET", "/api/v1/namespaces/gone")
        assert ns["spec"]["finalizers"] == ["kubernetes"] and ns["status"]["phase"] == "Active"
        assert ns["metadata"]["labels"]["kubernetes.io/metadata.name"] == "gone"
        await h.call("DELETE", "/api/v1/namespaces/gone")
        status, err = await h.call("POST", "/api/v1/namespaces/gone/configmaps", manifest)
        assert status == 403, err
        ns = await h.ok("GET", "/api/v1/namespaces/gone")
        ns["spec"]["finalizers"] = []
        await h.ok("PUT", "/api/v1/namespaces/gone/finalize", ns)
        assert (await h.call("GET", "/api/v1/namespaces/gone"))[0] == 404

    run(body, tmp_path)


def test_deletecollection_and_dry_run(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        path, manifest = MANIFESTS["configmaps"]
        for i in range(5):
            cm = copy.deepcopy(manifest)
            cm["metadata"] = {"name": f"c{i}", "labels": {"even": str(i % 2 == 0).lower()}}
            await h.ok("POST", path, cm)
        dry = await h.ok(
            "POST", path, {**manifest, "metadata": {"name": "dry"}}, params={"dryRun": "All"}
        )
        assert dry["metadata"]["name"] == "dry"
        assert (await h.call("GET", f"{path}/dry"))[0] == 404
        gone = await h.ok("DELETE", path, params={"labelSelector": "even=true"})
        assert sorted(i["metadata"]["name"] for i in gone["items"]) == ["c0", "c2", "c4"]
        left = await h.ok("GET", path)
        assert sorted(i["metadata"]["name"] for i in left["items"]) == ["c1", "c3"]
        # apply (simplified server-side apply) creates, then merges
        applied = await h.ok(
            "PATCH",
            f"{path}/applied",
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "applied"},
                "data": {"k": "v"},
            },
            content_type="application/apply-patch+yaml",
            params={"fieldManager": "test"},
        )
        assert applied["data"] == {"k": "v"}
        applied = await h.ok(
            "PATCH",
            f"{path}/applied",
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "applied"},
                "data": {"k2": "v2"},
            },
            content_type="application/apply-patch+yaml",
            params={"fieldManager": "test"},
        )
        assert applied["data"] == {"k": "v", "k2": "v2"}

    run(body, tmp_path)


def test_service_strategic_patch_like_kubectl_apply(tmp_path: Path) -> None:
    async def body(h: Harness) -> None:
        path = "/api/v1/namespaces/default/services"
        svc = {
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 80}]},
        }
        await h.ok("POST", path, svc)
        patch = {
            "spec": {
                "$setElementOrder/ports": [{"port": 8080}],
                "ports": [{"port": 8080, "targetPort": 80}, {"$patch": "delete", "port": 80}],
            }
        }
        out = await h.ok(
            "PATCH", f"{path}/web", patch, content_type="application/strategic-merge-patch+json"
        )
        assert [(p["port"], p["protocol"]) for p in out["spec"]["ports"]] == [(8080, "TCP")]
        assert out["spec"]["clusterIP"]

    run(body, tmp_path)
