"""Authorization: a subset of RBAC, the Node authorizer, and system:masters.

Owns the request :class:`Attributes`, the :class:`RbacPolicy` (Roles, ClusterRoles,
RoleBindings, ClusterRoleBindings as plain dicts, exactly as stored), the bootstrap
policy (:func:`bootstrap_policy_objects`) and the decision :func:`authorize`.

The decision is a pure function, evaluated as kube-apiserver's authorizer chain
``Node,RBAC`` with the ``system:masters`` short-circuit in front:

1. a user in ``system:masters`` may do everything;
2. the Node authorizer lets ``system:node:<name>`` (group ``system:nodes``) do what a
   kubelet/proxy on that node needs — and only for its own Node, Lease and bound pods;
3. RBAC: allowed iff some binding that applies to the request grants a matching rule.

Nothing is ever explicitly denied (RBAC is purely additive): "no" means no
authorizer said yes. Rule matching follows upstream's ``rbac/validation``: ``*``
wildcards for verbs, apiGroups and resources; ``*/status`` matches any resource's
status subresource, but ``pods`` alone does not cover ``pods/status``; an empty
``resourceNames`` matches any name, a non-empty one only requests naming an object
(so never list/watch/create-without-name).

For ``create``, callers set ``Attributes.name`` from the new object's metadata.name,
so the node restriction (own Node, own Lease) can check it.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

from kproxy.errors import KProxyError

MASTERS_GROUP = "system:masters"
NODES_GROUP = "system:nodes"
NODE_USER_PREFIX = "system:node:"
NODE_LEASE_NAMESPACE = "kube-node-lease"

READ_VERBS = frozenset({"get", "list", "watch"})


class Subject(Protocol):
    """Who is asking: :class:`kproxy.apiserver.authn.UserInfo` fits."""

    @property
    def name(self) -> str: ...

    @property
    def groups(self) -> tuple[str, ...]: ...


class UserLike(NamedTuple):
    """The two things authorization needs from :class:`authn.UserInfo`."""

    name: str
    groups: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Attributes:
    """What a request is trying to do (upstream's ``authorizer.Attributes``).

    Resource requests set ``resource`` (plural) and, for subresources, ``subresource``;
    non-resource requests (``/healthz``, ``/api``) set ``path`` and leave
    ``resource_request`` False. ``api_group`` is ``""`` for the core group.
    """

    verb: str
    resource: str = ""
    subresource: str = ""
    api_group: str = ""
    namespace: str = ""
    name: str = ""
    path: str = ""
    resource_request: bool = True


class Decision(NamedTuple):
    allowed: bool
    reason: str


class PolicyError(KProxyError):
    """An RBAC object that does not have the shape of one."""


# --------------------------------------------------------------------- matching


def _has(values: Sequence[str] | None, want: str) -> bool:
    if not values:
        return False
    return "*" in values or want in values


def _resource_matches(rule_resources: Sequence[str], resource: str, subresource: str) -> bool:
    combined = f"{resource}/{subresource}" if subresource else resource
    for r in rule_resources:
        if r in ("*", combined):
            return True
        if subresource and r == f"*/{subresource}":
            return True
    return False


def _non_resource_matches(urls: Sequence[str], path: str) -> bool:
    for url in urls:
        if url in ("*", path):
            return True
        if url.endswith("*") and path.startswith(url[:-1]):
            return True
    return False


def rule_allows(rule: Mapping[str, Any], attrs: Attributes) -> bool:
    """Whether one PolicyRule grants ``attrs`` (upstream's ``RuleAllows``)."""
    if not _has(rule.get("verbs"), attrs.verb):
        return False
    if not attrs.resource_request:
        return _non_resource_matches(rule.get("nonResourceURLs") or (), attrs.path)
    if not _has(rule.get("apiGroups"), attrs.api_group):
        return False
    if not _resource_matches(rule.get("resources") or (), attrs.resource, attrs.subresource):
        return False
    names = rule.get("resourceNames") or ()
    return not names or attrs.name in names


def subject_matches(subject: Mapping[str, Any], user: UserLike, binding_ns: str) -> bool:
    kind = subject.get("kind")
    name = subject.get("name", "")
    if kind == "User":
        return bool(name == user.name)
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        ns = subject.get("namespace") or binding_ns
        return user.name == f"system:serviceaccount:{ns}:{name}"
    return False


# ----------------------------------------------------------------------- policy

_ROLE_KINDS = ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")


class RbacPolicy:
    """The RBAC objects in force, indexed by (namespace, name).

    Objects are plain dicts as the API stores them. ``upsert``/``remove`` keep it
    current from a watch; lookups tolerate dangling roleRefs (the binding then grants
    nothing, as upstream).
    """

    def __init__(self, objects: Iterable[Mapping[str, Any]] = ()) -> None:
        self._objs: dict[str, dict[tuple[str, str], Mapping[str, Any]]] = {
            k: {} for k in _ROLE_KINDS
        }
        for obj in objects:
            self.upsert(obj)

    @staticmethod
    def _key(obj: Mapping[str, Any]) -> tuple[str, tuple[str, str]]:
        kind = obj.get("kind")
        meta = obj.get("metadata") or {}
        if kind not in _ROLE_KINDS or not isinstance(meta.get("name"), str):
            raise PolicyError(f"not an RBAC object: kind={kind!r} metadata={meta!r}")
        ns = "" if kind.startswith("Cluster") else str(meta.get("namespace") or "")
        return kind, (ns, meta["name"])

    def upsert(self, obj: Mapping[str, Any]) -> None:
        kind, key = self._key(obj)
        self._objs[kind][key] = obj

    def remove(self, obj: Mapping[str, Any]) -> None:
        kind, key = self._key(obj)
        self._objs[kind].pop(key, None)

    def _role_rules(self, ref: Mapping[str, Any], ns: str) -> Sequence[Mapping[str, Any]]:
        kind = ref.get("kind")
        name = str(ref.get("name", ""))
        if kind == "ClusterRole":
            role = self._objs["ClusterRole"].get(("", name))
        elif kind == "Role" and ns:
            role = self._objs["Role"].get((ns, name))
        else:
            role = None
        return (role or {}).get("rules") or ()

    def allows(self, user: UserLike, attrs: Attributes) -> Decision:
        for (_, bname), binding in self._objs["ClusterRoleBinding"].items():
            reason = self._binding_allows(binding, "", user, attrs)
            if reason is not None:
                return Decision(True, f'RBAC: allowed by ClusterRoleBinding "{bname}" {reason}')
        if attrs.resource_request and attrs.namespace:
            for (ns, bname), binding in self._objs["RoleBinding"].items():
                if ns != attrs.namespace:
                    continue
                reason = self._binding_allows(binding, ns, user, attrs)
                if reason is not None:
                    return Decision(True, f'RBAC: allowed by RoleBinding "{bname}/{ns}" {reason}')
        return Decision(False, "")

    def _binding_allows(
        self, binding: Mapping[str, Any], ns: str, user: UserLike, attrs: Attributes
    ) -> str | None:
        subjects = binding.get("subjects") or ()
        matched = next((s for s in subjects if subject_matches(s, user, ns)), None)
        if matched is None:
            return None
        ref = binding.get("roleRef") or {}
        for rule in self._role_rules(ref, ns):
            if rule_allows(rule, attrs):
                return (
                    f'of {ref.get("kind")} "{ref.get("name")}" to '
                    f'{matched.get("kind")} "{matched.get("name")}"'
                )
        return None


def bootstrap_policy_objects() -> list[dict[str, Any]]:
    """The default ClusterRoles/Bindings every cluster starts with (a subset of upstream's)."""

    def cluster_role(name: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": rules,
        }

    def binding(name: str, role: str, groups: Sequence[str]) -> dict[str, Any]:
        return {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role,
            },
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": g}
                for g in groups
            ],
        }

    public = ["/healthz", "/livez", "/readyz", "/version", "/version/"]
    discovery = [*public, "/api", "/api/*", "/apis", "/apis/*", "/openapi", "/openapi/*"]
    return [
        cluster_role(
            "cluster-admin",
            [
                {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                {"nonResourceURLs": ["*"], "verbs": ["*"]},
            ],
        ),
        cluster_role("system:discovery", [{"nonResourceURLs": discovery, "verbs": ["get"]}]),
        cluster_role("system:public-info-viewer", [{"nonResourceURLs": public, "verbs": ["get"]}]),
        binding("cluster-admin", "cluster-admin", [MASTERS_GROUP]),
        binding("system:discovery", "system:discovery", ["system:authenticated"]),
        binding(
            "system:public-info-viewer",
            "system:public-info-viewer",
            ["system:authenticated", "system:unauthenticated"],
        ),
    ]


# ------------------------------------------------------------------------- node

# (api group, resource) a node may read cluster-wide: what a kubelet and a proxy watch.
NODE_READABLE = frozenset(
    {
        ("", "pods"),
        ("", "services"),
        ("", "endpoints"),
        ("discovery.k8s.io", "endpointslices"),
        ("", "nodes"),
        ("", "namespaces"),
        ("", "configmaps"),
    }
)

PodNodeLookup = Callable[[str, str], "str | None"]
"""(namespace, pod name) → the pod's ``spec.nodeName`` ("" if unbound, None if absent)."""

AsyncPodNodeLookup = Callable[[str, str], Awaitable["str | None"]]


def node_name_of(user: UserLike) -> str | None:
    """The node a user speaks for, or None when it is not a node identity."""
    if user.name.startswith(NODE_USER_PREFIX) and NODES_GROUP in user.groups:
        name = user.name[len(NODE_USER_PREFIX) :]
        return name or None
    return None


def _needs_pod_lookup(node: str | None, attrs: Attributes) -> bool:
    return (
        node is not None
        and attrs.resource_request
        and attrs.api_group == ""
        and attrs.resource == "pods"
        and bool(attrs.name)
        and (
            (attrs.subresource == "status" and attrs.verb in ("update", "patch"))
            or (attrs.subresource == "" and attrs.verb == "delete")
        )
    )


def node_allows(node: str, attrs: Attributes, pod_node: PodNodeLookup | None) -> Decision:
    """The Node authorizer: what ``system:node:<node>`` may do (allow or no opinion)."""
    no = Decision(False, "")
    if not attrs.resource_request:
        return no
    group, res, sub, verb = attrs.api_group, attrs.resource, attrs.subresource, attrs.verb
    if verb in READ_VERBS and not sub and (group, res) in NODE_READABLE:
        return Decision(True, f"node {node!r} may {verb} {res}")
    if group == "" and res == "nodes" and attrs.name == node:
        if (not sub and verb in ("create", "update", "patch", "delete")) or (
            sub == "status" and verb in ("get", "update", "patch")
        ):
            return Decision(True, f"node {node!r} may {verb} its own Node")
        return no
    if group == "coordination.k8s.io" and res == "leases" and not sub:
        if (
            attrs.namespace == NODE_LEASE_NAMESPACE
            and attrs.name == node
            and verb in ("get", "create", "update", "patch", "delete")
        ):
            return Decision(True, f"node {node!r} may {verb} its own Lease")
        return no
    if group in ("", "events.k8s.io") and res == "events" and not sub:
        if verb in ("create", "update", "patch"):
            return Decision(True, f"node {node!r} may {verb} events")
        return no
    if group == "" and res == "pods" and attrs.name:
        is_status_write = sub == "status" and verb in ("update", "patch")
        is_delete = not sub and verb == "delete"
        if not (is_status_write or is_delete):
            return no
        bound = pod_node(attrs.namespace, attrs.name) if pod_node is not None else None
        if bound == node:
            what = "write the status of" if is_status_write else "delete"
            return Decision(True, f"node {node!r} may {what} pod {attrs.namespace}/{attrs.name}")
        if pod_node is None:
            return Decision(False, f"node {node!r}: no pod lookup to check the binding")
        return Decision(
            False,
            f"node {node!r} cannot {verb} pod {attrs.namespace}/{attrs.name}: bound to {bound!r}"
            if bound is not None
            else f"pod {attrs.name} not found",
        )
    return no


# ------------------------------------------------------------------------ entry


def authorize(
    user: Subject,
    attrs: Attributes,
    policy: RbacPolicy | None = None,
    pod_node: PodNodeLookup | None = None,
) -> Decision:
    """Whether ``user`` may do ``attrs``.

    ``pod_node`` resolves a pod's ``spec.nodeName``; it is only called for a node
    writing a pod's status or deleting a pod.
    """
    who = UserLike(str(user.name), tuple(user.groups))
    if MASTERS_GROUP in who.groups:
        return Decision(True, f"{who.name!r} is in {MASTERS_GROUP}")
    node = node_name_of(who)
    node_reason = ""
    if node is not None:
        decision = node_allows(node, attrs, pod_node)
        if decision.allowed:
            return decision
        node_reason = decision.reason
    if policy is not None:
        decision = policy.allows(who, attrs)
        if decision.allowed:
            return decision
    return Decision(False, node_reason or _forbidden_message(who, attrs))


async def authorize_async(
    user: Subject,
    attrs: Attributes,
    policy: RbacPolicy | None = None,
    pod_node: AsyncPodNodeLookup | PodNodeLookup | None = None,
) -> Decision:
    """:func:`authorize` with a pod lookup that may be a coroutine (a store read)."""
    who = UserLike(str(user.name), tuple(user.groups))
    sync_lookup: PodNodeLookup | None = None
    if pod_node is not None and _needs_pod_lookup(node_name_of(who), attrs):
        found = pod_node(attrs.namespace, attrs.name)
        bound = await found if inspect.isawaitable(found) else found

        def sync_lookup(_ns: str, _name: str) -> str | None:
            return bound

    return authorize(who, attrs, policy, sync_lookup)


def _forbidden_message(user: UserLike, attrs: Attributes) -> str:
    """The message kube-apiserver puts into a 403 Status."""
    if not attrs.resource_request:
        return f'User "{user.name}" cannot {attrs.verb} path "{attrs.path}"'
    res = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    msg = (
        f'User "{user.name}" cannot {attrs.verb} resource "{res}" in API group "{attrs.api_group}"'
    )
    if attrs.namespace:
        return msg + f' in the namespace "{attrs.namespace}"'
    return msg + " at the cluster scope"


def with_name(attrs: Attributes, name: str) -> Attributes:
    """``attrs`` naming an object (for create: the new object's metadata.name)."""
    return replace(attrs, name=name)
