"""Label and field selectors: upstream's grammar, errors, printing and matching."""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from kproxy.api import fieldselectors, selectors
from kproxy.api.errors import ApiError

KUBE_PROXY = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"


def test_kube_proxy_selector() -> None:
    sel = selectors.parse(KUBE_PROXY)
    assert sel.matches({"app": "web"})
    assert sel.matches(None)
    assert not sel.matches({"service.kubernetes.io/headless": ""})
    assert not sel.matches({"service.kubernetes.io/service-proxy-name": "other"})
    assert str(sel) == "!service.kubernetes.io/headless,!service.kubernetes.io/service-proxy-name"


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        ("", {"a": "b"}, True),
        ("a=b", {"a": "b"}, True),
        ("a==b", {"a": "b"}, True),
        ("a=b", {"a": "c"}, False),
        ("a!=b", {}, True),
        ("a!=b", {"a": "b"}, False),
        ("a in (b, c)", {"a": "c"}, True),
        ("a in (b,c)", {}, False),
        ("a notin (b,c)", {}, True),
        ("a notin (b,c)", {"a": "b"}, False),
        ("a", {"a": ""}, True),
        ("!a", {"a": ""}, False),
        ("a=", {"a": ""}, True),
        ("x>1", {"x": "2"}, True),
        ("x<1", {"x": "2"}, False),
        ("x>1", {"x": "z"}, False),
        (" a = b , c ", {"a": "b", "c": "1"}, True),
        ("kubernetes.io/service-name=web", {"kubernetes.io/service-name": "web"}, True),
        ("a in (in,notin)", {"a": "notin"}, True),
        ("a in (,b)", {"a": ""}, True),
    ],
)
def test_matching(text: str, labels: dict[str, str], expected: bool) -> None:
    assert selectors.parse(text).matches(labels) is expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a in ()", "values set can't be empty"),
        ("a in (b", "expected: ',' or ')'"),
        ("a in b", "expected: '('"),
        ("a b", "expected: in, notin"),
        ("=a", "expected: !, identifier"),
        ("a=b,", "identifier after ','"),
        ("a=b c", "expected: ',' or 'end of string'"),
        ("!a=b", "expected: ',' or 'end of string'"),
        ("a=(b)", "expected: identifier"),
        ("x>a", "must be an integer"),
        ("-a=b", "name part must consist"),
        ("a=-b", "a valid label must be"),
        ("a in (,,)", "expected: ',', or identifier"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ApiError) as info:
        selectors.parse(text)
    assert info.value.code == 400
    assert message in info.value.message


def test_printing_sorts_keys_and_values() -> None:
    sel = selectors.parse("z in (b,a,a), a notin (y,x),m")
    assert str(sel) == "a notin (x,y),m,z in (a,b)"


_key = st.from_regex(
    r"[a-z]([a-z0-9.-]{0,8}[a-z0-9])?(/[a-zA-Z0-9]([a-zA-Z0-9_.-]{0,8}[a-zA-Z0-9])?)?",
    fullmatch=True,
).filter(
    lambda k: (
        ".." not in k.split("/")[0] and ".-" not in k.split("/")[0] and "-." not in k.split("/")[0]
    )
)
_value = st.from_regex(r"([a-zA-Z0-9]([a-zA-Z0-9_.-]{0,8}[a-zA-Z0-9])?)?", fullmatch=True)
_req = st.one_of(
    st.builds(lambda k: k, _key),
    st.builds(lambda k: "!" + k, _key),
    st.builds(lambda k, v: f"{k}={v}", _key, _value),
    st.builds(lambda k, v: f"{k}!={v}", _key, _value),
    st.builds(
        lambda k, vs: f"{k} in ({','.join(vs)})", _key, st.lists(_value, min_size=1, max_size=3)
    ),
    st.builds(
        lambda k, vs: f"{k} notin ({','.join(vs)})", _key, st.lists(_value, min_size=1, max_size=3)
    ),
)


@given(st.lists(_req, max_size=4))
def test_round_trip(reqs: list[str]) -> None:
    try:
        sel = selectors.parse(",".join(reqs))
    except ApiError:
        assume(False)  # e.g. "a in (,,)", which upstream rejects too
        raise
    assert selectors.parse(str(sel)) == sel


@given(st.text(alphabet="ab=!(),<> in", max_size=20))
def test_garbage_raises_only_api_errors(text: str) -> None:
    try:
        selectors.parse(text)
    except ApiError as err:
        assert err.code == 400


def test_label_selector_objects() -> None:
    sel = selectors.from_label_selector(
        {
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["a", "b"]},
                {"key": "canary", "operator": "DoesNotExist"},
            ],
        }
    )
    assert sel.matches({"app": "web", "tier": "a"})
    assert not sel.matches({"app": "web", "tier": "a", "canary": "1"})
    assert selectors.from_label_selector({}).matches({"x": "y"})
    assert not selectors.from_label_selector(None).matches({})
    assert selectors.from_set({"app": "web"}).matches_object(
        {"metadata": {"labels": {"app": "web", "x": "y"}}}
    )
    assert selectors.from_set({}).empty


def test_label_selector_validation() -> None:
    errs = selectors.validate_label_selector(
        {
            "matchLabels": {"-bad": "ok"},
            "matchExpressions": [
                {"key": "a", "operator": "In"},
                {"key": "b", "operator": "Exists", "values": ["x"]},
                {"key": "c", "operator": "Near", "values": ["x"]},
            ],
        },
        "spec.selector",
    )
    fields = [e.field for e in errs]
    assert fields == [
        "spec.selector.matchLabels",
        "spec.selector.matchExpressions[0].values",
        "spec.selector.matchExpressions[1].values",
        "spec.selector.matchExpressions[2].operator",
    ]


# ------------------------------------------------------------------ fields

POD = {
    "metadata": {"name": "web", "namespace": "default"},
    "spec": {"nodeName": "n1", "hostNetwork": False},
    "status": {"phase": "Running"},
}


def test_describe_node_selector() -> None:
    sel = fieldselectors.parse_for(
        "Pod", True, "spec.nodeName=n1,status.phase!=Succeeded,status.phase!=Failed"
    )
    assert sel.matches_object("Pod", POD)
    assert not sel.matches_object("Pod", {**POD, "status": {"phase": "Failed"}})
    assert sel.value_for("spec.nodeName") == "n1"
    assert fieldselectors.parse("spec.hostNetwork=false").matches_object("Pod", POD)


def test_event_involved_object() -> None:
    event = {
        "metadata": {"name": "e", "namespace": "default"},
        "involvedObject": {"kind": "Service", "name": "web", "namespace": "default", "uid": "u1"},
    }
    text = (
        "involvedObject.uid=u1,involvedObject.name=web,"
        "involvedObject.namespace=default,involvedObject.kind=Service"
    )
    assert fieldselectors.parse_for("Event", True, text).matches_object("Event", event)
    assert not fieldselectors.parse("involvedObject.uid=u2").matches_object("Event", event)


def test_metadata_name_and_escapes() -> None:
    assert fieldselectors.parse("metadata.name==web").matches_object("Pod", POD)
    sel = fieldselectors.parse(r"metadata.name=a\,b")
    assert sel.requirements[0].value == "a,b"
    assert fieldselectors.parse(str(sel)) == sel
    assert fieldselectors.parse("").empty


@pytest.mark.parametrize(
    ("kind", "namespaced", "text", "message"),
    [
        ("Pod", True, "spec.foo=x", "field label not supported: spec.foo"),
        ("Node", False, "metadata.namespace=x", "field label not supported"),
        ("Pod", True, "metadata.name", "can't understand"),
        ("Pod", True, r"metadata.name=a\q", "invalid escape"),
        ("Pod", True, "metadata.name=a=b", "unescaped"),
    ],
)
def test_field_selector_errors(kind: str, namespaced: bool, text: str, message: str) -> None:
    with pytest.raises(ApiError) as info:
        fieldselectors.parse_for(kind, namespaced, text)
    assert info.value.code == 400
    assert message in info.value.message
