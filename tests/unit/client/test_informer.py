"""Informers against the fake server: list+watch, 410 → relist, bookmarks, resync, order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from kproxy.client.informer import (
    Backoff,
    Cache,
    FuncHandler,
    Informer,
    PairHandler,
    RestListerWatcher,
    field_index,
    object_key,
    wait_for_cache_sync,
)
from kproxy.client.kubeconfig import ClientConfig
from kproxy.client.rest import NODES, PODS, RestClient
from tests.unit.client.fake_apiserver import FakeApiServer

Obj = dict[str, Any]
Body = Callable[[FakeApiServer, RestClient], Awaitable[None]]

FAST = Backoff(initial=0.01, cap=0.05, jitter=0.0)


def run(body: Body, timeout: float = 20.0) -> None:
    async def main() -> None:
        server = FakeApiServer()
        server.register("pods", "Pod", "v1")
        server.register("nodes", "Node", "v1")
        async with (
            asyncio.timeout(timeout),
            server.serve() as url,
            RestClient(ClientConfig(server=url)) as client,
        ):
            await body(server, client)

    asyncio.run(main())


def pod(name: str, ns: str = "default", node: str = "", **labels: str) -> Obj:
    return {"metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"nodeName": node} if node else {}}  # fmt: skip


class Recorder:
    """Records every delivery as (tag, event, key, rv) in one shared log."""

    def __init__(self, log: list[tuple[str, ...]], tag: str = "h") -> None:
        self.log = log
        self.tag = tag

    @staticmethod
    def _rv(obj: Obj) -> str:
        return str(obj["metadata"].get("resourceVersion", ""))

    def on_add(self, obj: Obj) -> None:
        self.log.append((self.tag, "add", object_key(obj), self._rv(obj)))

    def on_update(self, old: Obj, new: Obj) -> None:
        self.log.append((self.tag, "update", object_key(new), self._rv(old), self._rv(new)))

    def on_delete(self, obj: Obj) -> None:
        self.log.append((self.tag, "delete", object_key(obj), self._rv(obj)))


async def until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)
    assert cond(), what


def informer(client: RestClient, **kw: Any) -> Informer:
    kw.setdefault("backoff", Backoff(initial=0.01, cap=0.05, jitter=0.0))
    kw.setdefault("watch_timeout", (30, 30))
    return Informer(RestListerWatcher(client, PODS), name="pods", **kw)


def test_list_then_watch_and_indexes() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        await server.put("pods", pod("a", node="n1"))
        await server.put("pods", pod("b", "kube-system", node="n2"))
        log: list[tuple[str, ...]] = []
        inf = informer(client, indexers={"node": field_index("spec.nodeName")})
        inf.add_handler(Recorder(log))
        assert not inf.has_synced()
        inf.start()
        try:
            assert await wait_for_cache_sync(inf, timeout=5)
            assert log == [("h", "add", "default/a", "101"), ("h", "add", "kube-system/b", "102")]
            # List items get their kind back for handlers that dispatch on it.
            a = inf.cache.get("default/a")
            assert a is not None and a["kind"] == "Pod" and a["apiVersion"] == "v1"
            assert inf.resource_version == "102"
            await until(lambda: server.open_watches == 1, "watching")
            assert server.requests[-1].query["resourceVersion"] == "102"
            assert server.requests[-1].query["allowWatchBookmarks"] == "true"

            await server.put("pods", pod("c", node="n1"))
            await server.put("pods", pod("a", node="n2"))
            await server.remove("pods", "kube-system", "b")
            await until(lambda: len(log) == 5, "three events")
            assert log[2:] == [
                ("h", "add", "default/c", "103"),
                ("h", "update", "default/a", "101", "104"),
                ("h", "delete", "kube-system/b", "105"),
            ]
            assert inf.resource_version == "105"
            assert [o["metadata"]["name"] for o in inf.cache.by_index("node", "n1")] == ["c"]
            assert [o["metadata"]["name"] for o in inf.cache.by_index("node", "n2")] == ["a"]
            assert inf.cache.index_values("namespace") == ["default"]
            assert len(inf.cache.by_index("namespace", "default")) == 2
            assert inf.cache.get_by_name("default", "c") is not None
        finally:
            await inf.stop()

    run(body)


def test_410_relist_converges() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        for name in ("keep", "change", "drop"):
            await server.put("pods", pod(name))
        log: list[tuple[str, ...]] = []
        inf = informer(client)
        inf.add_handler(Recorder(log))
        inf.start()
        try:
            await inf.wait_synced(5)
            await until(lambda: server.open_watches == 1, "watching")
            log.clear()
            # The watcher misses these, then the history is compacted away.
            server.hold_watches()
            await server.put("pods", pod("change", node="n9"))
            await server.remove("pods", "default", "drop")
            await server.put("pods", pod("new"))
            server.compact()
            await server.end_watches()  # the informer re-watches from its old RV → 410
            await until(lambda: inf.relists == 1, "a relist")
            assert sorted(log) == sorted(
                [
                    ("h", "update", "default/change", "102", "104"),
                    ("h", "add", "default/new", "106"),
                    ("h", "delete", "default/drop", "103"),
                ]
            )
            assert sorted(inf.cache.keys()) == ["default/change", "default/keep", "default/new"]
            assert inf.resource_version == "106"
            # It went on watching from the relist's RV, and still follows changes.
            await until(lambda: server.open_watches == 1, "watching again")
            watches = [r.query for r in server.requests if r.query.get("watch")]
            assert [w["resourceVersion"] for w in watches] == ["103", "103", "106"]
            await server.put("pods", pod("later"))
            await until(lambda: "default/later" in inf.cache, "watch after relist")
        finally:
            await inf.stop()

    run(body)


def test_bookmarks_advance_the_resource_version() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        await server.put("pods", pod("a"))
        log: list[tuple[str, ...]] = []
        inf = informer(client)
        inf.add_handler(Recorder(log))
        inf.start()
        try:
            await inf.wait_synced(5)
            await until(lambda: server.open_watches == 1, "watching")
            target = server.bump(50)  # writes to other resources
            await server.bookmark("pods")
            await until(lambda: inf.resource_version == str(target), "bookmark applied")
            assert log == [("h", "add", "default/a", "101")]  # bookmarks are not events
            await server.end_watches()
            await until(lambda: server.watch_count == 2 and server.open_watches == 1, "rewatch")
            last = [r.query for r in server.requests if r.query.get("watch")][-1]
            assert last["resourceVersion"] == str(target)
            assert inf.relists == 0  # a normal end of a watch is not a relist
        finally:
            await inf.stop()

    run(body)


def test_resync_redelivers_updates() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        await server.put("pods", pod("a"))
        await server.put("pods", pod("b"))
        log: list[tuple[str, ...]] = []
        inf = informer(client, resync_period=0.05)
        inf.add_handler(Recorder(log))
        inf.start()
        try:
            await inf.wait_synced(5)
            await until(lambda: len(log) >= 6, "two resyncs")
            resyncs = log[2:6]
            assert (
                resyncs
                == [
                    ("h", "update", "default/a", "101", "101"),
                    ("h", "update", "default/b", "102", "102"),
                ]
                * 2
            )
        finally:
            await inf.stop()

    run(body)


def test_handler_order_and_failing_handler() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        await server.put("pods", pod("a"))
        log: list[tuple[str, ...]] = []

        def explode(obj: Obj) -> None:
            log.append(("boom", "add", object_key(obj)))
            raise RuntimeError("handler bug")

        inf = informer(client)
        inf.add_handler(Recorder(log, "first"))
        inf.add_handler(FuncHandler(add=explode))
        inf.add_handler(Recorder(log, "third"))
        inf.start()
        try:
            await inf.wait_synced(5)
            await until(lambda: server.open_watches == 1, "watching")
            await server.put("pods", pod("b"))
            await server.remove("pods", "default", "a")
            await until(lambda: len(log) == 8, "all deliveries")
            assert log == [
                ("first", "add", "default/a", "101"),
                ("boom", "add", "default/a"),
                ("third", "add", "default/a", "101"),
                ("first", "add", "default/b", "102"),
                ("boom", "add", "default/b"),
                ("third", "add", "default/b", "102"),
                ("first", "delete", "default/a", "103"),
                ("third", "delete", "default/a", "103"),
            ]
            # A handler added late first hears about everything already cached.
            late: list[tuple[str, ...]] = []
            inf.add_handler(Recorder(late, "late"))
            assert late == [("late", "add", "default/b", "102")]
        finally:
            await inf.stop()

    run(body)


def test_backoff_on_list_errors_then_sync() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        await server.put("pods", pod("a"))
        server.fail_lists = 3
        inf = informer(client)
        inf.start()
        try:
            assert await inf.wait_synced(5)
            lists = [r for r in server.requests if r.method == "GET" and not r.query.get("watch")]
            assert len(lists) == 4
            assert "default/a" in inf.cache
        finally:
            await inf.stop()

    run(body)


def test_expired_continue_token_restarts_the_list() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        for i in range(5):
            await server.put("pods", pod(f"p{i}"))
        server.expire_continue = True
        log: list[tuple[str, ...]] = []
        inf = informer(client, page_size=2)
        inf.add_handler(Recorder(log))
        inf.start()
        try:
            await inf.wait_synced(5)
            assert [e[2] for e in log] == [f"default/p{i}" for i in range(5)]
            pages = [r.query for r in server.requests if r.query.get("limit") == "2"]
            assert [p.get("continue", "") for p in pages] == ["", "2:105", "", "2:105", "4:105"]
        finally:
            await inf.stop()

    run(body)


def test_stop_is_clean_and_prompt() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        inf = Informer(RestListerWatcher(client, NODES), name="nodes", backoff=FAST)
        inf.start()
        await inf.wait_synced(5)
        await until(lambda: server.open_watches == 1, "watching")
        async with asyncio.timeout(2):
            await inf.stop()
        await until(lambda: server.open_watches == 0, "server saw the watch close")
        with pytest.raises(Exception, match="already started"):
            inf.start()
            inf.start()
        await inf.stop()

    run(body)


def test_watch_transport_error_rewatches_without_relist() -> None:
    async def body(server: FakeApiServer, client: RestClient) -> None:
        await server.put("pods", pod("a"))
        inf = informer(client)
        inf.start()
        try:
            await inf.wait_synced(5)
            await until(lambda: server.open_watches == 1, "watching")
            await server.end_watches()
            await until(lambda: server.watch_count >= 2, "rewatched")
            await server.put("pods", pod("b"))
            await until(lambda: "default/b" in inf.cache, "sees new events")
            assert inf.relists == 0
        finally:
            await inf.stop()

    run(body)


def test_cache_indexes_follow_updates() -> None:
    cache = Cache({"node": field_index("spec.nodeName")})
    cache.put(pod("a", node="n1"))
    cache.put(pod("b", node="n1"))
    cache.put(pod("a", node="n2"))
    assert [o["metadata"]["name"] for o in cache.by_index("node", "n1")] == ["b"]
    assert cache.index_values("node") == ["n1", "n2"]
    cache.remove("default/b")
    assert cache.index_values("node") == ["n2"]
    cache.add_indexer("app", lambda o: [o["metadata"]["labels"].get("app", "none")])
    assert cache.index_values("app") == ["none"]
    cluster = {"metadata": {"name": "n1"}}
    assert object_key(cluster) == "n1"


def test_pair_handler_matches_the_proxy_source_shape() -> None:
    seen: list[tuple[str | None, ...]] = []

    def on_service(old: Obj | None, new: Obj | None) -> None:
        seen.append(tuple(None if o is None else o["metadata"]["name"] for o in (old, new)))

    h = PairHandler(on_service)
    a, a2 = pod("a"), pod("a", node="n1")
    h.on_add(a)
    h.on_update(a, a2)
    h.on_delete(a2)
    assert seen == [(None, "a"), ("a", "a"), ("a", None)]
