"""The apiserver source against the fake apiserver (loopback only).

Events reach a recording :class:`~kproxy.proxy.sources.Handler` as ``(old, new)``
pairs; upstream's selectors keep headless Services, Services of another proxy and
headless EndpointSlices away (filtered by the server, checked on the wire too);
``synced()`` comes once, after the first full set; a 410 relist converges; and
``run_proxy --master`` programs (dry run) what the apiserver holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any

import pytest

from kproxy.api import selectors
from kproxy.client.informer import Backoff
from kproxy.client.kubeconfig import ClientConfig
from kproxy.client.rest import RestClient
from kproxy.proxy.apisource import (
    ENDPOINT_SLICE_LABEL_SELECTOR,
    SERVICE_FIELD_SELECTOR,
    SERVICE_LABEL_SELECTOR,
    ApiServerSource,
)
from kproxy.proxy.config import ProxyConfig
from kproxy.proxy.daemon import run_proxy
from kproxy.proxy.sources import Obj
from tests.unit.client import fake_apiserver
from tests.unit.client.fake_apiserver import FakeApiServer

NODE = "node-a"
FAST = Backoff(initial=0.01, cap=0.05, jitter=0.0)
Doc = dict[str, Any]
Body = Callable[[FakeApiServer, RestClient], Awaitable[None]]

_equality_only = fake_apiserver._selected


def _selected(obj: dict[str, Any], labels: str | None, fields: str | None) -> bool:
    # The fake matches equality label selectors only; kube-proxy's are set-based
    # (``!key``), so its label half is upstream's parser here, its field half stays.
    return selectors.parse(labels or "").matches_object(obj) and _equality_only(obj, None, fields)


@pytest.fixture(autouse=True)
def set_based_label_selectors(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(fake_apiserver, "_selected", _selected)
    yield


def run(body: Body, timeout: float = 20.0) -> None:
    async def main() -> None:
        server = FakeApiServer()
        server.register("services", "Service", "v1")
        server.register("endpointslices", "EndpointSlice", "discovery.k8s.io/v1")
        server.register("nodes", "Node", "v1")
        async with (
            asyncio.timeout(timeout),
            server.serve() as url,
            RestClient(ClientConfig(server=url)) as client,
        ):
            await body(server, client)

    asyncio.run(main())


def svc(name: str, cluster_ip: str = "10.96.0.10", ns: str = "default", **labels: str) -> Doc:
    return {
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {
            "clusterIP": cluster_ip,
            "ports": [{"name": "p", "port": 80, "targetPort": 8080, "protocol": "UDP"}],
        },
    }


def eps(service: str, ips: list[str], ns: str = "default", **labels: str) -> Doc:
    return {
        "metadata": {
            "namespace": ns,
            "name": f"{service}-x",
            "labels": {"kubernetes.io/service-name": service, **labels},
        },
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": "UDP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
    }


def node(name: str, zone: str = "") -> Doc:
    labels = {"topology.kubernetes.io/zone": zone} if zone else {}
    return {"metadata": {"name": name, "labels": labels}}


def _key(obj: Obj | None) -> str | None:
    if obj is None:
        return None
    meta = obj["metadata"]
    name = f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]
    return f"{name}@{meta['resourceVersion']}"


class Recorder:
    """A Handler that logs (kind, old key@rv, new key@rv), ``synced`` in line."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str | None, str | None]] = []
        self.synced_calls = 0
        self.state: dict[str, dict[str, Obj]] = {"service": {}, "slice": {}, "node": {}}

    def _record(self, kind: str, old: Obj | None, new: Obj | None) -> None:
        self.log.append((kind, _key(old), _key(new)))
        current = self.state[kind]
        obj = new if new is not None else old
        assert obj is not None
        name = f"{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"
        if new is None:
            del current[name]
        else:
            current[name] = new

    def on_service(self, old: Obj | None, new: Obj | None) -> None:
        self._record("service", old, new)

    def on_endpoint_slice(self, old: Obj | None, new: Obj | None) -> None:
        self._record("slice", old, new)

    def on_node(self, old: Obj | None, new: Obj | None) -> None:
        self._record("node", old, new)

    def synced(self) -> None:
        self.synced_calls += 1
        self.log.append(("synced", None, None))

    def names(self, kind: str) -> list[str]:
        return sorted(self.state[kind])


@contextlib.asynccontextmanager
async def running(coro: Coroutine[Any, Any, Any]) -> AsyncIterator[asyncio.Task[Any]]:
    """``coro`` as a task for the block; then cancelled, and it must end cancelled."""
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def source(client: RestClient, **kw: Any) -> ApiServerSource:
    kw.setdefault("backoff", FAST)
    kw.setdefault("watch_timeout", (30, 30))
    return ApiServerSource(client, NODE, **kw)


async def watching(server: FakeApiServer, n: int = 3) -> None:
    await until(lambda: server.open_watches == n, f"{n} watches")


def test_events_flow_to_the_handler() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        await server.put("services", svc("a"))  # rv 101
        await server.put("endpointslices", eps("a", ["10.244.1.2"]))  # 102
        await server.put("nodes", node(NODE))  # 103
        await server.put("nodes", node("node-b"))  # 104: not ours
        rec = Recorder()
        src = source(client)
        async with running(src.run(rec)):
            await until(lambda: rec.synced_calls == 1, "synced")
            await watching(server)
            assert sorted(rec.log) == sorted(
                [
                    ("service", None, "default/a@101"),
                    ("slice", None, "default/a-x@102"),
                    ("node", None, "node-a@103"),
                    ("synced", None, None),
                ]
            )
            # Listed items carry their kind, as the core's objects-file events do.
            assert rec.state["service"]["default/a"]["kind"] == "Service"
            assert rec.state["slice"]["default/a-x"]["kind"] == "EndpointSlice"
            rec.log.clear()

            await server.put("services", svc("a", "10.96.0.11"))  # 105
            await server.put("endpointslices", eps("a", ["10.244.1.3"]))  # 106
            await server.put("nodes", node(NODE, zone="z1"))  # 107
            await server.put("nodes", node("node-b", zone="z2"))  # 108: not ours
            await server.remove("endpointslices", "default", "a-x")  # 109
            await server.remove("services", "default", "a")  # 110
            await until(lambda: len(rec.log) == 5, "five events")
            # Each informer keeps its own order (the watches are independent streams);
            # a delete carries the object's final state (the deletion's RV).
            assert [e for e in rec.log if e[0] == "service"] == [
                ("service", "default/a@101", "default/a@105"),
                ("service", "default/a@110", None),
            ]
            assert [e for e in rec.log if e[0] == "slice"] == [
                ("slice", "default/a-x@102", "default/a-x@106"),
                ("slice", "default/a-x@109", None),
            ]
            assert [e for e in rec.log if e[0] == "node"] == [("node", "node-a@103", "node-a@107")]
            assert rec.state["node"]["/node-a"]["metadata"]["labels"] == {
                "topology.kubernetes.io/zone": "z1"
            }
            assert rec.synced_calls == 1
        # run() stopped its informers when cancelled.
        await until(lambda: server.open_watches == 0, "the watches to close")

    run(body)


def test_upstream_selectors_filter_headless_and_other_proxies() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        proxy_name = {"service.kubernetes.io/service-proxy-name": "other"}
        headless = {"service.kubernetes.io/headless": ""}
        await server.put("services", svc("plain"))
        await server.put("services", svc("headless", "None"))
        await server.put("services", svc("other", **proxy_name))
        await server.put("endpointslices", eps("plain", ["10.244.1.2"]))
        await server.put("endpointslices", eps("headless", ["10.244.1.3"], **headless))
        # Upstream's EndpointSlice informer filters only on the headless label; a
        # slice of another proxy's Service is harmless (its Service never arrives).
        await server.put("endpointslices", eps("other", ["10.244.1.4"], **proxy_name))
        rec = Recorder()
        src = source(client)
        async with running(src.run(rec)):
            await until(lambda: rec.synced_calls == 1, "synced")
            await watching(server)
            assert rec.names("service") == ["default/plain"]
            assert rec.names("slice") == ["default/other-x", "default/plain-x"]

            # The same filtering holds on the watch.
            await server.put("services", svc("other2", **proxy_name))
            await server.put("services", svc("headless2", "None"))
            await server.put("endpointslices", eps("headless2", ["10.244.1.5"], **headless))
            await server.put("services", svc("later"))
            await until(lambda: "default/later" in rec.state["service"], "the later service")
            await asyncio.sleep(0.05)
            assert rec.names("service") == ["default/later", "default/plain"]
            assert rec.names("slice") == ["default/other-x", "default/plain-x"]

            # On the wire: upstream's selectors, per resource, on lists and watches.
            queries = {r.path: r.query for r in server.requests if r.query.get("watch") == "true"}
            assert queries["/api/v1/services"]["labelSelector"] == SERVICE_LABEL_SELECTOR
            assert queries["/api/v1/services"]["fieldSelector"] == SERVICE_FIELD_SELECTOR
            slices = queries["/apis/discovery.k8s.io/v1/endpointslices"]
            assert slices["labelSelector"] == ENDPOINT_SLICE_LABEL_SELECTOR
            assert "fieldSelector" not in slices
            assert queries["/api/v1/nodes"]["fieldSelector"] == f"metadata.name={NODE}"
            assert SERVICE_LABEL_SELECTOR == "!service.kubernetes.io/service-proxy-name"
            assert ENDPOINT_SLICE_LABEL_SELECTOR == "!service.kubernetes.io/headless"

    run(body)


def test_synced_once_after_both_first_lists() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        await server.put("services", svc("a"))
        await server.put("endpointslices", eps("a", ["10.244.1.2"]))
        # The first two lists fail: synced() must wait for both kinds' first full set.
        server.fail_lists = 2
        rec = Recorder()
        src = source(client, resync_period=0.05)
        async with running(src.run(rec)):
            await until(lambda: rec.synced_calls == 1, "synced")
            at = rec.log.index(("synced", None, None))
            before = {entry[0] for entry in rec.log[:at]}
            assert {"service", "slice"} <= before, rec.log
            # Resyncs re-deliver (obj, obj) and relists happen; synced() stays once.
            await until(
                lambda: ("service", "default/a@101", "default/a@101") in rec.log, "a resync"
            )
            await watching(server)
            server.bump(2)  # writes elsewhere, then compaction: the watches get 410
            server.compact()
            await server.end_watches()
            await until(lambda: src.services.relists >= 1, "a relist")
            await asyncio.sleep(0.1)
            assert rec.synced_calls == 1

    run(body)


def test_410_relist_converges_on_the_server_state() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        for name in ("keep", "change", "drop"):
            await server.put("services", svc(name))
            await server.put("endpointslices", eps(name, ["10.244.1.2"]))
        await server.put("nodes", node(NODE))
        rec = Recorder()
        src = source(client)
        async with running(src.run(rec)):
            await until(lambda: rec.synced_calls == 1, "synced")
            await watching(server)
            rec.log.clear()
            # The watchers miss these, then the history is compacted away.
            server.hold_watches()
            await server.put("services", svc("change", "10.96.0.99"))
            await server.remove("services", "default", "drop")
            await server.put("services", svc("new"))
            await server.put(
                "services", svc("other", **{"service.kubernetes.io/service-proxy-name": "x"})
            )
            await server.remove("endpointslices", "default", "drop-x")
            await server.put("endpointslices", eps("new", ["10.244.1.9"]))
            await server.put("nodes", node(NODE, zone="z9"))
            server.compact()
            await server.end_watches()  # re-watch from the old RV → 410 → relist
            await until(lambda: all(inf.relists == 1 for inf in src.informers), "three relists")
            assert rec.names("service") == ["default/change", "default/keep", "default/new"]
            assert rec.names("slice") == ["default/change-x", "default/keep-x", "default/new-x"]
            assert rec.state["service"]["default/change"]["spec"]["clusterIP"] == "10.96.0.99"
            assert rec.state["node"]["/node-a"]["metadata"]["labels"] == {
                "topology.kubernetes.io/zone": "z9"
            }
            # Exactly the difference was delivered: no event for "keep".
            assert not [e for e in rec.log if "keep" in str(e)], rec.log
            assert rec.synced_calls == 1
            # And it follows changes again.
            await watching(server)
            await server.put("services", svc("later"))
            await until(lambda: "default/later" in rec.state["service"], "watch after relist")

    run(body)


def test_run_proxy_follows_the_apiserver_of_master() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        await server.put("nodes", node(NODE))
        await server.put("services", svc("a", "10.96.0.41"))
        await server.put("endpointslices", eps("a", ["10.244.1.2"]))
        await server.put("services", svc("other", "10.96.0.42", **{
            "service.kubernetes.io/service-proxy-name": "x"}))  # fmt: skip
        cfg = ProxyConfig(
            hostname_override=NODE,
            master=server.url,
            healthz_bind_address="",
            metrics_bind_address="",
            min_sync_period=0.0,
        )
        out = io.StringIO()
        async with running(run_proxy(cfg, dry_run=True, out=out)) as task:
            await until(lambda: "# kproxy sync 1 full" in out.getvalue() or task.done(), "sync 1")
            assert not task.done() or task.result()
            await server.put("endpointslices", eps("a", ["10.244.1.3"]))
            await until(lambda: "10.244.1.3" in out.getvalue() or task.done(), "sync 2")
        text = out.getvalue()
        assert "10.96.0.41" in text and "10.244.1.2" in text
        assert "10.96.0.42" not in text
        await until(lambda: server.open_watches == 0, "the watches to close")

    run(body)
