"""Node registration objects, flag parsing and conditions (pure)."""

from __future__ import annotations

import pytest

from kproxy.errors import KProxyError
from kproxy.kubelet.node import (
    NodeConfig,
    build_node,
    machine_capacity,
    node_conditions,
    parse_labels,
    parse_taints,
)


def test_flags() -> None:
    assert parse_labels("a=b, zone=z1") == {"a": "b", "zone": "z1"}
    assert parse_taints("dedicated=infra:NoSchedule,gpu:NoExecute") == [
        {"key": "dedicated", "value": "infra", "effect": "NoSchedule"},
        {"key": "gpu", "effect": "NoExecute"},
    ]
    with pytest.raises(KProxyError):
        parse_taints("x=y:Sometimes")
    with pytest.raises(KProxyError):
        parse_labels("novalue")


def test_build_node() -> None:
    cfg = NodeConfig(name="n1", node_ip="192.0.2.7", labels={"role": "w"},
                     taints=[{"key": "k", "effect": "NoSchedule"}])  # fmt: skip
    node = build_node(cfg, node_conditions(ready=True, now="T"))
    labels = node["metadata"]["labels"]
    assert labels["kubernetes.io/hostname"] == "n1" and labels["kubernetes.io/os"] == "linux"
    assert labels["role"] == "w"
    assert node["spec"]["taints"] == [{"key": "k", "effect": "NoSchedule"}]
    st = node["status"]
    assert st["addresses"] == [{"type": "InternalIP", "address": "192.0.2.7"},
                               {"type": "Hostname", "address": "n1"}]  # fmt: skip
    assert st["capacity"]["pods"] == "110" and st["allocatable"] == st["capacity"]
    assert st["daemonEndpoints"] == {"kubeletEndpoint": {"Port": 10250}}
    assert st["nodeInfo"]["operatingSystem"] == "linux"
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True" and ready["reason"] == "KubeletReady"
    mem = next(c for c in st["conditions"] if c["type"] == "MemoryPressure")
    assert mem["status"] == "False"


def test_capacity_is_sane() -> None:
    cap = machine_capacity()
    assert int(cap["cpu"]) >= 1 and cap["memory"].endswith("Ki")


def test_condition_transitions() -> None:
    first = node_conditions(ready=False, not_ready_message="no network", now="T1")
    again = node_conditions(ready=False, previous=first, now="T2")
    ready = next(c for c in again if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "T1" and ready["lastHeartbeatTime"] == "T2"
    flipped = node_conditions(ready=True, previous=again, now="T3")
    assert next(c for c in flipped if c["type"] == "Ready")["lastTransitionTime"] == "T3"
