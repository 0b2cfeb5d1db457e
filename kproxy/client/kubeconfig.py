"""Kubeconfig loading: from a file (or ``--master``) to a server URL, TLS context and headers.

Owns :class:`ClientConfig` and :func:`load_kubeconfig`. Supported, as client-go reads
them: ``current-context`` (or an explicit context), the context's namespace, a cluster's
``server``, ``certificate-authority``/``-data``, ``insecure-skip-tls-verify`` and
``tls-server-name``; a user's ``token``/``tokenFile``, ``client-certificate``/``-data``
with ``client-key``/``-data``, and ``username``/``password``. Relative paths resolve
against the kubeconfig's own directory. ``--master`` overrides the cluster's server
(client-go's ``BuildConfigFromFlags``); with no kubeconfig at all it yields a bare
config for that URL. ``exec`` and ``auth-provider`` users are refused with a clear error
rather than silently sending no credentials. ``$KUBECONFIG`` lists are not merged: the
first existing file is used.

Invariant: key material given as ``-data`` only touches the disk inside a private
temporary directory (0700) for the one ``load_cert_chain`` call that needs a path.
"""

from __future__ import annotations

import base64
import binascii
import os
import ssl
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from kproxy.errors import KProxyError

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeconfigError(KProxyError):
    """A kubeconfig that cannot be used."""


@dataclass
class ClientConfig:
    """Everything a REST client needs to reach one apiserver as one user."""

    server: str
    ssl_context: ssl.SSLContext | None = None  # None: plain http
    headers: dict[str, str] = field(default_factory=dict)
    namespace: str = "default"
    tls_server_name: str | None = None
    token_file: Path | None = None  # re-read on every request (rotated SA tokens)
    context: str = ""

    def auth_headers(self) -> dict[str, str]:
        """Headers to send now: static ones, plus a fresh token from ``token_file``."""
        if self.token_file is None:
            return dict(self.headers)
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise KubeconfigError(f"cannot read token file {self.token_file}: {exc}") from exc
        return {**self.headers, "Authorization": f"Bearer {token}"}


def default_kubeconfig_path() -> Path | None:
    env = os.environ.get("KUBECONFIG")
    if env:
        for part in env.split(os.pathsep):
            if part and Path(part).expanduser().exists():
                return Path(part).expanduser()
        return None
    home = Path.home() / ".kube" / "config"
    return home if home.exists() else None


def _named(doc: Mapping[str, Any], section: str, name: str, inner: str) -> Mapping[str, Any]:
    for entry in doc.get(section) or ():
        if isinstance(entry, Mapping) and entry.get("name") == name:
            value = entry.get(inner) or {}
            if not isinstance(value, Mapping):
                raise KubeconfigError(f"{section} {name!r}: {inner} is not a mapping")
            return value
    raise KubeconfigError(f"no {section[:-1]} named {name!r}")


def _b64(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=False)
    except (binascii.Error, ValueError) as exc:
        raise KubeconfigError(f"{what}: not valid base64: {exc}") from exc


def _material(
    entry: Mapping[str, Any], key: str, base: Path, what: str
) -> tuple[bytes | None, Path | None]:
    """``key-data`` (decoded) or the file named by ``key``, resolved against ``base``."""
    data = entry.get(f"{key}-data")
    if data:
        return _b64(data, f"{what} {key}-data"), None
    path = entry.get(key)
    if path:
        p = Path(str(path)).expanduser()
        return None, p if p.is_absolute() else base / p
    return None, None


def _load_client_cert(
    ctx: ssl.SSLContext,
    cert: tuple[bytes | None, Path | None],
    key: tuple[bytes | None, Path | None],
) -> None:
    cert_data, cert_path = cert
    key_data, key_path = key
    try:
        if cert_path is not None and key_path is not None:
            ctx.load_cert_chain(cert_path, key_path)
            return
        with tempfile.TemporaryDirectory(prefix="kproxy-kc-") as tmp:
            os.chmod(tmp, 0o700)
            if cert_path is None:
                cert_path = Path(tmp) / "client.crt"
                cert_path.write_bytes(cert_data or b"")
            if key_path is None:
                key_path = Path(tmp) / "client.key"
                fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(key_data or b"")
            ctx.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise KubeconfigError(f"cannot load client certificate/key: {exc}") from exc


def build_ssl_context(
    *,
    ca: tuple[bytes | None, Path | None] = (None, None),
    insecure: bool = False,
    client_cert: tuple[bytes | None, Path | None] = (None, None),
    client_key: tuple[bytes | None, Path | None] = (None, None),
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ca_data, ca_path = ca
        try:
            if ca_data is not None:
                ctx.load_verify_locations(cadata=ca_data.decode())
            elif ca_path is not None:
                ctx.load_verify_locations(cafile=str(ca_path))
        except (OSError, ssl.SSLError, UnicodeDecodeError) as exc:
            raise KubeconfigError(f"cannot load certificate authority: {exc}") from exc
    if client_cert != (None, None) or client_key != (None, None):
        if client_cert == (None, None) or client_key == (None, None):
            raise KubeconfigError("client-certificate and client-key must be given together")
        _load_client_cert(ctx, client_cert, client_key)
    return ctx


def config_from_dict(
    doc: Mapping[str, Any],
    *,
    base_dir: Path | None = None,
    context: str | None = None,
    master: str | None = None,
    origin: str = "<kubeconfig>",
) -> ClientConfig:
    """A :class:`ClientConfig` from a parsed kubeconfig document."""
    base = base_dir or Path.cwd()
    ctx_name = context or doc.get("current-context") or ""
    if not ctx_name:
        raise KubeconfigError(f"{origin}: no current-context and no context given")
    try:
        ctx = _named(doc, "contexts", str(ctx_name), "context")
        cluster_name = str(ctx.get("cluster") or "")
        cluster = _named(doc, "clusters", cluster_name, "cluster")
        user_name = ctx.get("user")
        user = _named(doc, "users", str(user_name), "user") if user_name else {}
    except KubeconfigError as exc:
        raise KubeconfigError(f"{origin}: context {ctx_name!r}: {exc}") from exc

    server = master or str(cluster.get("server") or "")
    if not server:
        raise KubeconfigError(f"{origin}: cluster {cluster_name!r} has no server")
    for unsupported in ("exec", "auth-provider"):
        if user.get(unsupported):
            raise KubeconfigError(
                f"{origin}: user {user_name!r} uses {unsupported!r} credentials, which kproxy "
                "does not support; use a token or a client certificate"
            )

    headers: dict[str, str] = {}
    token_file: Path | None = None
    if user.get("token"):
        headers["Authorization"] = f"Bearer {str(user['token']).strip()}"
    elif user.get("tokenFile"):
        p = Path(str(user["tokenFile"])).expanduser()
        token_file = p if p.is_absolute() else base / p
    elif user.get("username"):
        basic = f"{user['username']}:{user.get('password') or ''}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(basic).decode()

    ssl_ctx: ssl.SSLContext | None = None
    if urlsplit(server).scheme == "https":
        ssl_ctx = build_ssl_context(
            ca=_material(cluster, "certificate-authority", base, "cluster"),
            insecure=bool(cluster.get("insecure-skip-tls-verify")),
            client_cert=_material(user, "client-certificate", base, "user"),
            client_key=_material(user, "client-key", base, "user"),
        )
    elif urlsplit(server).scheme != "http":
        raise KubeconfigError(f"{origin}: server {server!r} is not an http(s) URL")
    return ClientConfig(
        server=server.rstrip("/"),
        ssl_context=ssl_ctx,
        headers=headers,
        namespace=str(ctx.get("namespace") or "default"),
        tls_server_name=cluster.get("tls-server-name") or None,
        token_file=token_file,
        context=str(ctx_name),
    )


def load_kubeconfig(
    path: Path | str | None = None,
    *,
    context: str | None = None,
    master: str | None = None,
) -> ClientConfig:
    """Load ``path`` (default ``$KUBECONFIG`` or ``~/.kube/config``), ``master`` overriding.

    With neither a kubeconfig nor ``master``, fall back to the in-cluster service account.
    """
    p = Path(path).expanduser() if path else default_kubeconfig_path()
    if p is None:
        if master:
            return _bare(master)
        return in_cluster_config()
    try:
        doc = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise KubeconfigError(f"{p}: cannot read kubeconfig: {exc}") from exc
    if not isinstance(doc, Mapping):
        raise KubeconfigError(f"{p}: not a kubeconfig (expected a mapping)")
    return config_from_dict(
        doc, base_dir=p.parent.resolve(), context=context, master=master, origin=str(p)
    )


def _bare(master: str) -> ClientConfig:
    scheme = urlsplit(master).scheme
    if scheme not in ("http", "https"):
        raise KubeconfigError(f"--master {master!r} is not an http(s) URL")
    ctx = ssl.create_default_context() if scheme == "https" else None
    return ClientConfig(server=master.rstrip("/"), ssl_context=ctx)


def in_cluster_config(sa_dir: Path = SERVICE_ACCOUNT_DIR) -> ClientConfig:
    """client-go's ``InClusterConfig``: the service env vars and the mounted SA token."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT")
    token = sa_dir / "token"
    if not host or not port or not token.exists():
        raise KubeconfigError(
            "no kubeconfig found (--kubeconfig, $KUBECONFIG, ~/.kube/config), no --master, "
            "and not running in a cluster"
        )
    if ":" in host:
        host = f"[{host}]"
    ns_file = sa_dir / "namespace"
    return ClientConfig(
        server=f"https://{host}:{port}",
        ssl_context=build_ssl_context(ca=(None, sa_dir / "ca.crt")),
        namespace=ns_file.read_text().strip() if ns_file.exists() else "default",
        token_file=token,
    )
