"""A small in-memory Kubernetes-style apiserver for the client and informer tests.

Serves ``/api/v1/...`` and ``/apis/<group>/<version>/...`` for any plural, namespaced
or not, on 127.0.0.1 with an OS-chosen port. Enough of the real semantics to test a
client against: one resourceVersion counter, Status errors, list with limit/continue
and equality selectors, watch streams (events strictly after RV, synthetic ADDED for
RV 0 or none, BOOKMARK when allowed, 410 as an ERROR event after compaction,
``timeoutSeconds``). Test knobs: :meth:`hold_watches` (watchers miss events),
:meth:`compact`, :meth:`end_watches`, :meth:`bookmark`, ``fail_lists`` and
``expire_continue``. Every request is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

Obj = dict[str, Any]


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class _Entry:
    rv: int
    plural: str
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK
    obj: Obj


def status(code: int, reason: str, message: str, **details: Any) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return web.json_response(body, status=code)


def _lookup(obj: Obj, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return "" if value is None else str(value)


def _selected(obj: Obj, labels: str | None, fields: str | None) -> bool:
    for term in filter(None, (labels or "").split(",")):
        key, _, want = term.partition("=")
        if ((obj.get("metadata") or {}).get("labels") or {}).get(key) != want:
            return False
    for term in filter(None, (fields or "").split(",")):
        if "!=" in term:
            key, _, want = term.partition("!=")
            if _lookup(obj, key) == want:
                return False
        else:
            key, _, want = term.partition("=")
            if _lookup(obj, key) != want:
                return False
    return True


def _merge(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


def _json_patch(doc: Obj, ops: list[Obj]) -> Obj:
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = op["path"].lstrip("/").split("/")
        node: Any = doc
        for p in parents:
            node = node[p]
        if op["op"] in ("add", "replace"):
            node[last] = op["value"]
        elif op["op"] == "remove":
            del node[last]
    return doc


class FakeApiServer:
    def __init__(self) -> None:
        self.rv = 100
        self.items: dict[str, dict[tuple[str, str], Obj]] = {}
        self.kinds: dict[str, tuple[str, str]] = {}  # plural -> (kind, apiVersion)
        self.history: list[_Entry] = []
        self.compacted = 0  # watches from an RV below this get 410
        self.requests: list[Recorded] = []
        self.fail_lists = 0  # answer the next N lists with a 500
        self.expire_continue = False
        self.watch_count = 0
        self.open_watches = 0
        self._held = False
        self._generation = 0
        self._cond = asyncio.Condition()
        self.url = ""

    # ------------------------------------------------------------- state API

    def register(self, plural: str, kind: str, api_version: str) -> None:
        self.kinds[plural] = (kind, api_version)
        self.items.setdefault(plural, {})

    async def _changed(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def put(self, plural: str, obj: Obj) -> Obj:
        """Create or replace ``obj`` (server side), recording an event."""
        kind, api_version = self.kinds[plural]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace", ""), meta["name"])
        existed = key in self.items[plural]
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        meta.setdefault("uid", str(uuid.uuid4()))
        obj["kind"], obj["apiVersion"] = kind, api_version
        self.items[plural][key] = obj
        self.history.append(_Entry(self.rv, plural, "MODIFIED" if existed else "ADDED", obj))
        await self._changed()
        return obj

    async def remove(self, plural: str, namespace: str, name: str) -> Obj | None:
        obj = self.items[plural].pop((namespace, name), None)
        if obj is None:
            return None
        self.rv += 1
        gone = copy.deepcopy(obj)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self.history.append(_Entry(self.rv, plural, "DELETED", gone))
        await self._changed()
        return gone

    def bump(self, n: int = 1) -> int:
        """Writes elsewhere: the RV moves without events for our resources."""
        self.rv += n
        return self.rv

    async def bookmark(self, plural: str) -> None:
        kind, api_version = self.kinds[plural]
        obj = {
            "kind": kind,
            "apiVersion": api_version,
            "metadata": {"resourceVersion": str(self.rv)},
        }
        self.history.append(_Entry(self.rv, plural, "BOOKMARK", obj))
        await self._changed()

    def hold_watches(self, held: bool = True) -> None:
        self._held = held

    def compact(self) -> None:
        self.compacted = self.rv + 1
        self.history.clear()

    async def end_watches(self) -> None:
        self._generation += 1
        self._held = False
        await self._changed()

    # ---------------------------------------------------------------- serving

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        runner = web.AppRunner(self.app(), shutdown_timeout=0.5, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        try:
            yield self.url
        finally:
            await self.end_watches()
            await runner.cleanup()

    def _route(self, path: str) -> tuple[str, str, str, str] | None:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            rest = parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            rest = parts[3:]
        else:
            return None
        ns = ""
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            return None
        plural, name, sub = rest[0], *[*rest[1:], "", ""][:2]
        return plural, ns, name, sub

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            Recorded(request.method, request.path, dict(request.query), dict(request.headers), body)
        )
        route = self._route(request.path)
        if route is None or route[0] not in self.items:
            return status(404, "NotFound", f"the server could not find {request.path}")
        plural, ns, name, _sub = route
        q = request.query
        if request.method == "GET" and not name:
            if q.get("watch") in ("true", "1"):
                return await self._watch(request, plural, ns)
            return self._list(plural, ns, dict(q))
        if request.method == "GET":
            obj = self.items[plural].get((ns, name))
            if obj is None:
                return status(404, "NotFound", f'{plural} "{name}" not found', name=name)
            return web.json_response(obj)
        if request.method == "POST":
            obj = json.loads(body)
            meta = obj.get("metadata") or {}
            if not meta.get("name"):
                return status(
                    422,
                    "Invalid",
                    f"{plural} is invalid: metadata.name: Required value",
                    causes=[{"field": "metadata.name", "reason": "FieldValueRequired"}],
                )
            if (ns, meta["name"]) in self.items[plural]:
                return status(409, "AlreadyExists", f'{plural} "{meta["name"]}" already exists')
            if ns:
                meta.setdefault("namespace", ns)
            return web.json_response(await self.put(plural, obj), status=201)
        current = self.items[plural].get((ns, name))
        if current is None:
            return status(404, "NotFound", f'{plural} "{name}" not found', name=name)
        if request.method == "PUT":
            obj = json.loads(body)
            want = (obj.get("metadata") or {}).get("resourceVersion")
            if want and want != current["metadata"]["resourceVersion"]:
                return status(409, "Conflict", "the object has been modified; please retry")
            return web.json_response(await self.put(plural, obj))
        if request.method == "PATCH":
            patch = json.loads(body)
            ctype = request.headers.get("Content-Type", "")
            if ctype == "application/json-patch+json":
                new = _json_patch(current, patch)
            elif ctype in (
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
                "application/apply-patch+yaml",
            ):
                new = _merge(current, patch)
            else:
                return status(415, "UnsupportedMediaType", f"unsupported patch type {ctype}")
            return web.json_response(await self.put(plural, new))
        if request.method == "DELETE":
            gone = await self.remove(plural, ns, name)
            return web.json_response(gone)
        return status(405, "MethodNotAllowed", f"{request.method} is not supported")

    def _list(self, plural: str, ns: str, q: dict[str, str]) -> web.Response:
        if self.fail_lists > 0:
            self.fail_lists -= 1
            return web.Response(status=500, text="boom: storage unavailable")
        items = [
            obj
            for (ons, _), obj in sorted(self.items[plural].items())
            if (not ns or ons == ns)
            and _selected(obj, q.get("labelSelector"), q.get("fieldSelector"))
        ]
        start, list_rv = 0, self.rv
        if q.get("continue"):
            if self.expire_continue:
                self.expire_continue = False
                return status(410, "Expired", "The provided continue parameter is too old")
            offset, _, rv = q["continue"].partition(":")
            start, list_rv = int(offset), int(rv)
        limit = int(q.get("limit") or 0) or len(items)
        page = items[start : start + limit]
        meta: Obj = {"resourceVersion": str(list_rv)}
        if start + limit < len(items):
            meta["continue"] = f"{start + limit}:{list_rv}"
        kind, api_version = self.kinds[plural]
        # Items without kind/apiVersion, as the real API sends them.
        stripped = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in page]
        return web.json_response(
            {"kind": f"{kind}List", "apiVersion": api_version, "metadata": meta, "items": stripped}
        )

    async def _watch(self, request: web.Request, plural: str, ns: str) -> web.StreamResponse:
        q = dict(request.query)
        self.watch_count += 1
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)

        async def send(etype: str, obj: Obj) -> None:
            await resp.write(json.dumps({"type": etype, "object": obj}).encode() + b"\n")

        rv = int(q.get("resourceVersion") or 0)
        if rv and rv < self.compacted - 1:
            await send(
                "ERROR",
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": "Expired",
                    "code": 410,
                    "message": f"too old resource version: {rv} ({self.compacted})",
                },
            )
            return resp
        bookmarks = q.get("allowWatchBookmarks") == "true"
        labels, fields = q.get("labelSelector"), q.get("fieldSelector")
        if not rv:
            for (ons, _), obj in sorted(self.items[plural].items()):
                if (not ns or ons == ns) and _selected(obj, labels, fields):
                    await send("ADDED", obj)
            rv = self.rv
        generation = self._generation
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(q.get("timeoutSeconds") or 3600)
        self.open_watches += 1
        try:
            while generation == self._generation:
                pending = [e for e in self.history if e.rv > rv and e.plural == plural]
                bms = [
                    e
                    for e in self.history
                    if e.type == "BOOKMARK" and e.plural == plural and e.rv >= rv
                ]
                if not self._held and (pending or bms):
                    for e in sorted(
                        pending + [b for b in bms if b not in pending], key=lambda e: e.rv
                    ):
                        if e.type == "BOOKMARK":
                            if bookmarks:
                                await send("BOOKMARK", e.obj)
                            self.history.remove(e)  # a bookmark is sent once
                            continue
                        ons = e.obj["metadata"].get("namespace", "")
                        if (not ns or ons == ns) and _selected(e.obj, labels, fields):
                            await send(e.type, e.obj)
                        rv = max(rv, e.rv)
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                async with self._cond:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._cond.wait(), remaining)
        except ConnectionResetError:
            pass
        finally:
            self.open_watches -= 1
        return resp
