"""Authentication and authorization decisions, as tables of cases."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from kproxy.apiserver.authn import (
    ANONYMOUS,
    AuthenticationError,
    ClientCA,
    TokenFile,
    TokenFileError,
    UserInfo,
    allows_anonymous,
    authenticate,
    bearer_token,
)
from kproxy.apiserver.authz import (
    Attributes,
    RbacPolicy,
    authorize,
    authorize_async,
    bootstrap_policy_objects,
    rule_allows,
)
from kproxy.apiserver.certs import make_ca

# -------------------------------------------------------------------- authn

TOKENS = TokenFile.parse(
    "\n".join(
        [
            'abc123,alice,1001,"devs,ops"',
            "def456,bob,1002",
            "",
            " ghi789, carol, 1003, viewers",
        ]
    )
)


@pytest.mark.parametrize(
    ("header", "want"),
    [
        ("Bearer abc123", UserInfo("alice", "1001", ("devs", "ops", "system:authenticated"))),
        ("bearer def456", UserInfo("bob", "1002", ("system:authenticated",))),
        ("Bearer ghi789", UserInfo("carol", "1003", ("viewers", "system:authenticated"))),
        (None, ANONYMOUS),
        ("Basic dXNlcjpwdw==", ANONYMOUS),  # not a bearer token: no credentials for us
        ("Bearer ", ANONYMOUS),
    ],
)
def test_token_authn(header: str | None, want: UserInfo) -> None:
    headers = {"Authorization": header} if header is not None else {}
    assert authenticate(headers, None, tokens=TOKENS) == want


def test_unknown_token_is_401_not_anonymous() -> None:
    with pytest.raises(AuthenticationError):
        authenticate({"Authorization": "Bearer nope"}, None, tokens=TOKENS)
    with pytest.raises(AuthenticationError):
        authenticate({"Authorization": "Bearer abc123"}, None, tokens=None)


def test_anonymous_can_be_turned_off() -> None:
    with pytest.raises(AuthenticationError):
        authenticate({}, None, tokens=TOKENS, anonymous=False)


def test_ssl_dict_peer_is_trusted_when_a_client_ca_is_configured() -> None:
    ca, _ = make_ca()
    peer = {
        "subject": (
            (("organizationName", "system:nodes"),),
            (("commonName", "system:node:n1"),),
        )
    }
    user = authenticate({}, peer, client_ca=ClientCA([ca]))
    assert user == UserInfo("system:node:n1", "", ("system:nodes", "system:authenticated"))
    # Certificates win over tokens, as upstream orders its authenticators.
    user = authenticate(
        {"Authorization": "Bearer abc123"}, peer, tokens=TOKENS, client_ca=ClientCA([ca])
    )
    assert user.name == "system:node:n1"


@pytest.mark.parametrize(
    "text",
    ["tok,onlyuser", ",user,uid", "tok,,uid"],
)
def test_bad_token_files(text: str) -> None:
    with pytest.raises(TokenFileError):
        TokenFile.parse(text)


def test_duplicate_token_last_wins() -> None:
    tokens = TokenFile.parse("t,a,1\nt,b,2\n")
    user = tokens.lookup("t")
    assert user is not None and user.name == "b"
    assert len(tokens) == 1


@pytest.mark.parametrize(
    ("path", "ok"),
    [("/healthz", True), ("/livez", True), ("/readyz", True), ("/version", True),
     ("/healthz/", True), ("/api", False), ("/api/v1/pods", False), ("/metrics", False)],
)  # fmt: skip
def test_anonymous_paths(path: str, ok: bool) -> None:
    assert allows_anonymous(path) is ok


def test_bearer_token_parsing() -> None:
    assert bearer_token({"authorization": "Bearer  x "}) == "x"
    assert bearer_token({}) is None


# -------------------------------------------------------------------- authz

ADMIN = UserInfo("kproxy-admin", groups=("system:masters", "system:authenticated"))
NODE1 = UserInfo("system:node:n1", groups=("system:nodes", "system:authenticated"))
FAKE_NODE = UserInfo("system:node:n1", groups=("system:authenticated",))  # not in system:nodes
ALICE = UserInfo("alice", groups=("devs", "system:authenticated"))
BOB = UserInfo("bob", groups=("system:authenticated",))
SA = UserInfo("system:serviceaccount:kube-system:kproxy", groups=("system:authenticated",))


def A(verb: str, resource: str = "", **kw: Any) -> Attributes:
    return Attributes(verb=verb, resource=resource, **kw)


def P(verb: str, path: str) -> Attributes:
    return Attributes(verb=verb, path=path, resource_request=False)


POLICY = RbacPolicy(
    [
        *bootstrap_policy_objects(),
        {
            "kind": "Role",
            "metadata": {"name": "pod-reader", "namespace": "dev"},
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
            ],
        },
        {
            "kind": "RoleBinding",
            "metadata": {"name": "devs-read-pods", "namespace": "dev"},
            "roleRef": {"kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "Group", "name": "devs"}],
        },
        {
            "kind": "ClusterRole",
            "metadata": {"name": "status-writer"},
            "rules": [
                {"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["update", "patch"]},
                {
                    "apiGroups": ["apps"],
                    "resources": ["deployments"],
                    "verbs": ["get", "update"],
                    "resourceNames": ["web"],
                },
            ],
        },
        {
            "kind": "RoleBinding",  # a RoleBinding to a ClusterRole: only in its namespace
            "metadata": {"name": "bob-status", "namespace": "prod"},
            "roleRef": {"kind": "ClusterRole", "name": "status-writer"},
            "subjects": [{"kind": "User", "name": "bob"}],
        },
        {
            "kind": "ClusterRole",
            "metadata": {"name": "proxier"},
            "rules": [
                {
                    "apiGroups": ["", "discovery.k8s.io"],
                    "resources": ["services", "endpointslices"],
                    "verbs": ["list", "watch"],
                }
            ],
        },
        {
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "kproxy-sa"},
            "roleRef": {"kind": "ClusterRole", "name": "proxier"},
            "subjects": [{"kind": "ServiceAccount", "name": "kproxy", "namespace": "kube-system"}],
        },
        {
            "kind": "RoleBinding",  # dangling roleRef grants nothing
            "metadata": {"name": "dangling", "namespace": "dev"},
            "roleRef": {"kind": "Role", "name": "missing"},
            "subjects": [{"kind": "User", "name": "bob"}],
        },
    ]
)

PODS_BOUND = {("default", "mine"): "n1", ("default", "theirs"): "n2", ("default", "pending"): ""}


def pod_node(namespace: str, name: str) -> str | None:
    return PODS_BOUND.get((namespace, name))


CASES: list[tuple[str, UserInfo, Attributes, bool]] = [
    # system:masters
    ("admin anything", ADMIN, A("delete", "nodes", name="n9"), True),
    ("admin non-resource", ADMIN, P("get", "/metrics"), True),
    # bootstrap: discovery and public info
    ("auth'd discovery", BOB, P("get", "/apis/apps/v1"), True),
    ("anon healthz", ANONYMOUS, P("get", "/healthz"), True),
    ("anon discovery", ANONYMOUS, P("get", "/api"), False),
    ("auth'd metrics", BOB, P("get", "/metrics"), False),
    # Role + RoleBinding to a group
    ("devs list dev pods", ALICE, A("list", "pods", namespace="dev"), True),
    ("devs get dev pod", ALICE, A("get", "pods", namespace="dev", name="x"), True),
    ("devs other ns", ALICE, A("list", "pods", namespace="prod"), False),
    ("devs all ns", ALICE, A("list", "pods"), False),
    ("devs delete", ALICE, A("delete", "pods", namespace="dev", name="x"), False),
    ("pods rule ≠ pods/status", ALICE, A("get", "pods", subresource="status", namespace="dev",
                                         name="x"), False),
    ("devs wrong group", ALICE, A("list", "pods", api_group="apps", namespace="dev"), False),
    # ClusterRole via RoleBinding, */status, resourceNames
    ("bob pod status prod", BOB, A("patch", "pods", subresource="status", namespace="prod",
                                   name="p"), True),
    ("bob deploy status prod", BOB, A("update", "deployments", api_group="apps",
                                      subresource="status", namespace="prod", name="d"), True),
    ("bob pod status dev", BOB, A("patch", "pods", subresource="status", namespace="dev",
                                  name="p"), False),
    ("bob pods main resource", BOB, A("patch", "pods", namespace="prod", name="p"), False),
    ("bob named deploy", BOB, A("get", "deployments", api_group="apps", namespace="prod",
                                name="web"), True),
    ("bob other deploy", BOB, A("get", "deployments", api_group="apps", namespace="prod",
                                name="api"), False),
    ("bob list deploys (names)", BOB, A("list", "deployments", api_group="apps",
                                        namespace="prod"), False),
    # ServiceAccount subject in a ClusterRoleBinding
    ("sa watch slices", SA, A("watch", "endpointslices", api_group="discovery.k8s.io"), True),
    ("sa list svcs ns", SA, A("list", "services", namespace="default"), True),
    ("sa get svc", SA, A("get", "services", namespace="default", name="s"), False),
    ("sa slices core group", SA, A("watch", "endpointslices"), True),  # group "" listed too
    # Node authorizer: reads
    ("node list pods", NODE1, A("list", "pods"), True),
    ("node watch svcs", NODE1, A("watch", "services"), True),
    ("node get endpoints", NODE1, A("get", "endpoints", namespace="a", name="b"), True),
    ("node list slices", NODE1, A("list", "endpointslices", api_group="discovery.k8s.io"), True),
    ("node get other node", NODE1, A("get", "nodes", name="n2"), True),
    ("node list namespaces", NODE1, A("list", "namespaces"), True),
    ("node get configmap", NODE1, A("get", "configmaps", namespace="a", name="c"), True),
    ("node list secrets", NODE1, A("list", "secrets"), False),
    ("node list deployments", NODE1, A("list", "deployments", api_group="apps"), False),
    # Node: own Node object
    ("node create self", NODE1, A("create", "nodes", name="n1"), True),
    ("node patch self", NODE1, A("patch", "nodes", name="n1"), True),
    ("node self status", NODE1, A("update", "nodes", subresource="status", name="n1"), True),
    ("node other status", NODE1, A("patch", "nodes", subresource="status", name="n2"), False),
    ("node update other", NODE1, A("update", "nodes", name="n2"), False),
    ("node create other", NODE1, A("create", "nodes", name="n2"), False),
    # Node: own Lease
    ("node own lease", NODE1, A("update", "leases", api_group="coordination.k8s.io",
                                namespace="kube-node-lease", name="n1"), True),
    ("node create lease", NODE1, A("create", "leases", api_group="coordination.k8s.io",
                                   namespace="kube-node-lease", name="n1"), True),
    ("node other lease", NODE1, A("update", "leases", api_group="coordination.k8s.io",
                                  namespace="kube-node-lease", name="n2"), False),
    ("node lease other ns", NODE1, A("update", "leases", api_group="coordination.k8s.io",
                                     namespace="default", name="n1"), False),
    # Node: pod status of bound pods; deletes
    ("node own pod status", NODE1, A("patch", "pods", subresource="status", namespace="default",
                                     name="mine"), True),
    ("node other pod status", NODE1, A("patch", "pods", subresource="status",
                                       namespace="default", name="theirs"), False),
    ("node unbound pod status", NODE1, A("update", "pods", subresource="status",
                                         namespace="default", name="pending"), False),
    ("node missing pod status", NODE1, A("update", "pods", subresource="status",
                                         namespace="default", name="ghost"), False),
    ("node delete own pod", NODE1, A("delete", "pods", namespace="default", name="mine"), True),
    ("node delete other pod", NODE1, A("delete", "pods", namespace="default", name="theirs"),
     False),
    ("node patch own pod spec", NODE1, A("patch", "pods", namespace="default", name="mine"),
     False),
    ("node create pod", NODE1, A("create", "pods", namespace="default", name="x"), False),
    # Node: events
    ("node create event", NODE1, A("create", "events", namespace="default"), True),
    ("node create new event", NODE1, A("create", "events", api_group="events.k8s.io",
                                       namespace="default"), True),
    ("node delete event", NODE1, A("delete", "events", namespace="default", name="e"), False),
    # A node name without the group is just a user
    ("fake node", FAKE_NODE, A("list", "pods"), False),
    ("fake node self", FAKE_NODE, A("patch", "nodes", name="n1"), False),
]  # fmt: skip


@pytest.mark.parametrize(("label", "user", "attrs", "allowed"), CASES, ids=[c[0] for c in CASES])
def test_authorize(label: str, user: UserInfo, attrs: Attributes, allowed: bool) -> None:
    decision = authorize(user, attrs, POLICY, pod_node)
    assert decision.allowed is allowed, decision.reason
    assert decision.reason  # allowed or not, say why


@pytest.mark.parametrize(("label", "user", "attrs", "allowed"), CASES, ids=[c[0] for c in CASES])
def test_authorize_async_agrees(
    label: str, user: UserInfo, attrs: Attributes, allowed: bool
) -> None:
    calls: list[tuple[str, str]] = []

    async def lookup(namespace: str, name: str) -> str | None:
        calls.append((namespace, name))
        return pod_node(namespace, name)

    decision = asyncio.run(authorize_async(user, attrs, POLICY, lookup))
    assert decision.allowed is allowed, decision.reason
    # The store is only consulted for a node touching a pod by name.
    if user is not NODE1 or attrs.resource != "pods":
        assert calls == []


def test_reasons() -> None:
    allowed, reason = authorize(ALICE, A("list", "pods", namespace="dev"), POLICY)
    assert allowed and 'RoleBinding "devs-read-pods/dev"' in reason and 'Group "devs"' in reason
    allowed, reason = authorize(BOB, A("list", "secrets", namespace="x"), POLICY)
    assert not allowed
    assert reason == (
        'User "bob" cannot list resource "secrets" in API group "" in the namespace "x"'
    )
    allowed, reason = authorize(
        NODE1,
        A("patch", "pods", subresource="status", namespace="default", name="theirs"),
        POLICY,
        pod_node,
    )
    assert not allowed and "bound to 'n2'" in reason
    # Without a lookup a node can never write pod status (fail closed).
    assert not authorize(
        NODE1, A("patch", "pods", subresource="status", namespace="default", name="mine"), POLICY
    ).allowed


def test_policy_updates() -> None:
    policy = RbacPolicy()
    role = {
        "kind": "ClusterRole",
        "metadata": {"name": "r"},
        "rules": [{"apiGroups": [""], "resources": ["*"], "verbs": ["get"]}],
    }
    binding = {
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "b"},
        "roleRef": {"kind": "ClusterRole", "name": "r"},
        "subjects": [{"kind": "User", "name": "bob"}],
    }
    attrs = A("get", "pods", subresource="log", namespace="x", name="p")
    assert not authorize(BOB, attrs, policy).allowed
    policy.upsert(role)
    policy.upsert(binding)
    assert authorize(BOB, attrs, policy).allowed  # "*" covers subresources too
    policy.remove(binding)
    assert not authorize(BOB, attrs, policy).allowed


@pytest.mark.parametrize(
    ("rule", "attrs", "ok"),
    [
        ({"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}, A("get", "pods"), True),
        ({"verbs": ["get"], "apiGroups": [""], "resources": ["pods/*"]},
         A("get", "pods", subresource="status"), False),  # upstream has no pods/* wildcard
        ({"verbs": ["get"], "apiGroups": [""], "resources": ["pods/status"]},
         A("get", "pods", subresource="status"), True),
        ({"verbs": ["get"], "nonResourceURLs": ["/healthz/*"]}, P("get", "/healthz/etcd"), True),
        ({"verbs": ["get"], "nonResourceURLs": ["/healthz"]}, P("get", "/healthz/etcd"), False),
        ({"verbs": ["get"], "apiGroups": [""], "resources": ["pods"]}, P("get", "/api"), False),
        ({"verbs": ["get"], "apiGroups": [""], "resources": ["pods"], "resourceNames": ["a"]},
         A("get", "pods", name="a"), True),
    ],
)  # fmt: skip
def test_rule_matching(rule: dict[str, Any], attrs: Attributes, ok: bool) -> None:
    assert rule_allows(rule, attrs) is ok
