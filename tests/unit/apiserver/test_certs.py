"""The generated PKI: chains verify, SANs are right, files are private, kubeconfigs load,
and a real TLS handshake on 127.0.0.1 authenticates the admin and a node by certificate."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import ssl
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import NameOID

from kproxy.apiserver import certs
from kproxy.apiserver.authn import (
    AuthenticationError,
    ClientCA,
    TokenFile,
    authenticate,
)
from kproxy.client.errors import Unauthorized
from kproxy.client.kubeconfig import load_kubeconfig
from kproxy.client.rest import PODS, RestClient
from tests.support.tiers import optional_command


def _run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    async def main() -> Any:
        async with asyncio.timeout(timeout):
            return await coro_fn()

    return asyncio.run(main())


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _subject(cert: x509.Certificate) -> tuple[str, list[str]]:
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    orgs = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    return str(cn), [str(o) for o in orgs]


@pytest.fixture
def pki(tmp_path: Path) -> certs.Pki:
    return certs.ensure_pki(
        tmp_path / "data",
        bind_address="10.9.8.7",
        port=6443,
        extra_sans=["192.0.2.10", "api.example.test", "2001:db8::5"],
        advertise_address="127.0.0.1",
    )


def test_chain_verifies_and_subjects(pki: certs.Pki) -> None:
    ca = _cert(pki.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for leaf in (pki.serving_cert, pki.admin_cert):
        _cert(leaf).verify_directly_issued_by(ca)
    assert _subject(_cert(pki.admin_cert)) == ("kproxy-admin", ["system:masters"])
    eku = _cert(pki.admin_cert).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in eku


def test_serving_sans(pki: certs.Pki) -> None:
    ips, dns = certs.cert_sans(_cert(pki.serving_cert))
    want = {"127.0.0.1", "::1", "10.9.8.7", "192.0.2.10", "2001:db8::5"}
    assert {ipaddress.ip_address(a) for a in want} <= ips
    assert {"localhost", "api.example.test", "kubernetes.default.svc"} <= dns


def test_private_files_are_0600(pki: certs.Pki) -> None:
    for path in (pki.ca_key, pki.serving_key, pki.admin_key, pki.token_file, pki.admin_kubeconfig):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(pki.ca_cert.parent.stat().st_mode) == 0o700


def test_idempotent(pki: certs.Pki) -> None:
    before = {p: p.read_bytes() for p in pki.ca_cert.parent.iterdir() if p.is_file()}
    again = certs.ensure_pki(
        pki.data_dir,
        bind_address="10.9.8.7",
        extra_sans=["192.0.2.10", "api.example.test", "2001:db8::5"],
        advertise_address="127.0.0.1",
    )
    after = {p: p.read_bytes() for p in pki.ca_cert.parent.iterdir() if p.is_file()}
    assert before == after
    assert again.admin_token == pki.admin_token


def test_new_san_reissues_serving_cert_but_keeps_ca(pki: certs.Pki) -> None:
    ca_before = pki.ca_cert.read_bytes()
    serving_before = pki.serving_cert.read_bytes()
    admin_before = pki.admin_cert.read_bytes()
    certs.ensure_pki(pki.data_dir, bind_address="10.9.8.7", extra_sans=["198.51.100.1"])
    assert pki.ca_cert.read_bytes() == ca_before
    assert pki.admin_cert.read_bytes() == admin_before
    assert pki.serving_cert.read_bytes() != serving_before
    ips, _ = certs.cert_sans(_cert(pki.serving_cert))
    assert ipaddress.ip_address("198.51.100.1") in ips
    _cert(pki.serving_cert).verify_directly_issued_by(_cert(pki.ca_cert))


def test_half_a_ca_is_refused(pki: certs.Pki) -> None:
    pki.ca_key.unlink()
    with pytest.raises(certs.CertError, match="only one of"):
        certs.ensure_pki(pki.data_dir)


def test_token_file_parses_with_authn(pki: certs.Pki) -> None:
    tokens = TokenFile.load(pki.token_file)
    user = tokens.lookup(pki.admin_token)
    assert user is not None
    assert (user.name, user.groups) == ("kproxy-admin", ("system:masters",))


def test_node_credentials(pki: certs.Pki) -> None:
    node = certs.ensure_node_credentials(pki, "n1")
    leaf = _cert(node.cert)
    leaf.verify_directly_issued_by(_cert(pki.ca_cert))
    assert _subject(leaf) == ("system:node:n1", ["system:nodes"])
    assert stat.S_IMODE(node.key.stat().st_mode) == 0o600
    cfg = load_kubeconfig(node.kubeconfig)
    assert cfg.server == pki.server_url
    # Idempotent per node.
    before = node.cert.read_bytes()
    assert certs.ensure_node_credentials(pki, "n1").cert.read_bytes() == before
    with pytest.raises(certs.CertError):
        certs.ensure_node_credentials(pki, "../evil")


def test_kubeconfig_round_trip(pki: certs.Pki) -> None:
    doc = yaml.safe_load(pki.admin_kubeconfig.read_text())
    assert doc["current-context"] == "kproxy-admin@kproxy"
    cfg = load_kubeconfig(pki.admin_kubeconfig)
    assert cfg.server == "https://127.0.0.1:6443"
    assert cfg.ssl_context is not None
    assert cfg.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert "Authorization" not in cfg.headers

    token_pki = certs.ensure_pki(
        pki.data_dir, bind_address="10.9.8.7", advertise_address="127.0.0.1", admin_auth="token"
    )
    cfg = load_kubeconfig(token_pki.admin_kubeconfig)
    assert cfg.headers["Authorization"] == f"Bearer {pki.admin_token}"


def test_ipv6_server_url() -> None:
    assert certs.server_url("::1", 6443) == "https://[::1]:6443"
    assert certs.server_url("localhost", 1) == "https://localhost:1"


# ---------------------------------------------------------------- live TLS


def _server_context(pki: certs.Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.serving_cert, pki.serving_key)
    # Optional, as kube-apiserver: a token or anonymous request has no cert.
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cafile=str(pki.client_ca_file))
    return ctx


async def _serve_whoami(pki: certs.Pki, body: Callable[[int], Awaitable[None]]) -> None:
    client_ca = ClientCA.load(pki.client_ca_file)
    tokens = TokenFile.load(pki.token_file)

    async def whoami(request: web.Request) -> web.Response:
        ssl_obj = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        try:
            user = authenticate(request.headers, der, tokens=tokens, client_ca=client_ca)
        except AuthenticationError as exc:
            return web.json_response(
                {"kind": "Status", "code": 401, "reason": "Unauthorized", "message": str(exc)},
                status=401,
            )
        return web.json_response(
            {"kind": "Pod", "metadata": {"name": user.name}, "groups": list(user.groups)}
        )

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/default/pods/whoami", whoami)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=_server_context(pki))
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        await body(port)
    finally:
        await runner.cleanup()


def _config_for(path: Path, port: int) -> Any:
    return load_kubeconfig(path, master=f"https://127.0.0.1:{port}")


def test_tls_handshake_admin_by_certificate(pki: certs.Pki) -> None:
    async def body(port: int) -> None:
        async with RestClient(_config_for(pki.admin_kubeconfig, port)) as client:
            me = await client.get(PODS, "whoami", "default")
        assert me["metadata"]["name"] == "kproxy-admin"
        assert me["groups"] == ["system:masters", "system:authenticated"]

    _run(lambda: _serve_whoami(pki, body))


def test_tls_handshake_node_and_token(pki: certs.Pki) -> None:
    node = certs.ensure_node_credentials(pki, "worker-1")
    token_kc = pki.data_dir / "token.kubeconfig"
    doc = certs.kubeconfig_document(
        server="https://127.0.0.1:1",
        ca_pem=pki.ca_cert.read_bytes(),
        user="t",
        token=pki.admin_token,
    )
    certs.write_kubeconfig(token_kc, doc)
    bad = dict(doc, users=[{"name": "t", "user": {"token": "nope"}}])
    bad_kc = pki.data_dir / "bad.kubeconfig"
    certs.write_kubeconfig(bad_kc, bad)

    async def body(port: int) -> None:
        async with RestClient(_config_for(node.kubeconfig, port)) as client:
            me = await client.get(PODS, "whoami", "default")
        assert me["metadata"]["name"] == "system:node:worker-1"
        assert me["groups"][0] == "system:nodes"
        async with RestClient(_config_for(token_kc, port)) as client:
            me = await client.get(PODS, "whoami", "default")
        assert me["metadata"]["name"] == "kproxy-admin"
        async with RestClient(_config_for(bad_kc, port)) as client:
            with pytest.raises(Unauthorized):
                await client.get(PODS, "whoami", "default")

    _run(lambda: _serve_whoami(pki, body))


def test_foreign_and_expired_certificates_rejected(pki: certs.Pki, tmp_path: Path) -> None:
    client_ca = ClientCA.load(pki.client_ca_file)
    other_ca, other_key = certs.make_ca("someone-else")
    foreign, _ = certs.issue(
        other_ca, other_key, cn="kproxy-admin", orgs=["system:masters"], client=True
    )
    with pytest.raises(AuthenticationError, match="unknown authority"):
        authenticate({}, foreign, client_ca=client_ca)
    admin = _cert(pki.admin_cert)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=certs.LEAF_DAYS + 1)
    with pytest.raises(AuthenticationError, match="expired"):
        authenticate({}, admin, client_ca=client_ca, now=later)
    # A serving-only cert is not a client cert.
    with pytest.raises(AuthenticationError, match="key usage"):
        authenticate({}, _cert(pki.serving_cert), client_ca=client_ca)


@pytest.mark.clients
def test_kubectl_accepts_the_generated_pki(pki: certs.Pki, tmp_path: Path) -> None:
    """Go's crypto/x509 is stricter than OpenSSL: kubectl must trust our certs too."""
    optional_command("kubectl")
    node = certs.ensure_node_credentials(pki, "n1")

    async def kubectl(kubeconfig: Path, port: int) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            "kubectl",
            f"--kubeconfig={kubeconfig}",
            f"--server=https://127.0.0.1:{port}",
            f"--cache-dir={tmp_path / 'cache'}",
            "get",
            "--raw",
            "/api/v1/namespaces/default/pods/whoami",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        result: dict[str, Any] = json.loads(out)
        return result

    async def body(port: int) -> None:
        me = await kubectl(pki.admin_kubeconfig, port)
        assert me["metadata"]["name"] == "kproxy-admin"
        me = await kubectl(node.kubeconfig, port)
        assert me["metadata"]["name"] == "system:node:n1"

    _run(lambda: _serve_whoami(pki, body), timeout=60)
