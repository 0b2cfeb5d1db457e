"""The client tests' fake apiserver, plus the object semantics workload controllers need.

:class:`WorkloadFake` extends :class:`tests.unit.client.fake_apiserver.FakeApiServer`
with what the real apiserver does and the controllers rely on: ``generateName``,
``creationTimestamp`` and ``generation`` (bumped on spec changes), ``status``
subresource writes (status only; main-resource writes keep the status), DELETE
with ``DeleteOptions`` (UID precondition; ``propagationPolicy`` Foreground/Orphan
adding the ``foregroundDeletion``/``orphan`` finalizer; objects with finalizers get
a ``deletionTimestamp`` and stay until a write empties them; Namespaces become
Terminating and keep ``spec.finalizers``) and ``namespaces/{name}/finalize`` (with
``serve_finalize=False`` it is not served and a plain update may change
``spec.finalizers`` instead).
Pods are removed at once (no kubelet, no grace period). It does not collect
garbage: that is the garbage collector's job under test.

:func:`cluster` serves it with a client and shared informers; :func:`running`
starts the informers and controllers and stops them on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from kproxy.client.kubeconfig import ClientConfig
from kproxy.client.rest import RestClient
from kproxy.controllers import Controller, SharedInformers
from tests.unit.client.fake_apiserver import FakeApiServer, Recorded, status

Obj = dict[str, Any]

KINDS = {
    "namespaces": ("Namespace", "v1"),
    "pods": ("Pod", "v1"),
    "services": ("Service", "v1"),
    "endpoints": ("Endpoints", "v1"),
    "configmaps": ("ConfigMap", "v1"),
    "events": ("Event", "v1"),
    "nodes": ("Node", "v1"),
    "endpointslices": ("EndpointSlice", "discovery.k8s.io/v1"),
    "leases": ("Lease", "coordination.k8s.io/v1"),
    "deployments": ("Deployment", "apps/v1"),
    "replicasets": ("ReplicaSet", "apps/v1"),
}
WITH_STATUS = {"pods", "deployments", "replicasets", "namespaces", "nodes", "services"}


def now_text() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class WorkloadFake(FakeApiServer):
    def __init__(self, *, serve_finalize: bool = True) -> None:
        super().__init__()
        self.serve_finalize = serve_finalize
        self.deletes: list[tuple[str, str, str, Obj]] = []  # plural, ns, name, options
        self._created = 0
        for plural, (kind, api_version) in KINDS.items():
            self.register(plural, kind, api_version)

    # ---------------------------------------------------------- state rules

    async def put(self, plural: str, obj: Obj) -> Obj:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace", ""), meta["name"])
        current = self.items[plural].get(key)
        if current is None:
            # Distinct, ordered creation times even within one second.
            self._created += 1
            meta.setdefault("creationTimestamp", f"2024-01-01T00:{self._created // 60 % 60:02d}:"
                            f"{self._created % 60:02d}Z")  # fmt: skip
            meta.setdefault("generation", 1)
        else:
            cmeta = current["metadata"]
            meta["creationTimestamp"] = cmeta.get("creationTimestamp")
            meta["uid"] = cmeta.get("uid")
            gen = int(cmeta.get("generation") or 1)
            meta["generation"] = gen + 1 if obj.get("spec") != current.get("spec") else gen
        ns_held = plural == "namespaces" and bool((obj.get("spec") or {}).get("finalizers"))
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not ns_held:
            if current is not None:
                await self.remove(plural, key[0], key[1])
            return obj
        return await super().put(plural, obj)

    async def create(self, plural: str, obj: Obj) -> Obj:
        """Server-side create with the same defaulting as POST (tests seed with it)."""
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if plural == "namespaces":
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj.setdefault("status", {})["phase"] = "Active"
        return await self.put(plural, obj) if meta.get("name") else obj

    # ---------------------------------------------------------------- verbs

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        route = self._route(request.path)
        parts = [p for p in request.path.split("/") if p]
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 5 and parts[4] == "finalize":
            if not self.serve_finalize or request.method != "PUT":
                return await super()._handle(request)
            return await self._finalize(request, parts[3])
        if route is None or route[0] not in self.items:
            return await super()._handle(request)
        plural, ns, name, sub = route
        if request.method == "POST" and not name:
            return await self._create(request, plural, ns)
        if request.method == "PUT" and name:
            return await self._update(request, plural, ns, name, sub)
        if request.method == "DELETE" and name:
            return await self._delete(request, plural, ns, name)
        return await super()._handle(request)

    async def _body(self, request: web.Request) -> Obj:
        body = await request.read()
        self.requests.append(
            Recorded(request.method, request.path, dict(request.query), dict(request.headers), body)
        )
        decoded: Obj = json.loads(body) if body else {}
        return decoded

    async def _create(self, request: web.Request, plural: str, ns: str) -> web.StreamResponse:
        obj = await self._body(request)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            suffix = "".join(random.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
            meta["name"] = meta["generateName"] + suffix
        if not meta.get("name"):
            return status(422, "Invalid", f"{plural}: metadata.name: Required value")
        if ns:
            meta["namespace"] = ns
        if (ns, meta["name"]) in self.items[plural]:
            return status(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists')
        for key in ("uid", "resourceVersion", "deletionTimestamp", "creationTimestamp"):
            meta.pop(key, None)
        return web.json_response(await self.create(plural, obj), status=201)

    async def _update(
        self, request: web.Request, plural: str, ns: str, name: str, sub: str
    ) -> web.StreamResponse:
        body = await self._body(request)
        current = self.items[plural].get((ns, name))
        if current is None:
            return status(404, "NotFound", f'{plural} "{name}" not found', name=name)
        want = (body.get("metadata") or {}).get("resourceVersion")
        if want and want != current["metadata"]["resourceVersion"]:
            return status(409, "Conflict", "the object has been modified; please retry")
        if sub == "status":
            new = copy.deepcopy(current)
            new["status"] = body.get("status")
        else:
            new = body
            new.setdefault("metadata", {}).pop("deletionTimestamp", None)
            if current["metadata"].get("deletionTimestamp"):
                new["metadata"]["deletionTimestamp"] = current["metadata"]["deletionTimestamp"]
            if plural in WITH_STATUS:
                new["status"] = copy.deepcopy(current.get("status"))
            if plural == "namespaces" and self.serve_finalize:
                # As upstream: spec.finalizers change only through /finalize.
                new["spec"] = copy.deepcopy(current.get("spec"))
        return web.json_response(await self.put(plural, new))

    async def _finalize(self, request: web.Request, name: str) -> web.StreamResponse:
        body = await self._body(request)
        current = self.items["namespaces"].get(("", name))
        if current is None:
            return status(404, "NotFound", f'namespaces "{name}" not found', name=name)
        new = copy.deepcopy(current)
        new.setdefault("spec", {})["finalizers"] = (body.get("spec") or {}).get("finalizers", [])
        return web.json_response(await self.put("namespaces", new))

    async def _delete(
        self, request: web.Request, plural: str, ns: str, name: str
    ) -> web.StreamResponse:
        options = await self._body(request)
        self.deletes.append((plural, ns, name, options))
        current = self.items[plural].get((ns, name))
        if current is None:
            return status(404, "NotFound", f'{plural} "{name}" not found', name=name)
        pre = (options.get("preconditions") or {}).get("uid")
        if pre and pre != current["metadata"].get("uid"):
            return status(409, "Conflict", "Precondition failed: UID in precondition")
        new = copy.deepcopy(current)
        meta = new["metadata"]
        fins = list(meta.get("finalizers") or [])
        policy = options.get("propagationPolicy")
        if policy == "Foreground" and "foregroundDeletion" not in fins:
            fins.append("foregroundDeletion")
        elif policy == "Orphan" and "orphan" not in fins:
            fins.append("orphan")
        if fins:
            meta["finalizers"] = fins
        if plural == "namespaces":
            new.setdefault("status", {})["phase"] = "Terminating"
        meta.setdefault("deletionTimestamp", now_text())
        return web.json_response(await self.put(plural, new))


@dataclass
class Cluster:
    server: WorkloadFake
    client: RestClient
    informers: SharedInformers


@contextlib.asynccontextmanager
async def cluster(*, serve_finalize: bool = True) -> AsyncIterator[Cluster]:
    server = WorkloadFake(serve_finalize=serve_finalize)
    async with server.serve() as url, RestClient(ClientConfig(server=url)) as client:
        informers = SharedInformers(client)
        try:
            yield Cluster(server, client, informers)
        finally:
            await informers.stop()


@contextlib.asynccontextmanager
async def running(c: Cluster, *controllers: Controller) -> AsyncIterator[None]:
    c.informers.start()
    tasks = [asyncio.create_task(ctl.run(), name=ctl.name) for ctl in controllers]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


async def until(cond: Callable[[], bool], what: str = "", timeout: float = 10.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what or cond}") from None


def run(body: Callable[[], Any], timeout: float = 30.0) -> None:
    async def main() -> None:
        async with asyncio.timeout(timeout):
            await body()

    asyncio.run(main())
