"""Status bodies as kube-apiserver writes them, and the kind registry."""

from __future__ import annotations

import json

import pytest

from kproxy.api import kinds
from kproxy.api.errors import ApiError, FieldError
from kproxy.errors import KProxyError


def test_not_found_status_shape() -> None:
    err = ApiError.not_found("pods", "web")
    assert isinstance(err, KProxyError)
    status = err.to_status()
    assert status == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'pods "web" not found',
        "reason": "NotFound",
        "details": {"name": "web", "kind": "pods"},
        "code": 404,
    }
    # Upstream's key order, so the wire bytes look the same.
    assert list(status) == [
        "kind",
        "apiVersion",
        "metadata",
        "status",
        "message",
        "reason",
        "details",
        "code",
    ]


def test_grouped_resource_messages() -> None:
    assert ApiError.not_found("deployments", "w", "apps").message == (
        'deployments.apps "w" not found'
    )
    err = ApiError.already_exists("deployments", "w", "apps")
    assert (err.code, err.reason) == (409, "AlreadyExists")
    assert err.to_status()["details"] == {"name": "w", "group": "apps", "kind": "deployments"}


def test_conflict() -> None:
    err = ApiError.conflict("services", "web")
    assert (err.code, err.reason) == (409, "Conflict")
    assert err.message == (
        'Operation cannot be fulfilled on services "web": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )


def test_invalid_with_causes() -> None:
    causes = [
        FieldError.invalid("spec.ports[0].port", 0, "must be between 1 and 65535, inclusive"),
        FieldError.required("spec.ports[1].name"),
    ]
    status = ApiError.invalid("Service", "web", causes).to_status()
    assert status["code"] == 422
    assert status["reason"] == "Invalid"
    assert status["message"] == (
        'Service "web" is invalid: [spec.ports[0].port: Invalid value: 0: must be between 1 '
        "and 65535, inclusive, spec.ports[1].name: Required value]"
    )
    assert status["details"] == {
        "name": "web",
        "kind": "Service",
        "causes": [
            {
                "reason": "FieldValueInvalid",
                "message": "Invalid value: 0: must be between 1 and 65535, inclusive",
                "field": "spec.ports[0].port",
            },
            {
                "reason": "FieldValueRequired",
                "message": "Required value",
                "field": "spec.ports[1].name",
            },
        ],
    }


def test_single_cause_message_is_bare_and_strings_quoted() -> None:
    err = ApiError.invalid(
        "Deployment", "w", [FieldError.invalid("metadata.name", "A", "bad")], "apps"
    )
    assert err.message == 'Deployment.apps "w" is invalid: metadata.name: Invalid value: "A": bad'
    assert err.to_status()["details"]["group"] == "apps"


def test_not_supported_body() -> None:
    e = FieldError.not_supported("spec.type", "Foo", ["ClusterIP", "NodePort"])
    assert e.body() == 'Unsupported value: "Foo": supported values: "ClusterIP", "NodePort"'
    assert e.cause()["reason"] == "FieldValueNotSupported"


@pytest.mark.parametrize(
    ("err", "code", "reason"),
    [
        (ApiError.bad_request("x"), 400, "BadRequest"),
        (ApiError.unauthorized(), 401, "Unauthorized"),
        (ApiError.forbidden("pods", "p", "no"), 403, "Forbidden"),
        (ApiError.method_not_allowed("pods", "watch"), 405, "MethodNotAllowed"),
        (ApiError.gone("x"), 410, "Gone"),
        (ApiError.too_old_resource_version(5, 10), 410, "Expired"),
        (ApiError.unsupported_media_type("text/plain"), 415, "UnsupportedMediaType"),
        (ApiError.unprocessable("x"), 422, "Invalid"),
        (ApiError.too_many_requests("slow down", 1), 429, "TooManyRequests"),
        (ApiError.internal("boom"), 500, "InternalError"),
    ],
)
def test_codes_and_round_trip(err: ApiError, code: int, reason: str) -> None:
    status = err.to_status()
    assert (status["code"], status["reason"]) == (code, reason)
    back = ApiError.from_status(json.loads(json.dumps(status)))
    assert back.to_status() == status


def test_bad_request_has_no_details() -> None:
    assert "details" not in ApiError.bad_request("nope").to_status()
    assert ApiError.too_old_resource_version(5, 10).message == "too old resource version: 5 (10)"
    assert ApiError.forbidden("pods", "p", "no").message == 'pods "p" is forbidden: no'


def test_registry_lookups() -> None:
    assert kinds.lookup("svc").kind == "Service"
    assert kinds.lookup("deploy").group == "apps"
    assert kinds.lookup("endpointslices").group == "discovery.k8s.io"
    assert kinds.by_resource("apps", "replicasets").kind == "ReplicaSet"
    assert kinds.for_object("coordination.k8s.io/v1", "Lease").resource == "leases"
    assert not kinds.lookup("ns").namespaced
    assert kinds.lookup("ep").list_kind == "EndpointsList"
    with pytest.raises(ApiError) as info:
        kinds.lookup("widgets")
    assert info.value.code == 404


def test_short_names_unique_and_expected() -> None:
    seen = [s for k in kinds.KINDS for s in k.short_names]
    assert len(seen) == len(set(seen))
    assert set(seen) >= {"svc", "po", "ep", "no", "ns", "ev", "cm", "deploy", "rs"}


def test_discovery_lists_subresources() -> None:
    apps = kinds.api_resource_list("apps", "v1")
    assert apps["groupVersion"] == "apps/v1"
    by_name = {r["name"]: r for r in apps["resources"]}  # type: ignore[attr-defined]
    scale = by_name["deployments/scale"]
    assert (scale["group"], scale["version"], scale["kind"]) == ("autoscaling", "v1", "Scale")
    assert "deployments/status" in by_name
    core = {r["name"]: r for r in kinds.api_resource_list("", "v1")["resources"]}  # type: ignore[attr-defined]
    assert core["pods/binding"]["verbs"] == ["create"]
    assert core["services"]["shortNames"] == ["svc"]
    assert core["namespaces"]["namespaced"] is False
    assert "deletecollection" not in core["namespaces"]["verbs"]
    assert kinds.group_versions()[0] == ("", "v1")
