"""The resource endpoints: URL → (kind, namespace, name, subresource) → verb.

Owns path parsing for ``/api/v1/...`` and ``/apis/<group>/<version>/...`` (namespaced,
all-namespaces and cluster-scoped collections, objects, subresources, and the legacy
``/watch/`` prefix), the verb derived from method and path, request-body decoding
(JSON, YAML for apply patches; 400 on garbage, 415 on other media types), query
options (``dryRun``, DeleteOptions), authorization of the request, and the response
shapes (201 on create, 202 for a delete still pending, Table on request).

Invariants: each request is authorized before it touches state; every error leaves
as :class:`ApiError`; handlers never hold state of their own (it is all in the
:class:`~kproxy.apiserver.registry.Registry`).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import yaml
from aiohttp import web

from kproxy.api import kinds
from kproxy.api import patch as patches
from kproxy.api.errors import ApiError
from kproxy.api.kinds import Kind
from kproxy.apiserver import strategy, subresources, tables
from kproxy.apiserver.authz import Attributes
from kproxy.apiserver.listing import ListQuery, parse_bool, parse_int, parse_rv
from kproxy.apiserver.registry import Obj, Registry, registry_prefix
from kproxy.apiserver.watch import WatchOptions, serve_watch

Authorize = Callable[[web.Request, Attributes], Awaitable[None]]

DEFAULT_WATCH_TIMEOUT = 1800.0
NOT_FOUND_MESSAGE = "the server could not find the requested resource"
JSON_TYPES = ("application/json", "")
PATCH_MEDIA = (*patches.PATCH_TYPES, patches.APPLY)


@dataclass(frozen=True, slots=True)
class Target:
    kind: Kind
    namespace: str
    name: str = ""
    subresource: str = ""
    legacy_watch: bool = False


def _not_found() -> ApiError:
    return ApiError(404, "NotFound", NOT_FOUND_MESSAGE)


def parse_path(path: str) -> Target | None:
    """The resource a path names; None for non-resource paths; 404 for unknown ones."""
    parts = [unquote(p) for p in path.split("/") if p]
    if not parts or parts[0] not in ("api", "apis"):
        return None
    if parts[0] == "api":
        if len(parts) < 3:
            return None
        group, version, rest = "", parts[1], parts[2:]
    else:
        if len(parts) < 4:
            return None
        group, version, rest = parts[1], parts[2], parts[3:]
    if (group, version) not in kinds.group_versions():
        raise _not_found()
    legacy_watch = rest[0] == "watch"
    if legacy_watch:
        rest = rest[1:]
        if not rest:
            raise _not_found()
    namespace = ""
    if rest[0] == "namespaces" and len(rest) >= 3:
        inner = _kind_in(group, version, rest[2])
        if inner is not None and inner.namespaced:
            namespace, rest = rest[1], rest[2:]
    kind = _kind_in(group, version, rest[0])
    if kind is None or len(rest) > 3:
        raise _not_found()
    if kind.namespaced and not namespace and len(rest) > 1:
        raise _not_found()
    name = rest[1] if len(rest) > 1 else ""
    sub = rest[2] if len(rest) > 2 else ""
    if sub and legacy_watch:
        raise _not_found()
    return Target(kind, namespace, name, sub, legacy_watch)


def _kind_in(group: str, version: str, resource: str) -> Kind | None:
    for k in kinds.kinds_in(group, version):
        if k.resource == resource:
            return k
    return None


def _is_watch(request: web.Request, target: Target) -> bool:
    return target.legacy_watch or parse_bool(request.query, "watch")


def request_verb(request: web.Request, target: Target) -> str:
    method = request.method
    if method in ("GET", "HEAD"):
        if target.name and not target.legacy_watch:
            return "get"
        return "watch" if _is_watch(request, target) else "list"
    if method == "POST":
        return "create"
    if method == "PUT":
        return "update"
    if method == "PATCH":
        return "patch"
    if method == "DELETE":
        return "delete" if target.name else "deletecollection"
    raise ApiError.method_not_allowed(target.kind.resource, method, target.kind.group)


def _media(request: web.Request) -> str:
    return request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, datetime.date):  # datetime.datetime is a date too
        return value.isoformat()
    raise TypeError(f"a YAML {type(value).__name__} has no JSON form")


async def read_body(request: web.Request, *, allow_yaml: bool = False) -> Any:
    raw = await request.read()
    media = _media(request)
    if not raw.strip():
        return None
    if media in ("application/yaml", "application/apply-patch+yaml") or (
        allow_yaml and media not in JSON_TYPES
    ):
        try:
            # As upstream (sigs.k8s.io/yaml), YAML becomes JSON first: only JSON's types
            # survive. Dates become their text; binary, self-referencing anchors and
            # nesting deeper than the recursion limit are refused, never a 500.
            return json.loads(json.dumps(yaml.safe_load(raw), default=_yaml_scalar))
        except (yaml.YAMLError, TypeError, ValueError, RecursionError) as exc:
            raise ApiError.bad_request(f"error decoding YAML: {exc}") from None
    if media not in (*JSON_TYPES, *patches.PATCH_TYPES):
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"the body of the request was in an unknown format - accepted media types include: "
            f'application/json, application/yaml (got "{media}")',
        )
    try:
        return json.loads(raw)
    # RecursionError: nesting deeper than the interpreter's limit is bad input too.
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError.bad_request(f"couldn't decode the request body: {exc}") from None


def _object_body(body: Any, target: Target) -> Obj:
    if not isinstance(body, dict):
        raise ApiError.bad_request("the request body must be a JSON object")
    meta = body.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise ApiError.bad_request("metadata must be an object")
    meta = meta or {}
    if target.kind.namespaced and target.namespace:
        ns = meta.get("namespace")
        if ns not in (None, "", target.namespace):
            raise ApiError.bad_request(
                "the namespace of the provided object does not match the namespace sent on the "
                "request"
            )
    if target.name:
        name = meta.get("name")
        if name not in (None, "", target.name):
            raise ApiError.bad_request(
                f"the name of the object ({name}) does not match the name on the URL "
                f"({target.name})"
            )
    return body


def dry_run(request: web.Request) -> bool:
    values = request.query.getall("dryRun", [])
    for value in values:
        if value != "All":
            raise ApiError.bad_request(f'Invalid dryRun value "{value}": only "All" is supported')
    return bool(values)


def _json(data: Any, status: int = 200, content_type: str = "application/json") -> web.Response:
    return web.Response(
        body=json.dumps(data, separators=(",", ":")).encode(),
        status=status,
        headers={"Content-Type": content_type},
    )


def _respond(request: web.Request, kind: Kind, obj: Obj, status: int = 200) -> web.Response:
    if request.method == "GET" and tables.wants_table(request.headers.get("Accept", "")):
        return _json(
            tables.table(kind, [obj], resource_version=str(obj["metadata"].get("resourceVersion"))),
            status,
            tables.TABLE_CONTENT_TYPE,
        )
    return _json(obj, status)


def delete_options(request: web.Request, body: Any) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if body is not None:
        if not isinstance(body, dict):
            raise ApiError.bad_request("DeleteOptions must be a JSON object")
        options = dict(body)
    grace = parse_int(request.query, "gracePeriodSeconds")
    if grace is not None:
        options["gracePeriodSeconds"] = grace
    if "propagationPolicy" in request.query:
        options["propagationPolicy"] = request.query["propagationPolicy"]
    if "orphanDependents" in request.query:
        options["orphanDependents"] = parse_bool(request.query, "orphanDependents")
    policy = options.get("propagationPolicy")
    if policy not in (None, "Orphan", "Background", "Foreground"):
        raise ApiError(
            422,
            "Invalid",
            f'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: Unsupported value: '
            f'"{policy}": supported values: "Foreground", "Background", "Orphan"',
        )
    grace_value = options.get("gracePeriodSeconds")
    if grace_value is not None and (
        not isinstance(grace_value, int) or isinstance(grace_value, bool)
    ):
        raise ApiError.bad_request("gracePeriodSeconds must be an integer")
    return options


class ResourceHandler:
    """Serves every resource path against one registry."""

    def __init__(
        self,
        registry: Registry,
        authorize: Authorize,
        *,
        bookmark_interval: float = 5.0,
    ) -> None:
        self.registry = registry
        self.authorize = authorize
        self.bookmark_interval = bookmark_interval

    async def handle(self, request: web.Request, target: Target) -> web.StreamResponse:
        verb = request_verb(request, target)
        kind = target.kind
        if not target.subresource and not kind.has_verb(verb) and verb != "get":
            raise ApiError.method_not_allowed(kind.resource, verb, kind.group)
        if target.subresource:
            self._check_subresource(target, verb)
        body: Any = None
        name = target.name
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            body = await read_body(request, allow_yaml=request.method == "PATCH")
        if verb == "create" and not name and isinstance(body, dict):
            meta = body.get("metadata")
            if isinstance(meta, dict) and isinstance(meta.get("name"), str):
                name = meta["name"]
        attrs = Attributes(
            verb=verb,
            resource=kind.resource,
            subresource=target.subresource,
            api_group=kind.group,
            namespace=target.namespace,
            name=name,
            path=request.path,
        )
        await self.authorize(request, attrs)
        method = request.method
        if method in ("GET", "HEAD"):
            return await self._get(request, target, verb)
        if method == "POST":
            return await self._post(request, target, body)
        if method == "PUT":
            return await self._put(request, target, body)
        if method == "PATCH":
            return await self._patch(request, target, body)
        return await self._delete(request, target, body)

    @staticmethod
    def _check_subresource(target: Target, verb: str) -> None:
        kind = target.kind
        if kind.kind == "Namespace" and target.subresource in ("status", "finalize"):
            if verb in ("get", "update", "patch") and not (
                target.subresource == "finalize" and verb != "update"
            ):
                return
            raise ApiError.method_not_allowed(f"namespaces/{target.subresource}", verb)
        sub = kind.subresource(target.subresource)
        if verb not in sub.verbs:
            raise ApiError.method_not_allowed(f"{kind.resource}/{sub.name}", verb, kind.group)

    # ------------------------------------------------------------------ verbs

    async def _get(self, request: web.Request, target: Target, verb: str) -> web.StreamResponse:
        kind = target.kind
        if verb == "get":
            obj = await self.registry.get(kind, target.namespace, target.name)
            if target.subresource == "scale":
                return _json(subresources.scale_of(obj))
            return _respond(request, kind, obj)
        query = ListQuery.from_params(kind, request.query)
        as_table = tables.wants_table(request.headers.get("Accept", ""))
        prefix = registry_prefix(kind, target.namespace or None)
        if verb == "watch":
            timeout = parse_int(request.query, "timeoutSeconds")
            opts = WatchOptions(
                query=query,
                resource_version=parse_rv(request.query.get("resourceVersion")),
                bookmarks=parse_bool(request.query, "allowWatchBookmarks"),
                timeout=float(timeout) if timeout and timeout > 0 else DEFAULT_WATCH_TIMEOUT,
                send_initial_events=parse_bool(request.query, "sendInitialEvents"),
                table=as_table,
            )
            return await serve_watch(
                request,
                self.registry.store,
                kind,
                prefix,
                opts,
                idle_tick=self.bookmark_interval,
            )
        result = await self.registry.list(kind, target.namespace or None, query)
        if as_table:
            meta = result["metadata"]
            return _json(
                tables.table(
                    kind,
                    result["items"],
                    resource_version=meta.get("resourceVersion", ""),
                    continue_token=meta.get("continue", ""),
                ),
                content_type=tables.TABLE_CONTENT_TYPE,
            )
        return _json(result)

    async def _post(self, request: web.Request, target: Target, body: Any) -> web.StreamResponse:
        kind = target.kind
        if target.subresource == "binding":
            obj = _object_body(body, Target(kind, target.namespace))
            status = await subresources.bind(
                self.registry, kind, target.namespace, target.name, obj
            )
            return _json(status, 201)
        if target.name:
            raise ApiError.method_not_allowed(kind.resource, "create", kind.group)
        if kind.namespaced and not target.namespace:
            raise ApiError.method_not_allowed(kind.resource, "create", kind.group)
        obj = _object_body(body, target)
        problem = strategy.check_kind(kind, obj)
        if problem:
            raise ApiError.bad_request(problem)
        created = await self.registry.create(kind, target.namespace, obj, dry_run=dry_run(request))
        return _json(created, 201)

    async def _put(self, request: web.Request, target: Target, body: Any) -> web.StreamResponse:
        kind = target.kind
        obj = _object_body(body, target)
        sub = target.subresource
        if sub == "scale":
            return _json(
                await subresources.update_scale(
                    self.registry,
                    kind,
                    target.namespace,
                    target.name,
                    obj,
                    dry_run=dry_run(request),
                )
            )
        if sub == "finalize":
            return _json(
                await subresources.finalize_namespace(self.registry, kind, target.name, obj)
            )
        problem = strategy.check_kind(kind, obj)
        if problem:
            raise ApiError.bad_request(problem)
        result, created = await self.registry.update(
            kind, target.namespace, target.name, obj, subresource=sub, dry_run=dry_run(request)
        )
        return _json(result, 201 if created else 200)

    async def _patch(self, request: web.Request, target: Target, body: Any) -> web.StreamResponse:
        kind = target.kind
        media = _media(request)
        if media not in PATCH_MEDIA:
            raise ApiError.unsupported_media_type(media)
        if body is None:
            raise ApiError.bad_request("the patch body is empty")
        dry = dry_run(request)
        if target.subresource == "scale":
            return _json(
                await subresources.patch_scale(
                    self.registry, kind, target.namespace, target.name, media, body, dry_run=dry
                )
            )
        if media == patches.APPLY:
            return await self._apply(request, target, body, dry)

        async def mutate(current: Obj) -> Obj:
            patched = strategy.guarded(
                "patch", patches.apply_patch, media, current, body, kind.kind
            )
            _object_body(patched, target)
            problem = strategy.check_kind(kind, patched)
            if problem:
                raise ApiError.bad_request(problem)
            return self.registry.updated(kind, current, patched, target.subresource)

        obj, _ = await self.registry.write(kind, target.namespace, target.name, mutate, dry_run=dry)
        return _json(obj)

    async def _apply(
        self, request: web.Request, target: Target, body: Any, dry: bool
    ) -> web.StreamResponse:
        """Server-side apply, simplified: create if absent, else merge the applied
        object in as a strategic merge patch (no managedFields, no conflicts)."""
        kind = target.kind
        obj = _object_body(body, target)
        problem = strategy.check_kind(kind, obj)
        if problem:
            raise ApiError.bad_request(problem)
        if target.subresource:
            raise ApiError.unsupported_media_type(patches.APPLY)
        try:
            await self.registry.get(kind, target.namespace, target.name)
        except ApiError as exc:
            if exc.code != 404:
                raise
            meta = dict(obj.get("metadata") or {})
            meta["name"] = target.name
            created = await self.registry.create(
                kind, target.namespace, {**obj, "metadata": meta}, dry_run=dry
            )
            return _json(created, 201)

        async def mutate(current: Obj) -> Obj:
            patched = strategy.guarded(
                "apply", patches.apply_patch, patches.STRATEGIC, current, obj, kind.kind
            )
            return self.registry.updated(kind, current, patched)

        result, _ = await self.registry.write(
            kind, target.namespace, target.name, mutate, dry_run=dry
        )
        return _json(result)

    async def _delete(self, request: web.Request, target: Target, body: Any) -> web.StreamResponse:
        kind = target.kind
        options = delete_options(request, body)
        dry = dry_run(request) or options.get("dryRun") == ["All"]
        if target.name:
            obj, removed = await self.registry.delete(
                kind, target.namespace, target.name, options, dry_run=dry
            )
            return _json(obj, 200 if removed or dry else 202)
        query = ListQuery.from_params(kind, request.query)
        listed = await self.registry.list(kind, target.namespace or None, query)
        deleted = []
        for item in listed["items"]:
            meta: Mapping[str, Any] = item.get("metadata") or {}
            try:
                obj, _ = await self.registry.delete(
                    kind,
                    str(meta.get("namespace") or ""),
                    str(meta.get("name")),
                    options,
                    dry_run=dry,
                )
            except ApiError as exc:
                if exc.code == 404:
                    continue
                raise
            deleted.append(obj)
        return _json(
            {
                "kind": kind.list_kind,
                "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": listed["metadata"]["resourceVersion"]},
                "items": deleted,
            }
        )
