"""The cluster's credentials: a CA, the apiserver's serving cert, client certs, tokens.

On first start :func:`ensure_pki` creates, under ``<data_dir>/pki``:

- ``ca.crt``/``ca.key`` — a self-signed EC P-256 CA. It signs both the serving
  certificate and the client certificates, so it is also the ``--client-ca-file``.
- ``apiserver.crt``/``apiserver.key`` — the serving certificate; SANs are 127.0.0.1,
  ::1, localhost, the bind address and any extra IPs/DNS names.
- ``admin.crt``/``admin.key`` — CN=kproxy-admin, O=system:masters.
- ``tokens.csv`` — a ``--token-auth-file`` holding a random admin bearer token.
- ``nodes/<name>.crt``/``.key`` (:func:`ensure_node_credentials`) — CN=system:node:<name>,
  O=system:nodes, and ``nodes/<name>.kubeconfig`` beside them.

and writes ``<data_dir>/admin.kubeconfig`` (https server URL, embedded CA, and the admin's
client cert/key or token).

Invariants: idempotent — whatever exists and is still valid is reused (the CA is never
replaced, so earlier kubeconfigs keep working); the serving cert is re-issued only if it
lacks a SAN now asked for, is not signed by the CA, or nears expiry. Private keys, tokens
and kubeconfigs (which embed keys) are written 0600, atomically (temp file + rename), so
a crash never leaves a half-written key behind.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kproxy.errors import KProxyError

ADMIN_USER = "kproxy-admin"
MASTERS_GROUP = "system:masters"
NODES_GROUP = "system:nodes"
NODE_USER_PREFIX = "system:node:"

CA_DAYS = 3650
LEAF_DAYS = 365
# Re-issue leaves this long before they expire, so a restart renews them in time.
RENEW_BEFORE = dt.timedelta(days=30)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
PrivateKey = ec.EllipticCurvePrivateKey


class CertError(KProxyError):
    """Credentials under the data dir that cannot be read or used."""


@dataclass(frozen=True, slots=True)
class Pki:
    """Where the cluster's credentials live (all paths exist after :func:`ensure_pki`)."""

    data_dir: Path
    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    token_file: Path
    admin_token: str
    admin_kubeconfig: Path
    server_url: str

    @property
    def client_ca_file(self) -> Path:
        return self.ca_cert


# ----------------------------------------------------------------------- files


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise CertError(f"{path}: cannot load private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{path}: expected an EC private key, got {type(key).__name__}")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CertError(f"{path}: cannot load certificate: {exc}") from exc


# ---------------------------------------------------------------------- issuing


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(cn: str, orgs: Sequence[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(cn: str = "kproxy-ca") -> tuple[x509.Certificate, PrivateKey]:
    key = _new_key()
    now = _now()
    name = _name(cn)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # Backdate a little: a peer whose clock is slightly behind must still accept it.
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    *,
    cn: str,
    orgs: Sequence[str] = (),
    server: bool = False,
    client: bool = False,
    ips: Iterable[IPAddress] = (),
    dns: Iterable[str] = (),
    days: int = LEAF_DAYS,
) -> tuple[x509.Certificate, PrivateKey]:
    """A leaf certificate signed by the CA, for TLS server and/or client use."""
    key = _new_key()
    now = _now()
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn, orgs))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dict.fromkeys(dns)]
    sans += [x509.IPAddress(ip) for ip in dict.fromkeys(ips)]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def cert_sans(cert: x509.Certificate) -> tuple[set[IPAddress], set[str]]:
    """The IP and DNS subject alternative names of ``cert``."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    ips = {
        ip
        for ip in ext.get_values_for_type(x509.IPAddress)
        if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
    }
    return ips, set(ext.get_values_for_type(x509.DNSName))


def _usable(
    cert_path: Path,
    key_path: Path,
    ca_cert: x509.Certificate,
    *,
    ips: Iterable[IPAddress] = (),
    dns: Iterable[str] = (),
) -> bool:
    """Whether an existing leaf can be reused as is."""
    if not (cert_path.exists() and key_path.exists()):
        return False
    try:
        cert = _load_cert(cert_path)
        key = _load_key(key_path)
        cert.verify_directly_issued_by(ca_cert)
    except (CertError, ValueError, TypeError, InvalidSignature):
        return False
    if cert.public_key() != key.public_key():
        return False
    if cert.not_valid_after_utc - RENEW_BEFORE < _now():
        return False
    have_ips, have_dns = cert_sans(cert)
    return set(ips) <= have_ips and set(dns) <= have_dns


def _ensure_leaf(
    cert_path: Path,
    key_path: Path,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    *,
    cn: str,
    orgs: Sequence[str] = (),
    server: bool = False,
    client: bool = False,
    ips: Sequence[IPAddress] = (),
    dns: Sequence[str] = (),
) -> None:
    if _usable(cert_path, key_path, ca_cert, ips=ips, dns=dns):
        return
    cert, key = issue(
        ca_cert, ca_key, cn=cn, orgs=orgs, server=server, client=client, ips=ips, dns=dns
    )
    _write_atomic(key_path, _key_pem(key), 0o600)
    _write_atomic(cert_path, _cert_pem(cert), 0o644)


# ------------------------------------------------------------------- kubeconfig


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kubeconfig_document(
    *,
    server: str,
    ca_pem: bytes,
    user: str,
    cluster: str = "kproxy",
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """A one-cluster, one-user kubeconfig with everything embedded."""
    auth: dict[str, str] = {}
    if cert_pem is not None and key_pem is not None:
        auth["client-certificate-data"] = _b64(cert_pem)
        auth["client-key-data"] = _b64(key_pem)
    if token is not None:
        auth["token"] = token
    if not auth:
        raise CertError("a kubeconfig needs a client certificate and key, or a token")
    context = f"{user}@{cluster}"
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster,
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
            }
        ],
        "users": [{"name": user, "user": auth}],
        "contexts": [{"name": context, "context": {"cluster": cluster, "user": user}}],
        "current-context": context,
        "preferences": {},
    }


def write_kubeconfig(path: Path, doc: dict[str, Any]) -> None:
    _write_atomic(path, yaml.safe_dump(doc, sort_keys=False).encode(), 0o600)


def server_url(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass
    return f"https://{host}:{port}"


# ------------------------------------------------------------------------ tokens


def _read_admin_token(path: Path) -> str | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) >= 2 and fields[1] == ADMIN_USER and fields[0]:
            return fields[0]
    return None


def _ensure_token_file(path: Path) -> str:
    token = _read_admin_token(path)
    if token is not None:
        return token
    token = secrets.token_urlsafe(32)
    # token,user,uid,"groups": the --token-auth-file format that authn reads.
    line = f'{token},{ADMIN_USER},{ADMIN_USER},"{MASTERS_GROUP}"\n'
    existing = path.read_text() if path.exists() else ""
    _write_atomic(path, (existing + line).encode(), 0o600)
    return token


# -------------------------------------------------------------------------- API


def _as_ip(value: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return None


def ensure_pki(
    data_dir: Path | str,
    *,
    bind_address: str = "127.0.0.1",
    port: int = 6443,
    extra_sans: Iterable[str] = (),
    advertise_address: str | None = None,
    admin_auth: Literal["cert", "token"] = "cert",
) -> Pki:
    """Create what is missing under ``data_dir`` and return where everything is.

    ``extra_sans`` mixes IPs and DNS names. The kubeconfig's server is
    ``advertise_address`` (default: the bind address, or 127.0.0.1 for a wildcard bind).
    """
    data_dir = Path(data_dir)
    pki = data_dir / "pki"
    pki.mkdir(parents=True, exist_ok=True)
    os.chmod(pki, 0o700)
    ca_crt, ca_key_path = pki / "ca.crt", pki / "ca.key"
    if ca_crt.exists() and ca_key_path.exists():
        ca_cert, ca_key = _load_cert(ca_crt), _load_key(ca_key_path)
        if ca_cert.public_key() != ca_key.public_key():
            raise CertError(f"{ca_crt} does not match {ca_key_path}")
    elif ca_crt.exists() or ca_key_path.exists():
        # Half a CA: regenerating would silently invalidate every issued credential.
        raise CertError(f"{pki}: only one of ca.crt/ca.key exists; restore or remove both")
    else:
        ca_cert, ca_key = make_ca()
        _write_atomic(ca_key_path, _key_pem(ca_key), 0o600)
        _write_atomic(ca_crt, _cert_pem(ca_cert), 0o644)

    ips: list[IPAddress] = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    dns: list[str] = ["localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"]
    for value in (bind_address, advertise_address or "", *extra_sans):
        if not value:
            continue
        ip = _as_ip(value)
        if ip is None:
            dns.append(value)
        elif not ip.is_unspecified:
            ips.append(ip)
    _ensure_leaf(
        pki / "apiserver.crt",
        pki / "apiserver.key",
        ca_cert,
        ca_key,
        cn="kproxy-apiserver",
        server=True,
        ips=ips,
        dns=dns,
    )
    _ensure_leaf(
        pki / "admin.crt",
        pki / "admin.key",
        ca_cert,
        ca_key,
        cn=ADMIN_USER,
        orgs=[MASTERS_GROUP],
        client=True,
    )
    token = _ensure_token_file(pki / "tokens.csv")

    host = advertise_address or bind_address
    ip = _as_ip(host)
    if ip is not None and ip.is_unspecified:
        host = "127.0.0.1" if ip.version == 4 else "::1"
    url = server_url(host, port)
    ca_pem = ca_crt.read_bytes()
    if admin_auth == "cert":
        doc = kubeconfig_document(
            server=url,
            ca_pem=ca_pem,
            user=ADMIN_USER,
            cert_pem=(pki / "admin.crt").read_bytes(),
            key_pem=(pki / "admin.key").read_bytes(),
        )
    else:
        doc = kubeconfig_document(server=url, ca_pem=ca_pem, user=ADMIN_USER, token=token)
    kubeconfig = data_dir / "admin.kubeconfig"
    write_kubeconfig(kubeconfig, doc)
    return Pki(
        data_dir=data_dir,
        ca_cert=ca_crt,
        ca_key=ca_key_path,
        serving_cert=pki / "apiserver.crt",
        serving_key=pki / "apiserver.key",
        admin_cert=pki / "admin.crt",
        admin_key=pki / "admin.key",
        token_file=pki / "tokens.csv",
        admin_token=token,
        admin_kubeconfig=kubeconfig,
        server_url=url,
    )


@dataclass(frozen=True, slots=True)
class NodeCredentials:
    cert: Path
    key: Path
    kubeconfig: Path


def ensure_node_credentials(pki: Pki, node_name: str) -> NodeCredentials:
    """A client cert for ``node_name`` (CN=system:node:<name>, O=system:nodes) + kubeconfig."""
    if not node_name or "/" in node_name or node_name.startswith("."):
        raise CertError(f"not a valid node name: {node_name!r}")
    ca_cert, ca_key = _load_cert(pki.ca_cert), _load_key(pki.ca_key)
    nodes = pki.ca_cert.parent / "nodes"
    cert, key = nodes / f"{node_name}.crt", nodes / f"{node_name}.key"
    _ensure_leaf(
        cert,
        key,
        ca_cert,
        ca_key,
        cn=NODE_USER_PREFIX + node_name,
        orgs=[NODES_GROUP],
        client=True,
    )
    kubeconfig = nodes / f"{node_name}.kubeconfig"
    doc = kubeconfig_document(
        server=pki.server_url,
        ca_pem=pki.ca_cert.read_bytes(),
        user=NODE_USER_PREFIX + node_name,
        cert_pem=cert.read_bytes(),
        key_pem=key.read_bytes(),
    )
    write_kubeconfig(kubeconfig, doc)
    return NodeCredentials(cert=cert, key=key, kubeconfig=kubeconfig)
