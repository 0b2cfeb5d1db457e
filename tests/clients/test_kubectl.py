"""``kubectl`` (v1.32) against kproxy's apiserver (tier clients; needs kubectl).

A fresh ``--cache-dir`` per module so discovery is never stale, and the generated
admin kubeconfig. Covers apply (create, then a changed manifest → strategic merge
patch), get (Tables), describe svc/node/deployment, scale, label, a bounded
``get -w``, and delete.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.clients.server_thread import ThreadedApiServer
from tests.support.tiers import optional_command

pytestmark = pytest.mark.clients

APP = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: nginx
        ports: [{containerPort: 80}]
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
  - port: PORT
    targetPort: 80
"""
NODE = """\
apiVersion: v1
kind: Node
metadata:
  name: n1
  labels: {kubernetes.io/hostname: n1}
status:
  capacity: {cpu: "2", memory: 2Gi, pods: "110"}
  conditions:
  - {type: Ready, status: "True", reason: KubeletReady, message: ok}
  addresses:
  - {type: InternalIP, address: 192.0.2.10}
"""

Kubectl = Callable[..., str]


@pytest.fixture(scope="module")
def kubectl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kubectl]:
    optional_command("kubectl")
    base = tmp_path_factory.mktemp("kubectl")
    server = ThreadedApiServer(base / "data").start()
    cache = base / "cache"

    def run(*args: str, stdin: str | None = None, check: bool = True) -> str:
        cmd = ["kubectl", "--kubeconfig", str(server.kubeconfig), "--cache-dir", str(cache)]
        proc = subprocess.run(
            [*cmd, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.returncode}\n{proc.stderr}")
        return proc.stdout + proc.stderr

    run.server = server  # type: ignore[attr-defined]
    run.base = base  # type: ignore[attr-defined]
    try:
        yield run
    finally:
        server.stop()


def test_apply_get_describe_scale_label_delete(kubectl: Kubectl, tmp_path: Path) -> None:
    manifest = tmp_path / "app.yaml"
    manifest.write_text(APP.replace("PORT", "80"))
    out = kubectl("apply", "-f", str(manifest))
    assert "deployment.apps/web created" in out and "service/web created" in out
    manifest.write_text(APP.replace("PORT", "8080"))
    out = kubectl("apply", "-f", str(manifest))
    assert "service/web configured" in out and "deployment.apps/web unchanged" in out
    out = kubectl("get", "svc", "web", "-o", "jsonpath={.spec.ports[*].port}")
    assert out == "8080"
    out = kubectl("get", "svc,deploy", "-o", "wide")
    assert "ClusterIP" in out and "8080/TCP" in out and "app=web" in out
    kubectl("apply", "-f", "-", stdin=NODE)
    out = kubectl("get", "nodes")
    assert "n1" in out and "Ready" in out
    out = kubectl("describe", "svc", "web")
    assert "Type:" in out and "ClusterIP" in out and "8080/TCP" in out
    out = kubectl("describe", "node", "n1")
    assert "Name:" in out and "n1" in out and "192.0.2.10" in out
    out = kubectl("describe", "deployment", "web")
    assert "Replicas:" in out and "2 desired" in out
    out = kubectl("scale", "deployment/web", "--replicas=3")
    assert "scaled" in out
    assert kubectl("get", "deploy", "web", "-o", "jsonpath={.spec.replicas}") == "3"
    out = kubectl("label", "deployment", "web", "tier=frontend")
    assert "labeled" in out
    assert "tier=frontend" in kubectl("get", "deploy", "--show-labels")
    out = kubectl("get", "ns")
    assert all(ns in out for ns in ("default", "kube-system", "kube-public", "kube-node-lease"))
    out = kubectl("get", "pods", "-A")
    assert "No resources found" in out
    out = kubectl("get", "pod", "nope", check=False)
    assert 'Error from server (NotFound): pods "nope" not found' in out
    out = kubectl("delete", "-f", str(manifest))
    assert 'deployment.apps "web" deleted' in out and 'service "web" deleted' in out
    assert "NotFound" in kubectl("get", "svc", "web", check=False)


def test_get_watch_is_bounded(kubectl: Kubectl) -> None:
    server: ThreadedApiServer = kubectl.server  # type: ignore[attr-defined]
    base: Path = kubectl.base  # type: ignore[attr-defined]
    cmd = [
        "kubectl",
        "--kubeconfig",
        str(server.kubeconfig),
        "--cache-dir",
        str(base / "cache"),
        "get",
        "configmaps",
        "-w",
        "--request-timeout=20s",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.5)  # let the list + watch start
        # (not `kubectl create configmap`: its typed client sends protobuf bodies)
        kubectl(
            "apply",
            "-f",
            "-",
            stdin="apiVersion: v1\nkind: ConfigMap\nmetadata: {name: watched}\ndata: {a: b}\n",
        )
        kubectl("label", "configmap", "watched", "x=y")
        deadline = time.monotonic() + 15
        seen = ""
        assert proc.stdout is not None
        while time.monotonic() < deadline and seen.count("watched") < 2:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
        assert seen.count("watched") >= 2, seen
    finally:
        proc.kill()
        proc.wait(10)
    kubectl("delete", "configmap", "watched")
