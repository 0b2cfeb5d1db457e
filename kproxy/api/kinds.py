"""The registry of served kinds: what discovery lists and the apiserver routes.

Owns one :class:`Kind` per resource (group, version, plural, singular, Kind, scope,
short names, verbs, subresources, list kind), with the values upstream's discovery
documents carry for the same resource, and lookups by resource, Kind or short name.

Invariants: resources are unique per group; short names are unique across the
registry; every subresource names the kind it returns (``deployments/scale``
returns ``autoscaling/v1 Scale``, as ``kubectl scale`` expects).
"""

from __future__ import annotations

from dataclasses import dataclass

from kproxy.api.errors import ApiError

# Upstream's verb sets (apiserver's registry/rest capabilities).
ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
NAMESPACE_VERBS = ("create", "delete", "get", "list", "patch", "update", "watch")
STATUS_VERBS = ("get", "patch", "update")


@dataclass(frozen=True, slots=True)
class Subresource:
    """A subresource such as ``status`` or ``scale`` and the kind it speaks."""

    name: str
    kind: str
    verbs: tuple[str, ...]
    group: str = ""  # "" with version "": the parent's group-version
    version: str = ""


@dataclass(frozen=True, slots=True)
class Kind:
    group: str
    version: str
    resource: str
    singular: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    subresources: tuple[Subresource, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"

    @property
    def group_resource(self) -> str:
        """``deployments.apps``: how error messages qualify a resource."""
        return f"{self.resource}.{self.group}" if self.group else self.resource

    def subresource(self, name: str) -> Subresource:
        for sub in self.subresources:
            if sub.name == name:
                return sub
        raise ApiError.not_found(f"{self.resource}/{name}", "", self.group)

    def has_verb(self, verb: str) -> bool:
        return verb in self.verbs


def _status(kind: str) -> Subresource:
    return Subresource("status", kind, STATUS_VERBS)


_SCALE = Subresource("scale", "Scale", STATUS_VERBS, group="autoscaling", version="v1")

KINDS: tuple[Kind, ...] = (
    Kind(
        "",
        "v1",
        "namespaces",
        "namespace",
        "Namespace",
        False,
        ("ns",),
        NAMESPACE_VERBS,
        # finalize: what the namespace controller calls once the namespace is empty.
        subresources=(_status("Namespace"), Subresource("finalize", "Namespace", ("update",))),
    ),
    Kind(
        "",
        "v1",
        "pods",
        "pod",
        "Pod",
        True,
        ("po",),
        subresources=(_status("Pod"), Subresource("binding", "Binding", ("create",))),
        categories=("all",),
    ),
    Kind(
        "",
        "v1",
        "services",
        "service",
        "Service",
        True,
        ("svc",),
        subresources=(_status("Service"),),
        categories=("all",),
    ),
    Kind("", "v1", "endpoints", "endpoints", "Endpoints", True, ("ep",)),
    Kind("", "v1", "nodes", "node", "Node", False, ("no",), subresources=(_status("Node"),)),
    Kind("", "v1", "events", "event", "Event", True, ("ev",)),
    Kind("", "v1", "configmaps", "configmap", "ConfigMap", True, ("cm",)),
    Kind("discovery.k8s.io", "v1", "endpointslices", "endpointslice", "EndpointSlice", True),
    Kind(
        "apps",
        "v1",
        "deployments",
        "deployment",
        "Deployment",
        True,
        ("deploy",),
        subresources=(_SCALE, _status("Deployment")),
        categories=("all",),
    ),
    Kind(
        "apps",
        "v1",
        "replicasets",
        "replicaset",
        "ReplicaSet",
        True,
        ("rs",),
        subresources=(_SCALE, _status("ReplicaSet")),
        categories=("all",),
    ),
    Kind("coordination.k8s.io", "v1", "leases", "lease", "Lease", True),
)

_BY_RESOURCE = {(k.group, k.resource): k for k in KINDS}
_BY_KIND = {(k.group, k.kind): k for k in KINDS}
_BY_API_VERSION_KIND = {(k.api_version, k.kind): k for k in KINDS}
_BY_ANY_NAME = {name: k for k in KINDS for name in (k.resource, k.singular, *k.short_names)}


def group_versions() -> tuple[tuple[str, str], ...]:
    """Served (group, version) pairs, core first, in registry order."""
    return tuple(dict.fromkeys((k.group, k.version) for k in KINDS))


def kinds_in(group: str, version: str) -> tuple[Kind, ...]:
    return tuple(k for k in KINDS if k.group == group and k.version == version)


def by_resource(group: str, resource: str) -> Kind:
    try:
        return _BY_RESOURCE[(group, resource)]
    except KeyError:
        raise ApiError.not_found(resource, "", group) from None


def by_kind(group: str, kind: str) -> Kind:
    try:
        return _BY_KIND[(group, kind)]
    except KeyError:
        raise ApiError.bad_request(f"no kind {kind!r} is registered in group {group!r}") from None


def for_object(api_version: str, kind: str) -> Kind:
    """The kind of an object by its ``apiVersion``/``kind`` fields."""
    try:
        return _BY_API_VERSION_KIND[(api_version, kind)]
    except KeyError:
        raise ApiError.bad_request(
            f'no kind "{kind}" is registered for version "{api_version}"'
        ) from None


def lookup(name: str) -> Kind:
    """Resolve what a user types (``svc``, ``service``, ``services``) to a kind."""
    try:
        return _BY_ANY_NAME[name.lower()]
    except KeyError:
        raise ApiError.not_found("resources", name) from None


def api_resource_list(group: str, version: str) -> dict[str, object]:
    """The legacy discovery document (``APIResourceList``) for one group-version."""
    resources: list[dict[str, object]] = []
    for k in kinds_in(group, version):
        entry: dict[str, object] = {
            "name": k.resource,
            "singularName": k.singular,
            "namespaced": k.namespaced,
            "kind": k.kind,
            "verbs": list(k.verbs),
        }
        if k.short_names:
            entry["shortNames"] = list(k.short_names)
        if k.categories:
            entry["categories"] = list(k.categories)
        resources.append(entry)
        for sub in k.subresources:
            sub_entry: dict[str, object] = {
                "name": f"{k.resource}/{sub.name}",
                "singularName": "",
                "namespaced": k.namespaced,
                "kind": sub.kind,
                "verbs": list(sub.verbs),
            }
            if sub.group or sub.version:
                sub_entry["group"] = sub.group
                sub_entry["version"] = sub.version
            resources.append(sub_entry)
    gv = f"{group}/{version}" if group else version
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    }
