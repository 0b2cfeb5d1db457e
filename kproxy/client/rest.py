"""An asyncio REST client for Kubernetes-style APIs (aiohttp).

Owns :class:`Resource` (group, version, plural, scope) with :func:`resource_path`, the
:class:`RestClient` verbs — get, list (selectors, limit/continue, resourceVersion),
create, update, patch (strategic merge, merge, JSON patch, apply), delete (with a
DeleteOptions body) and watch — and :class:`WatchEvent`.

Invariants:

- Every failure the server reports becomes a typed :class:`~.errors.ApiStatusError`
  built from its ``Status`` body; transport failures become :class:`~.errors.ClientError`.
  Nothing else escapes (the informer relies on that to back off and retry).
- :meth:`RestClient.watch` yields events in the order the server sent them; an
  ``ERROR`` event is raised as its Status error (410 → :class:`~.errors.Gone`), never
  yielded. The stream ends normally when the server closes it (``timeoutSeconds``).
- Watch lines are split by hand, not with ``readline``: a single object may exceed
  aiohttp's line limit (64 KiB), and a large ConfigMap must not break a watch.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import aiohttp

from kproxy.client.errors import ClientError, status_error
from kproxy.client.kubeconfig import ClientConfig

USER_AGENT = "kproxy/0.1"

PatchType = Literal["strategic", "merge", "json", "apply"]
PATCH_CONTENT_TYPES: dict[str, str] = {
    "strategic": "application/strategic-merge-patch+json",
    "merge": "application/merge-patch+json",
    "json": "application/json-patch+json",
    "apply": "application/apply-patch+yaml",
}

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Resource:
    """A REST resource: where it lives and whether it is namespaced."""

    group: str
    version: str
    plural: str
    kind: str = ""
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(
        self, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        return resource_path(
            self.group,
            self.version,
            self.plural,
            namespace if self.namespaced else None,
            name,
            subresource,
        )


PODS = Resource("", "v1", "pods", "Pod")
SERVICES = Resource("", "v1", "services", "Service")
ENDPOINTS = Resource("", "v1", "endpoints", "Endpoints")
NODES = Resource("", "v1", "nodes", "Node", namespaced=False)
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", namespaced=False)
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
EVENTS = Resource("", "v1", "events", "Event")
ENDPOINTSLICES = Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice")
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
DEPLOYMENTS = Resource("apps", "v1", "deployments", "Deployment")
REPLICASETS = Resource("apps", "v1", "replicasets", "ReplicaSet")


def resource_path(
    group: str,
    version: str,
    resource: str,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """``/api/v1/namespaces/ns/pods/name/status`` and friends (segments URL-escaped)."""
    parts = ["/api", version] if not group else ["/apis", group, version]
    if namespace:
        parts += ["namespaces", quote(namespace, safe="")]
    parts.append(resource)
    if name:
        parts.append(quote(name, safe=""))
    if subresource:
        if not name:
            raise ValueError(f"subresource {subresource!r} of {resource} needs a name")
        parts.append(subresource)
    return "/".join(parts)


@dataclass(frozen=True, slots=True)
class WatchEvent:
    type: str  # ADDED | MODIFIED | DELETED | BOOKMARK
    object: Obj

    @property
    def resource_version(self) -> str:
        return str((self.object.get("metadata") or {}).get("resourceVersion") or "")


def _params(**kw: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in kw.items():
        if value is None or value == "":
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        out[key] = str(value)
    return out


class RestClient:
    """One apiserver, one identity; reuse it (it pools connections). Close it when done."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        user_agent: str = USER_AGENT,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.config = config
        self._user_agent = user_agent
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> RestClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _sess(self) -> aiohttp.ClientSession:
        # Created lazily: a session belongs to the loop it was made in.
        if self._session is None or self._session.closed:
            ssl_arg: Any = self.config.ssl_context if self.config.ssl_context is not None else True
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl_arg),
                headers={"User-Agent": self._user_agent, "Accept": "application/json"},
            )
        return self._session

    def _request_kwargs(self, timeout: aiohttp.ClientTimeout) -> dict[str, Any]:
        kw: dict[str, Any] = {"headers": self.config.auth_headers(), "timeout": timeout}
        if self.config.tls_server_name:
            kw["server_hostname"] = self.config.tls_server_name
        return kw

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        """One request; the decoded JSON response, or a typed error."""
        kw = self._request_kwargs(
            aiohttp.ClientTimeout(total=self._request_timeout, sock_connect=self._connect_timeout)
        )
        if body is not None:
            kw["data"] = json.dumps(body).encode()
            kw["headers"]["Content-Type"] = content_type
        url = self.config.server + path
        try:
            async with self._sess().request(method, url, params=params or {}, **kw) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise status_error(_json_or_none(text), resp.status)
                return json.loads(text) if text else {}
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ClientError(f"{method} {url}: {exc or type(exc).__name__}") from exc
        except json.JSONDecodeError as exc:
            raise ClientError(f"{method} {url}: response is not JSON: {exc}") from exc

    # ------------------------------------------------------------------ verbs

    def _ns(self, resource: Resource, namespace: str | None, body: Any = None) -> str | None:
        if not resource.namespaced:
            return None
        if namespace:
            return namespace
        if isinstance(body, Mapping):
            ns = (body.get("metadata") or {}).get("namespace")
            if ns:
                return str(ns)
        return self.config.namespace

    async def get(
        self,
        resource: Resource,
        name: str,
        namespace: str | None = None,
        *,
        subresource: str | None = None,
    ) -> Obj:
        path = resource.path(self._ns(resource, namespace), name, subresource)
        result: Obj = await self.request("GET", path)
        return result

    async def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        limit: int | None = None,
        continue_: str | None = None,
        resource_version: str | None = None,
        resource_version_match: str | None = None,
    ) -> Obj:
        """One page of a list; ``namespace=None`` lists across all namespaces."""
        params = _params(
            labelSelector=label_selector,
            fieldSelector=field_selector,
            limit=limit,
            resourceVersion=resource_version,
            resourceVersionMatch=resource_version_match,
            **{"continue": continue_},
        )
        result: Obj = await self.request("GET", resource.path(namespace), params=params)
        return result

    async def list_all(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        page_size: int = 500,
    ) -> Obj:
        """Every page of a list, as one list object (RV of the first page, as client-go)."""
        first: Obj | None = None
        items: list[Obj] = []
        token: str | None = None
        while True:
            page = await self.list(
                resource,
                namespace,
                label_selector=label_selector,
                field_selector=field_selector,
                limit=page_size,
                continue_=token,
            )
            first = first or page
            items.extend(page.get("items") or ())
            token = (page.get("metadata") or {}).get("continue") or None
            if not token:
                break
        merged = dict(first)
        merged["items"] = items
        merged["metadata"] = {
            k: v for k, v in (first.get("metadata") or {}).items() if k != "continue"
        }
        return merged

    async def create(
        self,
        resource: Resource,
        body: Mapping[str, Any],
        namespace: str | None = None,
        *,
        name: str | None = None,
        subresource: str | None = None,
        field_manager: str | None = None,
        dry_run: bool = False,
    ) -> Obj:
        """POST ``body``; with ``subresource`` (e.g. ``binding``) POST to the named object's."""
        path = resource.path(self._ns(resource, namespace, body), name, subresource)
        params = _params(fieldManager=field_manager, dryRun="All" if dry_run else None)
        result: Obj = await self.request("POST", path, params=params, body=body)
        return result

    async def update(
        self,
        resource: Resource,
        body: Mapping[str, Any],
        namespace: str | None = None,
        *,
        subresource: str | None = None,
        field_manager: str | None = None,
        dry_run: bool = False,
    ) -> Obj:
        """PUT ``body`` (named by its metadata.name; its resourceVersion guards the write)."""
        name = (body.get("metadata") or {}).get("name")
        if not name:
            raise ValueError("update needs body.metadata.name")
        path = resource.path(self._ns(resource, namespace, body), str(name), subresource)
        params = _params(fieldManager=field_manager, dryRun="All" if dry_run else None)
        result: Obj = await self.request("PUT", path, params=params, body=body)
        return result

    async def patch(
        self,
        resource: Resource,
        name: str,
        patch: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        namespace: str | None = None,
        *,
        patch_type: PatchType = "strategic",
        subresource: str | None = None,
        field_manager: str | None = None,
        force: bool | None = None,
        dry_run: bool = False,
    ) -> Obj:
        if patch_type not in PATCH_CONTENT_TYPES:
            raise ValueError(f"unknown patch type {patch_type!r}")
        if (patch_type == "json") != isinstance(patch, Sequence):
            raise ValueError("a JSON patch is a list of operations; other patches are objects")
        if patch_type == "apply" and not field_manager:
            raise ValueError("an apply patch needs a field manager")
        path = resource.path(self._ns(resource, namespace), name, subresource)
        params = _params(fieldManager=field_manager, force=force, dryRun="All" if dry_run else None)
        result: Obj = await self.request(
            "PATCH", path, params=params, body=patch, content_type=PATCH_CONTENT_TYPES[patch_type]
        )
        return result

    async def delete(
        self,
        resource: Resource,
        name: str,
        namespace: str | None = None,
        *,
        propagation_policy: str | None = None,
        grace_period_seconds: int | None = None,
        preconditions: Mapping[str, str] | None = None,
        options: Mapping[str, Any] | None = None,
        dry_run: bool = False,
    ) -> Obj:
        """DELETE with a ``DeleteOptions`` body; returns the object or a Success Status."""
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1", **(options or {})}
        if propagation_policy is not None:
            body["propagationPolicy"] = propagation_policy
        if grace_period_seconds is not None:
            body["gracePeriodSeconds"] = grace_period_seconds
        if preconditions:
            body["preconditions"] = dict(preconditions)
        if dry_run:
            body["dryRun"] = ["All"]
        path = resource.path(self._ns(resource, namespace), name)
        result: Obj = await self.request("DELETE", path, body=body)
        return result

    async def watch(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        resource_version: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        allow_bookmarks: bool = True,
        timeout_seconds: int | None = None,
    ) -> AsyncIterator[WatchEvent]:
        """Stream events strictly after ``resource_version`` until the server ends it."""
        params = _params(
            watch=True,
            resourceVersion=resource_version,
            labelSelector=label_selector,
            fieldSelector=field_selector,
            allowWatchBookmarks=True if allow_bookmarks else None,
            timeoutSeconds=timeout_seconds,
        )
        # No read timeout on an idle watch unless the server promised to end it.
        total = timeout_seconds + 30 if timeout_seconds else None
        kw = self._request_kwargs(
            aiohttp.ClientTimeout(total=total, sock_connect=self._connect_timeout)
        )
        url = self.config.server + resource.path(namespace)
        try:
            async with self._sess().get(url, params=params, **kw) as resp:
                if resp.status >= 400:
                    raise status_error(_json_or_none(await resp.text()), resp.status)
                buf = b""
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    while True:
                        line, sep, rest = buf.partition(b"\n")
                        if not sep:
                            break
                        buf = rest
                        event = _decode_event(line)
                        if event is not None:
                            yield event
                event = _decode_event(buf)
                if event is not None:
                    yield event
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ClientError(f"watch {url}: {exc or type(exc).__name__}") from exc


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return {"message": text[:200]} if text else None


def _decode_event(line: bytes) -> WatchEvent | None:
    line = line.strip()
    if not line:
        return None
    try:
        raw = json.loads(line)
    except ValueError as exc:
        raise ClientError(f"watch: undecodable event {line[:120]!r}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("object"), dict):
        raise ClientError(f"watch: malformed event {line[:120]!r}")
    etype = str(raw.get("type") or "")
    obj: Obj = raw["object"]
    if etype == "ERROR":
        code = obj.get("code")
        raise status_error(obj, code if isinstance(code, int) else 500)
    return WatchEvent(etype, obj)


__all__ = [
    "PATCH_CONTENT_TYPES",
    "ClientConfig",
    "PatchType",
    "Resource",
    "RestClient",
    "WatchEvent",
    "resource_path",
]
