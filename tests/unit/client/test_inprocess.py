"""The in-process client against a real in-process apiserver (memory and sqlite stores).

It must behave like :class:`RestClient` over HTTPS: the apiserver's validation,
defaulting and allocation apply, Status errors arrive typed, watches stream, and an
informer built on it syncs and follows changes. It needs no credentials, and it stops
working (with a :class:`ClientError`, never a hang) once the apiserver stops.
"""

from __future__ import annotations

import asyncio
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from kproxy.client.errors import AlreadyExists, ClientError, Invalid, NotFound
from kproxy.client.informer import FuncHandler, Informer, RestListerWatcher
from kproxy.client.inprocess import InProcessClient
from kproxy.client.rest import CONFIGMAPS, ENDPOINTSLICES, NAMESPACES, SERVICES
from tests.unit.apiserver.harness import Harness, apiserver

Obj = dict[str, Any]
Body = Callable[[Harness, InProcessClient], Awaitable[None]]

SERVICE: Obj = {
    "metadata": {"name": "web"},
    "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]},
}


def run(tmp_path: Path, body: Body, backend: str = "memory", timeout: float = 30.0) -> None:
    async def main() -> None:
        async with asyncio.timeout(timeout), apiserver(tmp_path, backend) as h:
            client = await InProcessClient.connect(h.server)
            try:
                await body(h, client)
            finally:
                await client.close()

    asyncio.run(main())


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_crud_goes_through_validation_and_defaulting(tmp_path: Path, backend: str) -> None:
    async def body(h: Harness, client: InProcessClient) -> None:
        svc = await client.create(SERVICES, SERVICE)
        # Defaulted and allocated by the apiserver, exactly as over HTTPS.
        assert svc["spec"]["type"] == "ClusterIP"
        assert svc["spec"]["ports"][0]["protocol"] == "TCP"
        assert svc["spec"]["clusterIP"].startswith("10.")
        assert svc["metadata"]["uid"] and svc["metadata"]["resourceVersion"]

        with pytest.raises(AlreadyExists):
            await client.create(SERVICES, SERVICE)
        bad = {"metadata": {"name": "bad"}, "spec": {"ports": [{"port": 70000}]}}
        with pytest.raises(Invalid) as info:
            await client.create(SERVICES, bad)
        assert info.value.code == 422

        patched = await client.patch(
            SERVICES, "web", {"metadata": {"labels": {"tier": "front"}}}, patch_type="merge"
        )
        assert patched["metadata"]["labels"] == {"tier": "front"}
        listed = await client.list(SERVICES, "default", label_selector="tier=front")
        assert [s["metadata"]["name"] for s in listed["items"]] == ["web"]

        # What the client wrote is what a remote (plain HTTP) client reads.
        status, remote = await h.call("GET", "/api/v1/namespaces/default/services/web")
        assert status == 200 and remote["spec"]["clusterIP"] == svc["spec"]["clusterIP"]

        await client.delete(SERVICES, "web")
        with pytest.raises(NotFound):
            await client.get(SERVICES, "web")

    run(tmp_path, body, backend)


def test_watch_streams_and_an_informer_follows(tmp_path: Path) -> None:
    async def body(h: Harness, client: InProcessClient) -> None:
        start = (await client.list(CONFIGMAPS, "default"))["metadata"]["resourceVersion"]
        seen: list[tuple[str, str]] = []

        async def watch() -> None:
            async for ev in client.watch(CONFIGMAPS, "default", resource_version=start):
                if ev.type != "BOOKMARK":
                    seen.append((ev.type, ev.object["metadata"]["name"]))
                if len(seen) == 3:
                    return

        watcher = asyncio.create_task(watch())
        cm = {"metadata": {"name": "c1"}, "data": {"a": "1"}}
        await client.create(CONFIGMAPS, cm)
        await client.update(CONFIGMAPS, {**cm, "data": {"a": "2"}})
        await client.delete(CONFIGMAPS, "c1")
        await asyncio.wait_for(watcher, 10)
        assert seen == [("ADDED", "c1"), ("MODIFIED", "c1"), ("DELETED", "c1")]

        names: set[str] = set()
        informer = Informer(RestListerWatcher(client, ENDPOINTSLICES, "default"))
        informer.add_handler(
            FuncHandler(
                add=lambda o: names.add(o["metadata"]["name"]),
                delete=lambda o: names.discard(o["metadata"]["name"]),
            )
        )
        informer.start()
        try:
            assert await informer.wait_synced(10)
            eps = {
                "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.0.0.1"]}],
                "ports": [{"port": 80}],
            }
            await client.create(ENDPOINTSLICES, eps)
            async with asyncio.timeout(10):
                while "web-1" not in names:
                    await asyncio.sleep(0.02)
            await client.delete(ENDPOINTSLICES, "web-1")
            async with asyncio.timeout(10):
                while names:
                    await asyncio.sleep(0.02)
        finally:
            await informer.stop()

    run(tmp_path, body)


def test_acts_as_admin_through_a_private_socket(tmp_path: Path) -> None:
    async def body(h: Harness, client: InProcessClient) -> None:
        # No token, no certificate, authorization on: cluster-scoped writes still pass.
        assert h.server.config.authorization
        await client.create(NAMESPACES, {"metadata": {"name": "team-a"}})
        assert (await client.get(NAMESPACES, "team-a"))["metadata"]["name"] == "team-a"
        mode = client.socket_path.parent.stat().st_mode
        assert stat.S_IMODE(mode) == 0o700, oct(mode)
        # Several clients share the apiserver's one socket.
        other = await InProcessClient.connect(h.server, namespace="team-a")
        try:
            assert other.socket_path == client.socket_path
            await other.create(CONFIGMAPS, {"metadata": {"name": "x"}})
            got = await client.get(CONFIGMAPS, "x", "team-a")
            assert got["metadata"]["namespace"] == "team-a"
        finally:
            await other.close()

    run(tmp_path, body)


def test_fails_cleanly_once_the_apiserver_stops(tmp_path: Path) -> None:
    async def main() -> None:
        async with asyncio.timeout(30):
            async with apiserver(tmp_path) as h:
                client = await InProcessClient.connect(h.server)
                await client.list(SERVICES, "default")
            # The harness stopped the server: the socket and its directory are gone.
            assert not client.socket_path.exists()
            assert not client.socket_path.parent.exists()
            with pytest.raises(ClientError):
                await client.list(SERVICES, "default")
            await client.close()

    asyncio.run(main())


def test_connect_needs_a_running_apiserver(tmp_path: Path) -> None:
    from kproxy.apiserver.server import ApiServer
    from kproxy.store import MemoryStore

    async def main() -> None:
        with pytest.raises(RuntimeError, match="not running"):
            await InProcessClient.connect(ApiServer(MemoryStore()))

    asyncio.run(main())
