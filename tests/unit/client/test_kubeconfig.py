"""The kubeconfig loader: contexts, paths relative to the file, credentials, --master."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml

from kproxy.apiserver import certs
from kproxy.client.kubeconfig import (
    KubeconfigError,
    config_from_dict,
    in_cluster_config,
    load_kubeconfig,
)


def _doc(cluster: dict[str, Any], user: dict[str, Any], **ctx: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "c1",
        "clusters": [{"name": "k", "cluster": cluster}],
        "users": [{"name": "u", "user": user}],
        "contexts": [
            {"name": "c1", "context": {"cluster": "k", "user": "u", **ctx}},
            {"name": "c2", "context": {"cluster": "k", "user": "u", "namespace": "other"}},
        ],
    }


@pytest.fixture
def pki(tmp_path: Path) -> certs.Pki:
    return certs.ensure_pki(tmp_path / "data")


def test_files_relative_to_the_kubeconfig(pki: certs.Pki, tmp_path: Path) -> None:
    kdir = tmp_path / "kc"
    kdir.mkdir()
    (kdir / "ca.crt").write_bytes(pki.ca_cert.read_bytes())
    (kdir / "me.crt").write_bytes(pki.admin_cert.read_bytes())
    (kdir / "me.key").write_bytes(pki.admin_key.read_bytes())
    doc = _doc(
        {"server": "https://127.0.0.1:6443/", "certificate-authority": "ca.crt"},
        {"client-certificate": "me.crt", "client-key": "me.key"},
        namespace="team",
    )
    path = kdir / "config"
    path.write_text(yaml.safe_dump(doc))
    cfg = load_kubeconfig(path)
    assert cfg.server == "https://127.0.0.1:6443"
    assert cfg.namespace == "team"
    assert cfg.context == "c1"
    assert cfg.ssl_context is not None and cfg.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert load_kubeconfig(path, context="c2").namespace == "other"
    over = load_kubeconfig(path, master="https://10.0.0.1:443")
    assert over.server == "https://10.0.0.1:443"


def test_token_file_is_reread(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("first\n")
    doc = _doc({"server": "http://127.0.0.1:8080"}, {"tokenFile": "token"})
    cfg = config_from_dict(doc, base_dir=tmp_path)
    assert cfg.ssl_context is None
    assert cfg.auth_headers() == {"Authorization": "Bearer first"}
    (tmp_path / "token").write_text("second")
    assert cfg.auth_headers() == {"Authorization": "Bearer second"}


def test_token_basic_and_insecure() -> None:
    cfg = config_from_dict(
        _doc({"server": "https://h:1", "insecure-skip-tls-verify": True}, {"token": "t0k"})
    )
    assert cfg.headers == {"Authorization": "Bearer t0k"}
    assert cfg.ssl_context is not None
    assert cfg.ssl_context.verify_mode == ssl.CERT_NONE
    assert not cfg.ssl_context.check_hostname
    basic = config_from_dict(_doc({"server": "http://h:1"}, {"username": "a", "password": "b"}))
    assert basic.headers == {"Authorization": "Basic " + base64.b64encode(b"a:b").decode()}


def test_tls_server_name(pki: certs.Pki) -> None:
    ca = base64.b64encode(pki.ca_cert.read_bytes()).decode()
    cfg = config_from_dict(
        _doc({"server": "https://10.1.1.1", "certificate-authority-data": ca,
              "tls-server-name": "kubernetes"}, {"token": "x"})
    )  # fmt: skip
    assert cfg.tls_server_name == "kubernetes"


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"clusters": [], "contexts": [], "users": []}, "no current-context"),
        (_doc({"server": "https://h"}, {}) | {"current-context": "nope"}, "no context named"),
        (_doc({}, {}), "has no server"),
        (_doc({"server": "ftp://h"}, {}), "not an http"),
        (_doc({"server": "https://h"}, {"exec": {"command": "aws"}}), "'exec'"),
        (_doc({"server": "https://h"}, {"client-certificate-data": "QQ=="}), "together"),
        (_doc({"server": "https://h", "certificate-authority-data": "QQ=="}, {}), "authority"),
    ],
)
def test_errors(doc: dict[str, Any], match: str) -> None:
    with pytest.raises(KubeconfigError, match=match):
        config_from_dict(doc)


def test_master_without_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    cfg = load_kubeconfig(master="http://127.0.0.1:8080")
    assert cfg.server == "http://127.0.0.1:8080" and cfg.ssl_context is None
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeconfigError, match="no kubeconfig"):
        load_kubeconfig()


def test_kubeconfig_env_first_existing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "real"
    path.write_text(yaml.safe_dump(_doc({"server": "http://h:1"}, {})))
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing'}:{path}")
    assert load_kubeconfig().server == "http://h:1"


def test_in_cluster(pki: certs.Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("sa-token")
    (sa / "namespace").write_text("kube-system")
    (sa / "ca.crt").write_bytes(pki.ca_cert.read_bytes())
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    cfg = in_cluster_config(sa)
    assert cfg.server == "https://[fd00::1]:443"
    assert cfg.namespace == "kube-system"
    assert cfg.auth_headers()["Authorization"] == "Bearer sa-token"
