"""Defaults per kind, and validation of good and bad objects with upstream field paths."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kproxy.api import quantity
from kproxy.api.defaults import apply_defaults
from kproxy.api.errors import ApiError
from kproxy.api.validation import errors_for, validate, validate_update


def _svc(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}], **spec},
    }


def _defaulted(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    return apply_defaults(kind, copy.deepcopy(obj))


def _fields(kind: str, obj: dict[str, Any], **kw: Any) -> list[str]:
    return [e.field for e in errors_for(kind, _defaulted(kind, obj), **kw)]


# ------------------------------------------------------------------ Service


def test_service_defaults() -> None:
    svc = _defaulted("Service", _svc())
    spec = svc["spec"]
    assert spec["type"] == "ClusterIP"
    assert spec["sessionAffinity"] == "None"
    assert spec["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": 80}]
    assert spec["internalTrafficPolicy"] == "Cluster"
    assert spec["ipFamilyPolicy"] == "SingleStack"
    assert spec["ipFamilies"] == ["IPv4"]
    assert "externalTrafficPolicy" not in spec
    validate("Service", svc)
    assert apply_defaults("Service", copy.deepcopy(svc)) == svc  # idempotent


def test_service_defaults_by_type() -> None:
    spec = _defaulted("Service", _svc(type="LoadBalancer", sessionAffinity="ClientIP"))["spec"]
    assert spec["externalTrafficPolicy"] == "Cluster"
    assert spec["allocateLoadBalancerNodePorts"] is True
    assert spec["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 10800}}
    spec = _defaulted("Service", _svc(clusterIP="fd00::10"))["spec"]
    assert spec["clusterIPs"] == ["fd00::10"]
    assert spec["ipFamilies"] == ["IPv6"]
    spec = _defaulted(
        "Service", _svc(ports=[{"port": 53, "targetPort": "dns", "protocol": "UDP"}])
    )["spec"]
    assert spec["ports"][0]["targetPort"] == "dns"


@pytest.mark.parametrize(
    ("spec", "fields"),
    [
        ({"ports": [{"port": 0}]}, ["spec.ports[0].port", "spec.ports[0].targetPort"]),
        ({"ports": [{"port": 70000, "targetPort": 80}]}, ["spec.ports[0].port"]),
        ({"ports": [{"port": 80}, {"port": 81}]}, ["spec.ports[0].name", "spec.ports[1].name"]),
        (
            {"ports": [{"port": 80, "name": "a"}, {"port": 80, "name": "a"}]},
            ["spec.ports[1].name", "spec.ports[1]"],
        ),
        ({"ports": [{"port": 80, "protocol": "ICMP"}]}, ["spec.ports[0].protocol"]),
        ({"ports": [{"port": 80, "targetPort": "Not_A_Name"}]}, ["spec.ports[0].targetPort"]),
        ({"ports": []}, ["spec.ports"]),
        ({"type": "Magic"}, ["spec.type"]),
        ({"clusterIP": "10.0.0.300"}, ["spec.clusterIPs[0]"]),
        ({"clusterIP": "None", "type": "NodePort"}, ["spec.clusterIP"]),
        ({"sessionAffinity": "Sticky"}, ["spec.sessionAffinity"]),
        (
            {
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86401}},
            },
            ["spec.sessionAffinityConfig.clientIP.timeoutSeconds"],
        ),
        (
            {"sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10}}},
            ["spec.sessionAffinityConfig"],
        ),
        ({"externalTrafficPolicy": "Local"}, ["spec.externalTrafficPolicy"]),
        ({"type": "NodePort", "externalTrafficPolicy": "Nearest"}, ["spec.externalTrafficPolicy"]),
        (
            {"externalIPs": ["1.2.3.4", "nope", "127.0.0.1"]},
            ["spec.externalIPs[1]", "spec.externalIPs[2]"],
        ),
        (
            {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8", "10.0.0.1"]},
            ["spec.loadBalancerSourceRanges[1]"],
        ),
        ({"loadBalancerSourceRanges": ["10.0.0.0/8"]}, ["spec.loadBalancerSourceRanges"]),
        ({"selector": {"app": "-bad-"}}, ["spec.selector[app]"]),
        ({"ports": [{"port": 80, "nodePort": 30080}]}, ["spec.ports[0].nodePort"]),
        ({"ipFamilies": ["IPv4", "IPv6"]}, ["spec.ipFamilyPolicy"]),
        ({"ipFamilies": ["IPv5"]}, ["spec.ipFamilies[0]"]),
        (
            {"clusterIPs": ["10.0.0.1", "10.0.0.2"], "ipFamilyPolicy": "PreferDualStack"},
            ["spec.clusterIPs"],
        ),
        ({"type": "ExternalName", "ports": []}, ["spec.externalName"]),
        (
            {"type": "ExternalName", "externalName": "db.example.com", "clusterIP": "10.0.0.1"},
            ["spec.clusterIP"],
        ),
    ],
)
def test_bad_services(spec: dict[str, Any], fields: list[str]) -> None:
    assert _fields("Service", _svc(**spec)) == fields


def test_good_services() -> None:
    for spec in (
        {"clusterIP": "None", "ports": []},
        {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]},
        {
            "type": "LoadBalancer",
            "externalTrafficPolicy": "Local",
            "loadBalancerSourceRanges": ["10.0.0.1/8"],
            "healthCheckNodePort": 32000,
        },
        {"type": "ExternalName", "externalName": "db.example.com.", "ports": []},
        {
            "clusterIPs": ["10.0.0.1", "fd00::1"],
            "ipFamilyPolicy": "RequireDualStack",
        },
        {
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 86400}},
        },
        {"ports": [{"port": 80, "name": "http"}, {"port": 80, "name": "dns", "protocol": "UDP"}]},
    ):
        assert _fields("Service", _svc(**spec)) == [], spec


def test_service_name_must_be_dns1035_and_status_body() -> None:
    svc = _svc()
    svc["metadata"]["name"] = "1web"
    with pytest.raises(ApiError) as info:
        validate("Service", _defaulted("Service", svc))
    status = info.value.to_status()
    assert status["code"] == 422
    assert status["details"]["causes"][0]["field"] == "metadata.name"
    assert status["message"].startswith('Service "1web" is invalid: metadata.name: Invalid value')


def test_node_port_range_hook() -> None:
    svc = _svc(type="NodePort", ports=[{"port": 80, "nodePort": 8080}])
    assert _fields("Service", svc) == []
    assert _fields("Service", svc, node_port_range=(30000, 32767)) == ["spec.ports[0].nodePort"]


def test_service_update_cluster_ip_immutable() -> None:
    old = _defaulted("Service", _svc(clusterIP="10.0.0.1"))
    new = copy.deepcopy(old)
    new["spec"]["clusterIP"] = new["spec"]["clusterIPs"][0] = "10.0.0.2"
    with pytest.raises(ApiError) as info:
        validate_update("Service", old, new)
    assert [c["field"] for c in info.value.causes] == ["spec.clusterIP"]
    validate_update("Service", old, copy.deepcopy(old))


# ------------------------------------------------------------ EndpointSlice


def _slice(**fields: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "web-abc", "namespace": "default"},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": True}, "nodeName": "n1"}],
        "ports": [{"name": "http", "port": 8080}],
        **fields,
    }


def test_endpoint_slice_good_and_defaults() -> None:
    eps = _defaulted("EndpointSlice", _slice())
    assert eps["ports"][0]["protocol"] == "TCP"
    validate("EndpointSlice", eps)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"addressType": "IPv7"}, ["addressType"]),
        ({"endpoints": [{"addresses": ["fd00::1"]}]}, ["endpoints[0].addresses[0]"]),
        ({"endpoints": [{"addresses": []}]}, ["endpoints[0].addresses"]),
        ({"endpoints": [{"addresses": ["10.0.0.1", "10.0.0.2"]}]}, ["endpoints[0].addresses"]),
        ({"endpoints": [{"addresses": ["10.0.0.1"]}] * 1001}, ["endpoints"]),
        ({"ports": [{"name": "a", "port": 0}]}, ["ports[0].port"]),
        ({"ports": [{"name": "a"}, {"name": "a"}]}, ["ports[1].name"]),
        ({"ports": [{"name": "A_b"}]}, ["ports[0].name"]),
        (
            {"addressType": "FQDN", "endpoints": [{"addresses": ["Bad_Host"]}]},
            ["endpoints[0].addresses[0]"],
        ),
        (
            {"endpoints": [{"addresses": ["10.0.0.1"], "hostname": "a.b"}]},
            ["endpoints[0].hostname"],
        ),
    ],
)
def test_bad_endpoint_slices(fields: dict[str, Any], expected: list[str]) -> None:
    assert _fields("EndpointSlice", _slice(**fields)) == expected


def test_endpoint_slice_address_type_immutable() -> None:
    old = _defaulted("EndpointSlice", _slice())
    new = copy.deepcopy(old)
    new["addressType"] = "FQDN"
    new["endpoints"] = [{"addresses": ["a.example"]}]
    with pytest.raises(ApiError) as info:
        validate_update("EndpointSlice", old, new)
    assert [c["field"] for c in info.value.causes] == ["addressType"]


# ------------------------------------------------------------------ Pod


def _pod(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "web-0", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "nginx:1.25"}], **spec},
    }


def test_pod_defaults() -> None:
    pod = _defaulted(
        "Pod",
        _pod(
            containers=[
                {
                    "name": "c",
                    "image": "nginx",
                    "ports": [{"containerPort": 80}],
                    "readinessProbe": {"httpGet": {"port": 80}},
                    "resources": {"limits": {"cpu": "500m"}},
                }
            ]
        ),
    )
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Always"
    assert spec["terminationGracePeriodSeconds"] == 30
    assert spec["dnsPolicy"] == "ClusterFirst"
    assert spec["schedulerName"] == "default-scheduler"
    c = spec["containers"][0]
    assert c["imagePullPolicy"] == "Always"  # no tag
    assert c["ports"][0]["protocol"] == "TCP"
    assert c["readinessProbe"] == {
        "httpGet": {"port": 80, "path": "/", "scheme": "HTTP"},
        "timeoutSeconds": 1,
        "periodSeconds": 10,
        "successThreshold": 1,
        "failureThreshold": 3,
    }
    assert c["resources"]["requests"] == {"cpu": "500m"}
    validate("Pod", pod)
    assert _defaulted("Pod", _pod())["spec"]["containers"][0]["imagePullPolicy"] == "IfNotPresent"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"containers": []}, ["spec.containers"]),
        ({"containers": [{"name": "c"}]}, ["spec.containers[0].image"]),
        ({"containers": [{"image": "x"}]}, ["spec.containers[0].name"]),
        (
            {"containers": [{"name": "c", "image": "x"}, {"name": "c", "image": "y"}]},
            ["spec.containers[1].name"],
        ),
        ({"restartPolicy": "Sometimes"}, ["spec.restartPolicy"]),
        ({"dnsPolicy": "None"}, ["spec.dnsConfig"]),
        (
            {"containers": [{"name": "c", "image": "x", "ports": [{"containerPort": 0}]}]},
            ["spec.containers[0].ports[0].containerPort"],
        ),
        (
            {"containers": [{"name": "c", "image": "x", "env": [{"name": "1X"}]}]},
            ["spec.containers[0].env[0].name"],
        ),
        (
            {"containers": [{"name": "c", "image": "x", "resources": {"limits": {"cpu": "lots"}}}]},
            [
                "spec.containers[0].resources.limits[cpu]",
                "spec.containers[0].resources.requests[cpu]",
            ],
        ),
        (
            {
                "containers": [
                    {
                        "name": "c",
                        "image": "x",
                        "resources": {"limits": {"memory": "1Gi"}, "requests": {"memory": "2Gi"}},
                    }
                ]
            },
            ["spec.containers[0].resources.requests[memory]"],
        ),
        (
            {"containers": [{"name": "c", "image": "x", "livenessProbe": {"periodSeconds": 5}}]},
            ["spec.containers[0].livenessProbe"],
        ),
        (
            {
                "containers": [
                    {
                        "name": "c",
                        "image": "x",
                        "livenessProbe": {"tcpSocket": {"port": 80}, "successThreshold": 2},
                    }
                ]
            },
            ["spec.containers[0].livenessProbe.successThreshold"],
        ),
        (
            {
                "containers": [
                    {"name": "c", "image": "x", "volumeMounts": [{"name": "v", "mountPath": "/d"}]}
                ]
            },
            ["spec.containers[0].volumeMounts[0].name"],
        ),
        (
            {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]},
            ["spec.tolerations[0].operator"],
        ),
        ({"tolerations": [{"key": "k", "effect": "Sometimes"}]}, ["spec.tolerations[0].effect"]),
        ({"nodeName": "Node_1"}, ["spec.nodeName"]),
    ],
)
def test_bad_pods(spec: dict[str, Any], expected: list[str]) -> None:
    assert _fields("Pod", _pod(**spec)) == expected


def test_pod_update_only_image_and_binding() -> None:
    old = _defaulted("Pod", _pod())
    new = copy.deepcopy(old)
    new["spec"]["containers"][0]["image"] = "nginx:1.26"
    new["spec"]["nodeName"] = "n1"
    validate_update("Pod", old, new)
    new["spec"]["restartPolicy"] = "Never"
    with pytest.raises(ApiError):
        validate_update("Pod", old, new)


# ------------------------------------------------------------------ others


def _deploy(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "nginx:1"}]},
            },
            **spec,
        },
    }


def test_deployment_defaults_and_validation() -> None:
    d = _defaulted("Deployment", _deploy())
    assert d["spec"]["replicas"] == 1
    assert d["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"},
    }
    assert d["spec"]["revisionHistoryLimit"] == 10
    assert d["spec"]["progressDeadlineSeconds"] == 600
    assert d["spec"]["template"]["spec"]["restartPolicy"] == "Always"
    validate("Deployment", d)
    rs = _defaulted("ReplicaSet", _deploy())
    assert rs["spec"]["replicas"] == 1 and "strategy" not in rs["spec"]
    validate("ReplicaSet", rs)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"replicas": -1}, ["spec.replicas"]),
        ({"selector": None}, ["spec.selector"]),
        ({"selector": {}}, ["spec.selector"]),
        ({"selector": {"matchLabels": {"app": "db"}}}, ["spec.template.metadata.labels"]),
        ({"strategy": {"type": "Recreate", "rollingUpdate": {}}}, ["spec.strategy.rollingUpdate"]),
        (
            {
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"},
                }
            },
            ["spec.strategy.rollingUpdate.maxUnavailable"],
        ),
        (
            {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "150%"}}},
            ["spec.strategy.rollingUpdate.maxSurge"],
        ),
        ({"progressDeadlineSeconds": 5, "minReadySeconds": 10}, ["spec.progressDeadlineSeconds"]),
    ],
)
def test_bad_deployments(spec: dict[str, Any], expected: list[str]) -> None:
    deploy = _deploy(**spec)
    if spec.get("selector", 1) is None:
        del deploy["spec"]["selector"]
    assert _fields("Deployment", deploy) == expected


def test_workload_selector_immutable() -> None:
    old = _defaulted("ReplicaSet", _deploy())
    new = copy.deepcopy(old)
    new["spec"]["selector"] = {"matchLabels": {"app": "web", "v": "2"}}
    new["spec"]["template"]["metadata"]["labels"]["v"] = "2"
    with pytest.raises(ApiError) as info:
        validate_update("ReplicaSet", old, new)
    assert [c["field"] for c in info.value.causes] == ["spec.selector"]


def test_namespace_node_and_cluster_scope() -> None:
    ns = _defaulted("Namespace", {"metadata": {"name": "team-a"}})
    assert ns["metadata"]["labels"] == {"kubernetes.io/metadata.name": "team-a"}
    validate("Namespace", ns)
    assert _fields("Namespace", {"metadata": {"name": "team.a"}}) == ["metadata.name"]
    assert _fields("Node", {"metadata": {"name": "n1", "namespace": "x"}}) == ["metadata.namespace"]
    node = {
        "metadata": {"name": "n1"},
        "spec": {
            "podCIDRs": ["10.244.1.0/24", "nope"],
            "taints": [{"key": "k", "effect": "Bad"}],
        },
        "status": {"capacity": {"cpu": "4", "memory": "8Gi"}, "addresses": [{"type": "Wifi"}]},
    }
    assert _fields("Node", node) == [
        "spec.podCIDRs[1]",
        "spec.taints[0].effect",
        "status.addresses[0].type",
    ]
    assert _defaulted("Node", node)["status"]["allocatable"] == {"cpu": "4", "memory": "8Gi"}


def test_endpoints_event_configmap_lease() -> None:
    ep = {
        "metadata": {"name": "web", "namespace": "default"},
        "subsets": [{"addresses": [{"ip": "10.0.0.1"}, {"ip": "x"}], "ports": [{"port": 80}]}],
    }
    assert _fields("Endpoints", ep) == ["subsets[0].addresses[1].ip"]
    event = {
        "metadata": {"name": "e.1", "namespace": "default"},
        "involvedObject": {"kind": "Pod", "name": "p", "namespace": "other"},
        "type": "Loud",
    }
    assert _fields("Event", event) == ["involvedObject.namespace", "type"]
    cm = {
        "metadata": {"name": "c", "namespace": "default"},
        "data": {"ok.key": "v", "bad key": "v"},
    }
    assert _fields("ConfigMap", cm) == ["data"]
    lease = {
        "metadata": {"name": "n1", "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": "n1", "leaseDurationSeconds": 0},
    }
    assert _fields("Lease", lease) == ["spec.leaseDurationSeconds"]
    assert _fields(
        "Scale", {"metadata": {"name": "w", "namespace": "d"}, "spec": {"replicas": -2}}
    ) == ["spec.replicas"]


def test_metadata_rules() -> None:
    pod = _pod()
    pod["metadata"] = {"generateName": "web-", "namespace": "default", "labels": {"a/b/c": "x"}}
    assert _fields("Pod", pod) == ["metadata.labels"]
    pod["metadata"] = {"namespace": "default"}
    assert _fields("Pod", pod) == ["metadata.name"]
    pod["metadata"] = {"name": "p"}
    assert _fields("Pod", pod) == ["metadata.namespace"]


# ---------------------------------------------------------------- quantity


@pytest.mark.parametrize(
    ("text", "milli"),
    [("100m", 100), ("1", 1000), ("2", 2000), ("1e3", 1_000_000), ("0.5", 500), ("1Ki", 1_024_000)],
)
def test_quantities(text: str, milli: int) -> None:
    assert quantity.milli_value(text) == milli


def test_quantity_values() -> None:
    assert quantity.parse_quantity("1Gi") == 2**30
    assert quantity.value("100m") == 1  # rounds up
    assert quantity.parse_quantity("1.5M") == 1_500_000
    for bad in ("", "1x", "Gi", "1.2.3", "1 Gi", True, None):
        assert not quantity.is_quantity(bad)


_any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=4),
    lambda c: (
        st.lists(c, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                ["metadata", "spec", "name", "ports", "port", "containers", "selector", "type", "x"]
            ),
            c,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@given(
    st.sampled_from(
        [
            "Service",
            "Pod",
            "EndpointSlice",
            "Endpoints",
            "Node",
            "Namespace",
            "Event",
            "ConfigMap",
            "Deployment",
            "ReplicaSet",
            "Lease",
        ]
    ),
    _any_json,
)
def test_defaults_and_validation_are_total(kind: str, obj: Any) -> None:
    if isinstance(obj, dict):
        apply_defaults(kind, obj)
    try:
        validate(kind, obj)
    except ApiError as err:
        assert err.code == 422
