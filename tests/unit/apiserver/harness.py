"""An in-process apiserver on 127.0.0.1 (OS-chosen ports) for the REST tests.

:func:`apiserver` starts :class:`~kproxy.apiserver.server.ApiServer` over a memory or
sqlite store, with the plain-HTTP admin port for convenience, and yields a
:class:`Harness` whose :meth:`Harness.call` returns ``(status, decoded body)``.
Everything is stopped and closed on exit, also when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from kproxy.apiserver.server import ApiServer, ServerConfig
from kproxy.store import MemoryStore, SqliteStore, Store

Obj = dict[str, Any]

MANIFESTS: dict[str, tuple[str, Obj]] = {
    # resource → (collection path in namespace "default" or cluster scope, minimal body)
    "namespaces": ("/api/v1/namespaces", {"metadata": {"name": "t1"}}),
    "pods": (
        "/api/v1/namespaces/default/pods",
        {"metadata": {"name": "p1"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}},
    ),
    "services": (
        "/api/v1/namespaces/default/services",
        {"metadata": {"name": "s1"}, "spec": {"selector": {"app": "a"}, "ports": [{"port": 80}]}},
    ),
    "endpoints": (
        "/api/v1/namespaces/default/endpoints",
        {
            "metadata": {"name": "s1"},
            "subsets": [{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80}]}],
        },
    ),
    "nodes": ("/api/v1/nodes", {"metadata": {"name": "n1"}}),
    "events": (
        "/api/v1/namespaces/default/events",
        {
            "metadata": {"name": "e1"},
            "involvedObject": {"kind": "Pod", "name": "p1", "namespace": "default"},
            "reason": "Test",
            "type": "Normal",
        },
    ),
    "configmaps": (
        "/api/v1/namespaces/default/configmaps",
        {"metadata": {"name": "cm1"}, "data": {"a": "b"}},
    ),
    "endpointslices": (
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices",
        {
            "metadata": {"name": "s1-abc"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"]}],
            "ports": [{"port": 80}],
        },
    ),
    "deployments": (
        "/apis/apps/v1/namespaces/default/deployments",
        {
            "metadata": {"name": "d1"},
            "spec": {
                "selector": {"matchLabels": {"app": "d1"}},
                "template": {
                    "metadata": {"labels": {"app": "d1"}},
                    "spec": {"containers": [{"name": "c", "image": "nginx"}]},
                },
            },
        },
    ),
    "replicasets": (
        "/apis/apps/v1/namespaces/default/replicasets",
        {
            "metadata": {"name": "r1"},
            "spec": {
                "selector": {"matchLabels": {"app": "r1"}},
                "template": {
                    "metadata": {"labels": {"app": "r1"}},
                    "spec": {"containers": [{"name": "c", "image": "nginx"}]},
                },
            },
        },
    ),
    "leases": (
        "/apis/coordination.k8s.io/v1/namespaces/default/leases",
        {"metadata": {"name": "l1"}, "spec": {"holderIdentity": "n1", "leaseDurationSeconds": 40}},
    ),
}


@dataclass
class Harness:
    server: ApiServer
    store: Store
    session: aiohttp.ClientSession
    base: str

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        hdrs = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            hdrs.setdefault("Content-Type", content_type)
        async with self.session.request(
            method, self.base + path, data=data, params=params or {}, headers=hdrs
        ) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text) if text else None
            except ValueError:
                return resp.status, text

    async def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Obj:
        status, out = await self.call(method, path, body, **kw)
        assert status < 300, (status, out)
        assert isinstance(out, dict)
        return out

    async def watch_lines(
        self, path: str, params: dict[str, str], *, count: int, timeout: float = 10.0
    ) -> list[Obj]:
        """Read up to ``count`` watch events (or until the stream ends)."""
        events: list[Obj] = []
        async with asyncio.timeout(timeout):
            async with self.session.get(
                self.base + path, params={"watch": "true", **params}
            ) as resp:
                assert resp.status == 200, await resp.text()
                async for line in resp.content:
                    if line.strip():
                        events.append(json.loads(line))
                    if len(events) >= count:
                        break
        return events


async def open_store(backend: str, tmp_path: Path) -> Store:
    if backend == "sqlite":
        return await SqliteStore.open(tmp_path / "kproxy.db")
    return MemoryStore()


@contextlib.asynccontextmanager
async def apiserver(
    tmp_path: Path,
    backend: str = "memory",
    *,
    store: Store | None = None,
    **config: Any,
) -> AsyncIterator[Harness]:
    owned = store is None
    st = store if store is not None else await open_store(backend, tmp_path)
    cfg = ServerConfig(
        secure_port=0,
        insecure_port=0,
        data_dir=tmp_path / "data",
        compaction_interval=0,
        bookmark_interval=0.2,
        **config,
    )
    server = ApiServer(st, cfg)
    try:
        await server.start()
        async with aiohttp.ClientSession() as session:
            yield Harness(server, st, session, server.insecure_url)
    finally:
        await server.stop()
        if owned:
            await st.close()


def run(
    body: Callable[[Harness], Awaitable[None]],
    tmp_path: Path,
    backend: str = "memory",
    timeout: float = 60.0,
    **config: Any,
) -> None:
    async def main() -> None:
        async with asyncio.timeout(timeout), apiserver(tmp_path, backend, **config) as h:
            await body(h)

    asyncio.run(main())
