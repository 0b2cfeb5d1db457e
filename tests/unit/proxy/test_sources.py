"""The --objects source: formats, change events, and bad input kept away."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kproxy.proxy.sources import Obj, ObjectsFile, parse_objects


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str | None, str | None]] = []
        self.synced_calls = 0

    def _name(self, obj: Obj | None) -> str | None:
        return None if obj is None else obj["metadata"]["name"]

    def on_service(self, old: Obj | None, new: Obj | None) -> None:
        self.events.append(("svc", self._name(old), self._name(new)))

    def on_endpoint_slice(self, old: Obj | None, new: Obj | None) -> None:
        self.events.append(("eps", self._name(old), self._name(new)))

    def on_node(self, old: Obj | None, new: Obj | None) -> None:
        self.events.append(("node", self._name(old), self._name(new)))

    def synced(self) -> None:
        self.synced_calls += 1


def svc(name: str, port: int = 80) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "ns1"},
        "spec": {"clusterIP": "172.30.0.41", "ports": [{"port": port, "protocol": "TCP"}]},
    }


def test_multi_doc_yaml_list_and_json() -> None:
    text = (
        "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ns1}\n---\n"
        "apiVersion: v1\nkind: List\nitems:\n"
        "- {apiVersion: discovery.k8s.io/v1, kind: EndpointSlice, metadata: {name: a-1}}\n"
        "- {apiVersion: v1, kind: Node, metadata: {name: node1}}\n"
        "---\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ignored}\n"
    )
    objs = parse_objects(text)
    assert sorted(objs) == [
        ("EndpointSlice", "default", "a-1"),
        ("Node", "", "node1"),
        ("Service", "ns1", "a"),
    ]
    assert parse_objects(json.dumps({"kind": "List", "items": [svc("b")]})).keys() == {
        ("Service", "ns1", "b")
    }


def test_changes_become_events_and_bad_files_keep_state(tmp_path: Path) -> None:
    path = tmp_path / "objects.yaml"
    path.write_text(json.dumps({"kind": "List", "items": [svc("a"), svc("b")]}))
    src = ObjectsFile(path, node_name="node1")
    rec = Recorder()
    assert src.refresh(rec) == 2
    assert rec.events == [("svc", None, "a"), ("svc", None, "b")]
    assert src.refresh(rec) == 0  # unchanged content: no events

    path.write_text(json.dumps({"kind": "List", "items": [svc("a", 81)]}))
    rec.events.clear()
    src.refresh(rec)
    assert rec.events == [("svc", "a", "a"), ("svc", "b", None)]

    path.write_text("kind: [unterminated")
    rec.events.clear()
    assert src.refresh(rec) == -1 and rec.events == []

    nodes = [
        {"kind": "Node", "metadata": {"name": "node1"}},
        {"kind": "Node", "metadata": {"name": "other"}},
    ]
    path.write_text(json.dumps({"kind": "List", "items": [svc("a", 81), *nodes]}))
    src.refresh(rec)
    assert rec.events == [("node", None, "node1")]  # only our own Node


def test_documents_without_names_are_skipped() -> None:
    assert parse_objects("kind: Service\nmetadata: {}\n---\n- 1\n- 2\n") == {}
