"""The REST client against a fake Kubernetes-style server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from kproxy.client.errors import (
    AlreadyExists,
    ApiStatusError,
    ClientError,
    Conflict,
    Gone,
    Invalid,
    NotFound,
    ServerError,
    status_error,
)
from kproxy.client.kubeconfig import ClientConfig
from kproxy.client.rest import (
    ENDPOINTSLICES,
    NODES,
    PODS,
    Resource,
    RestClient,
    WatchEvent,
    resource_path,
)
from tests.unit.client.fake_apiserver import FakeApiServer

Body = Callable[[FakeApiServer, RestClient], Awaitable[None]]


def run(body: Body, timeout: float = 20.0) -> None:
    async def main() -> None:
        server = FakeApiServer()
        server.register("pods", "Pod", "v1")
        server.register("nodes", "Node", "v1")
        server.register("endpointslices", "EndpointSlice", "discovery.k8s.io/v1")
        async with (
            asyncio.timeout(timeout),
            server.serve() as url,
            RestClient(ClientConfig(server=url, headers={"X-Test": "1"})) as client,
        ):
            await body(server, client)

    asyncio.run(main())


def pod(name: str, ns: str = "default", **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "labels": labels}, "spec": {}}


@pytest.mark.parametrize(
    ("args", "path"),
    [
        (("", "v1", "pods"), "/api/v1/pods"),
        (("", "v1", "pods", "ns1"), "/api/v1/namespaces/ns1/pods"),
        (("", "v1", "pods", "ns1", "p", "status"), "/api/v1/namespaces/ns1/pods/p/status"),
        (("", "v1", "namespaces", None, "kube-system"), "/api/v1/namespaces/kube-system"),
        (("apps", "v1", "deployments", "d", "web", "scale"),
         "/apis/apps/v1/namespaces/d/deployments/web/scale"),
        (("discovery.k8s.io", "v1", "endpointslices"), "/apis/discovery.k8s.io/v1/endpointslices"),
        (("", "v1", "configmaps", "a b", "x/y"), "/api/v1/namespaces/a%20b/configmaps/x%2Fy"),
    ],
)  # fmt: skip
def test_resource_path(args: tuple[Any, ...], path: str) -> None:
    assert resource_path(*args) == path


def test_resource_path_subresource_needs_name() -> None:
    with pytest.raises(ValueError):
        resource_path("", "v1", "pods", "ns", None, "status")
    assert NODES.path("ignored-namespace", "n1") == "/api/v1/nodes/n1"
    assert Resource("apps", "v1", "deployments").api_version == "apps/v1"


def test_crud_round_trip() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        created = await client.create(PODS, pod("a", app="web"), field_manager="kproxy")
        assert created["metadata"]["resourceVersion"] == "101"
        assert server.requests[-1].query == {"fieldManager": "kproxy"}
        assert server.requests[-1].headers["Content-Type"] == "application/json"
        assert server.requests[-1].headers["X-Test"] == "1"
        assert server.requests[-1].path == "/api/v1/namespaces/default/pods"

        got = await client.get(PODS, "a", "default")
        assert got["metadata"]["uid"] == created["metadata"]["uid"]

        got["spec"] = {"nodeName": "n1"}
        updated = await client.update(PODS, got)
        assert updated["spec"]["nodeName"] == "n1"
        assert server.requests[-1].method == "PUT"

        with pytest.raises(Conflict) as info:
            await client.update(PODS, got)  # the RV is stale now
        assert info.value.code == 409 and info.value.reason == "Conflict"

        deleted = await client.delete(PODS, "a", "default", propagation_policy="Background",
                                      grace_period_seconds=0)  # fmt: skip
        assert deleted["metadata"]["name"] == "a"
        sent = json.loads(server.requests[-1].body)
        assert sent == {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": "Background",
            "gracePeriodSeconds": 0,
        }
        with pytest.raises(NotFound) as nf:
            await client.get(PODS, "a", "default")
        assert nf.value.message == 'pods "a" not found'
        assert nf.value.details == {"name": "a"}

    run(body)


def test_errors_are_typed() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        await client.create(PODS, pod("a"))
        with pytest.raises(AlreadyExists):
            await client.create(PODS, pod("a"))
        with pytest.raises(Invalid) as inv:
            await client.create(PODS, {"metadata": {"namespace": "default"}})
        assert inv.value.code == 422
        assert inv.value.details["causes"][0]["field"] == "metadata.name"
        server.fail_lists = 1
        with pytest.raises(ServerError) as se:
            await client.list(PODS)
        assert se.value.code == 500 and "boom" in se.value.message
        with pytest.raises(NotFound):
            await client.list(Resource("", "v1", "secrets"))

    run(body)


def test_transport_errors_are_client_errors() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before use: nothing listens there

    async def main() -> None:
        async with RestClient(ClientConfig(server=f"http://127.0.0.1:{port}")) as client:
            with pytest.raises(ClientError) as info:
                await client.get(PODS, "a", "default")
            assert not isinstance(info.value, ApiStatusError)
            with pytest.raises(ClientError):
                async for _ in client.watch(PODS):
                    pass

    asyncio.run(main())


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        ({"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}, 0, Gone),
        ({"kind": "Status", "code": 410, "reason": "Gone"}, 0, Gone),
        ({"kind": "Status", "code": 409, "reason": "AlreadyExists"}, 0, AlreadyExists),
        ({"kind": "Status", "code": 409}, 0, Conflict),
        (None, 404, NotFound),
        ({"message": "<html>"}, 503, ServerError),
        ({"kind": "Status", "code": 418, "reason": "Teapot"}, 0, ApiStatusError),
    ],
)
def test_status_error_mapping(status: Any, code: int, cls: type[ApiStatusError]) -> None:
    err = status_error(status, code)
    assert type(err) is cls
    assert err.status["kind"] == "Status"


def test_list_selectors_and_pages() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        for i in range(7):
            await client.create(PODS, pod(f"p{i}", "a" if i % 2 else "b", app="web"))
        await client.create(PODS, pod("other", "a", app="db"))

        page = await client.list(PODS, "a", label_selector="app=web", limit=2)
        assert [p["metadata"]["name"] for p in page["items"]] == ["p1", "p3"]
        q = server.requests[-1]
        assert q.path == "/api/v1/namespaces/a/pods"
        assert q.query == {"labelSelector": "app=web", "limit": "2"}
        token = page["metadata"]["continue"]
        page2 = await client.list(PODS, "a", label_selector="app=web", limit=2, continue_=token)
        assert [p["metadata"]["name"] for p in page2["items"]] == ["p5"]
        assert server.requests[-1].query["continue"] == token

        everything = await client.list_all(PODS, label_selector="app=web", page_size=3)
        assert len(everything["items"]) == 7
        assert "continue" not in everything["metadata"]
        assert everything["metadata"]["resourceVersion"] == str(server.rv)
        assert sum(1 for r in server.requests if r.query.get("limit") == "3") == 3

        await client.list(PODS, field_selector="metadata.name=p1", resource_version="0",
                          resource_version_match="NotOlderThan")  # fmt: skip
        assert server.requests[-1].query == {
            "fieldSelector": "metadata.name=p1",
            "resourceVersion": "0",
            "resourceVersionMatch": "NotOlderThan",
        }

    run(body)


def test_patch_content_types() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        await client.create(PODS, pod("a"))
        out = await client.patch(PODS, "a", {"metadata": {"labels": {"x": "y"}}}, "default")
        assert out["metadata"]["labels"] == {"x": "y"}
        assert (
            server.requests[-1].headers["Content-Type"] == "application/strategic-merge-patch+json"
        )
        await client.patch(PODS, "a", {"spec": {"replicas": 3}}, "default", patch_type="merge")
        assert server.requests[-1].headers["Content-Type"] == "application/merge-patch+json"
        out = await client.patch(
            PODS, "a", [{"op": "replace", "path": "/spec/replicas", "value": 5}], "default",
            patch_type="json",
        )  # fmt: skip
        assert out["spec"]["replicas"] == 5
        assert server.requests[-1].headers["Content-Type"] == "application/json-patch+json"
        await client.patch(PODS, "a", {"status": {"phase": "Running"}}, "default",
                           subresource="status")  # fmt: skip
        assert server.requests[-1].path == "/api/v1/namespaces/default/pods/a/status"
        await client.patch(PODS, "a", {"metadata": {}}, "default", patch_type="apply",
                           field_manager="kproxy", force=True)  # fmt: skip
        assert server.requests[-1].headers["Content-Type"] == "application/apply-patch+yaml"
        assert server.requests[-1].query == {"fieldManager": "kproxy", "force": "true"}
        with pytest.raises(ValueError):
            await client.patch(PODS, "a", {"x": 1}, patch_type="json")
        with pytest.raises(ValueError):
            await client.patch(PODS, "a", [{"op": "remove", "path": "/x"}], patch_type="merge")
        with pytest.raises(ValueError):
            await client.patch(PODS, "a", {}, patch_type="apply")

    run(body)


def test_namespace_defaults() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        await client.create(PODS, pod("a", "team"))  # from the body
        assert server.requests[-1].path == "/api/v1/namespaces/team/pods"
        await client.create(PODS, {"metadata": {"name": "b"}})  # from the config
        assert server.requests[-1].path == "/api/v1/namespaces/default/pods"
        await client.create(NODES, {"metadata": {"name": "n1"}})
        assert server.requests[-1].path == "/api/v1/nodes"
        await client.list(PODS)  # all namespaces
        assert server.requests[-1].path == "/api/v1/pods"

    run(body)


async def _collect(stream: Any, n: int) -> list[WatchEvent]:
    out: list[WatchEvent] = []
    async for event in stream:
        out.append(event)
        if len(out) == n:
            break
    return out


def test_watch_streams_events_after_rv() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        await client.create(PODS, pod("a"))
        rv = (await client.list(PODS))["metadata"]["resourceVersion"]
        watch = asyncio.create_task(
            _collect(client.watch(PODS, resource_version=rv, timeout_seconds=30), 3)
        )
        while server.open_watches == 0:
            await asyncio.sleep(0.01)
        await client.create(PODS, pod("b"))
        await client.patch(PODS, "a", {"metadata": {"labels": {"x": "1"}}}, "default")
        await client.delete(PODS, "b", "default")
        events = await watch
        assert [(e.type, e.object["metadata"]["name"]) for e in events] == [
            ("ADDED", "b"),
            ("MODIFIED", "a"),
            ("DELETED", "b"),
        ]
        assert events[-1].resource_version == str(server.rv)
        q = server.requests[-4].query
        assert q == {
            "watch": "true",
            "resourceVersion": rv,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": "30",
        }

    run(body)


def test_watch_without_rv_replays_and_selects() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        await client.create(PODS, pod("a", app="web"))
        await client.create(PODS, pod("b", app="db"))
        events = await _collect(client.watch(PODS, label_selector="app=web"), 1)
        assert [e.object["metadata"]["name"] for e in events] == ["a"]
        assert "resourceVersion" not in server.requests[-1].query

    run(body)


def test_watch_410_error_event_raises_gone() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        await client.create(PODS, pod("a"))
        await client.create(PODS, pod("b"))
        server.compact()
        with pytest.raises(Gone) as info:
            async for _ in client.watch(PODS, resource_version="100"):
                pass
        assert info.value.code == 410 and info.value.reason == "Expired"
        assert "too old resource version" in info.value.message

    run(body)


def test_watch_bookmarks_and_timeout_end() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        rv = str(server.rv)
        got: list[WatchEvent] = []

        async def consume() -> None:
            async for e in client.watch(PODS, resource_version=rv, timeout_seconds=1):
                got.append(e)

        task = asyncio.create_task(consume())
        while server.open_watches == 0:
            await asyncio.sleep(0.01)
        server.bump(5)
        await server.bookmark("pods")
        await task  # ends by itself when the server honours timeoutSeconds
        assert [(e.type, e.resource_version) for e in got] == [("BOOKMARK", str(server.rv))]

    run(body)


def test_watch_handles_objects_larger_than_aiohttp_line_limit() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        rv = str(server.rv)
        big = pod("big")
        big["metadata"]["annotations"] = {"blob": "x" * 300_000}
        task = asyncio.create_task(_collect(client.watch(PODS, resource_version=rv), 2))
        while server.open_watches == 0:
            await asyncio.sleep(0.01)
        await client.create(PODS, big)
        await client.create(PODS, pod("small"))
        events = await task
        assert len(events[0].object["metadata"]["annotations"]["blob"]) == 300_000
        assert events[1].object["metadata"]["name"] == "small"

    run(body)


def test_cluster_scoped_and_grouped_watch_paths() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        await client.create(ENDPOINTSLICES, {"metadata": {"name": "s", "namespace": "default"}})
        assert (
            server.requests[-1].path
            == "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
        )
        events = await _collect(client.watch(ENDPOINTSLICES), 1)
        assert events[0].object["kind"] == "EndpointSlice"
        assert server.requests[-1].path == "/apis/discovery.k8s.io/v1/endpointslices"

    run(body)
