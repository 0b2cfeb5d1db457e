"""Discovery and the non-resource endpoints: version, legacy discovery, OpenAPI, health.

Owns ``/version`` (``version.Info``), ``/api`` (``APIVersions``), ``/apis``
(``APIGroupList``), one ``APIResourceList`` per served group-version (from
:func:`kproxy.api.kinds.api_resource_list`, which lists subresources such as
``deployments/scale`` → ``autoscaling/v1 Scale``), ``/openapi/v2`` answered 200 with an
empty body (a valid empty protobuf ``Document``: kubectl's default ``--validate``
then skips schema checks), ``/openapi/v3`` 404, and ``/healthz``, ``/livez``,
``/readyz``.

Only legacy discovery is served: client-go picks the format by the response's
Content-Type, so plain ``application/json`` makes it fall back to these documents.
"""

from __future__ import annotations

import platform
from typing import Any

from aiohttp import web

from kproxy import __version__ as kproxy_version
from kproxy.api import kinds
from kproxy.api.errors import ApiError

# Reported as the Kubernetes version served; kubectl warns on a skew larger than one minor.
KUBE_MAJOR, KUBE_MINOR = "1", "32"


def version_info() -> dict[str, Any]:
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
    return {
        "major": KUBE_MAJOR,
        "minor": KUBE_MINOR,
        "gitVersion": f"v{KUBE_MAJOR}.{KUBE_MINOR}.0+kproxy-{kproxy_version}",
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": f"python{platform.python_version()}",
        "compiler": "cpython",
        "platform": f"linux/{arch}",
    }


def api_versions(server_address: str) -> dict[str, Any]:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
        ],
    }


def api_group_list() -> dict[str, Any]:
    groups: dict[str, list[str]] = {}
    for group, version in kinds.group_versions():
        if group:
            groups.setdefault(group, []).append(version)
    items = []
    for group, versions in groups.items():
        gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        items.append({"name": group, "versions": gvs, "preferredVersion": gvs[0]})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": items}


def api_group(group: str) -> dict[str, Any]:
    for item in api_group_list()["groups"]:
        if item["name"] == group:
            return {"kind": "APIGroup", "apiVersion": "v1", **item}
    raise ApiError.not_found("", group)


def served(group: str, version: str) -> bool:
    return (group, version) in kinds.group_versions()


def _json(data: Any) -> web.Response:
    return web.json_response(data)


async def handle_non_resource(request: web.Request, path: str) -> web.StreamResponse | None:
    """Answer a non-resource path, or None if ``path`` is a resource path (or unknown)."""
    if path in ("/healthz", "/livez", "/readyz"):
        return web.Response(text="ok", content_type="text/plain")
    if path.startswith(("/healthz/", "/livez/", "/readyz/")):
        return web.Response(text="ok", content_type="text/plain")
    if path == "/version":
        return _json(version_info())
    if path == "/api":
        host = request.host or "127.0.0.1"
        return _json(api_versions(host))
    if path == "/apis":
        return _json(api_group_list())
    if path == "/openapi/v2":
        return web.Response(body=b"", content_type="application/json")
    if path.startswith("/openapi"):
        raise ApiError(404, "NotFound", "the server could not find the requested resource")
    parts = [p for p in path.split("/") if p]
    if parts == ["api", "v1"]:
        return _json(kinds.api_resource_list("", "v1"))
    if len(parts) == 2 and parts[0] == "apis":
        return _json(api_group(parts[1]))
    if len(parts) == 3 and parts[0] == "apis":
        if not served(parts[1], parts[2]):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return _json(kinds.api_resource_list(parts[1], parts[2]))
    return None
