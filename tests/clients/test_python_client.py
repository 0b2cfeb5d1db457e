"""The official ``kubernetes`` Python client against kproxy's apiserver (tier clients).

Uses the generated admin kubeconfig (TLS + admin client certificate) exactly as a user
would. For every served kind: create, get, list with a label selector, strategic and
merge patches, a replace with a stale resourceVersion (409), delete; and a watch that
sees each change once and recovers from a 410 after the store is compacted.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.tiers import require_module

kubernetes = require_module("kubernetes")
from kubernetes import client, config, watch  # noqa: E402
from kubernetes.client.rest import ApiException  # noqa: E402

from tests.clients.server_thread import ThreadedApiServer  # noqa: E402
from tests.unit.apiserver.harness import MANIFESTS  # noqa: E402

pytestmark = pytest.mark.clients

# resource → (API class, method suffix, namespaced)
APIS: dict[str, tuple[str, str, bool]] = {
    "namespaces": ("CoreV1Api", "namespace", False),
    "pods": ("CoreV1Api", "pod", True),
    "services": ("CoreV1Api", "service", True),
    "endpoints": ("CoreV1Api", "endpoints", True),
    "nodes": ("CoreV1Api", "node", False),
    "events": ("CoreV1Api", "event", True),
    "configmaps": ("CoreV1Api", "config_map", True),
    "endpointslices": ("DiscoveryV1Api", "endpoint_slice", True),
    "deployments": ("AppsV1Api", "deployment", True),
    "replicasets": ("AppsV1Api", "replica_set", True),
    "leases": ("CoordinationV1Api", "lease", True),
}
KIND_META = {
    "namespaces": ("v1", "Namespace"),
    "pods": ("v1", "Pod"),
    "services": ("v1", "Service"),
    "endpoints": ("v1", "Endpoints"),
    "nodes": ("v1", "Node"),
    "events": ("v1", "Event"),
    "configmaps": ("v1", "ConfigMap"),
    "endpointslices": ("discovery.k8s.io/v1", "EndpointSlice"),
    "deployments": ("apps/v1", "Deployment"),
    "replicasets": ("apps/v1", "ReplicaSet"),
    "leases": ("coordination.k8s.io/v1", "Lease"),
}


@pytest.fixture(scope="module")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedApiServer]:
    server = ThreadedApiServer(tmp_path_factory.mktemp("apiserver")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api_client(apiserver: ThreadedApiServer) -> Iterator[Any]:
    cfg = client.Configuration()
    config.load_kube_config(config_file=str(apiserver.kubeconfig), client_configuration=cfg)
    with client.ApiClient(cfg) as api:
        yield api


class Ops:
    """The typed client's verbs for one kind, named as the generated methods are."""

    def __init__(self, api_client: Any, resource: str) -> None:
        cls, self.suffix, self.namespaced = APIS[resource]
        self.api = getattr(client, cls)(api_client)

    def _fn(self, verb: str, plural: bool = False) -> Any:
        scope = "namespaced_" if self.namespaced else ""
        if verb == "list" and not self.namespaced:
            return getattr(self.api, f"list_{self.suffix}")
        return getattr(self.api, f"{verb}_{scope}{self.suffix}")

    def _ns(self) -> list[str]:
        return ["default"] if self.namespaced else []

    def create(self, body: dict[str, Any]) -> Any:
        return self._fn("create")(*self._ns(), body)

    def read(self, name: str) -> Any:
        return self._fn("read")(name, *self._ns())

    def list(self, **kw: Any) -> Any:
        return self._fn("list")(*self._ns(), **kw)

    def patch(self, name: str, body: Any, **kw: Any) -> Any:
        return self._fn("patch")(name, *self._ns(), body, **kw)

    def replace(self, name: str, body: Any) -> Any:
        return self._fn("replace")(name, *self._ns(), body)

    def delete(self, name: str) -> Any:
        return self._fn("delete")(name, *self._ns())


@pytest.mark.parametrize("resource", sorted(APIS))
def test_every_kind(api_client: Any, resource: str) -> None:
    ops = Ops(api_client, resource)
    api_version, kind = KIND_META[resource]
    body = copy.deepcopy(MANIFESTS[resource][1])
    body.update(apiVersion=api_version, kind=kind)
    name = f"py-{body['metadata']['name']}"
    body["metadata"]["name"] = name
    body["metadata"]["labels"] = {"suite": "python", "kind": resource}
    created = ops.create(body)
    assert created.metadata.name == name and created.metadata.uid
    with pytest.raises(ApiException) as exc:
        ops.create(body)
    assert exc.value.status == 409
    got = ops.read(name)
    assert got.metadata.resource_version == created.metadata.resource_version
    listed = ops.list(label_selector=f"suite=python,kind={resource}")
    assert [i.metadata.name for i in listed.items] == [name]
    assert ops.list(label_selector="suite=python,kind=other").items == []
    # a dict body goes out as a strategic merge patch
    patched = ops.patch(name, {"metadata": {"labels": {"patched": "smp"}}})
    assert patched.metadata.labels["patched"] == "smp"
    merged = ops.patch(
        name,
        {"metadata": {"labels": {"merged": "yes"}}},
        _content_type="application/merge-patch+json",
    )
    expected = {"suite": "python", "kind": resource, "patched": "smp", "merged": "yes"}
    assert expected.items() <= merged.metadata.labels.items()
    # the object read before the patches is stale now
    with pytest.raises(ApiException) as exc:
        ops.replace(name, got)
    assert exc.value.status == 409
    fresh = ops.read(name)
    fresh.metadata.labels["replaced"] = "ok"
    assert ops.replace(name, fresh).metadata.labels["replaced"] == "ok"
    ops.delete(name)
    if resource == "namespaces":
        assert ops.read(name).status.phase == "Terminating"
        return
    with pytest.raises(ApiException) as exc:
        ops.read(name)
    assert exc.value.status == 404


def test_scale_and_status(api_client: Any) -> None:
    apps = client.AppsV1Api(api_client)
    body = copy.deepcopy(MANIFESTS["deployments"][1])
    body["metadata"]["name"] = "py-scale"
    apps.create_namespaced_deployment("default", body)
    scale = apps.patch_namespaced_deployment_scale("py-scale", "default", {"spec": {"replicas": 5}})
    assert scale.spec.replicas == 5
    assert apps.read_namespaced_deployment_scale("py-scale", "default").status.selector == "app=d1"
    status = apps.patch_namespaced_deployment_status(
        "py-scale", "default", {"status": {"replicas": 2}}
    )
    assert status.status.replicas == 2 and status.spec.replicas == 5
    core = client.CoreV1Api(api_client)
    with pytest.raises(ApiException) as exc:
        core.create_namespaced_config_map("no-such-ns", {"metadata": {"name": "x"}})
    assert exc.value.status == 404


def test_watch_sees_each_change_once_and_recovers_from_410(
    api_client: Any, apiserver: ThreadedApiServer
) -> None:
    core = client.CoreV1Api(api_client)
    ns = "default"
    start_rv = core.list_namespaced_config_map(ns).metadata.resource_version
    names = [f"w{i}" for i in range(4)]
    done = threading.Event()

    def writer() -> None:
        for name in names:
            core.create_namespaced_config_map(
                ns, {"metadata": {"name": name, "labels": {"w": "1"}}}
            )
        for name in names:
            core.patch_namespaced_config_map(name, ns, {"data": {"x": "1"}})
        for name in names:
            core.delete_namespaced_config_map(name, ns)
        done.set()

    seen: list[tuple[str, str]] = []
    w = watch.Watch()
    thread = threading.Thread(target=writer)
    thread.start()
    for event in w.stream(
        core.list_namespaced_config_map,
        ns,
        label_selector="w=1",
        resource_version=start_rv,
        timeout_seconds=10,
        allow_watch_bookmarks=True,
    ):
        if event["type"] == "BOOKMARK":
            continue
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 3 * len(names):
            w.stop()
    thread.join(10)
    assert done.is_set()
    expected = (
        [("ADDED", n) for n in names]
        + [("MODIFIED", n) for n in names]
        + [("DELETED", n) for n in names]
    )
    assert seen == expected

    # compact the history away: the watch from the old RV fails with 410 ...
    apiserver.compact()
    with pytest.raises(ApiException) as exc:
        for _ in watch.Watch().stream(
            core.list_namespaced_config_map, ns, resource_version=start_rv
        ):
            pytest.fail("no event may arrive from a compacted resourceVersion")
    assert exc.value.status == 410
    # ... and the documented recovery (re-list, watch from the list's RV) works
    rv = core.list_namespaced_config_map(ns).metadata.resource_version
    core.create_namespaced_config_map(ns, {"metadata": {"name": "after", "labels": {"w": "1"}}})
    w = watch.Watch()
    for event in w.stream(
        core.list_namespaced_config_map,
        ns,
        label_selector="w=1",
        resource_version=rv,
        timeout_seconds=5,
    ):
        assert (event["type"], event["object"].metadata.name) == ("ADDED", "after")
        w.stop()
        break


def test_kubeconfig_is_on_disk(apiserver: ThreadedApiServer) -> None:
    path: Path = apiserver.kubeconfig
    assert path.exists() and path.stat().st_mode & 0o077 == 0
