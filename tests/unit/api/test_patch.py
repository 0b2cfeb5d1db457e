"""Strategic merge patch per merge key and directive; JSON merge patch; JSON patch."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kproxy.api import jsonpatch
from kproxy.api.errors import ApiError
from kproxy.api.patch import JSON_PATCH, MERGE, STRATEGIC, apply_patch, strategic_merge

SERVICE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "web", "namespace": "default", "annotations": {"old": "1"}},
    "spec": {
        "selector": {"app": "web"},
        "ports": [{"port": 80, "targetPort": 80, "protocol": "TCP"}],
        "type": "ClusterIP",
    },
}

# The body kubectl v1.32 sent for `kubectl apply` after changing port 80 to 8080.
KUBECTL_APPLY_BODY = {
    "metadata": {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
    "spec": {
        "$setElementOrder/ports": [{"port": 8080}],
        "ports": [{"port": 8080, "targetPort": 80}, {"$patch": "delete", "port": 80}],
    },
}


def test_kubectl_apply_body() -> None:
    before = copy.deepcopy(SERVICE)
    out = strategic_merge(SERVICE, KUBECTL_APPLY_BODY, "Service")
    assert before == SERVICE  # inputs untouched
    assert out["spec"]["ports"] == [{"port": 8080, "targetPort": 80}]
    assert out["metadata"]["annotations"] == {
        "old": "1",
        "kubectl.kubernetes.io/last-applied-configuration": "{}",
    }
    assert out["spec"]["selector"] == {"app": "web"}
    assert "$patch" not in str(out) and "$setElementOrder" not in str(out)


def test_service_ports_merge_by_port() -> None:
    out = strategic_merge(SERVICE, {"spec": {"ports": [{"port": 80, "name": "http"}]}}, "Service")
    assert out["spec"]["ports"] == [
        {"port": 80, "targetPort": 80, "protocol": "TCP", "name": "http"}
    ]
    out = strategic_merge(SERVICE, {"spec": {"ports": [{"port": 443}]}}, "Service")
    assert [p["port"] for p in out["spec"]["ports"]] == [80, 443]


POD: dict[str, Any] = {
    "metadata": {
        "name": "p",
        "finalizers": ["a", "b"],
        "ownerReferences": [{"uid": "u1", "name": "rs", "kind": "ReplicaSet"}],
    },
    "spec": {
        "containers": [
            {
                "name": "c",
                "image": "busybox",
                "ports": [{"containerPort": 80, "name": "http"}],
                "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                "volumeMounts": [{"mountPath": "/data", "name": "v"}],
            }
        ],
        "volumes": [{"name": "v", "emptyDir": {}}],
        "tolerations": [{"key": "x", "operator": "Exists"}],
        "imagePullSecrets": [{"name": "s1"}],
    },
    "status": {
        "conditions": [
            {"type": "Ready", "status": "False"},
            {"type": "PodScheduled", "status": "True"},
        ]
    },
}


def _container_patch(**fields: Any) -> dict[str, Any]:
    return {"spec": {"containers": [{"name": "c", **fields}]}}


def test_containers_and_their_lists_merge_by_key() -> None:
    out = strategic_merge(
        POD,
        _container_patch(
            image="nginx",
            env=[{"name": "B", "value": "3"}, {"name": "C", "value": "4"}],
            ports=[{"containerPort": 80, "protocol": "TCP"}],
            volumeMounts=[{"mountPath": "/data", "readOnly": True}],
        ),
        "Pod",
    )
    c = out["spec"]["containers"][0]
    assert c["image"] == "nginx"
    assert c["env"] == [
        {"name": "A", "value": "1"},
        {"name": "B", "value": "3"},
        {"name": "C", "value": "4"},
    ]
    assert c["ports"] == [{"containerPort": 80, "name": "http", "protocol": "TCP"}]
    assert c["volumeMounts"] == [{"mountPath": "/data", "name": "v", "readOnly": True}]


def test_init_containers_and_new_container_added() -> None:
    out = strategic_merge(
        POD,
        {
            "spec": {
                "containers": [{"name": "side", "image": "x"}],
                "initContainers": [{"name": "i"}],
            }
        },
        "Pod",
    )
    assert [c["name"] for c in out["spec"]["containers"]] == ["c", "side"]
    assert out["spec"]["initContainers"] == [{"name": "i"}]


def test_atomic_lists_are_replaced() -> None:
    out = strategic_merge(POD, {"spec": {"tolerations": [{"key": "y"}]}}, "Pod")
    assert out["spec"]["tolerations"] == [{"key": "y"}]
    slice_ = {"endpoints": [{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.2"]}]}
    out = strategic_merge(slice_, {"endpoints": [{"addresses": ["10.0.0.3"]}]}, "EndpointSlice")
    assert out["endpoints"] == [{"addresses": ["10.0.0.3"]}]


def test_conditions_by_type_and_secrets_by_name() -> None:
    out = strategic_merge(
        POD, {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}, "Pod"
    )
    assert out["status"]["conditions"] == [
        {"type": "Ready", "status": "True"},
        {"type": "PodScheduled", "status": "True"},
    ]
    out = strategic_merge(POD, {"spec": {"imagePullSecrets": [{"name": "s2"}]}}, "Pod")
    assert out["spec"]["imagePullSecrets"] == [{"name": "s1"}, {"name": "s2"}]


def test_owner_references_by_uid_and_finalizers_as_set() -> None:
    out = strategic_merge(
        POD,
        {
            "metadata": {
                "ownerReferences": [{"uid": "u1", "controller": True}],
                "finalizers": ["b", "c"],
            }
        },
        "Pod",
    )
    assert out["metadata"]["ownerReferences"] == [
        {"uid": "u1", "name": "rs", "kind": "ReplicaSet", "controller": True}
    ]
    assert out["metadata"]["finalizers"] == ["a", "b", "c"]


def test_delete_from_primitive_list() -> None:
    out = strategic_merge(POD, {"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"]}}, "Pod")
    assert out["metadata"]["finalizers"] == ["b"]


def test_patch_delete_in_list_and_in_map() -> None:
    out = strategic_merge(POD, _container_patch(env=[{"name": "A", "$patch": "delete"}]), "Pod")
    assert out["spec"]["containers"][0]["env"] == [{"name": "B", "value": "2"}]
    out = strategic_merge(POD, {"status": {"$patch": "delete"}}, "Pod")
    assert out["status"] == {}


def test_patch_replace_list_and_map() -> None:
    out = strategic_merge(
        POD, _container_patch(env=[{"$patch": "replace"}, {"name": "Z", "value": "9"}]), "Pod"
    )
    assert out["spec"]["containers"][0]["env"] == [{"name": "Z", "value": "9"}]
    out = strategic_merge(
        SERVICE, {"spec": {"selector": {"$patch": "replace", "tier": "db"}}}, "Service"
    )
    assert out["spec"]["selector"] == {"tier": "db"}


def test_null_deletes_and_patch_merge_is_noop_directive() -> None:
    out = strategic_merge(
        SERVICE, {"spec": {"selector": {"$patch": "merge", "app": None, "x": "y"}}}, "Service"
    )
    assert out["spec"]["selector"] == {"x": "y"}


def test_retain_keys() -> None:
    deployment = {
        "spec": {
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"},
            }
        }
    }
    out = strategic_merge(
        deployment,
        {"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}},
        "Deployment",
    )
    assert out["spec"]["strategy"] == {"type": "Recreate"}
    out = strategic_merge(
        POD,
        {
            "spec": {
                "volumes": [
                    {"name": "v", "$retainKeys": ["name", "hostPath"], "hostPath": {"path": "/x"}}
                ]
            }
        },
        "Pod",
    )
    assert out["spec"]["volumes"] == [{"name": "v", "hostPath": {"path": "/x"}}]


def test_set_element_order() -> None:
    three = {"spec": {"ports": [{"port": 1}, {"port": 2}, {"port": 3}]}}
    out = strategic_merge(
        three,
        {"spec": {"$setElementOrder/ports": [{"port": 3}, {"port": 1}, {"port": 2}]}},
        "Service",
    )
    assert [p["port"] for p in out["spec"]["ports"]] == [3, 1, 2]
    # A server-only item keeps its place relative to the ordered ones it preceded.
    out = strategic_merge(
        three, {"spec": {"$setElementOrder/ports": [{"port": 3}, {"port": 1}]}}, "Service"
    )
    assert [p["port"] for p in out["spec"]["ports"]] == [2, 3, 1]
    prims = {"metadata": {"finalizers": ["a", "b"]}}
    out = strategic_merge(
        prims,
        {"metadata": {"$setElementOrder/finalizers": ["c", "b", "a"], "finalizers": ["c"]}},
        "Pod",
    )
    assert out["metadata"]["finalizers"] == ["c", "b", "a"]


def test_new_fields_have_directives_resolved() -> None:
    out = strategic_merge({}, KUBECTL_APPLY_BODY, "Service")
    assert out["spec"] == {"ports": [{"port": 8080, "targetPort": 80}]}


@pytest.mark.parametrize(
    "patch",
    [
        [],
        {"spec": {"ports": [{"targetPort": 1}]}},  # no merge key
        {"spec": {"ports": [{"$patch": "delete"}]}},
        {"spec": {"$patch": "explode"}},
        {"spec": {"$retainKeys": "type"}},
        {"spec": {"ports": [80]}},
        {"spec": {"$setElementOrder/ports": [{"name": "x"}]}},
    ],
)
def test_smp_errors_are_bad_requests(patch: Any) -> None:
    with pytest.raises(ApiError) as info:
        strategic_merge(SERVICE, patch, "Service")
    assert info.value.code == 400


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["spec", "ports", "port", "$patch", "$retainKeys", "name", "a"]),
            children,
            max_size=3,
        )
    ),
    max_leaves=10,
)


@given(_json)
def test_random_patches_raise_only_api_errors(patch: Any) -> None:
    for media in (STRATEGIC, MERGE, JSON_PATCH):
        with contextlib.suppress(ApiError):
            apply_patch(media, SERVICE, patch, "Service")


def test_apply_patch_dispatch() -> None:
    out = apply_patch(MERGE + "; charset=utf-8", SERVICE, {"spec": {"type": "NodePort"}}, "Service")
    assert out["spec"]["type"] == "NodePort"
    with pytest.raises(ApiError) as info:
        apply_patch("application/apply-patch+yaml", SERVICE, {}, "Service")
    assert info.value.code == 415
    with pytest.raises(ApiError) as info:
        apply_patch(JSON_PATCH, SERVICE, [{"op": "replace", "path": "", "value": 1}], "Service")
    assert info.value.code == 422


# --------------------------------------------------------------- RFC 7386


@pytest.mark.parametrize(
    ("target", "patch", "result"),
    [  # RFC 7386 Appendix A
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
        ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
        ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        (["a", "b"], ["c", "d"], ["c", "d"]),
        ({"a": "b"}, ["c"], ["c"]),
        ({"a": "foo"}, None, None),
        ({"a": "foo"}, "bar", "bar"),
        ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
        ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
        ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
    ],
)
def test_merge_patch_rfc7386(target: Any, patch: Any, result: Any) -> None:
    assert jsonpatch.merge_patch(target, patch) == result


# --------------------------------------------------------------- RFC 6902


@pytest.mark.parametrize(
    ("doc", "patch", "result"),
    [  # RFC 6902 Appendix A
        (
            {"foo": "bar"},
            [{"op": "add", "path": "/baz", "value": "qux"}],
            {"foo": "bar", "baz": "qux"},
        ),
        (
            {"foo": ["bar", "baz"]},
            [{"op": "add", "path": "/foo/1", "value": "qux"}],
            {"foo": ["bar", "qux", "baz"]},
        ),
        ({"baz": "qux", "foo": "bar"}, [{"op": "remove", "path": "/baz"}], {"foo": "bar"}),
        (
            {"foo": ["bar", "qux", "baz"]},
            [{"op": "remove", "path": "/foo/1"}],
            {"foo": ["bar", "baz"]},
        ),
        (
            {"baz": "qux", "foo": "bar"},
            [{"op": "replace", "path": "/baz", "value": "boo"}],
            {"baz": "boo", "foo": "bar"},
        ),
        (
            {"foo": {"bar": "baz", "waldo": "fred"}, "qux": {"corge": "grault"}},
            [{"op": "move", "from": "/foo/waldo", "path": "/qux/thud"}],
            {"foo": {"bar": "baz"}, "qux": {"corge": "grault", "thud": "fred"}},
        ),
        (
            {"foo": ["all", "grass", "cows", "eat"]},
            [{"op": "move", "from": "/foo/1", "path": "/foo/3"}],
            {"foo": ["all", "cows", "eat", "grass"]},
        ),
        (
            {"baz": "qux", "foo": ["a", 2, "c"]},
            [
                {"op": "test", "path": "/baz", "value": "qux"},
                {"op": "test", "path": "/foo/1", "value": 2},
            ],
            {"baz": "qux", "foo": ["a", 2, "c"]},
        ),
        (
            {"foo": "bar"},
            [{"op": "add", "path": "/child", "value": {"grandchild": {}}}],
            {"foo": "bar", "child": {"grandchild": {}}},
        ),
        (
            {"foo": ["bar"]},
            [{"op": "add", "path": "/foo/-", "value": ["abc", "def"]}],
            {"foo": ["bar", ["abc", "def"]]},
        ),
        ({"/": 9, "~1": 10}, [{"op": "test", "path": "/~01", "value": 10}], {"/": 9, "~1": 10}),
        ({"foo": 1}, [{"op": "copy", "from": "/foo", "path": "/bar"}], {"foo": 1, "bar": 1}),
        ({"foo": 1}, [{"op": "add", "path": "", "value": [1]}], [1]),
        ({"a": {"b": 1}}, [{"op": "test", "path": "/a", "value": {"b": 1.0}}], {"a": {"b": 1}}),
    ],
)
def test_json_patch_rfc6902(doc: Any, patch: Any, result: Any) -> None:
    before = copy.deepcopy(doc)
    assert jsonpatch.apply(doc, patch) == result
    assert doc == before


@pytest.mark.parametrize(
    ("doc", "patch", "code"),
    [
        ({"baz": "qux"}, [{"op": "test", "path": "/baz", "value": "bar"}], 422),
        ({"foo": "bar"}, [{"op": "add", "path": "/baz/bat", "value": "qux"}], 422),
        ({"q": {"bar": 2}}, [{"op": "test", "path": "/q/bar", "value": True}], 422),
        ({"foo": [1]}, [{"op": "add", "path": "/foo/01", "value": 2}], 422),
        ({"foo": [1]}, [{"op": "add", "path": "/foo/5", "value": 2}], 422),
        ({"foo": [1]}, [{"op": "remove", "path": "/foo/1"}], 422),
        ({"foo": 1}, [{"op": "replace", "path": "/bar", "value": 2}], 422),
        ({"a": {"b": 1}}, [{"op": "move", "from": "/a", "path": "/a/b/c"}], 422),
        ({"foo": 1}, [{"op": "frob", "path": "/foo"}], 422),
        ({"foo": 1}, [{"op": "add", "path": "/bar"}], 400),
        ({"foo": 1}, [{"path": "/bar"}], 400),
        ({"foo": 1}, {"op": "add"}, 400),
        ({"foo": 1}, [{"op": "add", "path": "bar", "value": 1}], 422),
        ({"foo": 1}, [{"op": "test", "path": "/~2", "value": 1}], 422),
    ],
)
def test_json_patch_errors(doc: Any, patch: Any, code: int) -> None:
    with pytest.raises(ApiError) as info:
        jsonpatch.apply(doc, patch)
    assert info.value.code == code


def test_kubectl_scale_merge_patch() -> None:
    scale = {"kind": "Scale", "spec": {"replicas": 1}, "status": {"replicas": 1}}
    out = apply_patch(MERGE, scale, {"spec": {"replicas": 3}}, "Scale")
    assert out["spec"]["replicas"] == 3
