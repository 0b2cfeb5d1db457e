"""Reading pods: env with fieldRefs and $(VAR) expansion, grace periods, named ports."""

from __future__ import annotations

import pytest

from kproxy.kubelet.podspec import (
    PodSpecError,
    container_env,
    expand,
    grace_period,
    named_ports,
)

POD = {
    "metadata": {"name": "web-1", "namespace": "prod", "uid": "u1", "labels": {"app": "web"}},
    "spec": {"nodeName": "n1", "terminationGracePeriodSeconds": 5},
}


def test_env() -> None:
    container = {
        "env": [
            {"name": "A", "value": "x"},
            {"name": "B", "value": "$(A)-$$(A)-$(MISSING)"},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        ]
    }
    env = container_env(POD, container, pod_ip="10.0.0.2", host_ip="192.0.2.1")
    assert env["A"] == "x" and env["B"] == "x-$(A)-$(MISSING)"
    assert env["POD_NAME"] == "web-1" and env["IP"] == "10.0.0.2" and env["APP"] == "web"
    assert env["HOSTNAME"] == "web-1"


def test_unsupported_sources_are_errors() -> None:
    container = {"env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}
    with pytest.raises(PodSpecError):
        container_env(POD, container, pod_ip="", host_ip="")


def test_grace_and_ports() -> None:
    assert grace_period(POD, deleting=False) == 5
    deleting = {**POD, "metadata": {**POD["metadata"], "deletionGracePeriodSeconds": 0}}
    assert grace_period(deleting, deleting=True) == 0
    assert grace_period({"spec": {}}, deleting=False) == 30
    assert named_ports(
        {"ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 1}]}
    ) == {"http": 8080}
    assert expand("$(X)", {"X": "1"}) == "1"
